"""Detection: COCOeval / VOC07 on hand-made boxes, the synthetic set, the detector, training,
resume, evaluation of a saved run, the CLI, and bad annotation files (CPU, seconds each)."""

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file

from cbam.cli import main
from cbam.detection import (
    COCO_STATS,
    SyntheticSpec,
    build_backbone,
    build_detection_data,
    build_detector,
    clean_coco,
    coco_metrics,
    collate_detection,
    detector_from_config,
    ensure_synthetic,
    evaluate_detection_run,
    load_detect_config,
    read_coco_json,
    train_detector,
    voc07_map,
    voc_as_coco,
)
from cbam.detection.data import coco_index
from cbam.interop import CheckpointError
from cbam.models import create_model

# ---- metrics on hand-made ground truth ------------------------------------------------------


def ground_truth(boxes: dict[int, list[list[float]]], crowd: dict[int, list[bool]] | None = None):
    """A COCO index of category-1 boxes [x, y, w, h] per image id, on 200 x 200 images."""
    crowd = crowd or {}
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in boxes]
    annotations = [
        {"id": len(boxes) * 100 + i * 10 + j, "image_id": i, "category_id": 1, "bbox": box,
         "area": box[2] * box[3], "iscrowd": int(crowd.get(i, [False] * 9)[j])}
        for i, image_boxes in boxes.items() for j, box in enumerate(image_boxes)
    ]  # fmt: skip
    return coco_index(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}
    )


def det(image_id: int, box: list[float], score: float = 0.9) -> dict:
    return {"image_id": image_id, "category_id": 1, "bbox": box, "score": score}


MEDIUM = [10.0, 10.0, 40.0, 40.0]  # area 1600: COCO's "medium" (32^2 .. 96^2)


def test_cocoeval_perfect_predictions_score_one():
    small, large = [100.0, 100.0, 20.0, 20.0], [0.0, 60.0, 120.0, 120.0]
    gt = ground_truth({1: [MEDIUM, small], 2: [large]})
    stats = coco_metrics(gt, [det(1, MEDIUM), det(1, small), det(2, large)])
    assert set(stats) == set(COCO_STATS)
    for name in ("mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large", "AR_100"):
        assert stats[name] == pytest.approx(1.0), name
    assert voc07_map(gt, [det(1, MEDIUM), det(1, small), det(2, large)]) == pytest.approx(1.0)


def test_cocoeval_shifted_box_counts_only_at_thresholds_its_iou_passes():
    gt = ground_truth({1: [MEDIUM]})
    # 8 px to the right: overlap 32 x 40 = 1280, union 1920, IoU 2/3. It passes the IoU
    # thresholds .50, .55, .60, .65 of the ten in .50:.05:.95, so AP is 1 at four of them.
    shifted = coco_metrics(gt, [det(1, [18.0, 10.0, 40.0, 40.0])])
    assert shifted["mAP"] == pytest.approx(0.4)
    assert shifted["mAP_50"] == pytest.approx(1.0) and shifted["mAP_75"] == pytest.approx(0.0)
    assert shifted["mAP_medium"] == pytest.approx(0.4)
    assert shifted["mAP_small"] == -1 and shifted["mAP_large"] == -1  # no GT of those sizes
    assert voc07_map(gt, [det(1, [18.0, 10.0, 40.0, 40.0])]) == pytest.approx(1.0)
    # 20 px: IoU 800 / 2400 = 1/3, below every threshold: a false positive and a miss.
    far = [det(1, [30.0, 10.0, 40.0, 40.0])]
    assert coco_metrics(gt, far)["mAP"] == pytest.approx(0.0)
    assert voc07_map(gt, far) == pytest.approx(0.0)


