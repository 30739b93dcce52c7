import json

import pytest

from cnpose_trt.cli.app import main as cli


def test_bench_cli_table_json_plot(tmp_path, capsys):
    code = cli(["bench", "--variant", "XS", "--backend", "onnxruntime", "torch", "--precision", "fp32", "int8",
                "--batch", "1", "2", "--iterations", "2", "--warmup", "1", "--engines", str(tmp_path / "e"),
                "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "machine:" in out.out and "engine img/s" in out.out and "decode" in out.out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    done = [r for r in rows if "skipped" not in r]
    assert {(r["backend"], r["precision"], r["batch"]) for r in done} >= {("onnxruntime", "fp32", 1),
                                                                         ("onnxruntime", "int8", 2)}
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["backend"], r["precision"]) for r in skipped] == [("torch", "int8")]
    assert "the torch backend builds fp32, fp16, not 'int8'" in skipped[0]["skipped"]
    for r in done:
        assert r["engine"]["img_s"] > 0 and r["e2e"]["p99_ms"] >= r["e2e"]["p50_ms"] > 0
        assert 0 < r["decode_share"] < 1
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "[4/4]" in out.err


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], r"--batch must be integers in 1\.\.4096, got \[0\]"),
    (["--batch", "1", "100000"], r"--batch must be integers in 1\.\.4096, got \[100000\]"),
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--variant", "M", "--batch", "4096"], r"--batch 4096 needs about 225\.0 GiB for variant M, more than half of this "
                                            r"machine's 16\.0 GiB; use --batch 145 or less"),
])
def test_bench_cli_bad_args(tmp_path, capsys, monkeypatch, args, message):
    """Issue 10, item 13: `bench --batch 100000` printed "skipped" and exited 0."""
    import re

    from cnpose_trt.eval import bench

    monkeypatch.setattr(bench, "_physical_memory", lambda: 16 << 30)  # the same verdict on every machine
    assert cli(["bench", *args, "--engines", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch("error: " + message + "\n", err), err
    assert not list(tmp_path.iterdir())  # refused before building anything


def test_bench_cli_fails_when_nothing_was_measured(tmp_path, capsys):
    code = cli(["bench", "--backend", "torch", "--precision", "int8", "--batch", "1", "--iterations", "1",
                "--engines", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 1 and "skipped: the torch backend builds fp32, fp16, not 'int8'" in out.out
    assert out.err.strip().splitlines()[-1] == "error: nothing was measured: every combination was skipped " \
                                               "(reasons above)"


def test_bench_keeps_what_it_measured_when_stopped(tmp_path, capsys, monkeypatch):
    """Issue 21, item 5: a run cut off after its first configuration still leaves its table rows, JSON and plot."""
    import re

    from cnpose_trt.build import builder as build

    real = build.build_engine
    calls = []

    def build_then_stop(config, **kwargs):  # open_engine hands build_engine a BuildConfig
        calls.append(config.precision)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config, **kwargs)

    monkeypatch.setattr(build, "build_engine", build_then_stop)
    assert cli(["bench", "--precision", "fp32", "fp16", "--batch", "1", "--iterations", "2", "--warmup", "0",
                "--engines", str(tmp_path / "e"), "--json", str(tmp_path / "b.json"),
                "--plot", str(tmp_path / "b.png")]) == 130
    out = capsys.readouterr()
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1)]
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert out.out.count("onnxruntime  fp32") == 1  # the row was printed as it finished
    assert re.match(r"2 configurations x batch 1: about [0-9.]+ min", out.err)  # the total estimate comes first
    assert out.err.rstrip().endswith("error: interrupted")


def test_bench_budget_skips_what_would_overrun(tmp_path, capsys, monkeypatch):
    """--budget: a configuration estimated past the budget is skipped with the estimate; the rest run."""
    from cnpose_trt.eval import bench

    guesses = {"fp32": 1.0, "fp16": 1e6}
    monkeypatch.setattr(bench, "estimate_seconds", lambda v, b, p, *a: guesses[p])
    code = cli(["bench", "--precision", "fp32", "fp16", "--batch", "1", "--iterations", "2", "--warmup", "0",
                "--budget", "600", "--engines", str(tmp_path / "e"), "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert "skipped" not in rows[0] and rows[0]["precision"] == "fp32"
    assert rows[1]["precision"] == "fp16" and rows[1]["skipped"].startswith("over --budget 600 s:")
    assert 0 < rows[0]["e2e_of_engine"] < 5


def test_bench_budget_must_be_positive(tmp_path, capsys):
    assert cli(["bench", "--budget", "0", "--engines", str(tmp_path)]) == 2
    assert "--budget must be a positive number of seconds, got 0.0" in capsys.readouterr().err


def test_bench_torch_on_the_cpu_for_m_is_opt_in(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the rule is for machines without CUDA")
    code = cli(["bench", "--variant", "M", "--backend", "torch", "--batch", "1", "--iterations", "1",
                "--engines", str(tmp_path), "--json", str(tmp_path / "b.json")])
    assert "skipped: the torch backend on the CPU" in capsys.readouterr().out
    assert code == 1
    [row] = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert "the torch backend on the CPU is a reference" in row["skipped"] and "--all" in row["skipped"]
    assert not list(tmp_path.glob("*.pt"))  # nothing was built
