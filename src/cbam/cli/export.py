"""`cbam export`: a registered model, optionally with weights, to ONNX or TorchScript, checked
against PyTorch before it is reported as done."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbam.interop import (
    FORMATS,
    export_model,
    onnx_batch_axis,
    onnx_op_types,
    verify_export,
)
from cbam.layers import list_attentions
from cbam.models import create_model, list_models, model_entry

POOLING_OPS = ("ReduceMax", "ReduceMean", "GlobalMaxPool", "GlobalAveragePool", "MaxPool")
VERIFY_BATCHES = (1, 3)


def cmd_export(args: argparse.Namespace) -> int:
    entry = model_entry(args.model)
    attention = None if args.attention == "none" else args.attention
    input_size = args.input_size or entry.input_size
    model = create_model(
        args.model,
        attention=attention,
        num_classes=entry.num_classes if args.num_classes is None else args.num_classes,
        in_chans=args.in_chans,
        checkpoint=args.checkpoint,
    ).eval()
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    output = args.output or Path(f"{args.model}{f'-{attention}' if attention else ''}{suffix}")
    try:
        path = export_model(
            model, output, args.format, input_size=input_size, in_chans=args.in_chans,
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
        model, path, batch_sizes=VERIFY_BATCHES, input_size=input_size, in_chans=args.in_chans
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
    export.add_argument("--model", required=True, choices=list_models(), metavar="NAME")
    export.add_argument(
        "--attention", default="cbam", choices=["none", *list_attentions()],
        help="default: cbam",
    )  # fmt: skip
    export.add_argument(
        "--checkpoint", metavar="PATH",
        help="weights to load first: the CBAM authors' .pth(.tar), torchvision's, or ours "
        "(.pth or .safetensors)",
    )  # fmt: skip
    export.add_argument("--format", choices=FORMATS, default="onnx")
    export.add_argument(
        "--output", type=Path, metavar="PATH", help="default: MODEL-ATTENTION.onnx / .pt"
    )
    export.add_argument(
        "--input-size", type=int, metavar="PX", help="default: the model's (224, CIFAR 32)"
    )
    export.add_argument("--in-chans", type=int, default=3)
    export.add_argument("--num-classes", type=int, help="default: the model's (1000, CIFAR 10)")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    export.add_argument(
        "--legacy-exporter", action="store_true",
        help="ONNX: torch.onnx's TorchScript-based exporter instead of torch.export (dynamo)",
    )  # fmt: skip
    export.add_argument(
        "--no-verify", action="store_true",
        help="skip running the export at batch 1 and 3 against PyTorch",
    )  # fmt: skip
    export.add_argument("--tolerance", type=float, default=1e-4, help="default: 1e-4")
    export.set_defaults(run=cmd_export)
