#!/usr/bin/env python
"""Train the real ConvNeXtPose XS network on synthetic people (cnpose_trt.io.synthetic) with upstream's loss.

    .venv/bin/python tools/train_xs.py --out runs/xs --steps 20000 [--batch 32] [--threads 2]
    .venv/bin/python tools/train_xs.py --out runs/xs --steps 20000 --device cuda --workers 12 --amp
    .venv/bin/python tools/train_xs.py --out runs/xs --finalize      # write the small file from the last checkpoint

What upstream does (medialab-ku/ConvNeXtPose main/model.py, data/dataset.py, common/base.py), and so does this:
- input: the person box through upstream's box rule and the crop/normalisation of cnpose_trt.io.preprocess.prepare
  (0..255 pixels, (p - mean) / std);
- target per joint, in heatmap units: x, y = the joint's position in the crop / crop size * heatmap size;
  z = ((depth - root depth) / (2000 mm / 2) + 1) / 2 * depth_dim; joints outside the crop or the 2 m depth
  box get visibility 0;
- output: soft-argmax of the (N, 18 * D, H, W) heatmaps (one softmax over each joint's D*H*W voxels, then
  the expected x, y, z);
- loss: |output - target| * visibility, (x + y + z) / 3 per joint, mean over the batch and the joints;
- AdamW (lr 1e-3, weight decay 0.1), linear warm-up then half-cycle cosine to 1e-6, batch 32.
Differences: no drop-path (the package's model has none), no flip/rotation augmentation (the synthetic
poses already come in every heading and tilt), a small jitter of the person box instead of upstream's
scale augmentation, synthetic occluders instead of its random-noise rectangles.

Data are deterministic: training sample i is synthesize((seed, i)); step k uses samples k*batch .. (k+1)*batch-1,
so a resumed run sees exactly what an uninterrupted one would. The held-out evaluation set uses seed 1
(cnpose_trt.eval.evaluate's default); training uses seed 0.

Outputs in --out: last.pth.tar (resumable: model, optimizer, step; written atomically every --save-every
steps), train_log.txt (one line per logged step), and at the end the shipped file
(default convnextpose_xs_synthetic.pth.tar: the official layout {'epoch', 'network': {'module.<name>': tensor},
'optimizer': {}}, convolution weights stored in float16, BatchNorm in float32; loading restores float32)
with a JSON record beside it (steps, images, time, machine, loss, held-out MPJPE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnpose_trt.spec import BBOX_3D_DEPTH_MM, get_spec

SPEC = get_spec("XS")
TRAIN_SEED = 0
FINAL_NAME = "convnextpose_xs_synthetic.pth.tar"


# ----------------------------------------------------------------------------------------------- data

def targets(joints_img: np.ndarray, root_depth: float, crop_box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's coordinate target (J, 3) in heatmap units and visibility (J,) for one person.

    joints_img (J, 3) x_px, y_px, depth mm; crop_box (4,) the square box the crop shows.
    """
    h = w = SPEC.heatmap_size
    d = SPEC.depth_dim
    t = np.empty(joints_img.shape, np.float32)
    t[:, 0] = (joints_img[:, 0] - crop_box[0]) / crop_box[2] * w
    t[:, 1] = (joints_img[:, 1] - crop_box[1]) / crop_box[3] * h
    z01 = ((joints_img[:, 2] - root_depth) / (BBOX_3D_DEPTH_MM / 2) + 1.0) / 2.0
    t[:, 2] = z01 * d
    vis = (t[:, 0] >= 0) & (t[:, 0] < w) & (t[:, 1] >= 0) & (t[:, 1] < h) & (z01 >= 0) & (z01 < 1)
    return t, vis.astype(np.float32)


class SyntheticPeople(torch.utils.data.Dataset):
    """Sample i: a synthetic person (seed (seed, i)), its jittered box, crop and upstream target."""

    def __init__(self, seed: int, size: int, occluders: float, jitter: float) -> None:
        self.seed, self.size, self.occluders, self.jitter = seed, size, occluders, jitter

    def __len__(self) -> int:
        return 2 ** 62  # indexed by the sampler; never iterated to the end

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from cnpose_trt.io.preprocess import prepare
        from cnpose_trt.io.synthetic import synthesize

        scene = synthesize((self.seed, int(index)), width=self.size, height=self.size, occluder_prob=self.occluders)
        rng = np.random.default_rng((self.seed, int(index), 1))
        x, y, w, h = scene.boxes[0]
        cx = x + w / 2 + rng.normal(0, self.jitter) * w
        cy = y + h / 2 + rng.normal(0, self.jitter) * h
        k = math.exp(rng.normal(0, 2 * self.jitter))
        w, h = w * k, h * k
        x0, y0 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
        x1, y1 = min(float(self.size), cx + w / 2), min(float(self.size), cy + h / 2)
        crops, crop_boxes = prepare(scene.image, np.array([[x0, y0, x1 - x0, y1 - y0]]), SPEC.input_size, threads=1)
        t, vis = targets(scene.joints_img[0], float(scene.root_depth[0]), crop_boxes[0])
        return crops[0], t, vis


