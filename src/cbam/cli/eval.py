"""`cbam eval`: top-1 / top-5 error, loss, throughput and per-class accuracy."""

from __future__ import annotations

import argparse
import json

from cbam._argtypes import output_file
from cbam.cli.train import overrides_from


def cmd_eval(args: argparse.Namespace) -> int:
    from cbam.training.eval_run import evaluate_source

    overrides = overrides_from(args, skip=("source", "weights", "json"))
    metrics, classes, config = evaluate_source(args.source, args.weights, overrides)
    print(
        f"{config.model} + {config.attention or 'no attention'} on {config.dataset} "
        f"({metrics.images} test images)"
    )
    print(f"top-1 error {metrics.top1_err:.2f}% | top-5 error {metrics.top5_err:.2f}% | "
          f"loss {metrics.loss:.4f} | {metrics.images_per_s:.0f} img/s")  # fmt: skip
    if metrics.skipped:
        print(f"skipped {metrics.skipped} unreadable images")
    width = max(len(c) for c in classes)
    for name, acc in zip(classes, metrics.per_class_acc, strict=True):
        print(f"  {name:<{width}}  {acc:6.2f}% correct")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": str(args.source), **metrics.to_dict()}, f, indent=2)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate a run folder or a weights file")
    parser.add_argument("source", help="run folder, or a .safetensors file (with --model ...)")
    parser.add_argument("--weights", choices=["best", "last"], default="best",
                        help="which weights of a run folder (default: best)")  # fmt: skip
    for flag, kind in (("--model", str), ("--attention", str), ("--dataset", str),
                       ("--data-dir", str), ("--batch-size", int), ("--device", str),
                       ("--workers", int), ("--test-subset", int)):  # fmt: skip
        parser.add_argument(flag, type=kind)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--json", type=output_file, metavar="PATH", help="also write the metrics as JSON"
    )
    parser.set_defaults(run=cmd_eval)
