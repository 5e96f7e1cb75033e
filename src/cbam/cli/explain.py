"""`cbam explain`: Grad-CAM of several trained models on the same images (the paper's figure),
with the true class's probability per model, and CBAM's spatial and channel gates."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cbam._argtypes import non_negative_int, output_folder, positive_int
from cbam.cli.train import overrides_from
from cbam.explain.gradcam import CAM_METHODS

MODEL_OPTIONS = ("model", "dataset", "data_dir", "device", "test_subset")  # config overrides


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        return _explain(args)
    except ImportError as error:  # pytorch-grad-cam or matplotlib missing: the `explain` extra
        print(f"cbam explain: error: {error}", file=sys.stderr)
        return 2


def _explain(args: argparse.Namespace) -> int:
    from cbam.explain import dataset_samples, explain, format_summary, load_images, load_models

    if args.images and args.samples is not None:
        raise ValueError("give either --images or --samples, not both")
    model_options = {key: getattr(args, key) for key in MODEL_OPTIONS}
    overrides = overrides_from(argparse.Namespace(**model_options, set=args.set))
    models = load_models(args.sources, args.names, args.weights, overrides, args.attention)
    first = models[0]
    if args.images:
        samples = load_images(args.images, first.classes)
    else:
        splits = first.splits
        assert splits is not None  # models from load_models always carry their data
        split = splits.test if args.split == "test" else splits.train
        samples = dataset_samples(
            split.dataset,
            8 if args.samples is None else args.samples,
            args.split,
            args.offset,
            args.per_class,
        )
    result = explain(
        models,
        samples,
        args.output,
        method=args.method,
        layer=args.layer,
        target=args.target,
        box=args.box,
        mask=args.mask,
        per_page=args.per_page,
        gates=not args.no_gates,
        figures=not args.no_figures,
        name=args.name,
        display_size=args.display_size,
        gate_scale=args.gate_scale,
    )
    print(format_summary(result.summary))
    print("wrote:")
    for path in [*result.figures, *(p for ps in result.gate_figures.values() for p in ps),
                 *result.tables]:  # fmt: skip
        print(f"  {path}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "explain",
        help="Grad-CAM of several models on the same images, and CBAM's gates",
        description="Writes a PNG grid (input, then one Grad-CAM overlay per model, titled "
        "with the model, its prediction and the true class's probability), probabilities.csv, "
        "summary.csv, and for CBAM/SE models their gates (gates_MODEL.png / .csv).",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="run folders of `cbam train`, or weights files (+ --model ...)",
    )
    parser.add_argument(
        "--names", nargs="+", metavar="NAME", help="one label per model (default: model+attention)"
    )
    parser.add_argument(
        "--weights",
        choices=["best", "last"],
        default="best",
        help="which weights of a run folder (default: best)",
    )
    inputs = parser.add_argument_group("images (default: --samples 8 of the test split)")
    inputs.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="image files or folders (a CLASS/ folder gives the true class)",
    )
    inputs.add_argument(
        "--samples", type=positive_int, metavar="N", help="N images of a data set split"
    )
    inputs.add_argument("--split", choices=["test", "train"], default="test")
    inputs.add_argument(
        "--offset", type=non_negative_int, default=0, help="first sample index (default 0)"
    )
    inputs.add_argument(
        "--per-class",
        action="store_true",
        help="one image of each class in turn instead of the first N",
    )
    cam = parser.add_argument_group("maps")
    cam.add_argument("--method", choices=list(CAM_METHODS), default="gradcam")
    cam.add_argument("--layer", help="module name, e.g. layer3 or layer2.1 (default: last stage)")
    cam.add_argument(
        "--target",
        choices=["true", "predicted"],
        default="true",
        help="class to explain (default: the true class where known)",
    )
    cam.add_argument(
        "--box",
        type=int,
        nargs=4,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="object box in model-input pixels (ends excluded): adds the "
        "peak-in-box rate to the summary",
    )
    cam.add_argument(
        "--mask",
        metavar="PATH",
        help="object mask image for all images, or a folder of masks named like the images",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output", type=output_folder, default="explain", help="folder (default: ./explain)"
    )
    out.add_argument("--name", default="explain", help="figure file name (default: explain)")
    out.add_argument(
        "--per-page",
        type=positive_int,
        default=8,
        help="images per PNG; more go to NAME_001.png, ... (default 8)",
    )
    out.add_argument(
        "--display-size", type=positive_int, help="pixels to upsample images to (min 112)"
    )
    out.add_argument("--no-gates", action="store_true", help="skip the gates")
    out.add_argument(
        "--no-figures", action="store_true", help="write the CSV files only (many images)"
    )
    out.add_argument(
        "--gate-scale",
        choices=["block", "fixed"],
        default="block",
        help="spatial gate colours: each block's range, or 0..1",
    )
    model = parser.add_argument_group("for weights files (and evaluation settings)")
    options: list[tuple[str, Any]] = [("--model", str), ("--dataset", str), ("--data-dir", str),
                                      ("--device", str), ("--test-subset", int)]  # fmt: skip
    for flag, kind in options:
        model.add_argument(flag, type=kind)
    model.add_argument(
        "--attention",
        nargs="+",
        metavar="ATT",
        help="one for every weights file, or one per SOURCE",
    )
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.set_defaults(run=cmd_explain)
