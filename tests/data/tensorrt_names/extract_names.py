"""Extract the names a TensorRT Python bindings wheel defines: the weaker, per-string check of
tests/test_tensorrt_names.py for the newest wheel (11.4), newer than NVIDIA's stored sources. The
main check uses (class, attribute) pairs from the binding sources (extract_pairs.py).

The tensorrt-cu12/cu13 "bindings" wheels on PyPI are real wheels (about 1.3 MB) whose compiled
module cannot be imported without the TensorRT libraries, but it carries every class, method,
property and enum-member name as a string, and its docstrings name the rest. This script reads
a wheel without installing it and writes one name per line:
  - identifier-like strings of the compiled module (pybind11 registers names as C strings),
  - names the docstrings mention (:class:`X`, :func:`x`, :attr:`x`, :ivar x:),
  - top-level names of the wheel's Python files (nptype, volume, ...).
The linker may store a name only as the tail of a longer string ("num_errors" inside
"get_num_errors"), so the test accepts a name that ends one of these strings.

Regenerate (the wheels come from PyPI, any platform tag with the same contents will do):
    pip download --no-deps -d /tmp/trtw "tensorrt-cu13-bindings==11.4.*"
    python tests/data/tensorrt_names/extract_names.py /tmp/trtw/*.whl
"""

from __future__ import annotations

import ast
import re
import sys
import zipfile
from pathlib import Path

IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{1,80}")
PRINTABLE = re.compile(rb"[\x20-\x7e\t\n]{2,}")
DOC_ROLE = re.compile(r":(?:class|func|attr|meth|py:\w+):`~?([\w.]+)`|:ivar (\w+):|:arg (\w+):")


def names_in_wheel(wheel: Path) -> tuple[str, set[str]]:
    version = wheel.name.split("-")[1]
    names: set[str] = set()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            data = zf.read(info)
            if info.filename.endswith(".so"):
                for run in PRINTABLE.findall(data):
                    if IDENT.fullmatch(run) and not run.startswith((b"_Z", b"_GLOBAL", b"GLIBC")):
                        names.add(run.decode())
                    for m in DOC_ROLE.finditer(run.decode("ascii", "replace")):
                        names.update(part for g in m.groups() if g for part in g.split("."))
            elif info.filename.endswith(".py"):
                tree = ast.parse(data)
                for node in tree.body:
                    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                        names.add(node.name)
                    elif isinstance(node, ast.Assign):
                        names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return version, names


def main(wheels: list[str]) -> None:
    out_dir = Path(__file__).parent
    for wheel in map(Path, wheels):
        version, names = names_in_wheel(wheel)
        major_minor = ".".join(version.split(".")[:2])
        target = out_dir / f"tensorrt-{major_minor}.txt"
        target.write_text(f"# names in {wheel.name}\n" + "\n".join(sorted(names)) + "\n")
        print(f"{target}: {len(names)} names")


if __name__ == "__main__":
    main(sys.argv[1:])
