"""`cbam attach-report MODEL`: where `attach` puts attention, and what it adds."""

from __future__ import annotations

import argparse

from torch import nn

from cbam._argtypes import non_negative_int, positive_int
from cbam.interop.placements import PLACEMENTS
from cbam.layers import list_attentions


def build_named(name: str, num_classes: int | None) -> nn.Module:
    """`torchvision:NAME`, `timm:NAME` (random weights), or a cbam model built without
    attention."""
    from cbam.interop.external import create_external, is_external
    from cbam.models import create_model, model_entry

    if is_external(name):
        return create_external(name, num_classes or 1000)
    entry = model_entry(name)
    return create_model(name, num_classes=num_classes or entry.num_classes)


def cmd_attach_report(args: argparse.Namespace) -> int:
    from cbam.interop.report import attach_report, format_report

    model = build_named(args.model, args.num_classes).eval()
    size = None if args.input_size == 0 else args.input_size
    report = attach_report(model, args.attention, args.placement, name=args.model,
                           input_size=size)  # fmt: skip
    print(format_report(report))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "attach-report",
        help="where attach puts attention in a model: block paths, channels, params, MACs",
    )
    parser.add_argument(
        "model", help="torchvision:NAME, timm:NAME (random weights) or a cbam model name"
    )
    parser.add_argument("--attention", default="cbam", choices=list_attentions())
    parser.add_argument("--placement", default="auto", choices=PLACEMENTS)
    parser.add_argument("--num-classes", type=positive_int, help="default: the model's (1000)")
    parser.add_argument(
        "--input-size",
        type=non_negative_int,
        default=224,
        help="for MACs (default: 224; 0: skip them)",
    )
    parser.set_defaults(run=cmd_attach_report)
