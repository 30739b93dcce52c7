import json

from cnpose_trt.cli import main as cli


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
    assert "torch backend runs fp32 or fp16" in skipped[0]["skipped"]
    for r in done:
        assert r["engine"]["img_s"] > 0 and r["e2e"]["p99_ms"] >= r["e2e"]["p50_ms"] > 0
        assert 0 < r["decode_share"] < 1
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "[4/4]" in out.err


def test_bench_cli_bad_args(capsys):
    assert cli(["bench", "--batch", "0"]) == 2
    assert "--batch and --iterations must be >= 1" in capsys.readouterr().err
