"""The engine cache under faults: rebuilds raced by readers, builds killed at every step, signals,
read-only caches, file modes, full disks and paths of the wrong type (issue 10, items 1-4)."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import signal_swallowed

from cnpose_trt import BuildError, EngineError, build_engine, load_engine
from cnpose_trt import cache as cache_mod
from cnpose_trt.cache import clean_stale, sidecar_path, temp_dir

# A rebuild in another process. It makes the ONNX Runtime engine differ from build to build (a
# random doc string), as TensorRT engines do, so that every rebuild replaces the engine file and
# deletes the old one; with a step name, it SIGKILLs itself there.
WRITER = r"""
import os, signal, sys, uuid
import onnx
from cnpose_trt import cache
from cnpose_trt.build import builder as build
from cnpose_trt.build import export
from cnpose_trt.backends.onnxruntime import compiler as ort_compiler

out, kill_at, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_optimise = ort_compiler.optimise

def optimise(src, dst):
    real_optimise(src, dst)
    model = onnx.load(str(dst))
    model.doc_string = uuid.uuid4().hex
    onnx.save(model, str(dst))

ort_compiler.optimise = optimise
if kill_at != "none":
    module = export if kill_at == "export_onnx" else cache
    real = getattr(module, kill_at)

    def die(*args, **kwargs):
        if kill_at == "export_onnx":
            real(*args, **kwargs)  # die once the exported graph lies in the temporary folder
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(module, kill_at, die)
for _ in range(rounds):
    print(build.build_engine("XS", out_dir=out, max_batch=2, force=True).meta["engine_sha256"], flush=True)
