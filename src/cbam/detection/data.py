"""Detection data: COCO-format json + image folder, Pascal VOC XML, and the synthetic set,
all checked up front and served in torchvision's target format.

Every source becomes a COCO-format dict first (VOC's XML is read with torchvision's
VOCDetection parser), which is checked once: images whose files are missing, annotations
that name an unknown image or category, boxes that are malformed, have zero area or lie
outside their image. Each problem is either skipped and counted (a warning names the counts
and examples) or, with strict=True, an error. Boxes that only cross the border are clipped to
it, and counted. The cleaned dict is indexed with pycocotools, and the same cleaned ground
truth is what COCOeval scores against, so skipped items never count as misses.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError
from xml.etree.ElementTree import parse as parse_xml

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import VOCDetection
from torchvision.transforms import v2

from cbam.data.datasets import SeededTransform, open_rgb
from cbam.detection.config import DetectConfig
from cbam.detection.synthetic import ensure_synthetic, synthetic_spec

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
DEFAULT_SPLITS = {
    "synthetic": ("train", "test"),
    "coco": ("train2017", "val2017"),
    "voc": ("trainval", "test"),
}
# What each problem is, as a warning or error shows it.
PROBLEMS = {
    "missing_image": "images listed in the annotation file whose file is missing",
    "unreadable_image": "images without width/height in the json whose file cannot be read",
    "unreadable_annotation": "VOC annotation files that are missing or not valid XML",
    "unknown_image": "annotations whose image_id is not in the images list",
    "unknown_category": "annotations whose category is not in the categories list",
    "bad_box": "annotations whose bbox is not 4 finite numbers [x, y, width, height]",
    "zero_area": "boxes with zero (or negative) width or height",
    "outside_image": "boxes that lie entirely outside their image",
    "clipped": "boxes that cross the image border (clipped to it and kept)",
}
_EXAMPLES = 3


@dataclass
class DataReport:
    """What checking one annotation file found: counts and a few examples per problem."""

    source: str
    images: int = 0  # kept
    annotations: int = 0  # kept
    skipped_images: int = 0
    skipped_annotations: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)  # kind -> every example

    def add(self, kind: str, example: str) -> None:
        self.problems.setdefault(kind, []).append(example)

    def describe(self) -> str:
        """One line per kind of problem: count, meaning, examples."""
        lines = []
        for kind, examples in self.problems.items():
            shown = "; ".join(examples[:_EXAMPLES]) + ("; ..." if len(examples) > _EXAMPLES else "")
            lines.append(f"  {len(examples)} {PROBLEMS[kind]} (e.g. {shown})")
        return "\n".join(lines)

    def summary(self) -> str:
        return (
            f"{self.source}: {self.images} images, {self.annotations} annotations kept; "
            f"skipped {self.skipped_images} images and {self.skipped_annotations} annotations"
        )


def read_coco_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A COCO instances file, with an error that says what is wrong with an unusable one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"annotation file {path} not found; COCO-format data needs "
            f"DATA_DIR/annotations/instances_SPLIT.json next to the image folder DATA_DIR/SPLIT/"
        )
    if path.stat().st_size == 0:
        raise ValueError(
            f"annotation file {path} is empty (0 bytes); it must be COCO instances json with "
            f"'images', 'annotations' and 'categories' lists"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from None
    return data


def clean_coco(
    data: dict[str, Any],
    image_root: str | os.PathLike[str],
    source: str,
    strict: bool = False,
    report: DataReport | None = None,
) -> tuple[dict[str, Any], DataReport]:
    """Check a COCO-format dict against its image folder; return the usable part and a
    report (`report`: one holding what reading the files found already). strict=True turns
    any skipped or clipped item into a ValueError."""
    _check_structure(data, source)
    root = Path(image_root)
    report = report or DataReport(source)
    category_ids = {c["id"] for c in data["categories"]}
    images: dict[Any, dict[str, Any]] = {}
    for image in data["images"]:
        if image.get("id") in images:
            raise ValueError(
                f"{source}: image id {image.get('id')!r} appears twice in 'images'; ids must "
                f"be unique"
            )
        path = root / str(image.get("file_name", ""))
        name = f"{image.get('file_name')!r} (id {image.get('id')})"
        images[image.get("id")] = {}  # until its file is found: its annotations go with it
        if not path.is_file():
            report.add("missing_image", name)
            continue
        if "width" not in image or "height" not in image:
            try:
                with Image.open(path) as im:  # reads the header only
                    image = {**image, "width": im.width, "height": im.height}
            except (OSError, UnidentifiedImageError) as error:
                report.add("unreadable_image", f"{name}: {error}")
                continue
        images[image["id"]] = image
    annotations = []
    for ann in data["annotations"]:
        kept = _clean_annotation(ann, images, category_ids, report)
        if kept is not None:
            annotations.append(kept)
    kept_images = [im for im in images.values() if im]
    report.images, report.annotations = len(kept_images), len(annotations)
    report.skipped_images += len(images) - len(kept_images)
    report.skipped_annotations = len(data["annotations"]) - len(annotations)
    if report.problems:
        details = report.describe()
        if strict:
            raise ValueError(
                f"{source} has problems:\n{details}\nFix the annotation file or the image "
                f"folder, or run without --strict to skip these and count them"
            )
        warnings.warn(f"{report.summary()}:\n{details}", stacklevel=2)
    if not annotations:
        details = f":\n{report.describe()}" if report.problems else ""
        raise ValueError(
            f"{source}: no usable annotations ({len(data['annotations'])} in the file); "
            f"nothing to train on or evaluate{details}"
        )
    cleaned = {**data, "images": kept_images, "annotations": annotations}
    return cleaned, report


def _check_structure(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"{source} has no {key!r} list; COCO instances json needs 'images', "
                f"'annotations' and 'categories'"
            )
    if not data["images"]:
        raise ValueError(f"{source} lists no images; nothing to train on or evaluate")
    if not data["annotations"]:
        raise ValueError(
            f"{source} has no annotations; a detection set needs boxes (COCO instances "
            f"json: one entry per object with image_id, category_id and bbox)"
        )
    if not data["categories"] or not all(
        isinstance(c, dict) and "id" in c for c in data["categories"]
    ):
        raise ValueError(
            f"{source}: 'categories' must list {{'id': ..., 'name': ...}} entries, got "
            f"{data['categories'][:3]!r}"
        )


def _clean_annotation(
    ann: dict[str, Any], images: dict[Any, dict[str, Any]], category_ids: set[Any],
    report: DataReport,
) -> dict[str, Any] | None:  # fmt: skip
    """The annotation, its box clipped to the image, or None if it must be skipped."""
    name = f"annotation {ann.get('id')}"
    image = images.get(ann.get("image_id"))
    if image is None:
        report.add("unknown_image", f"{name} -> image {ann.get('image_id')!r}")
        return None
    if not image:
        return None  # its image file is missing, already reported
    if ann.get("category_id") not in category_ids:
        report.add("unknown_category", f"{name}: category {ann.get('category_id')!r}")
        return None
    box = ann.get("bbox")
    if (
        not isinstance(box, list | tuple)
        or len(box) != 4
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in box)
    ):
        report.add("bad_box", f"{name}: bbox {box!r}")
        return None
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        report.add("zero_area", f"{name}: bbox {list(box)}")
        return None
    width, height = float(image["width"]), float(image["height"])
    where = f"{name}: bbox {list(box)} in a {image['width']}x{image['height']} image"
    area = ann.get("area") or w * h  # COCO's is the mask's area; COCOeval sizes by it
    if x < 0 or y < 0 or x + w > width or y + h > height:
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            report.add("outside_image", where)
            return None
        report.add("clipped", where)
        x, y, w, h = x0, y0, x1 - x0, y1 - y0
        area = w * h
    return {**ann, "bbox": [x, y, w, h], "area": area, "iscrowd": int(ann.get("iscrowd", 0))}


def voc_as_coco(
    data_dir: str | os.PathLike[str], year: str, split: str
) -> tuple[dict[str, Any], Path, DataReport]:
    """A Pascal VOC split (VOCdevkit/VOC{year} under data_dir) as a COCO-format dict, its
    image folder, and a report of the XML files that could not be read. Boxes become
    continuous pixel coordinates ([xmin - 1, ymin - 1] to [xmax, ymax]); 'difficult' objects
    become crowd regions, which training skips and COCOeval and VOC07 evaluation ignore, as
    VOC's devkit does."""
    try:
        voc = VOCDetection(str(data_dir), year=year, image_set=split, download=False)
    except (RuntimeError, FileNotFoundError, ValueError):
        raise ValueError(
            f"Pascal VOC {year} {split!r} not found under {data_dir}: expected "
            f"{data_dir}/VOCdevkit/VOC{year}/ with Annotations/, JPEGImages/ and "
            f"ImageSets/Main/{split}.txt (splits: train, val, trainval; test for 2007)"
        ) from None
    report = DataReport(f"VOC{year} {split} in {data_dir}")
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(VOC_CLASSES)]
    category_of = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for index, (image_path, xml_path) in enumerate(zip(voc.images, voc.annotations, strict=True)):
        try:
            parsed = VOCDetection.parse_voc_xml(parse_xml(xml_path).getroot())["annotation"]
            size = parsed["size"]
            width, height = int(size["width"]), int(size["height"])
        except (OSError, ParseError, KeyError, TypeError, ValueError) as error:
            report.add("unreadable_annotation", f"{Path(xml_path).name}: {error}")
            report.skipped_images += 1
            continue
        image_id = index + 1
        images.append({"id": image_id, "file_name": Path(image_path).name, "width": width,
                       "height": height})  # fmt: skip
        for obj in parsed.get("object", []):
            box = obj.get("bndbox", {})
            try:
                xmin, ymin, xmax, ymax = (float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                bbox: Any = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            except (KeyError, TypeError, ValueError):
                bbox = box  # reported as a bad box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": category_of.get(obj.get("name"), obj.get("name")),
                "bbox": bbox, "iscrowd": int(obj.get("difficult", "0") == "1"),
            })  # fmt: skip
    data = {"images": images, "annotations": annotations, "categories": categories}
    return data, Path(data_dir) / "VOCdevkit" / f"VOC{year}" / "JPEGImages", report