def test_cocoeval_missing_box_and_no_detections():
    gt = ground_truth({1: [MEDIUM], 2: [[100.0, 100.0, 50.0, 50.0]]})
    one_of_two = [det(1, MEDIUM)]
    stats = coco_metrics(gt, one_of_two)
    # Recall reaches 0.5 at precision 1: COCO's 101-point interpolation has 51 recall points
    # in [0, 0.5], VOC07's 11-point one has 6.
    assert stats["mAP"] == pytest.approx(51 / 101)
    assert stats["mAP_50"] == pytest.approx(51 / 101)
    assert stats["AR_100"] == pytest.approx(0.5)
    assert voc07_map(gt, one_of_two) == pytest.approx(6 / 11)
    assert coco_metrics(gt, [])["mAP"] == 0.0


def test_voc07_ignores_difficult_boxes_and_counts_duplicates_as_false_positives():
    gt = ground_truth({1: [MEDIUM, [100.0, 100.0, 50.0, 50.0]]}, crowd={1: [False, True]})
    on_difficult = [det(1, MEDIUM, 0.9), det(1, [100.0, 100.0, 50.0, 50.0], 0.95)]
    assert voc07_map(gt, on_difficult) == pytest.approx(1.0)
    assert coco_metrics(gt, on_difficult)["mAP"] == pytest.approx(1.0)
    duplicate = [det(1, MEDIUM, 0.9), det(1, MEDIUM, 0.95)]
    assert voc07_map(gt, duplicate) == pytest.approx(1.0)  # the FP ranks after the TP
    duplicate_first = [det(1, [10.0, 10.0, 40.0, 41.0], 0.99), det(1, MEDIUM, 0.5)]
    # The higher-scored one takes the box; the other is a false positive after it.
    assert voc07_map(gt, duplicate_first) == pytest.approx(1.0)


# ---- config ----------------------------------------------------------------------------------


def test_recipes_and_the_multistep_schedule():
    from cbam.training.trainer import lr_factor

    coco = load_detect_config("coco")
    assert (coco.backbone, coco.min_size, coco.batch_size, coco.step_epochs) == (
        "resnet50",
        800,
        16,
        [8, 11],
    )
    factors = [lr_factor(e * 100, 100, coco) for e in (0, 7, 8, 10, 11)]
    assert factors == pytest.approx([0.1, 1.0, 0.1, 0.1, 0.01])  # warm-up starts at 1/10
    with pytest.raises(ValueError, match=r"pass a path or one of the recipes: small, coco, voc"):
        load_detect_config("imagenet")
    with pytest.raises(ValueError, match=r"unknown config key 'anchor_size'.*'anchor_sizes'"):
        load_detect_config("small", {"anchor_size": [8]})
    with pytest.raises(ValueError, match=r"unknown detection backbone 'resnet5'"):
        load_detect_config("small", {"backbone": "resnet5"})
    with pytest.raises(ValueError, match=r"step_epochs must be a positive integer or a list"):
        load_detect_config("small", {"step_epochs": [8, 0]})


# ---- the synthetic set ----------------------------------------------------------------------

