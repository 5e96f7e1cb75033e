"""The `cbam` command: a thin layer over the Python API, one module per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

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


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (argparse prints the whole usage first)
    that points to --help; subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cbam", description="Paper-faithful CBAM attention for PyTorch.")
    parser.add_argument("--version", action="version", version=f"cbam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # the user's input: one line, no traceback
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"cbam {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (training stops at a checkpoint on its own and returns 130)
        print(f"cbam {args.command}: interrupted", file=sys.stderr)
        return 130
