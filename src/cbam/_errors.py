"""Error messages shared by every part of the package: say what was wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown_choice(kind: str, value: object, choices: Iterable[str]) -> ValueError:
    """A ValueError for a name that is not one of `choices`, with the closest matches."""
    choices = list(choices)
    message = f"unknown {kind} {value!r}; expected one of: {', '.join(choices)}"
    close = difflib.get_close_matches(str(value), choices, n=3)
    if close:
        message += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    return ValueError(message)


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def unknown_kwargs(what: str, given: Iterable[str], accepted: Iterable[str]) -> ValueError | None:
    """A ValueError naming the keyword arguments in `given` that are not `accepted`, else None."""
    accepted = sorted(accepted)
    unknown = [k for k in given if k not in accepted]
    if not unknown:
        return None
    return ValueError(
        f"{what} got unknown argument(s) {', '.join(repr(k) for k in unknown)}; "
        f"it accepts: {', '.join(accepted)}"
    )
