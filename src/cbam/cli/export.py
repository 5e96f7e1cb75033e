"""`cbam export SOURCE`: a run folder or weights file (as `cbam eval` takes it), or a model by
name (ours, torchvision:NAME, timm:NAME, optionally attached), to ONNX or TorchScript, checked
against PyTorch before it is reported as done."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from cbam._argtypes import positive_float, positive_int
from cbam.interop import (
    FORMATS,
    export_model,
    load_checkpoint,
    onnx_batch_axis,
    onnx_op_types,
    verify_export,
)
from cbam.interop.external import create_external, is_external
from cbam.layers import list_attentions
from cbam.models import create_model, model_entry

POOLING_OPS = ("ReduceMax", "ReduceMean", "GlobalMaxPool", "GlobalAveragePool", "MaxPool")
VERIFY_BATCHES = (1, 3)


# What a run folder's model needs from its data set, without reading the data.
DATASET_SHAPES = {"fashion-mnist": (10, 1, 28), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}


def cmd_export(args: argparse.Namespace) -> int:
    if args.source is not None and args.checkpoint is not None:
        raise ValueError("give the weights once: as SOURCE or with --checkpoint, not both")
    source = args.source or args.checkpoint
    if source is not None and (Path(source).is_dir() or args.model is None):
        model, input_size, in_chans, label = _from_run(Path(source), args)
    else:
        if args.model is None:
            raise ValueError("give a run folder or weights file, or --model NAME")
        model, input_size, in_chans, label = _from_registry(args, source)
    return _export(args, model.eval(), input_size, in_chans, label)


def _from_registry(
    args: argparse.Namespace, weights: str | None
) -> tuple[nn.Module, int, int, str]:
    """A cbam model by name (--model), or torchvision:/timm: (+ --attach), then the weights."""
    in_chans = args.in_chans
    if is_external(args.model):
        model = create_external(args.model, args.num_classes or 1000, in_chans, None,
                                args.attach, identity_init=True)  # fmt: skip
        if weights is not None:
            load_checkpoint(model, weights)
        label = f"{args.model.partition(':')[2]}{f'-{args.attach}' if args.attach else ''}"
        return model, args.input_size or 224, in_chans, label
    entry = model_entry(args.model)
    attention = None if args.attention == "none" else args.attention
    model = create_model(
        args.model, attention=attention,
        num_classes=entry.num_classes if args.num_classes is None else args.num_classes,
        in_chans=in_chans, checkpoint=weights,
    )  # fmt: skip
    label = f"{args.model}{f'-{attention}' if attention else ''}"
    return model, args.input_size or entry.input_size, in_chans, label


def _from_run(source: Path, args: argparse.Namespace) -> tuple[nn.Module, int, int, str]:
    """A run folder (its config.yaml and best/last weights) or a weights file of one, as
    `cbam eval` reads it; the data set's shape comes from its name, or from the data for
    imagefolder."""
    from cbam.training.config import load_config
    from cbam.training.eval_run import resolve_source
    from cbam.training.trainer import build_model

    overrides = {k: v for k, v in (("model", args.model), ("attach", args.attach)) if v}
    overrides["pretrained"] = None  # the run's own weights replace them: the file may be gone
    config, weights, path = resolve_source(source, args.weights, overrides, load_config)
    if config.dataset in DATASET_SHAPES:
        num_classes, in_chans, size = DATASET_SHAPES[config.dataset]
        splits = SimpleNamespace(
            num_classes=num_classes, in_chans=in_chans, image_size=config.image_size or size
        )
    else:
        from cbam.data import build_datasets

        splits = build_datasets(config.dataset, config.data_dir, config.augment,
                                config.image_size, None, 1, False, config.seed)  # fmt: skip
    model = build_model(config, splits)  # type: ignore[arg-type]
    load_checkpoint(model, weights, source="cbam" if path.is_dir() else "auto")
    label = source.name if source.is_dir() else source.stem
    return model, args.input_size or splits.image_size, splits.in_chans, label


def _export(
    args: argparse.Namespace, model: nn.Module, input_size: int, in_chans: int, label: str
) -> int:
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    output = args.output or Path(f"{label}{suffix}")
    try:
        path = export_model(
            model, output, args.format, input_size=input_size, in_chans=in_chans,
            opset=args.opset, dynamo=not args.legacy_exporter,
        )  # fmt: skip
    except ImportError as error:
        raise ValueError(f"{error}; install the exporters: pip install 'cbam[export]'") from None
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.format})")
    if args.format == "onnx":
        everywhere, in_attention = onnx_op_types(path), onnx_op_types(path, "attention")
        print(f"batch axis: {onnx_batch_axis(path)!r}")
        print(f"pooling ops, whole graph: {_ops(everywhere)}")
        print(f"pooling ops, attention layers: {_ops(in_attention)}")
    if args.no_verify:
        return 0
    runtime = "onnxruntime" if args.format == "onnx" else "torch.jit.load"
    diffs = verify_export(
        model, path, batch_sizes=VERIFY_BATCHES, input_size=input_size, in_chans=in_chans
    )
    for batch, diff in diffs.items():
        print(f"batch {batch}: max |{runtime} - PyTorch| = {diff:.2e}")
    if max(diffs.values()) > args.tolerance:
        print(
            f"cbam export: error: {runtime}'s outputs differ from PyTorch's by more than "
            f"--tolerance {args.tolerance:g}",
            file=sys.stderr,
        )
        return 1
    return 0


def _ops(counts: dict[str, int]) -> str:
    found = [f"{op} x{counts[op]}" for op in POOLING_OPS if counts.get(op)]
    return ", ".join(found) or "none"


def register(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch) or TorchScript and check it against PyTorch",
    )
    export.add_argument(
        "source", nargs="?",
        help="run folder or weights file (as for cbam eval); or weights for --model: the CBAM "
        "authors' .pth(.tar), torchvision's, or ours (.pth or .safetensors)",
    )  # fmt: skip
    export.add_argument(
        "--model", metavar="NAME",
        help="a registered model (random weights unless SOURCE), torchvision:NAME or "
        "timm:NAME; with a run folder: overrides its model",
    )  # fmt: skip
    export.add_argument(
        "--attention", default="cbam", choices=["none", *list_attentions()],
        help="cbam models: default cbam",
    )  # fmt: skip
    export.add_argument("--attach", help="torchvision:/timm: models: attention to attach")
    export.add_argument("--weights", choices=["best", "last"], default="best",
                        help="which weights of a run folder (default: best)")  # fmt: skip
    export.add_argument("--checkpoint", metavar="PATH", help=argparse.SUPPRESS)  # old spelling
    export.add_argument("--format", choices=FORMATS, default="onnx")
    export.add_argument(
        "--output", type=Path, metavar="PATH", help="default: MODEL-ATTENTION.onnx / .pt"
    )
    export.add_argument(
        "--input-size", type=positive_int, metavar="PX", help="default: the model's (224, CIFAR 32)"
    )
    export.add_argument("--in-chans", type=positive_int, default=3, help="--model: input channels")
    export.add_argument(
        "--num-classes", type=positive_int, help="default: the model's (1000, CIFAR 10)"
    )
    export.add_argument("--opset", type=positive_int, default=18, help="ONNX opset (default: 18)")
    export.add_argument(
        "--legacy-exporter", action="store_true",
        help="ONNX: torch.onnx's TorchScript-based exporter instead of torch.export (dynamo)",
    )  # fmt: skip
    export.add_argument(
        "--no-verify", action="store_true",
        help="skip running the export at batch 1 and 3 against PyTorch",
    )  # fmt: skip
    export.add_argument("--tolerance", type=positive_float, default=1e-4, help="default: 1e-4")
    export.set_defaults(run=cmd_export)
