"""Output paths checked before any work: a folder that cannot be made (a file stands where a
folder must go) fails in one line at the start, not as an OSError after an hour of training."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_folder(path: str | os.PathLike[str], what: str) -> Path:
    """`path` is a folder, or can be made one: no part of it is an existing file."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ValueError(
                    f"{what} {str(path)!r}: {str(part)!r} is a file, not a folder; "
                    f"choose another output folder"
                )
            break
    return path
