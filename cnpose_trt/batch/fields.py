"""The checks that every reader of batch records shares (manifests, detections files): one error form,
"FILE, line N, field 'F': what is wrong", JSON with those messages, and text that must be UTF-8.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from ..errors import ManifestError


def _fail(where: str, field: str | None, message: str) -> ManifestError:
    return ManifestError(f"{where}{f', field {field!r}' if field else ''}: {message}")


_is_number = checks.is_number


def _floats(values: Any, where: str, field: str) -> np.ndarray:
    """Numbers (checked by _is_number) -> float64; an integer too large for a float is refused."""
    try:
        return np.asarray(values, np.float64)
    except OverflowError:
        raise _fail(where, field, "holds an integer too large for a float64 number") from None


def _json(text: str | bytes, where: str, field: str | None = None) -> Any:
    """json.loads with the manifest's messages (a record nested thousands deep included)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _fail(where, field, f"{'is ' if field else ''}not valid JSON here: nested too deeply") from None
    except ValueError as exc:
        if field is None:
            raise _fail(where, None, f"not valid JSON ({exc})") from None
        raise _fail(where, field, f"is not valid JSON ({getattr(exc, 'msg', exc)}): {text!r:.80}") from None


@contextlib.contextmanager
def _text_errors(path: Path) -> Iterator[None]:
    """A manifest that is not UTF-8 text (Latin-1, UTF-16) is refused naming the file."""
    try:
        yield
    except UnicodeDecodeError as exc:
        what = ("it is UTF-16" if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff") else
                f"byte {exc.object[exc.start]:#04x}, e.g. Latin-1")
        raise _fail(str(path), None, f"not UTF-8 text ({what}): save it as UTF-8") from None


def _is_image_id(value: Any) -> bool:
    # not bool: True == 1 would match image 1
    return checks.identifier(value)
