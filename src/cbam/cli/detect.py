"""`cbam detect train` / `cbam detect eval`: Faster R-CNN + FPN over our ResNets (+ CBAM, SE),
on the embedded synthetic set, COCO-format data or Pascal VOC."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cbam._argtypes import output_file
from cbam.cli.train import overrides_from

RESERVED = ("detect_command", "source", "weights", "json")
MISSING_EXTRA = "install the detection extra: pip install 'cbam[detect]' (pycocotools)"


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from cbam.detection import load_detect_config, train_detector
    except ImportError as error:
        raise ValueError(f"{error}; {MISSING_EXTRA}") from None
    from cbam.training import TrainingDiverged

    overrides = overrides_from(args, skip=RESERVED)
    try:
        if args.resume:
            result = train_detector(load_detect_config(None), args.resume, overrides)
        else:
            result = train_detector(load_detect_config(args.config, overrides))
    except TrainingDiverged as error:
        print(f"cbam detect train: {error}", file=sys.stderr)
        return 3
    return 130 if result.interrupted else 0


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        from cbam.detection import evaluate_detection_run
        from cbam.detection.engine import format_metrics
    except ImportError as error:
        raise ValueError(f"{error}; {MISSING_EXTRA}") from None

    metrics, config = evaluate_detection_run(
        args.source, args.weights, overrides_from(args, skip=RESERVED)
    )
    print(
        f"{config.description}, "
        f"{config.dataset} ({metrics.images} test images, {metrics.detections} detections, "
        f"{metrics.images_per_s:.1f} img/s)"
    )
    print(format_metrics(metrics))
    print(metrics.summary.rstrip())
    if metrics.skipped:
        print(f"skipped {metrics.skipped} unreadable images")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": str(args.source), **metrics.to_dict()}, f, indent=2)
    return 0


def _add_options(parser: argparse.ArgumentParser, options: list[tuple[str, Any, str]]) -> None:
    for flag, kind, text in options:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], help="mixed precision")
    parser.add_argument(
        "--strict", action="store_true", default=None,
        help="stop on bad images or annotations (listing them) instead of skipping and counting",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any detection config key, value in YAML syntax (e.g. --set min_size=600 "
        "--set 'synthetic={train_images: 2000}'); repeatable",
    )  # fmt: skip


MODEL_OPTIONS: list[tuple[str, Any, str]] = [
    ("--backbone", str, "resnet18, resnet50, resnet101, ... (any registered ResNet)"),
    ("--attention", str, "none, se, bam or cbam"),
    ("--model", str, "torchvision:NAME: one of torchvision's box detectors instead of ours "
     "(e.g. torchvision:fasterrcnn_resnet50_fpn)"),
    ("--attach", str, "with --model: attention to attach in its backbone body (e.g. cbam)"),
    ("--dataset", str, "synthetic (default: built offline from Fashion-MNIST), coco or voc"),
    ("--data-dir", str, "coco: holds annotations/ and the image folders; voc: holds "
     "VOCdevkit/; synthetic: where to write it (default: ~/.cache/cbam/datasets)"),
    ("--test-subset", int, "use the first N test images"),
    ("--batch-size", int, "global batch size (split over processes)"),
    ("--device", str, "auto, cpu, cuda, cuda:1, ..."),
    ("--workers", int, "data-loader worker processes"),
]  # fmt: skip


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "detect",
        help="object detection: Faster R-CNN + FPN with CBAM / SE / plain ResNet backbones",
        description="Faster R-CNN + FPN (torchvision) over our ResNets, trained and scored "
        "with COCOeval (mAP@[.5,.95], mAP@.5, mAP@.75, per size) and VOC07 mAP@.5.",
    )
    sub = parser.add_subparsers(dest="detect_command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train", help="train a detector (the default runs offline on a synthetic set)"
    )
    train.add_argument(
        "--config", default="small", metavar="RECIPE",
        help="small (synthetic set, CPU, minutes), coco, voc, or a YAML file (default: small)",
    )  # fmt: skip
    _add_options(train, [
        *MODEL_OPTIONS,
        ("--backbone-weights", str, "ImageNet-style backbone weights: a cbam run's "
         ".safetensors, torchvision's or the CBAM authors' .pth"),
        ("--detector-weights", str, "with --model: a local file of the whole torchvision "
         "detector (e.g. COCO-trained); tensors of another class count stay at init"),
        ("--epochs", int, "number of epochs"),
        ("--lr", float, "learning rate per base_batch_size images (scaled linearly)"),
        ("--seed", int, "seed for initialisation, data order and augmentation"),
        ("--output", str, "run folder (default: runs/detect)"),
        ("--train-subset", int, "use the first N training images"),
    ])  # fmt: skip
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("eval", help="score a detection run folder or weights file")
    evaluate.add_argument(
        "source", help="run folder of `cbam detect train`, or a .safetensors file (+ options)"
    )
    evaluate.add_argument("--weights", choices=["best", "last"], default="best",
                          help="which weights of a run folder (default: best)")  # fmt: skip
    _add_options(evaluate, MODEL_OPTIONS)
    evaluate.add_argument(
        "--json", type=output_file, metavar="PATH", help="also write the metrics as JSON"
    )
    evaluate.set_defaults(run=cmd_eval)