"""


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
    """A cache holding one XS onnxruntime engine (max_batch 2); tests work on copies."""
    folder = tmp_path_factory.mktemp("base") / "engines"
    build_engine("XS", out_dir=folder, max_batch=2)
    return folder


@pytest.fixture
def engines(base_cache, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(base_cache, folder)
    (handle,) = [p.with_suffix("") for p in folder.glob("*.json")]
    return folder, handle, json.loads(sidecar_path(handle).read_text())


def _leftovers(folder: Path, meta: dict) -> list[str]:
    """Everything in the cache that is not the lock, the sidecar, the engine file it names or the record
    of requests served (build.Request)."""
    keep = {meta["engine_file"], "requests"}
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in keep and not p.name.endswith((".lock", ".json")))


@contextlib.contextmanager
def _readers(handle: Path):
    """A thread loading the engine in a loop; yields the list of engine sha256s (or exceptions) seen."""
    seen: list = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                seen.append(load_engine(handle, threads=1).meta["engine_sha256"])
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                seen.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(60)


def _writer(folder: Path, kill_at: str = "none", rounds: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(folder), kill_at, str(rounds)],
                          capture_output=True, text=True, timeout=600)


def test_readers_see_the_old_or_the_new_engine_during_rebuilds(engines):
    folder, handle, before = engines
    with _readers(handle) as seen:
        proc = _writer(folder, rounds=3)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = proc.stdout.split()
    assert len(set(built)) == 3 and before["engine_sha256"] not in built
    errors = [x for x in seen if isinstance(x, Exception)]
    assert not errors, f"{len(errors)} of {len(seen)} loads failed, first: {errors[0]!r}"
    assert len(seen) >= 5 and set(seen) <= {before["engine_sha256"], *built}
    now = load_engine(handle)
    assert now.meta["engine_sha256"] == built[-1] and now.path.name == now.meta["engine_file"]
    assert _leftovers(folder, now.meta) == []  # each rebuild deleted the engine file it replaced


@pytest.mark.parametrize("kill_at", ["export_onnx", "install_file", "write_json", "remove_replaced"])
def test_rebuild_killed_at_any_step_leaves_a_loadable_engine(engines, monkeypatch, kill_at):
    folder, handle, before = engines
    with _readers(handle) as seen:
        proc = _writer(folder, kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not [x for x in seen if isinstance(x, Exception)]
    engine = load_engine(handle)
    committed = kill_at == "remove_replaced"  # killed after the sidecar was replaced
    assert (engine.meta["engine_sha256"] != before["engine_sha256"]) == committed
    left = _leftovers(folder, engine.meta)
    assert any(name.endswith(".tmp") for name in left), left  # SIGKILL leaves the temporary folder ...
    monkeypatch.setattr(cache_mod, "STALE_GRACE_S", 0.0)  # (its files are younger than the grace period)
    again = build_engine("XS", out_dir=folder, max_batch=2)
    assert again.cached and again.meta == engine.meta
    assert _leftovers(folder, engine.meta) == []  # ... and the next build removes it and unused engine files


@pytest.mark.parametrize("sig, status, line", [(signal.SIGTERM, 143, "error: terminated by SIGTERM"),
                                               (signal.SIGINT, 130, "error: interrupted")])
def test_build_cli_signals(engines, sigint_default, sig, status, line):
    folder, handle, before = engines
    # sigint_default: a harness may start us with SIGINT ignored, which the child would inherit
    proc = subprocess.Popen([sys.executable, "-m", "cnpose_trt.build", "--variant", "XS", "--max-batch", "2",
                             "--out", str(folder), "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    err = []
    for text in proc.stderr:  # wait until the export is under way
        err.append(text)
        if "[2/5]" in text:
            break
    proc.send_signal(sig)
    out, rest = proc.communicate(timeout=300)
    err = "".join(err) + rest
    assert proc.returncode == status, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert out == "" and _leftovers(folder, before) == []  # the temporary folder was removed
    assert load_engine(handle).meta["engine_sha256"] == before["engine_sha256"]


def test_stale_temporaries_are_those_whose_writer_died(tmp_path, monkeypatch):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cnpose_trt.cache import temp_dir\n"
         f"with temp_dir({str(tmp_path)!r}, 'XS') as t:\n"
         "    (t / 'big.bin').write_bytes(b'x' * 1000); print(t, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        held = Path(holder.stdout.readline().strip())
        monkeypatch.setattr(cache_mod, "STALE_GRACE_S", 0.0)
        (tmp_path / ".orphan.onnx.json.0123456789ab.tmp").write_text("{")  # an atomic_write whose writer died
        (tmp_path / "calib-XS-0123.json").write_text("{}")  # not a temporary: never touched
        assert [p.name for p in clean_stale(tmp_path)] == [".orphan.onnx.json.0123456789ab.tmp"]
        assert held.is_dir()  # its writer is alive and holds its lock
        holder.kill()
        holder.wait(30)
        assert clean_stale(tmp_path) == [held] and not held.exists()
    finally:
        holder.kill()
    with temp_dir(tmp_path, "XS") as mine:  # a temporary of this very process is alive too
        monkeypatch.setattr(cache_mod, "STALE_GRACE_S", 0.0)
        assert clean_stale(tmp_path) == [] and mine.is_dir()
    monkeypatch.setattr(cache_mod, "STALE_GRACE_S", 3600.0)
    (tmp_path / ".fresh.tmp").write_text("")  # younger than the grace period: its writer may not have locked it
    assert clean_stale(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fresh.tmp", "calib-XS-0123.json"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_are_created_as_open_creates_them(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        built = build_engine("XS", out_dir=tmp_path, backend="torch")
    finally:
        os.umask(old)
    assert oct(built.path.stat().st_mode & 0o777) == oct(mode)
    assert oct(sidecar_path(built.path).stat().st_mode & 0o777) == oct(mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_another_user_loads_the_engines(base_cache):
    # /tmp, not TMPDIR: every folder above must be traversable by the other user
    shared = Path(tempfile.mkdtemp(prefix="cnpose-shared-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        folder = shared / "engines"
        old = os.umask(0o022)
        try:
            built = build_engine("XS", out_dir=folder, backend="torch")
        finally:
            os.umask(old)
        # What load_engine does with the files, as user nobody (this venv's interpreter may lie under
        # /root, out of nobody's reach): read the sidecar, hash the engine file.
        side = sidecar_path(built.path)
        proc = subprocess.run(["sha256sum", str(built.path), str(side)], capture_output=True, text=True,
                              timeout=60, user=65534, group=65534)
        assert proc.returncode == 0, proc.stderr
        digests = dict(reversed(line.split()) for line in proc.stdout.splitlines())
        assert digests[str(built.path)] == json.loads(side.read_text())["engine_sha256"]
    finally:
        shutil.rmtree(shared)


@contextlib.contextmanager
def _read_only(folder: Path):
    """folder made read-only for real: a read-only bind mount as root, else chmod."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs CAP_SYS_ADMIN)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_cache_serves_its_engines(engines, capsys):
    from cnpose_trt.cli.app import main as cli
    from cnpose_trt.io.draw import demo_image, save_image

    folder, handle, before = engines
    for lock in folder.glob(".*.lock"):
        lock.unlink()  # shipped without lock files, which cannot be created there
    image = save_image(folder.parent / "scene.png", demo_image()[0])
    with _read_only(folder):
        with pytest.raises(OSError):
            (folder / "probe").write_text("")
        hit = build_engine("XS", out_dir=folder, max_batch=2)
        assert hit.cached and hit.meta == before
        assert load_engine(handle).meta == before
        assert cli(["predict", str(image), "--bbox", "100,40,300,400", "--engine", str(handle)]) == 0
        assert json.loads(capsys.readouterr().out)["people"]
        for kwargs in ({"force": True}, {"max_batch": 3}):
            with pytest.raises(BuildError, match=r"read-only .* new ones cannot be built there"):
                build_engine("XS", out_dir=folder, **{"max_batch": 2, **kwargs})
        assert cli(["build", "--variant", "XS", "--max-batch", "2", "--out", str(folder), "--force"]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "read-only" in errors[0] and err.strip().endswith(errors[0])
    assert _leftovers(folder, before) == []


def test_disk_full_is_a_clear_build_error(engines, monkeypatch):
    folder, handle, before = engines

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))

    monkeypatch.setattr(cache_mod, "install_file", full)
    with pytest.raises(BuildError, match="no space left on the device holding the engine cache"):
        build_engine("XS", out_dir=folder, max_batch=2, force=True)
    monkeypatch.undo()
    from cnpose_trt.build import export

    monkeypatch.setattr(export, "export_onnx", full)
    with pytest.raises(BuildError, match="no space left|is full"):
        build_engine("XS", out_dir=folder, max_batch=2, force=True)
    assert load_engine(handle).meta == before and _leftovers(folder, before) == []


