"""The `cbam` command: a thin layer over the Python API, one module per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cbam import __version__
from cbam.cli import (
    attach_report,
    bench,
    compare,
    detect,
    explain,
    export,
    info,
    reproduce,
    train,
)
from cbam.cli import eval as eval_

COMMANDS = (
    info, train, eval_, compare, reproduce, explain, export, attach_report, bench, detect,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbam", description="Paper-faithful CBAM attention for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"cbam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"cbam {args.command}: error: {error}", file=sys.stderr)
        return 2
