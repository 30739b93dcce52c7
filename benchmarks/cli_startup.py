"""Wall time of CLI commands on a cached engine, for one or two checkouts of the package, interleaved.

    python benchmarks/cli_startup.py --root after=. [--root before=/path/to/older/checkout] [--rounds 5]

Each round runs every command once per checkout, in alternating order, as a fresh process (what a user
waits for); the table gives the median and the range. Commands: predict with --engine (the engine
file itself), predict with --checkpoint (found in the cache), a second build (a cache hit), and a
hand-written script that loads the engine and estimates directly (the floor a CLI can reach).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HAND_WRITTEN = (
    "import sys, json, numpy as np, cv2, cnpose_trt\n"
    "engine = cnpose_trt.load_engine(sys.argv[1])\n"
    "image = cv2.cvtColor(cv2.imread(sys.argv[2]), cv2.COLOR_BGR2RGB)\n"
    "box = [float(v) for v in sys.argv[3].split(',')]\n"
    "r = cnpose_trt.estimate(engine, image, [box])\n"
    "print(json.dumps(r.to_dict()))\n")


def run(root: Path, args: list[str]) -> float:
    # Not in the checkout: python -c puts the working folder ahead of PYTHONPATH on sys.path.
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{root}: {' '.join(args[:4])}... failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    roots = dict(r.split("=", 1) for r in a.root)
    roots = {k: Path(v).resolve() for k, v in roots.items()}
    first = next(iter(roots.values()))
    sys.path.insert(0, str(first))
    from cnpose_trt import build_engine
    from cnpose_trt.io.draw import save_image
    from cnpose_trt.io.synthetic import synthesize
    from cnpose_trt.shipped import SHIPPED_XS

    work = Path(tempfile.mkdtemp(prefix="cnpose-cli-startup-"))
    engines = work / "engines"
    built = build_engine(checkpoint=SHIPPED_XS, out_dir=engines)
    scene = synthesize(7, width=640, height=480)
    image = save_image(work / "scene.png", scene.image)
    box = ",".join(f"{v:.1f}" for v in scene.boxes[0])
    cli = ["-c", "import sys; from cnpose_trt.cli.app import main; sys.exit(main(sys.argv[1:]))"]
    commands = {
        "predict --engine": [*cli, "predict", str(image), "--bbox", box, "--engine", str(built.path)],
        "predict --checkpoint (cached)": [*cli, "predict", str(image), "--bbox", box, "--checkpoint",
                                          str(SHIPPED_XS), "--engines", str(engines)],
        "build (cached)": [*cli, "build", "--checkpoint", str(SHIPPED_XS), "--out", str(engines)],
        "hand-written script": ["-c", HAND_WRITTEN, str(built.path), str(image), box],
    }
    for root in roots.values():  # warm the file cache and record each checkout's request once
        for args in commands.values():
            run(root, args)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(a.rounds):
        order = list(roots.items()) if r % 2 == 0 else list(roots.items())[::-1]
        for cmd, args in commands.items():
            for name, root in order:
                times.setdefault((cmd, name), []).append(run(root, args))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs; {a.rounds} rounds, fresh process each; seconds")
    print(f"{'command':<32}" + "".join(f"{n + ' median':>16}{'range':>14}" for n in roots))
    rows = []
    for cmd in commands:
        line = f"{cmd:<32}"
        for name in roots:
            t = times[(cmd, name)]
            line += f"{statistics.median(t):>16.2f}{f'{min(t):.2f}-{max(t):.2f}':>14}"
            rows.append({"command": cmd, "checkout": name, "seconds": t, "median": statistics.median(t)})
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"machine": cpu, "cores": os.cpu_count(), "rounds": a.rounds,
                                      "checkouts": {k: str(v) for k, v in roots.items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
