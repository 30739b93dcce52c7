"""The layout of csrc/ (issue 23): one folder per op over common/, read from the sources' includes.

csrc/module.cpp creates the module; decode/ and crop/ each hold one op (kernels, contract header,
bindings.cpp); common/ holds what they share (checks.h, the CPU switch and threads, the CUDA device
queries). The checks stay at the binding boundary: only the binding files (and checks.h, the
module) see pybind11, an op never includes the other op's files, common/ includes no op, and no
source file grows past 600 lines.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".cpp", ".cu"})
OPS = ("decode", "crop")
# The files allowed to include pybind11: the module, the shared checks, one binding file per folder,
# and the no-CUDA stub of the device queries (it raises the checks' "built without CUDA" error).
PYBIND = {"module.cpp", "module.h", "common/checks.h", "common/bindings.cpp", "common/cuda_device.cpp",
          *(f"{op}/bindings.cpp" for op in OPS)}


def _includes(path: Path) -> list[str]:
    return re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(), flags=re.M)


def _rel(path: Path) -> str:
    return path.relative_to(CSRC).as_posix()


def test_folders():
    assert {p.name for p in CSRC.iterdir() if p.is_dir()} == {"common", *OPS}
    assert {_rel(p) for p in CSRC.iterdir() if p.is_file()} == {"module.cpp", "module.h"}
    for op in OPS:
        assert (CSRC / op / "bindings.cpp").is_file(), op


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_includes_are_rooted_and_exist(path):
    for inc in _includes(path):
        assert (CSRC / inc).is_file(), f"{_rel(path)} includes {inc!r}: includes name paths from csrc/"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_include_direction(path):
    rel = _rel(path)
    room = rel.split("/")[0] if "/" in rel else "module"
    for inc in _includes(path):
        target = inc.split("/")[0] if "/" in inc else "module"
        if room == "common":
            assert target == "common" or (rel == "common/bindings.cpp" and inc == "module.h"), (rel, inc)
        elif room in OPS:
            assert target in {room, "common"} or (rel == f"{room}/bindings.cpp" and inc == "module.h"), (rel, inc)


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_pybind11_only_at_the_boundary(path):
    if "pybind11" in path.read_text():
        assert _rel(path) in PYBIND, f"{_rel(path)} uses pybind11: argument checks belong in the binding files"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_source_over_600_lines(path):
    assert len(path.read_text().splitlines()) <= 600, _rel(path)