@contextlib.contextmanager
def _tmpfs(folder: Path, megabytes: int):
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                                            str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_tmpfs_keeps_the_previous_engine(base_cache, tmp_path):
    # 34 MB: the previous engine (14 MB) and the exported graph (14 MB) fit, the optimised one does not;
    # ONNX Runtime reports that write as an invalid protobuf.
    with _tmpfs(tmp_path / "small", 34) as folder:
        for p in base_cache.iterdir():
            if p.is_file():  # the engine, its sidecar, the lock (not the record of requests)
                shutil.copy(p, folder / p.name)
        (handle,) = [p.with_suffix("") for p in folder.glob("*.json")]
        before = json.loads(sidecar_path(handle).read_text())
        with pytest.raises(BuildError, match=r"the disk holding the engine cache .* is full"):
            build_engine("XS", out_dir=folder, max_batch=2, force=True)
        assert load_engine(handle).meta == before and _leftovers(folder, before) == []


def test_cache_paths_of_the_wrong_type(tmp_path, monkeypatch, capsys):
    from cnpose_trt.cli.app import main as cli

    not_a_folder = tmp_path / "engines.txt"
    not_a_folder.write_text("")
    with pytest.raises(BuildError, match="engines.txt is a file, not a folder"):
        build_engine("XS", out_dir=not_a_folder, backend="torch")
    monkeypatch.setenv("CNPOSE_TRT_ENGINES", str(not_a_folder))
    with pytest.raises(BuildError, match=r"is a file, not a folder \(from --out / --engines or \$CNPOSE_TRT_ENG"):
        build_engine("XS", backend="torch")
    image = tmp_path / "x.png"
    from cnpose_trt.io.draw import demo_image, save_image

    save_image(image, demo_image()[0])
    assert cli(["predict", str(image), "--bbox", "1,1,50,50"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.delenv("CNPOSE_TRT_ENGINES")
    with pytest.raises(BuildError, match=r"cannot write in the engine cache .*engines.txt/sub: Not a directory"):
        build_engine("XS", out_dir=not_a_folder / "sub", backend="torch")

    folder = tmp_path / "cache"
    first = build_engine("XS", out_dir=folder, backend="torch")
    side = sidecar_path(first.path)
    side.unlink()
    side.mkdir()  # a folder where the sidecar belongs
    with pytest.raises(EngineError, match="is a folder, not a file"):
        load_engine(first.path)
    with pytest.raises(BuildError, match=r"cannot write in the engine cache .*Is a directory"):
        build_engine("XS", out_dir=folder, backend="torch")
    side.rmdir()
    (folder / f".{first.path.name.split('.')[0]}.lock").unlink()
    (folder / f".{first.path.name.split('.')[0]}.lock").mkdir()  # a folder where the lock file belongs
    with pytest.raises(BuildError, match=r"cannot write in the engine cache .*\.lock"):
        build_engine("XS", out_dir=folder, backend="torch")


def test_load_retries_when_a_rebuild_commits_meanwhile(engines, monkeypatch):
    """The reader's side of item 1, made deterministic: the engine file named by the sidecar it read
    is deleted by a commit before the reader opens it."""
    from cnpose_trt.runtime import engine as engine_mod

    folder, handle, before = engines
    new = folder / cache_mod.engine_file_name(handle, "f" * 64)
    real = engine_mod.read_sidecar
    calls = []

    def read_then_rebuild(path):
        meta = real(path)
        if not calls:  # a rebuild commits right after this read: new file, new sidecar, old file gone
            shutil.copy(folder / meta["engine_file"], new)
            cache_mod.write_json(sidecar_path(handle), dict(meta, engine_file=new.name))
            (folder / meta["engine_file"]).unlink()
        calls.append(path)
        return meta

    monkeypatch.setattr(engine_mod, "read_sidecar", read_then_rebuild)
    assert load_engine(handle).path == new and len(calls) == 2
    # Without a new sidecar a missing engine file is an error, not a retry loop.
    new.unlink()
    with pytest.raises(EngineError, match="is missing"):
        load_engine(handle)
    assert len(calls) == 3


@pytest.mark.parametrize("sig, status, line", [(signal.SIGINT, 130, "error: interrupted"),
                                               (signal.SIGTERM, 143, "error: terminated by SIGTERM")])
def test_build_cli_stop_swallowed_by_library_code_still_stops(engines, monkeypatch, capsys, sigint_default, sig,
                                                               status, line):
    """copyreg._slotnames wraps a line in a bare except: a Ctrl-C landing there (during the model's
    deepcopy) was lost and the build replaced the engine (seen in CI). The stop is remembered and
    raised again at the next step, before anything is committed."""
    from cnpose_trt.build import export as export_mod
    from cnpose_trt.cli.build import main as build_main

    folder, handle, before = engines
    real = export_mod.export_onnx

    def swallowing_export(*args, **kwargs):
        signal_swallowed(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "export_onnx", swallowing_export)
    previous = signal.getsignal(sig)
    assert build_main(["--variant", "XS", "--max-batch", "2", "--out", str(folder), "--force"]) == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == line and "[3/5]" not in err, err
    assert signal.getsignal(sig) is previous  # handlers restored
    assert _leftovers(folder, before) == []
    assert load_engine(handle).meta["engine_sha256"] == before["engine_sha256"]


def test_run_command_reports_a_stop_swallowed_after_the_last_check(capsys, sigint_default):
    from cnpose_trt.interrupts import raise_if_stopped, run_command

    def fn():
        signal_swallowed(signal.SIGINT)
        return 0

    assert run_command(fn) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    raise_if_stopped()  # nothing pending once the command has ended
    assert run_command(lambda: 0) == 0


def test_ignored_signals_stay_ignored_and_other_handlers_come_back():
    """A script's background job starts with SIGINT ignored, nohup ignores SIGHUP: a command keeps
    them so. Any other handler (one Ray's driver left behind, say) is replaced while the command
    runs, so a stop is remembered, and restored after."""
    from cnpose_trt.interrupts import signals_as_exceptions

    def mine(signum, frame):
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, mine)
        with signals_as_exceptions():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (mine, signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is mine
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with signals_as_exceptions():
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGHUP) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_failed_command_keeps_its_one_line_when_a_stop_was_swallowed(capsys, sigint_default):
    from cnpose_trt.interrupts import run_command

    def fn():
        signal_swallowed(signal.SIGINT)
        print("error: the input is bad", file=sys.stderr)
        return 2

    assert run_command(fn) == 2
    assert capsys.readouterr().err == "error: the input is bad\n"


def test_keep_handlers_undoes_a_library_s_handlers():
    """ray.init installs a SIGTERM handler that exits without a word; batch jobs call it through keep_handlers."""
    from cnpose_trt.interrupts import keep_handlers, signals_as_exceptions

    def installs():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        return 7

    with signals_as_exceptions():
        ours = signal.getsignal(signal.SIGTERM)
        assert keep_handlers(installs) == 7 and signal.getsignal(signal.SIGTERM) is ours
