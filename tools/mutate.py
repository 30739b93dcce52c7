"""Mutation check: plant each mutant of tools/mutants.py in a scratch copy, run the tests that must catch it.

    .venv/bin/python tools/mutate.py                       # every mutant
    .venv/bin/python tools/mutate.py --module spec,model   # only those modules (csrc = the C++ decode)
    .venv/bin/python tools/mutate.py --id model-residual-dropped --id spec-mean-bgr   (adds to --module)
    .venv/bin/python tools/mutate.py --list                # applicability only, runs nothing
    .venv/bin/python tools/mutate.py --output benchmarks/results/mutation-2026-11-27.txt

The checkout is copied once to a scratch folder (tracked and untracked, non-ignored files, plus the
compiled extension), so other people's edits to the checkout never see a mutant and a crash never
leaves one behind. There, each mutant in turn: its snippet is replaced (it must occur exactly once
in the file, else the mutant is "not applicable" and the list needs refreshing), csrc/ mutants
rebuild the extension CPU-only (CNPOSE_TRT_CUDA=0), its tests run with `pytest -x -q` under a time
limit, and the file (and extension) are restored. A baseline run of the same tests on the unmutated
copy comes first: a mutant whose tests already fail there is reported, not scored.

Outcomes: killed (a test failed, or the collection failed, or the time limit hit), survived (its
tests passed: either a missing test or an equivalent mutant; say which), not-applicable, error
(a test id that does not exist, a mutant that does not compile, a baseline failure).

Not part of the default test run (pytest collects tests/ only) nor of CI: a full run takes tens of
minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_GLOB = "_C*.so"


def load_mutants(path: Path) -> tuple:
    spec = importlib.util.spec_from_file_location("cnpose_mutants", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load the mutant list {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    mutants = tuple(module.MUTANTS)
    ids = [m.id for m in mutants]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise SystemExit(f"mutant ids must be unique, repeated: {', '.join(dupes)}")
    for m in mutants:
        if not m.tests or not m.find or m.find == m.replace:
            raise SystemExit(f"mutant {m.id}: needs tests, a snippet, and a replacement that differs")
    return mutants


@dataclasses.dataclass
class Outcome:
    mutant: object
    status: str          # killed | survived | not-applicable | error | baseline-fails
    detail: str = ""
    seconds: float = 0.0


def applicability(mutant, root: Path) -> str | None:
    """None when the snippet occurs exactly once in the file under root, else why not."""
    path = root / mutant.file
    if not path.is_file():
        return f"file {mutant.file} not found"
    count = path.read_text().count(mutant.find)
    if count == 0:
        return "snippet not found (the code changed: refresh the mutant)"
    if count > 1:
        return f"snippet found {count} times (make it unique)"
    return None


def _git_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def make_scratch(root: Path, dest: Path) -> None:
    """Copy tracked and untracked (not ignored) files and the compiled extension."""
    for rel in _git_files(root):
        src = root / rel
        if not src.is_file():  # deleted in the work tree, or a submodule
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    for so in (root / "cnpose_trt").glob(EXTENSION_GLOB):
        shutil.copy2(so, dest / "cnpose_trt" / so.name)


def scratch_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch)  # ahead of the editable install of the checkout
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["CNPOSE_TRT_ENGINES"] = str(scratch / "engines")
    env["CNPOSE_TRT_CUDA"] = "0"
    return env


def run(cmd: Sequence[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, combined output). The child gets its own process group,
    which is what a timeout stops (its pytest workers included)."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")


def build_extension(python: str, scratch: Path, env: dict[str, str], timeout: float) -> tuple[bool, str]:
    """Rebuild cnpose_trt._C in place, CPU only."""
    for so in (scratch / "cnpose_trt").glob(EXTENSION_GLOB):
        so.unlink()
    rc, out = run([python, "setup.py", "-q", "build_ext", "--inplace", "--force"], scratch, env, timeout)
    ok = rc == 0 and any((scratch / "cnpose_trt").glob(EXTENSION_GLOB))
    return ok, out


def check_import(python: str, scratch: Path, env: dict[str, str]) -> None:
    rc, out = run([python, "-c", "import cnpose_trt; print(cnpose_trt.__file__)"], scratch, env, 120)
    if rc != 0 or not out.strip().splitlines()[-1].startswith(str(scratch)):
        raise SystemExit(f"the scratch copy is not the package imported there:\n{out[-2000:]}")


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0][:160]
    tail = [ln for ln in output.strip().splitlines() if ln.strip()]
    return tail[-1][:160] if tail else ""


def pytest_cmd(python: str, tests: Iterable[str], *extra: str) -> list[str]:
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-rfE", *extra, *tests]


def baseline(python: str, scratch: Path, env: dict[str, str], tests: list[str], timeout: float
             ) -> tuple[set[str], str]:
    """Node ids that fail (or error) on the unmutated copy, from a JUnit report."""
    report = scratch / ".mutate-baseline.xml"
    rc, out = run(pytest_cmd(python, tests, f"--junitxml={report}"), scratch, env, timeout)
    if rc is None:
        raise SystemExit(f"the baseline run took longer than {timeout:.0f} s:\n{out[-3000:]}")
    if rc not in (0, 1) or not report.is_file():
        raise SystemExit(f"the baseline run could not run these tests (exit {rc}):\n{out[-3000:]}")
    failing = set()
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            file = case.get("classname", "").replace(".", "/") + ".py"
            failing.add(f"{file}::{case.get('name')}")
    return failing, out


def collect(python: str, scratch: Path, env: dict[str, str], tests: list[str], timeout: float) -> set[str]:
    """Every test id in the files the given ids name (ids of missing files are left out)."""
    files = sorted({t.split("::")[0] for t in tests if (scratch / t.split("::")[0]).is_file()})
    if not files:
        return set()
    rc, out = run(pytest_cmd(python, files, "--collect-only"), scratch, env, timeout)
    if rc not in (0, 5):
        raise SystemExit(f"collecting the tests failed (exit {rc}):\n{out[-3000:]}")
    return {ln.strip() for ln in out.splitlines() if "::" in ln and not ln.startswith(("ERROR", "FAILED"))}


def _covers(node: str, failing: set[str]) -> list[str]:
    """The failing test ids that a mutant's node id (a file, a test, or one parametrised case) selects."""
    return [f for f in failing if f == node or f.startswith(node + "::") or f.startswith(node + "[")]