class IndexRange(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- model and loss

def soft_argmax(heatmaps: torch.Tensor, joints: int, depth: int) -> torch.Tensor:
    """(N, J*D, H, W) logits -> (N, J, 3) expected x, y, z in heatmap cells (one softmax per joint volume)."""
    n, _, h, w = heatmaps.shape
    p = torch.softmax(heatmaps.reshape(n, joints, depth * h * w).float(), dim=2).reshape(n, joints, depth, h, w)
    xs = torch.arange(w, device=p.device, dtype=p.dtype)
    ys = torch.arange(h, device=p.device, dtype=p.dtype)
    zs = torch.arange(depth, device=p.device, dtype=p.dtype)
    x = (p.sum(dim=(2, 3)) * xs).sum(dim=2)
    y = (p.sum(dim=(2, 4)) * ys).sum(dim=2)
    z = (p.sum(dim=(3, 4)) * zs).sum(dim=2)
    return torch.stack([x, y, z], dim=2)


def coord_loss(coords: torch.Tensor, target: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Upstream's L1 coordinate loss: |c - t| * vis, (x + y + z) / 3 per joint, mean over everything."""
    err = (coords - target).abs() * vis[..., None]
    return ((err[..., 0] + err[..., 1] + err[..., 2]) / 3.0).mean()


def init_for_training(model: nn.Module, seed: int) -> None:
    """Upstream's initialisation: convolutions truncated normal (std 0.02), zero bias; BatchNorm 1, 0, fresh stats."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.fmod(torch.randn(m.weight.shape, generator=gen), 2.0) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.reset_running_stats()


def learning_rate(step: int, total: int, warmup: int, lr: float, min_lr: float, elapsed: float | None = None,
                  budget: float | None = None) -> float:
    """Linear warm-up, then half-cycle cosine to min_lr (upstream's set_lr_v2, per step instead of per epoch).

    With a time budget (seconds) the cosine follows whichever is further along: steps or time."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if budget:
        progress = max(progress, (elapsed or 0.0) / budget)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------- checkpoints

def official_state(model: nn.Module, half: bool) -> dict[str, torch.Tensor]:
    """{'module.<name>': tensor}; with half, floating convolution weights/biases in float16 (BatchNorm stays float32:
    its running variance after the 0..255-scale stem does not fit float16's range)."""
    norm_prefixes = tuple(name + "." for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().clone()
        if half and v.is_floating_point() and not k.startswith(norm_prefixes):
            v = v.half()
        out["module." + k] = v
    return out


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def machine() -> dict[str, Any]:
    from cnpose_trt.eval.evaluate import machine_info

    info = machine_info()
    info.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_mpjpe(model: nn.Module, device: torch.device, count: int, size: int) -> dict[str, float]:
    """MPJPE / PA-MPJPE (mm) of the PyTorch model on `count` held-out synthetic people (seed 1), no flip."""
    from cnpose_trt.eval.evaluate import DEFAULT_SYNTHETIC_SEED, joint_errors
    from cnpose_trt.io.preprocess import prepare
    from cnpose_trt.io.synthetic import dataset
    from cnpose_trt.ops.geometry import cells_to_image, image_to_camera

    was_training = model.training
    model.eval()
    preds, gts = [], []
    for scene in dataset(DEFAULT_SYNTHETIC_SEED, count, width=size, height=size):
        crops, crop_boxes = prepare(scene.image, scene.boxes, SPEC.input_size)
        cells = soft_argmax(model(torch.from_numpy(crops).to(device)), SPEC.joints, SPEC.depth_dim).cpu().double()
        img = cells_to_image(cells.numpy(), crop_boxes, (SPEC.heatmap_size,) * 2, SPEC.depth_dim, scene.root_depth)
        preds.append(image_to_camera(img, np.broadcast_to(scene.intrinsics, (len(scene), 4))))
        gts.append(scene.joints_cam)
    model.train(was_training)
    p, g = np.concatenate(preds), np.concatenate(gts)
    return {"mpjpe": float(joint_errors(p, g).mean()), "pa_mpjpe": float(joint_errors(p, g, align="rigid").mean()),
            "people": len(p)}


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/train_xs"), help="run folder (checkpoints, log)")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps in total (default 20000)")
    p.add_argument("--batch", type=int, default=32, help="people per step (default 32, upstream's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5 %% of --steps)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=0, help="data-generating processes (default 0: in the main one)")
    p.add_argument("--amp", action="store_true", help="CUDA: bfloat16 autocast")
    p.add_argument("--size", type=int, default=256, help="synthetic image size (default 256)")
    p.add_argument("--occluders", type=float, default=0.3, help="chance of an occluder per person (default 0.3)")
    p.add_argument("--jitter", type=float, default=0.04, help="person-box jitter, fraction of its size (default 0.04)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help=f"training data seed (default {TRAIN_SEED})")
    p.add_argument("--init-seed", type=int, default=0, help="weight initialisation seed")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds of this run (wall); the cosine schedule follows the time "
                        "(for a lent GPU of fixed minutes)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=200, help="steps between resumable checkpoints")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out MPJPE checks (0: at the end)")
    p.add_argument("--eval-count", type=int, default=100, help="held-out people per check (default 100)")
    p.add_argument("--final", type=Path, default=None, help=f"shipped file (default OUT/{FINAL_NAME})")
    p.add_argument("--fp32-final", action="store_true", help="store the shipped file in float32")
    p.add_argument("--fresh", action="store_true", help="ignore an existing last.pth.tar (default: resume from it)")
    p.add_argument("--finalize", action="store_true", help="only write the shipped file from last.pth.tar")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "log_every", "save_every", "eval_count", "size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.workers < 0 or args.eval_every < 0:
        raise SystemExit("--workers and --eval-every must be >= 0")
    if args.time_budget is not None and not args.time_budget > 0:
        raise SystemExit(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    last = args.out / "last.pth.tar"
    final = args.final or args.out / FINAL_NAME
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k in ("batch", "lr", "min_lr", "weight_decay", "size", "occluders", "jitter", "seed", "init_seed")}

    from cnpose_trt.nn.model import build_model

    model = build_model(SPEC, warn_random=False)
    init_for_training(model, args.init_seed)
    model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    step, images, train_seconds, history = 0, 0, 0.0, []
    budget_used = 0.0  # wall seconds of the time budget spent by earlier runs of this folder
    if last.is_file() and not args.fresh:
        ck = torch.load(last, map_location="cpu", weights_only=True)
        if ck.get("config") != config:
            raise SystemExit(f"{last} was trained with {ck.get('config')}, not {config}; use --fresh or another --out")
        model.load_state_dict({k[len("module."):]: v for k, v in ck["network"].items()})
        opt.load_state_dict(ck["optimizer"])
        step, images, train_seconds = int(ck["step"]), int(ck["images"]), float(ck["train_seconds"])
        history = json.loads(ck.get("history", "[]"))
        budget_used = float(ck.get("budget_seconds_used", 0.0))
        print(f"resumed from {last} at step {step} ({images} images, {train_seconds:.0f} s)", flush=True)
        if ck.get("total_steps") != args.steps:
            print(f"note: --steps {args.steps} differs from the run's {ck.get('total_steps')}: the cosine schedule "
                  "changes from here on", flush=True)
    elif args.finalize:
        raise SystemExit(f"--finalize needs {last}")

    log = open(args.out / "train_log.txt", "a")  # noqa: SIM115 (open for the whole run)

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    run_started = 0.0

    def checkpoint() -> None:
        save_atomic({"epoch": step, "network": official_state(model, half=False), "optimizer": opt.state_dict(),
                     "step": step, "images": images, "train_seconds": train_seconds, "total_steps": args.steps,
                     "budget_seconds_used": budget_used + (time.perf_counter() - run_started if run_started else 0.0),
                     "config": config, "history": json.dumps(history)}, last)

    if args.time_budget and budget_used >= args.time_budget and not args.finalize:
        say(f"the time budget of {args.time_budget:.0f} s was spent by earlier runs ({budget_used:.0f} s): "
            "writing the shipped file")
    elif not args.finalize and step < args.steps:
        say(f"# train_xs: {step} -> {args.steps} steps, batch {args.batch}, device {device}, "
            f"{torch.get_num_threads()} torch threads, {args.workers} data workers; {json.dumps(machine())}")
        loader = torch.utils.data.DataLoader(
            SyntheticPeople(args.seed, args.size, args.occluders, args.jitter), batch_size=args.batch,
            sampler=IndexRange(step * args.batch, args.steps * args.batch), num_workers=args.workers,
            worker_init_fn=_worker_init if args.workers else None, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=False,
            # spawn, not fork: a child forked after the parent's OpenMP pool ran can deadlock in it
            multiprocessing_context="spawn" if args.workers else None)
        window_t, window_n, window_loss = time.perf_counter(), 0, 0.0
        run_started = time.perf_counter()
        for crops, target, vis in loader:
            elapsed = budget_used + time.perf_counter() - run_started  # the budget spans resumed runs
            if args.time_budget and elapsed >= args.time_budget:
                say(f"time budget of {args.time_budget:.0f} s reached at step {step}")
                break
            lr = learning_rate(step, args.steps, warmup, args.lr, args.min_lr, elapsed, args.time_budget)
            for group in opt.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            crops = crops.to(device, non_blocking=True)
            if device.type == "cuda":
                crops = crops.contiguous(memory_format=torch.channels_last)
            target, vis = target.to(device, non_blocking=True), vis.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                heatmaps = model(crops)
            loss = coord_loss(soft_argmax(heatmaps, SPEC.joints, SPEC.depth_dim), target, vis)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            train_seconds += time.perf_counter() - started
            step += 1
            images += len(crops)
            window_n += len(crops)
            window_loss += value
            if not math.isfinite(value):
                say(f"step {step}: loss is {value}; stopping (last good checkpoint: {last})")
                return 1
            if step % args.log_every == 0 or step == args.steps:
                now = time.perf_counter()
                rate = window_n / (now - window_t)
                mean = window_loss / (window_n / args.batch)
                history.append({"step": step, "loss": round(mean, 5), "lr": lr, "images": images})
                say(f"step {step}/{args.steps} loss {mean:.4f} lr {lr:.2e} images {images} "
                    f"{rate:.1f} img/s (wall, incl. data) train {train_seconds:.0f} s")
                window_t, window_n, window_loss = now, 0, 0.0
            if args.eval_every and step % args.eval_every == 0:
                m = heldout_mpjpe(model, device, args.eval_count, args.size)
                history.append({"step": step, "heldout": m})
                say(f"step {step}: held-out MPJPE {m['mpjpe']:.1f} mm, PA-MPJPE {m['pa_mpjpe']:.1f} mm "
                    f"({m['people']} people)")
                window_t = time.perf_counter()
            if step % args.save_every == 0 or step == args.steps:
                checkpoint()
        checkpoint()

    # The shipped file: official layout, small; then its own held-out score, as loaded back (float16 weights).
    state = official_state(model, half=not args.fp32_final)
    save_atomic({"epoch": step, "network": state, "optimizer": {}}, final)
    from cnpose_trt.nn.model import build_model as load_model

    shipped = load_model(SPEC, final).to(device)
    m = heldout_mpjpe(shipped, device, args.eval_count, args.size)
    record = {"file": final.name, "what": "ConvNeXtPose XS trained on synthetic people only (cnpose_trt.io.synthetic); "
                                          "not trained on real images", "variant": "XS",
              "storage": "float32" if args.fp32_final else "float16 convolutions, float32 BatchNorm",
              "bytes": final.stat().st_size, "steps": step, "images": images, "batch": args.batch,
              "train_seconds": round(train_seconds, 1), "machine": machine(), "device": str(device), "config": config,
              "total_steps": args.steps, "time_budget_s": args.time_budget, "warmup": warmup,
              "loss_last": history[-1] if history else None,
              "heldout": {**m, "seed": 1, "flip_test": False, "note": "PyTorch model as loaded from the file"},
              "loss_history": [h for h in history if "loss" in h][-200:]}
    final.with_suffix("").with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    say(f"wrote {final} ({final.stat().st_size / 1e6:.1f} MB) and its record; held-out MPJPE {m['mpjpe']:.1f} mm, "
        f"PA-MPJPE {m['pa_mpjpe']:.1f} mm on {m['people']} people")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