TINY_SPEC = {"canvas": 64, "train_images": 8, "test_images": 4, "min_scale": 0.7, "max_scale": 1.5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("detection-data")


def test_synthetic_set_is_deterministic_and_well_formed(data_dir, tmp_path):
    spec = SyntheticSpec(**TINY_SPEC)
    root = ensure_synthetic(spec, data_dir)
    assert root.name == spec.key and ensure_synthetic(spec, data_dir) == root  # reused
    again = ensure_synthetic(spec, tmp_path)
    for name in ("annotations/instances_train.json", "annotations/instances_test.json",
                 "train/000000.png", "test/000003.png"):  # fmt: skip
        assert (root / name).read_bytes() == (again / name).read_bytes(), name
    train = read_coco_json(root / "annotations" / "instances_train.json")
    assert len(train["images"]) == 8 and len(train["categories"]) == 10
    assert train["categories"][9]["name"] == "Ankle boot"
    per_image = {im["id"]: 0 for im in train["images"]}
    for ann in train["annotations"]:
        x, y, w, h = ann["bbox"]
        assert min(x, y) >= 0 and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
        per_image[ann["image_id"]] += 1
    assert all(1 <= n <= 5 for n in per_image.values()) and sum(per_image.values()) > 8
    # The box is tight: the pixels on its border rows/columns are not all zero.
    image = torch.from_numpy(np.array(Image.open(root / "train" / "000000.png")))
    x, y, w, h = next(a["bbox"] for a in train["annotations"] if a["image_id"] == 1)
    for edge in (image[y, x : x + w], image[y + h - 1, x : x + w], image[y : y + h, x],
                 image[y : y + h, x + w - 1]):  # fmt: skip
        assert edge.any()
    # The first images do not depend on how many are made.
    longer = ensure_synthetic(SyntheticSpec(**{**TINY_SPEC, "train_images": 9}), tmp_path)
    assert (longer / "train/000007.png").read_bytes() == (root / "train/000007.png").read_bytes()
    with pytest.raises(ValueError, match=r"unknown argument\(s\) 'canvass'"):
        build_detection_data(load_detect_config("small", {"synthetic": {"canvass": 3}}))


# ---- the detector ---------------------------------------------------------------------------


def tiny(data_dir: Path, output: Path, **overrides) -> object:
    return load_detect_config("small", {
        "synthetic": TINY_SPEC, "data_dir": str(data_dir), "min_size": 64, "max_size": 64,
        "anchor_sizes": [8, 16, 32, 64, 128], "batch_size": 4, "epochs": 1, "log_every": 1,
        "warmup_epochs": 0, "output": str(output), **overrides,
    })  # fmt: skip


def test_resnet_stages_feed_the_fpn():
    model = create_model("resnet18", attention="cbam").eval()
    x = torch.randn(1, 3, 64, 64)
    stages = model.forward_stages(x)
    assert [s.shape[1] for s in stages] == [i["num_chs"] for i in model.feature_info]
    assert torch.equal(stages[-1], model.forward_features(x))
    detector = build_detector("resnet18", "cbam", 3, min_size=64, max_size=64,
                              fpn_channels=32, representation_size=32).eval()  # fmt: skip
    out = detector([torch.rand(3, 64, 80)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
    with pytest.raises(ValueError, match=r"one size per FPN level: resnet18 gives 5 levels"):
        build_detector("resnet18", None, 3, anchor_sizes=(32, 64))
    with pytest.raises(ValueError, match=r"ResNet-family models .*'mobilenet_v1'"):
        build_detector("mobilenet_v1", None, 3)
    with pytest.raises(ValueError, match=r"counts the background"):
        build_detector("resnet18", None, 1)


def test_backbone_weights_from_torchvision_ours_and_the_wrong_model():
    import torchvision

    tv = torchvision.models.resnet18().state_dict()
    backbone = build_backbone("resnet18", "cbam", weights=tv, out_channels=32)
    body = backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, tv["layer3.0.conv1.weight"])
    assert backbone.frozen_bn and backbone.trainable_layers == 3  # torchvision's defaults
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"
    assert type(body.layer1[0].attention.spatial.bn).__name__ == "BatchNorm2d"  # not frozen
    trained = {n for n, p in body.named_parameters() if p.requires_grad}
    assert "layer4.0.conv1.weight" in trained and "layer1.0.conv1.weight" not in trained
    assert "layer1.0.attention.channel.mlp.0.weight" in trained  # attention always trains
    assert not any(n.startswith("fc.") for n, _ in body.named_parameters())
    # Our own checkpoint with a 10-class head: the head is dropped, the rest loads.
    ours = create_model("resnet18", attention="se", num_classes=10).state_dict()
    loaded = build_backbone("resnet18", "se", weights=ours, trainable_layers=5, frozen_bn=False)
    assert torch.equal(loaded.body.conv1.weight, ours["conv1.weight"])
    assert all(p.requires_grad for p in loaded.body.parameters())
    with pytest.raises(CheckpointError, match=r"does not fit"):
        build_backbone("resnet18", None, weights=torchvision.models.resnet34().state_dict())


def test_a_few_steps_lower_the_loss_on_the_default_set(tmp_path):
    """The small recipe's detector on canvases drawn like the default set's (128 px)."""
    config = load_detect_config("small", {
        "synthetic": {"train_images": 8, "test_images": 2}, "data_dir": str(tmp_path),
    })  # fmt: skip
    data = build_detection_data(config)
    assert data.num_classes == 11
    images, targets, skipped = collate_detection([data.train[i] for i in range(4)])
    assert skipped == 0 and images[0].shape == (3, 128, 128)
    torch.manual_seed(0)
    model = detector_from_config(config, data.num_classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same anchor / proposal sampling every time
        return sum(model(images, targets).values())

    before = loss().item()
    for _ in range(4):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * before


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_run_and_eval_reproduces_the_logged_map(data_dir, tmp_path):
    result = train_detector(tiny(data_dir, tmp_path / "run", epochs=2))
    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "last.safetensors", "best.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    logged = rows(run)
    assert [int(r["step"]) for r in logged] == [2, 4]  # 8 images / batch 4
    assert int(logged[0]["skipped_images"]) == 0 and int(logged[0]["skipped_annotations"]) == 0
    saved = (run / "config.yaml").read_text()
    assert "frozen_bn: false" in saved and "trainable_layers: 5" in saved  # resolved
    metrics, _ = evaluate_detection_run(run, "last")
    assert metrics.detections > 0 and metrics.images == 4
    for name in COCO_STATS:
        assert metrics.coco[name] == pytest.approx(float(logged[-1][name]), abs=1e-12), name
    assert metrics.voc07_map50 == pytest.approx(float(logged[-1]["voc07_mAP_50"]), abs=1e-12)
    assert result.best_map == max(float(r["mAP"]) for r in logged)


def test_resume_after_interrupt_is_bit_identical(data_dir, tmp_path):
    options = {"epochs": 2, "batch_size": 2}
    straight = train_detector(tiny(data_dir, tmp_path / "straight", **options))

    def interrupt(step: int, model: torch.nn.Module) -> None:
        if step == 3:  # mid-epoch 1 of 4 steps
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train_detector(tiny(data_dir, tmp_path / "stopped", **options), on_step=interrupt)
    assert stopped.interrupted and not (stopped.run_dir / "metrics.csv").exists()
    resumed = train_detector(load_detect_config(None), resume=stopped.run_dir)
    assert not resumed.interrupted
    a = load_file(str(straight.run_dir / "last.safetensors"))
    b = load_file(str(resumed.run_dir / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    columns = ("epoch", "step", "train_loss", "loss_classifier", "mAP", "voc07_mAP_50")
    assert [[r[c] for c in columns] for r in rows(resumed.run_dir)] == [
        [r[c] for c in columns] for r in rows(straight.run_dir)
    ]
    with pytest.raises(ValueError, match=r"already finished all 2 epochs"):
        train_detector(load_detect_config(None), resume=resumed.run_dir)


def _ddp_worker(rank: int, world: int, port: int, config, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    result = train_detector(config)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


def test_two_process_gloo_training_agrees_across_ranks(data_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny(data_dir, tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, port, config, str(tmp_path)), nprocs=2, join=True)
    run = tmp_path / "ddp"
    saved = load_file(str(run / "last.safetensors"))
    for rank in (0, 1):
        other = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert all(torch.equal(saved[k], other[k]) for k in saved)
    logged = rows(run)
    assert len(logged) == 1 and int(logged[0]["step"]) == 2  # 8 images / global batch 4
    metrics, _ = evaluate_detection_run(run, "last")  # one process, all 4 test images
    assert metrics.coco["mAP"] == pytest.approx(float(logged[0]["mAP"]), abs=1e-12)


def test_cli_train_then_eval(data_dir, tmp_path, capsys):
    run = tmp_path / "cli"
    args = ["detect", "train", "--attention", "se", "--data-dir", str(data_dir),
            "--batch-size", "4", "--epochs", "1", "--output", str(run),
            "--set", f"synthetic={json.dumps(TINY_SPEC)}", "--set", "min_size=64",
            "--set", "max_size=64", "--set", "anchor_sizes=[8, 16, 32, 64, 128]"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resnet18 + se" in out and "mAP@[.5,.95]" in out
    assert main(["detect", "eval", str(run), "--weights", "last", "--json",
                 str(tmp_path / "m.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in out  # COCOeval's table
    reported = json.loads((tmp_path / "m.json").read_text())
    assert reported["coco"]["mAP"] == pytest.approx(float(rows(run)[-1]["mAP"]), abs=1e-12)
    assert main(["detect", "train", "--dataset", "coco", "--output", str(tmp_path / "x")]) == 2
    assert "coco needs --data-dir" in capsys.readouterr().err


# ---- bad input ------------------------------------------------------------------------------


def coco_folder(root: Path, annotations: list[dict], images: int = 2) -> Path:
    """A COCO-layout folder: `images` 32 x 32 images in val/, their json in annotations/."""
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(images):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / "val" / f"{i}.png")
    data = {
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32}
                   for i in range(images)],
        "annotations": [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }  # fmt: skip
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


def coco_config(root: Path, strict: bool = False):
    return load_detect_config("small", {
        "dataset": "coco", "data_dir": str(root), "train_split": "val", "test_split": "val",
        "strict": strict,
    })  # fmt: skip


GOOD = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}


def test_bad_annotations_are_skipped_and_counted_or_stop_with_strict(tmp_path):
    bad = [
        GOOD,
        {"image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10]},  # unknown category
        {"image_id": 9, "category_id": 1, "bbox": [2, 2, 10, 10]},  # unknown image
        {"image_id": 2, "category_id": 2, "bbox": [5, 5, 0, 8]},  # zero area
        {"image_id": 2, "category_id": 2, "bbox": [40, 40, 5, 5]},  # outside the image
        {"image_id": 2, "category_id": 2, "bbox": [20, 20, 20, 5]},  # crosses the border
        {"image_id": 2, "category_id": 2, "bbox": [1, 2, "x", 4]},  # malformed
    ]
    root = coco_folder(tmp_path / "coco", bad)
    with pytest.warns(UserWarning) as caught:
        data = build_detection_data(coco_config(root))
    text = "\n".join(str(w.message) for w in caught)
    for expected in (
        "skipped 0 images and 5 annotations",
        "1 annotations whose category is not in the categories list (e.g. annotation 2: "
        "category 7)",
        "1 annotations whose image_id is not in the images list (e.g. annotation 3 -> image 9)",
        "1 boxes with zero (or negative) width or height",
        "1 boxes that lie entirely outside their image (e.g. annotation 5: bbox [40, 40, 5, 5] "
        "in a 32x32 image)",
        "1 boxes that cross the image border (clipped to it and kept)",
        "1 annotations whose bbox is not 4 finite numbers",
    ):
        assert expected in text, expected
    assert data.skipped_annotations == 2 * 5  # train and test read the same file
    kept = data.test_coco.loadAnns(data.test_coco.getAnnIds())
    assert sorted(a["bbox"] for a in kept) == [[2.0, 2.0, 10.0, 10.0], [20.0, 20.0, 12.0, 5.0]]
    with pytest.raises(ValueError, match=r"(?s)has problems:\n.*category.*--strict") as error:
        build_detection_data(coco_config(root, strict=True))
    assert "outside their image" in str(error.value)


def test_missing_images_empty_files_and_bad_json(tmp_path):
    root = coco_folder(tmp_path / "missing", [GOOD, {**GOOD, "image_id": 2}])
    (root / "val" / "1.png").unlink()
    with pytest.warns(UserWarning, match=r"1 images listed in the annotation file whose file "
                                         r"is missing \(e.g. '1.png' \(id 2\)\)"):  # fmt: skip
        data = build_detection_data(coco_config(root))
    assert len(data.test) == 1 and data.skipped_images == 2 and data.skipped_annotations == 2
    with pytest.raises(ValueError, match=r"(?s)whose file is missing.*--strict"):
        build_detection_data(coco_config(root, strict=True))

    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.json is empty \(0 bytes\)"):
        read_coco_json(empty)
    empty.write_text("{not json")
    with pytest.raises(ValueError, match=r"is not valid JSON"):
        read_coco_json(empty)
    with pytest.raises(ValueError, match=r"not found; COCO-format data needs"):
        read_coco_json(tmp_path / "nowhere.json")
    images = [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}]
    cats = [{"id": 1, "name": "a"}]
    with pytest.raises(ValueError, match=r"has no annotations"):
        clean_coco({"images": images, "annotations": [], "categories": cats}, tmp_path, "x.json")
    with pytest.raises(ValueError, match=r"has no 'categories' list"):
        clean_coco({"images": images, "annotations": []}, tmp_path, "x.json")
    all_bad = coco_folder(tmp_path / "all-bad", [{**GOOD, "category_id": 5}])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no usable annotations"):
        build_detection_data(coco_config(all_bad))


def voc_folder(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    objects = {
        "a": [("dog", 0, (10, 10, 30, 40)), ("cat", 1, (5, 5, 20, 20))],
        "b": [("unicorn", 0, (1, 1, 10, 10)), ("person", 0, (2, 3, 30, 30))],
    }
    for name, objs in objects.items():
        Image.new("RGB", (48, 48)).save(voc / "JPEGImages" / f"{name}.jpg")
        xml = "".join(
            f"<object><name>{cls}</name><difficult>{hard}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for cls, hard, b in objs
        )
        (voc / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>48</width><height>48</height><depth>3</depth></size>"
            f"{xml}</annotation>"
        )
    (voc / "Annotations" / "c.xml").write_text("<annotation><size>")  # broken
    (voc / "ImageSets" / "Main" / "test.txt").write_text("a\nb\nc\n")
    return root


def test_voc_xml_through_torchvision_with_difficult_unknown_and_broken_files(tmp_path):
    root = voc_folder(tmp_path)
    data, image_root, report = voc_as_coco(root, "2007", "test")
    assert image_root == root / "VOCdevkit" / "VOC2007" / "JPEGImages"
    assert report.skipped_images == 1 and "c.xml" in report.problems["unreadable_annotation"][0]
    dog = data["annotations"][0]
    assert dog["bbox"] == [9.0, 9.0, 21.0, 31.0] and dog["category_id"] == 12  # dog
    assert data["annotations"][1]["iscrowd"] == 1  # the difficult cat
    config = load_detect_config("small", {"dataset": "voc", "data_dir": str(root),
                                          "train_split": "test"})  # fmt: skip
    with pytest.warns(UserWarning, match=r"category is not in the categories list \(e.g. "
                                         r"annotation 3: category 'unicorn'\)"):  # fmt: skip
        data = build_detection_data(config)
    assert data.num_classes == 21 and len(data.test) == 2
    _, target = data.train[0]
    assert target["labels"].tolist() == [12]  # the difficult cat is not trained on
    with pytest.raises(ValueError, match=r"VOC annotation files that are missing or not valid"):
        build_detection_data(load_detect_config("small", {**config.to_dict(), "strict": True}))
    with pytest.raises(
        ValueError, match=r"VOC 2007 'test' not found under .*VOCdevkit/VOC2007/ with"
    ):
        voc_as_coco(tmp_path / "nowhere", "2007", "test")


def save_weights(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def test_detect_train_takes_an_attached_torchvision_detector(data_dir, tmp_path):
    """`cbam detect train --model torchvision:NAME --attach cbam --detector-weights FILE`:
    torchvision's detector, its weights from a local file of another class count (the
    class-dependent tensors stay at init), CBAM (identity init) in its backbone body only,
    trained and scored with COCOeval like ours."""
    name = "torchvision:fasterrcnn_mobilenet_v3_large_fpn"
    torch.manual_seed(0)
    weights = tmp_path / "coco.safetensors"
    save_weights(torchvision.models.get_model(name.partition(":")[2], weights=None,
                                              weights_backbone=None), weights)  # fmt: skip
    config = tiny(data_dir, tmp_path / "run", model=name, attach="cbam",
                  detector_weights=str(weights))  # fmt: skip
    with pytest.warns(UserWarning, match=r"4 tensors of another class count left at their init"):
        result = train_detector(config)
    saved = load_file(str(result.run_dir / "last.safetensors"))
    attention = {k.split(".attention.")[0] for k in saved if ".attention." in k}
    assert len(attention) == 10 and all(k.startswith("backbone.body.") for k in attention)
    metrics, loaded = evaluate_detection_run(result.run_dir, "last")
    assert metrics.images == 4 and loaded.model == name


def test_torchvision_detector_weights_and_options(tmp_path):
    from cbam.detection.model import build_torchvision_detector
    from cbam.interop import CheckpointError

    with pytest.raises(ValueError, match=r"instance masks as well as boxes"):
        load_detect_config("small", {"model": "torchvision:maskrcnn_resnet50_fpn"})
    with pytest.raises(ValueError, match=r"unknown torchvision detector \(model\)"):
        load_detect_config("small", {"model": "torchvision:fasterrcnn_resnet18"})
    with pytest.raises(ValueError, match=r"attach and detector_weights are for model"):
        load_detect_config("small", {"attach": "cbam"})
    foreign = tmp_path / "resnet18.safetensors"
    save_weights(create_model("resnet18", attention=None), foreign)
    retinanet = "torchvision:retinanet_resnet50_fpn"
    with pytest.raises(CheckpointError, match=rf"is not a {retinanet} checkpoint"):
        build_torchvision_detector(retinanet, None, 3, detector_weights=foreign)
    with pytest.raises(CheckpointError, match=r"does not hold .*backbone body \(backbone.body\)"):
        build_torchvision_detector(retinanet, None, 3, backbone_weights=foreign)

    name = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    classifier = save_weights(torchvision.models.mobilenet_v3_large(), tmp_path / "mnv3.st")
    model = build_torchvision_detector(name, "cbam", 3, backbone_weights=tmp_path / "mnv3.st")
    body = model.backbone.body.state_dict()  # attention keys aside, the classifier's names
    assert torch.equal(body["0.0.weight"], classifier["features.0.0.weight"])
    torch.manual_seed(0)
    whole = torchvision.models.get_model(name.partition(":")[2], weights=None,
                                         weights_backbone=None)  # fmt: skip
    coco = save_weights(whole, tmp_path / "coco.st")
    with pytest.warns(UserWarning, match=r"\(roi_heads.box_predictor.cls_score.weight, "):
        model = build_torchvision_detector(name, None, 3, detector_weights=tmp_path / "coco.st")
    for key in ("backbone.fpn.layer_blocks.0.0.weight", "rpn.head.conv.0.0.weight"):
        assert torch.equal(model.state_dict()[key], coco[key])


def test_a_one_stage_torchvision_detector_logs_its_losses(data_dir, tmp_path):
    """FCOS names its losses classification / bbox_regression / bbox_ctrness; they go in the
    same columns, and the RPN loss it does not have is nan."""
    config = tiny(data_dir, tmp_path / "fcos", model="torchvision:fcos_resnet50_fpn")
    result = train_detector(config)
    with open(result.run_dir / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert all(np.isfinite(float(row[k])) for k in ("loss_classifier", "loss_box_reg",
                                                    "loss_objectness"))  # fmt: skip
    assert row["loss_rpn_box_reg"] == "nan"