def run_mutant(mutant, python: str, scratch: Path, env: dict[str, str], timeout: float, pristine_so: dict[str, bytes]
               ) -> Outcome:
    started = time.time()
    path = scratch / mutant.file
    original = path.read_text()
    path.write_text(original.replace(mutant.find, mutant.replace, 1))
    try:
        if mutant.module == "csrc":
            ok, out = build_extension(python, scratch, env, timeout)
            if not ok:
                return Outcome(mutant, "error", "the mutant does not compile: " + _first_failure(out),
                               time.time() - started)
        rc, out = run(pytest_cmd(python, mutant.tests, "-x"), scratch, env, timeout)
    finally:
        path.write_text(original)
        if mutant.module == "csrc":
            for so in (scratch / "cnpose_trt").glob(EXTENSION_GLOB):
                so.unlink()
            for name, data in pristine_so.items():
                (scratch / "cnpose_trt" / name).write_bytes(data)
    seconds = time.time() - started
    if rc is None:
        return Outcome(mutant, "killed", f"time limit ({timeout:.0f} s)", seconds)
    if rc == 0:
        return Outcome(mutant, "survived", "", seconds)
    if rc in (1, 2):  # test failures, or collection interrupted by an error the mutant caused
        return Outcome(mutant, "killed", _first_failure(out), seconds)
    if rc == 4:
        return Outcome(mutant, "error", "pytest usage error (a test id that does not exist?): " + _first_failure(out),
                       seconds)
    if rc == 5:
        return Outcome(mutant, "error", "no tests ran (test ids select nothing)", seconds)
    return Outcome(mutant, "error", f"pytest exit {rc}: " + _first_failure(out), seconds)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                          if ln.startswith("MemTotal")).split()[1])
        mem = f", {mem_kb / 2**20:.0f} GB"
    except (OSError, StopIteration, ValueError):
        mem = ""
    return f"{os.cpu_count()}-core {model or platform.processor() or platform.machine()}{mem}"