def coco_index(data: dict[str, Any]) -> COCO:
    """pycocotools' index of an in-memory COCO dict (without its progress prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def first_images(data: dict[str, Any], n: int | None) -> dict[str, Any]:
    """The first n images (by id) and their annotations."""
    if n is None:
        return data
    keep = sorted(im["id"] for im in data["images"])[:n]
    ids = set(keep)
    return {
        **data,
        "images": [im for im in data["images"] if im["id"] in ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
    }


class CocoDetection(Dataset):
    """Images (RGB) and torchvision detection targets from a cleaned COCO dict.

    Targets: boxes (x0, y0, x1, y1 in pixels, as tv_tensors so transforms move them), labels
    (1..K, 0 is the background), image_id. With train=True crowd / VOC-difficult regions are
    left out, as torchvision's references do; evaluation keeps them as ignore regions."""

    def __init__(
        self, coco: COCO, image_root: Path, labels: dict[int, int], train: bool,
        strict: bool = False,
    ) -> None:  # fmt: skip
        self.coco = coco
        self.image_root = image_root
        self.labels = labels
        self.train = train
        self.strict = strict
        self.ids = sorted(coco.imgs)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Image.Image, dict[str, Any]] | None:
        info = self.coco.imgs[self.ids[index]]
        image = open_rgb(self.image_root / info["file_name"], self.strict)
        if image is None:
            return None
        anns = [a for a in self.coco.imgToAnns[info["id"]] if not (self.train and a["iscrowd"])]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x0, y0, x1, y1
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes, format="XYXY", canvas_size=(image.height, image.width)
            ),
            "labels": torch.tensor(
                [self.labels[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "image_id": info["id"],
        }
        return image, target


class SeededDetectionTransform(SeededTransform):
    """SeededTransform for (image, target) pairs: a flip moves the boxes with the image."""

    def apply(self, item: Any) -> Any:
        return self.transform(*item)


def detection_transforms(train: bool, flip: bool) -> v2.Compose:
    """To a float tensor in [0, 1] (the detector normalises), with a random horizontal flip
    for training."""
    steps: list[v2.Transform] = [v2.ToImage()]
    if train and flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def collate_detection(
    batch: Sequence[Any],
) -> tuple[list[torch.Tensor], list[dict[str, Any]], int]:
    """Images and targets as lists (sizes differ), plain tensors, plus how many samples were
    unreadable and skipped."""
    kept = [item for item in batch if item is not None]
    images = [image.as_subclass(torch.Tensor) for image, _ in kept]
    targets = [{**target, "boxes": target["boxes"].as_subclass(torch.Tensor)} for _, target in kept]
    return images, targets, len(batch) - len(kept)


@dataclass
class DetectionData:
    """Train and test splits, the cleaned test ground truth for COCOeval, and what checking
    the files found."""

    train: SeededDetectionTransform | None
    test: SeededDetectionTransform
    test_coco: COCO
    categories: list[dict[str, Any]]  # sorted by id; label i + 1 is categories[i]
    reports: list[DataReport]

    @property
    def num_classes(self) -> int:
        """Object classes plus the background, as torchvision's detectors count them."""
        return len(self.categories) + 1

    @property
    def category_ids(self) -> list[int]:
        """The category id of each label: label L is category_ids[L - 1]."""
        return [c["id"] for c in self.categories]

    @property
    def skipped_images(self) -> int:
        return sum(r.skipped_images for r in self.reports)

    @property
    def skipped_annotations(self) -> int:
        return sum(r.skipped_annotations for r in self.reports)


def _load_split(config: DetectConfig, split: str) -> tuple[dict[str, Any], Path, DataReport]:
    """One split of the configured data set, checked and cleaned: (data, images, report)."""
    report = None
    if config.dataset == "voc":
        if config.data_dir is None:
            raise ValueError("voc needs --data-dir: the folder that holds VOCdevkit/")
        data, image_root, report = voc_as_coco(config.data_dir, config.voc_year, split)
        source = report.source
    else:
        if config.dataset == "synthetic":
            root = ensure_synthetic(synthetic_spec(config.synthetic), config.data_dir)
        elif config.data_dir is None:
            raise ValueError(
                "coco needs --data-dir: a folder with annotations/instances_SPLIT.json and "
                "the images in SPLIT/ (COCO 2017's layout)"
            )
        else:
            root = Path(config.data_dir)
        source = str(root / "annotations" / f"instances_{split}.json")
        data, image_root = read_coco_json(source), root / split
    cleaned, report = clean_coco(data, image_root, source, config.strict, report)
    return cleaned, image_root, report


def build_detection_data(config: DetectConfig, train: bool = True) -> DetectionData:
    """The configured data set's splits (train=False: the test split only, for evaluation)."""
    default_train, default_test = DEFAULT_SPLITS[config.dataset]
    test_data, test_root, test_report = _load_split(config, config.test_split or default_test)
    test_data = first_images(test_data, config.test_subset)
    categories = sorted(test_data["categories"], key=lambda c: c["id"])
    labels = {c["id"]: i + 1 for i, c in enumerate(categories)}
    test_coco = coco_index(test_data)
    reports = [test_report]
    train_set = None
    if train:
        train_data, train_root, train_report = _load_split(
            config, config.train_split or default_train
        )
        reports.insert(0, train_report)
        if sorted(c["id"] for c in train_data["categories"]) != sorted(labels):
            raise ValueError(
                f"{train_report.source} and {test_report.source} list different categories; "
                f"train and test must share one category list"
            )
        train_coco = coco_index(first_images(train_data, config.train_subset))
        train_set = SeededDetectionTransform(
            CocoDetection(train_coco, train_root, labels, train=True, strict=config.strict),
            detection_transforms(True, config.flip),
            config.seed,
        )
    test_set = SeededDetectionTransform(
        CocoDetection(test_coco, test_root, labels, train=False, strict=config.strict),
        detection_transforms(False, config.flip),
        config.seed,
    )
    return DetectionData(train_set, test_set, test_coco, categories, reports)
