"""The argument checks, written once: each names the argument and says what is allowed.

`bool` is an `int` in Python (True == 1), so every integer check refuses it explicitly; numpy
integers are accepted where a caller may pass an array element. Each check returns the value as a
plain Python type. A leaf module: it imports nothing of the package, so every room may use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

_INTEGERS = (int, np.integer)


def is_integer(value: Any) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, _INTEGERS) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """An int or float (numpy ones too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _bounds(lo: int | float | None, hi: int | float | None) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None, *, none: bool = False,
            hint: str = "", error: type[Exception] = ValueError) -> Any:
    """`value` as an int in lo..hi (either bound optional); None passes through when `none`.

    Raises `error` (ValueError by default) naming `name`: "max_batch must be an integer in 1..4096, got 0".
    `hint` is added in parentheses after the allowed range ("0: one per core").
    """
    if value is None and none:
        return None
    if not is_integer(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(lo) if hi is None else None
        allowed = (kind or f"an integer{_bounds(lo, hi)}") + (f" ({hint})" if hint else "")
        allowed += " or None" if none else ""
        raise error(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, above: float | None = None,
           none: bool = False, hint: str = "", error: type[Exception] = ValueError) -> Any:
    """`value` as a finite float in lo..hi (and > `above` when given); None passes when `none`."""
    if value is None and none:
        return None
    ok = is_number(value) and math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi) \
        and (above is None or value > above)
    if not ok:
        bounds = f" > {above}" if above is not None else _bounds(lo, hi)
        allowed = f"a finite number{bounds}" + (f" ({hint})" if hint else "") + (" or None" if none else "")
        raise error(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def flag(name: str, value: Any, *, none: bool = False, words: bool = False) -> Any:
    """`value` as a bool; with `words`, "on"/"off" too (the CLI's spelling). None passes when `none`."""
    if value is None and none:
        return None
    if words and value in ("on", "off"):
        return value == "on"
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    allowed = "on or off (True or False)" if words else "True or False"
    raise ValueError(f"{name} must be {allowed}" + (" or None" if none else "") + f", got {value!r}")


def one_of(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """`value` if it is one of `allowed` (compared with ==, bools never stand for 0/1)."""
    options = list(allowed)
    if isinstance(value, bool) or value not in options or not isinstance(value, (str, int, float, type(None))):
        raise ValueError(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")
    return value


def identifier(value: Any) -> bool:
    """An image or record id: a string or an integer, never a bool (True == 1 would match image 1)."""
    return isinstance(value, str) or is_integer(value)