def report(outcomes: list[Outcome], header: list[str]) -> str:
    order = {"killed": 0, "survived": 1, "error": 2, "baseline-fails": 3, "not-applicable": 4}
    lines = list(header)
    width = max((len(o.mutant.id) for o in outcomes), default=10)
    for o in sorted(outcomes, key=lambda o: (order[o.status], o.mutant.module, o.mutant.id)):
        secs = f"{o.seconds:6.1f}s" if o.seconds else "       "
        lines.append(f"{o.status.upper():15s} {o.mutant.id:{width}s} {secs}  {o.mutant.reason}"
                     + (f"\n{'':16s}{'':{width}s}          -> {o.detail}" if o.detail else ""))
    counts = {s: sum(o.status == s for o in outcomes) for s in order}
    scored = counts["killed"] + counts["survived"]
    score = f"{100 * counts['killed'] / scored:.1f}%" if scored else "n/a"
    lines.append("")
    lines.append(f"score: {counts['killed']} killed / {scored} scored = {score}   "
                 f"(survived {counts['survived']}, errors {counts['error']}, baseline failing "
                 f"{counts['baseline-fails']}, not applicable {counts['not-applicable']})")
    by_module: dict[str, list[int]] = {}
    for o in outcomes:
        k = by_module.setdefault(o.mutant.module, [0, 0, 0])
        k[0] += o.status == "killed"
        k[1] += o.status == "survived"
        k[2] += o.status not in ("killed", "survived")
    lines.append("per module (killed/survived/other): " + ", ".join(
        f"{m} {k[0]}/{k[1]}/{k[2]}" for m, k in sorted(by_module.items())))
    stale = [o.mutant.id for o in outcomes if o.status == "not-applicable"]
    if stale:
        lines.append("refresh these mutants (their snippet is gone or ambiguous): " + ", ".join(stale))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mutants", type=Path, default=ROOT / "tools" / "mutants.py", help="the mutant list")
    p.add_argument("--module", action="append", default=[],
                   help="only mutants of these modules (comma-separated, repeatable; csrc = C++)")
    p.add_argument("--id", action="append", default=[], help="only these mutant ids (comma-separated, repeatable)")
    p.add_argument("--list", action="store_true", help="print each mutant's applicability and stop")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant (tests, and rebuild for csrc)")
    p.add_argument("--python", default=None, help="interpreter (default: the checkout's .venv, else this one)")
    p.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = p.parse_args(argv)

    mutants = load_mutants(args.mutants)
    modules = {m for arg in args.module for m in arg.split(",") if m}
    ids = {i for arg in args.id for i in arg.split(",") if i}
    unknown = ids - {m.id for m in mutants}
    if unknown:
        p.error(f"unknown mutant ids: {', '.join(sorted(unknown))}")
    # --module and --id add up: the mutants of those modules and those ids.
    selected = [m for m in mutants if (not modules and not ids) or m.module in modules or m.id in ids]
    if not selected:
        p.error("no mutant selected")
    python = args.python or str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).exists():
        python = sys.executable

    outcomes = {m.id: Outcome(m, "not-applicable", why) for m in selected if (why := applicability(m, ROOT))}
    runnable = [m for m in selected if m.id not in outcomes]
    if args.list:
        for m in selected:
            state = outcomes[m.id].detail if m.id in outcomes else "applicable"
            print(f"{m.module:11s} {m.id:36s} {state}")
        print(f"{len(runnable)} of {len(selected)} applicable")
        return 0

    started = time.time()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = [ln[3:] for ln in subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                              capture_output=True, text=True).stdout.splitlines()]
    scratch = Path(tempfile.mkdtemp(prefix="cnpose-mutate-"))
    try:
        make_scratch(ROOT, scratch)
        env = scratch_env(scratch)
        pristine: dict[str, bytes] = {}
        if any(m.module == "csrc" for m in runnable):
            print("building the unmutated extension in the scratch copy (CPU only) ...", flush=True)
            ok, out = build_extension(python, scratch, env, args.timeout)
            if not ok:
                print(out[-3000:], file=sys.stderr)
                for m in [m for m in runnable if m.module == "csrc"]:
                    outcomes[m.id] = Outcome(m, "error", "the unmutated extension does not build in the scratch copy")
                runnable = [m for m in runnable if m.module != "csrc"]
                make_scratch(ROOT, scratch)  # the checkout's extension back
        pristine = {so.name: so.read_bytes() for so in (scratch / "cnpose_trt").glob(EXTENSION_GLOB)}
        check_import(python, scratch, env)
        known = collect(python, scratch, env, sorted({t for m in runnable for t in m.tests}), args.timeout)
        for m in list(runnable):
            missing = [t for t in m.tests if not _covers(t, known)]
            if missing:
                outcomes[m.id] = Outcome(m, "not-applicable", "test ids not found (refresh the mutant): "
                                         + ", ".join(missing))
                runnable.remove(m)
        tests = sorted({t for m in runnable for t in m.tests})
        print(f"baseline: {len(tests)} test ids on the unmutated copy ...", flush=True)
        failing, out = baseline(python, scratch, env, tests, args.timeout * 3) if tests else (set(), "")
        if failing:
            print("baseline failures (their mutants are not scored):\n  " + "\n  ".join(sorted(failing)), flush=True)
        for i, m in enumerate(runnable, 1):
            broken = [f for t in m.tests for f in _covers(t, failing)]
            if broken:
                outcomes[m.id] = Outcome(m, "baseline-fails", "fails unmutated: " + ", ".join(sorted(broken)[:3]))
            else:
                outcomes[m.id] = run_mutant(m, python, scratch, env, args.timeout, pristine)
            o = outcomes[m.id]
            print(f"[{i}/{len(runnable)}] {o.status:14s} {m.id} ({o.seconds:.0f} s) {o.detail}", flush=True)
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    header = [f"cnpose_trt mutation check, {datetime.date.today().isoformat()}",
              f"machine: {machine()}; python {platform.python_version()}",
              f"checkout: {ROOT} at {head.strip()}"
              + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else ""),
              f"command: tools/mutate.py {' '.join(argv if argv is not None else sys.argv[1:])}",
              f"mutants: {len(selected)} selected of {len(mutants)}; wall time {time.time() - started:.0f} s", ""]
    text = report([outcomes[m.id] for m in selected], header)
    print("\n" + text, end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
