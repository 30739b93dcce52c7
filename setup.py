"""Builds the compiled extension cnpose_trt._C from csrc/ (metadata lives in pyproject.toml).

Sources: every .cpp under csrc/ (module.cpp, the pybind11 module; common/, the shared argument
checks, processor and thread helpers; decode/ and crop/, each op's CPU kernels, with their
AVX-512 / AVX2 / portable versions picked at run time, and its bindings) and, with CUDA, every
.cu under csrc/. Includes name paths from csrc/ ("common/checks.h"). The CPU kernels are always
built. The CUDA kernels are built when nvcc is found, or forced:
    CNPOSE_TRT_CUDA=1   build with CUDA, fail if nvcc is missing
    CNPOSE_TRT_CUDA=0   build without CUDA
    CNPOSE_TRT_CUDA_ARCH="80;90"   GPU architectures (default 75;80;90, plus PTX for the newest)
The CUDA runtime is linked statically, so the module imports on machines without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_ARCH = "75;80;90"


def say(msg: str) -> None:
    print(f"cnpose_trt build: {msg}", file=sys.stderr, flush=True)


def find_cuda() -> tuple[str, Path] | None:
    """(nvcc path, CUDA home) or None."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, homes):
        home_p = Path(home)
        cand = home_p / "bin" / "nvcc"
        if (home_p / "include" / "cuda_runtime.h").is_file() and (nvcc or cand.is_file()):
            return nvcc or str(cand), home_p
    return None


def cuda_wanted() -> tuple[bool, str, tuple[str, Path] | None]:
    flag = os.environ.get("CNPOSE_TRT_CUDA", "").strip().lower()
    found = find_cuda()
    if flag in ("0", "off", "false", "no"):
        return False, "CNPOSE_TRT_CUDA=0", found
    if flag in ("1", "on", "true", "yes"):
        if found is None:
            raise SystemExit("cnpose_trt build: CNPOSE_TRT_CUDA=1 but nvcc / the CUDA headers were not found "
                             "(set CUDA_HOME)")
        return True, "CNPOSE_TRT_CUDA=1", found
    if found is None:
        return False, "nvcc not found", None
    return True, f"nvcc found at {found[0]}", found


def gencode_flags(arch_list: str) -> list[str]:
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in arch_list.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"cnpose_trt build: CNPOSE_TRT_CUDA_ARCH must list compute capabilities like '80;90', "
                         f"got {arch_list!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        use_cuda, why, found = cuda_wanted()
        stamp = self._mode_stamp(use_cuda)
        for ext in self.extensions:
            # Rebuild when a header or CUDA source changes, or the CUDA mode does (an in-place
            # build would otherwise keep a module of the other mode: the .cpp files look unchanged).
            ext.depends += [str(stamp), *map(str, sorted(CSRC.rglob("*.h"))), *map(str, sorted(CSRC.rglob("*.cu")))]
            if use_cuda:
                self._add_cuda(ext, *found)
        say(f"building cnpose_trt._C {'WITH' if use_cuda else 'WITHOUT'} CUDA ({why})")
        super().build_extensions()

    def _mode_stamp(self, use_cuda: bool) -> Path:
        """A file whose content names the build mode, rewritten (newer) only when the mode changes."""
        stamp = Path(self.build_temp) / "cnpose_trt_build_mode.txt"
        mode = f"cuda={use_cuda} arch={os.environ.get('CNPOSE_TRT_CUDA_ARCH', DEFAULT_ARCH) if use_cuda else '-'}\n"
        stamp.parent.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file() or stamp.read_text() != mode:
            stamp.write_text(mode)
        return stamp

    def _add_cuda(self, ext: Pybind11Extension, nvcc: str, home: Path) -> None:
        import pybind11

        arch = os.environ.get("CNPOSE_TRT_CUDA_ARCH", DEFAULT_ARCH)
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in sorted(CSRC.rglob("*.cu")):
            obj = out_dir / src.relative_to(CSRC).with_suffix(".o")  # decode/x.o: names may repeat across folders
            obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "-Xcompiler", "-fvisibility=hidden", "-I", str(CSRC), "-I", pybind11.get_include(),
                   "--expt-relaxed-constexpr", "-lineinfo", *gencode_flags(arch)]
            say(f"nvcc {src.relative_to(CSRC)} for sm {arch}")
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        ext.extra_objects += objects
        ext.define_macros.append(("CNPOSE_WITH_CUDA", "1"))
        ext.include_dirs.append(str(home / "include"))
        libdir = home / "lib64" if (home / "lib64").is_dir() else home / "lib"
        ext.library_dirs.append(str(libdir))
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]


ext = Pybind11Extension(
    "cnpose_trt._C",
    sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp")),
    include_dirs=[str(CSRC)],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
