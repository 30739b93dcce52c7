"""`cnpose-trt inspect`: what a file holds. An engine (its file or .json sidecar) is described from
its sidecar, without loading it or torch: variant, precision, backend, I/O, weights, cache key, and
whether the engine file is there with the bytes the sidecar names, and what `--backend auto` measured
where it chose the engine. A checkpoint is described by the
configuration its tensors describe (nn.checkpoint.detect_spec) and the variant it matches.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cache import file_sha256, sidecar_path
from ..nn.checkpoint import detect_spec, load_checkpoint, network_of
from ..runtime.engine import read_sidecar
from ..spec import ROOTNET, match_variant


def add_inspect_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("file", type=Path, help="a checkpoint (.pth/.pth.tar/.pt), or an engine file or its .json sidecar")


def run_inspect(args: argparse.Namespace) -> int:
    """`cnpose-trt inspect FILE` from parsed options: an engine or a checkpoint."""
    if _is_engine(Path(args.file)):
        return _inspect_engine(Path(args.file))
    return _inspect_checkpoint(args.file)


def _is_engine(path: Path) -> bool:
    """An engine handle, engine file or sidecar: the path is a .json, or has a sidecar beside it."""
    return path.suffix == ".json" or sidecar_path(path).is_file()


def _inspect_engine(path: Path) -> int:
    """What an engine is, from its sidecar (no torch, no engine load): variant, precision, backend, I/O,
    weights, cache key; and whether its file is there with the bytes the sidecar names."""
    meta = read_sidecar(path)
    side = sidecar_path(path)
    engine_file = side.parent / meta["engine_file"]
    if not engine_file.is_file():
        state = "missing: rebuild"
    elif file_sha256(engine_file) != meta["engine_sha256"]:
        state = "damaged (its sha256 differs from the sidecar's): rebuild with --force"
    else:
        state = "present, sha256 as recorded"

    def io(d: dict[str, Any]) -> str:
        return f"{d['name']} {d['dtype']} ({', '.join(map(str, d['shape']))})"

    weights = meta.get("weights", {})
    print(f"engine:          {side}")
    print(f"file:            {engine_file.name}: {state}")
    if meta.get("model") == "rootnet":
        print(f"model:           RootNet ({meta['head']}); outputs x, y cells (0..{ROOTNET.output_size - 1}) and "
              "gamma: depth mm = gamma * k, on the host")
    else:
        print(f"variant:         {meta['variant']} ({meta['head']})")
    print(f"precision:       {meta['precision']}, backend {meta['backend']}, max batch {meta['max_batch']}")
    print(f"input:           {io(meta['input'])}, {meta['input'].get('convention', '?')}")
    print(f"output:          {io(meta['output'])}")
    print(f"weights:         {weights.get('source', '?')}" + (" (random: outputs are meaningless)"
                                                               if weights.get("random") else ""))
    print(f"cache key:       {meta['cache_key']}")
    version = meta.get("versions", {}).get("cnpose_trt", "?")
    print(f"built:           {meta.get('built_at', '?')} by cnpose_trt {version}"
          + (f", rel. L2 vs PyTorch {meta['parity_rel_l2_vs_torch']:.1e}" if "parity_rel_l2_vs_torch" in meta else ""))
    roots = meta.get("roots_vs_torch")
    if isinstance(roots, dict):
        print(f"checked:         roots vs PyTorch max {roots.get('max_cells', float('nan')):.1e} cells, gamma "
              f"{roots.get('max_gamma_rel', float('nan')):.1e} (relative) on {roots.get('samples', '?')} crops")
    if isinstance(meta.get("auto"), dict):
        _print_auto(meta["auto"])
    return 0


def _print_auto(rec: dict[str, Any]) -> None:
    """What `--backend auto` measured before it chose this engine (build/auto.py records it)."""
    cpu, choice = rec.get("cpu") or {}, rec.get("choice") or {}
    print(f"chosen by auto:  {choice.get('backend', '?')} {choice.get('precision', '?')} for the "
          f"{rec.get('requested_precision', '?')} request, measured {rec.get('measured_at', '?')} on "
          f"{cpu.get('model', '?')} ({' '.join(cpu.get('flags') or []) or 'no flags read'}, "
          f"{cpu.get('cores', '?')} cores), batch {rec.get('batch', '?')}, {rec.get('rounds', '?')} rounds")
    for cand in rec.get("candidates") or []:
        if not isinstance(cand, dict):
            continue
        ms = cand.get("ms_per_batch")
        figure = f"{ms:8.1f} ms/batch (median)" if isinstance(ms, (int, float)) else f"{cand.get('status', '?')}"
        reason = f": {cand['reason']}" if cand.get("reason") else ""
        mark = " <- chosen" if (cand.get("backend"), cand.get("precision")) == (
            choice.get("backend"), choice.get("precision")) else ""
        print(f"  {cand.get('backend', '?'):12} {cand.get('precision', '?'):5} {figure}{reason}{mark}")


def _inspect_checkpoint(file: Path) -> int:
    """A checkpoint's configuration, read from its tensors (torch): the variant it matches, backbone, head,
    parameter counts; and a note where the file's own record contradicts its tensors."""
    import numpy as np

    state, stored = load_checkpoint(file)
    if network_of(state) == "RootNet":
        return _inspect_rootnet(file, state)
    spec = detect_spec(state, head_upsample=stored.head_upsample if stored else None)
    learnable = sum(int(np.prod(v.shape)) for k, v in state.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    with_stats = sum(int(np.prod(v.shape)) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    match = match_variant(spec)
    print(f"file:            {file}")
    print(f"matches variant: {match or 'none (custom configuration)'}")
    print(f"backbone:        depths {spec.depths}, dims {spec.dims}")
    print(f"head:            {spec.head_channels} channels, upsample {spec.head_upsample} ({spec.head_tag})")
    shape = ", ".join(map(str, spec.heatmap_shape))
    print(f"depth_dim:       {spec.depth_dim}, joints {spec.joints}, heatmap (N, {shape})")
    print(f"parameters:      {learnable:,} learnable, {with_stats:,} with BatchNorm statistics")
    if stored is not None and not stored.same_architecture(spec):
        print(f"note: the file's own record says {stored}, which its tensors contradict")
    return 0


def _inspect_rootnet(file: Path, state: dict[str, Any]) -> int:
    """A RootNet snapshot: checked against the network (nn.rootnet, strict), its parameter count."""
    import numpy as np

    from ..nn.rootnet import RootNet, load_rootnet_into

    load_rootnet_into(RootNet(), state)  # CheckpointError naming what does not fit
    learnable = sum(int(np.prod(v.shape)) for k, v in state.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    print(f"file:            {file}")
    print(f"network:         RootNet ({ROOTNET.head_tag}): ResNet-50 backbone, xy and depth head; fits, strictly")
    print(f"parameters:      {learnable:,} learnable")
    print(f"input, output:   (N, {', '.join(map(str, ROOTNET.input_shape))}) -> (N, 3) x, y cells, gamma; "
          f"build it with `cnpose-trt build --model rootnet --checkpoint {file}`")
    return 0
