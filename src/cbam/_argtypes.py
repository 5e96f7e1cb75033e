"""argparse types for numbers with a range: a 0 or negative count is refused in one line
(`cbam CMD: error: argument --x: ...`) before any work, not found deep inside a run."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cbam._paths import check_output_folder


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def output_folder(text: str) -> Path:
    """A folder to write into (made if missing): nothing in its way."""
    try:
        return check_output_folder(text, "output folder")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def output_file(text: str) -> Path:
    """A file to write at the end of a long command: its folder must exist now."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"folder {str(path.parent)!r} of {text!r} does not exist; create it first"
        )
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    return path
