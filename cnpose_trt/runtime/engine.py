"""Runtime: the Engine protocol every backend implements, and load_engine. No torch needed.

An engine turns (N, 3, S, S) network inputs into (N, J*D, H, W) heatmaps. Every backend offers
the same calls, checked the same way:
- infer(images): host in, host out (numpy);
- infer_decode(images, boxes=, root_depth=, intrinsics=, flip=): the network and the fused
  decode, the decode reading the engine's own output where it lives; only the (P, J, 10)
  result comes back to the host. On a GPU engine the heatmaps never leave the device;
- infer_device(images): heatmaps left on the device (GPU backends only);
- enqueue_device(fill, n, flip=, boxes=, ...): the device-resident path (GPU backends only):
  `fill` writes the n network inputs straight into the engine's input buffer on the engine's
  stream (the pipeline's GPU crop kernel), the network and the fused decode follow on that
  stream, and a handle's result() gives the (P, J, 10) floats; nothing else crosses to the host;
- close() and `with engine:`.
Backends live one per module (onnxruntime_backend, tensorrt_backend, torch_backend), found
through the registry in backends.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import ENGINE_FORMAT, file_sha256, is_plain_name, sidecar_path
from ..errors import CnposeError, EngineError
from ..spec import INPUT_CONVENTION, PIXEL_MEAN, PIXEL_STD, VariantSpec, conv_weight_shapes

log = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 1 << 20  # a sidecar holds a few KB; a file far larger is not one
MAX_ENGINE_BATCH = 1 << 16
IO_DTYPES = ("float32", "float16")
PRECISIONS = ("fp32", "fp16", "int8")
_LOAD_ATTEMPTS = 5


def _damaged(side: Path, what: str) -> EngineError:
    return EngineError(f"engine metadata {side} is damaged ({what}); rebuild with --force")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The metadata of an engine, from its sidecar (path: the engine handle, an engine file or the .json).

    Raises:
        EngineError: missing, unreadable, oversized, too deeply nested or malformed metadata.
    """
    side = sidecar_path(path)
    if side.is_dir():
        raise EngineError(f"engine metadata {side} is a folder, not a file; remove it and rebuild")
    if not side.is_file():
        raise EngineError(f"no engine metadata at {side}: build the engine with `python -m cnpose_trt.build`"
                          " (an engine without its sidecar is an unfinished build)")
    try:
        with open(side, "rb") as f:
            raw = f.read(MAX_SIDECAR_BYTES + 1)
        if len(raw) > MAX_SIDECAR_BYTES:
            raise _damaged(side, f"larger than {MAX_SIDECAR_BYTES} bytes")
        meta = json.loads(raw)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise EngineError(f"engine metadata {side} is unreadable ({exc}); rebuild with --force") from None
    except RecursionError:
        raise _damaged(side, "JSON nested too deeply") from None
    if isinstance(meta, dict) and meta.get("engine_format") == 1:
        raise EngineError(f"engine {side} was built by cnpose_trt 0.1 (engine format 1), whose input normalisation "
                          "was not upstream's (INT8 ranges and build checks used [0, 1]-scaled crops); rebuild it "
                          "with `python -m cnpose_trt.build ... --force`")
    if not isinstance(meta, dict) or meta.get("engine_format") != ENGINE_FORMAT:
        raise EngineError(f"engine metadata {side} is of an unknown format "
                          f"(engine_format {meta.get('engine_format') if isinstance(meta, dict) else '?'}, "
                          f"this version reads {ENGINE_FORMAT}); rebuild with --force")
    _check_meta(meta, side)
    return meta


def _check_meta(meta: dict[str, Any], side: Path) -> None:
    """The fields load_engine and Engine rely on, checked for type and range (hostile or damaged files)."""
    if not is_plain_name(meta.get("engine_file")):
        raise _damaged(side, f"engine_file must name a file in the sidecar's folder, got {meta.get('engine_file')!r}")
    sha = meta.get("engine_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise _damaged(side, "engine_sha256 must be 64 hex digits")
    if not isinstance(meta.get("backend"), str):
        raise _damaged(side, f"backend must be a name, got {meta.get('backend')!r}")
    _max_batch(meta.get("max_batch"), side)
    for key in ("spec", "input", "output"):
        if not isinstance(meta.get(key), dict):
            raise _damaged(side, f"{key} must be an object, got {type(meta.get(key)).__name__}")
    if not isinstance(meta.get("weights", {}), dict):
        raise _damaged(side, "weights must be an object")
    _check_recorded(meta, side)


def _check_recorded(meta: dict[str, Any], side: Path) -> None:
    """The sidecar agrees with itself and with this version: variant, head and I/O shapes with its
    spec, a known precision, and the input convention this version applies. Crops are normalised
    outside the engine with spec's constants, so a sidecar recording others was edited (or is
    foreign): it is damaged, not a request to normalise differently."""
    try:
        spec = VariantSpec.from_dict(meta["spec"])
    except (TypeError, ValueError):
        return  # Engine() names what is wrong with the spec
    if meta.get("variant") != spec.name:
        raise _damaged(side, f"variant {meta.get('variant')!r} is not its spec's name {spec.name!r}")
    if meta.get("head") != spec.head_tag:
        raise _damaged(side, f"head {meta.get('head')!r} is not its spec's head {spec.head_tag!r}")
    if meta.get("precision") not in PRECISIONS:
        raise _damaged(side, f"precision must be one of {', '.join(PRECISIONS)}, got {meta.get('precision')!r}")
    for field, want in (("convention", INPUT_CONVENTION), ("mean", list(PIXEL_MEAN)), ("std", list(PIXEL_STD))):
        if meta["input"].get(field) != want:
            raise _damaged(side, f"input.{field} is {meta['input'].get(field)!r}; this version normalises crops "
                                 f"with {want!r}, outside the engine")
    for role, shape in (("input", spec.input_shape), ("output", spec.heatmap_shape)):
        if meta[role].get("shape") != ["N", *shape]:
            raise _damaged(side, f"{role}.shape is {meta[role].get('shape')!r}; its spec's is {['N', *shape]!r}")


def engine_mismatch(path: Any, what: str) -> EngineError:
    """The error for an engine file whose contents contradict its sidecar (edited, or another engine's bytes)."""
    return EngineError(f"engine {path} does not match its metadata (damaged or swapped): {what}; "
                       "rebuild with --force")


def check_engine_contents(path: Any, meta: dict[str, Any], *, precision: str | None = None,
                          conv_shapes: dict[tuple[int, ...], int] | None = None) -> None:
    """Compare what an engine file's contents show with its sidecar; a backend passes what it can
    read cheaply (precision: from the graph's tensors and nodes; conv_shapes: its convolution
    weights by shape, which give the variant when the heads agree). Raises engine_mismatch."""
    spec = VariantSpec.from_dict(meta["spec"])
    if precision is not None and precision != meta.get("precision"):
        evidence = {"int8": "quantize/dequantize nodes", "fp16": "float16 tensors, no quantize/dequantize nodes",
                    "fp32": "no float16 tensors, no quantize/dequantize nodes"}[precision]
        raise engine_mismatch(path, f"precision says {meta.get('precision')!r}, its graph is {precision} ({evidence})")
    if conv_shapes is not None:
        want = conv_weight_shapes(spec)
        missing = sorted(k for k in want if conv_shapes.get(k, 0) < want[k])
        extra = sorted(k for k in conv_shapes if conv_shapes[k] > want.get(k, 0))
        if missing or extra:
            example = "; ".join(part for part in (
                f"lacks {missing[0]}" if missing else "", f"has {extra[0]}" if extra else "") if part)
            raise engine_mismatch(path, f"spec says variant {spec.name} ({spec.head_tag}), its convolution weights "
                                        f"are another network's ({example})")


def _max_batch(value: Any, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ENGINE_BATCH:
        raise _damaged(where, f"max_batch must be an integer in 1..{MAX_ENGINE_BATCH}, got {value!r}")
    return value


class Engine:
    """A compiled ConvNeXtPose network: (N, 3, S, S) float32 images -> (N, J*D, H, W) heatmaps.

    The protocol every backend implements (module docstring); subclasses provide _run, and GPU
    backends infer_device and _infer_decode.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = meta
        try:
            self.spec = VariantSpec.from_dict(meta["spec"])
            self.input_name = meta["input"]["name"]
            self.output_name = meta["output"]["name"]
            dtypes = (meta["input"]["dtype"], meta["output"]["dtype"])
            max_batch = meta["max_batch"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(f"engine metadata of {path} lacks or garbles {exc}; rebuild with --force") from None
        if not (isinstance(self.input_name, str) and isinstance(self.output_name, str)):
            raise _damaged(sidecar_path(path), "input and output names must be strings")
        if not all(isinstance(d, str) and d in IO_DTYPES for d in dtypes):
            raise _damaged(sidecar_path(path), f"input/output dtypes must be {' or '.join(IO_DTYPES)}, got {dtypes!r}")
        self.input_dtype, self.output_dtype = np.dtype(dtypes[0]), np.dtype(dtypes[1])
        self.max_batch = _max_batch(max_batch, sidecar_path(path))

    # What a backend subclass declares.
    backend = "?"
    options: tuple[str, ...] = ()   # keyword options load_engine passes to the constructor
    device = "cpu"                  # where the engine's output lives: "cpu" or "cuda[:n]"

    @property
    def precision(self) -> str:
        return str(self.meta.get("precision", "fp32"))

    @property
    def on_device(self) -> bool:
        """True when the engine's output lives on a GPU (infer_decode then never copies heatmaps)."""
        return self.device != "cpu"

    @property
    def cache_key(self) -> str:
        return str(self.meta.get("cache_key", ""))

    def check_input(self, images: object) -> np.ndarray:
        """Validate against the engine: (N, 3, S, S) of its input dtype, N >= 1, C-contiguous."""
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array (N, 3, {self.spec.input_size}, "
                            f"{self.spec.input_size}), got {type(images).__name__}")
        want = self.spec.input_shape
        if images.ndim != 4 or images.shape[1:] != want:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, want))}), got {images.shape}")
        if images.dtype != self.input_dtype:
            raise TypeError(f"images must be {self.input_dtype}, got {images.dtype} "
                            f"(normalise with cnpose_trt.preprocess.prepare)")
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image, got N = 0")
        return np.ascontiguousarray(images)

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Run the network; batches above max_batch are run in chunks.

        Args:
            images: (N, 3, S, S) of the engine's input dtype, normalised.
        Returns:
            heatmaps (N, J*D, H, W) of the engine's output dtype, on the host.
        """
        images = self.check_input(images)
        if len(images) <= self.max_batch:
            return self._run(images)
        return np.concatenate([self._run(images[i:i + self.max_batch])
                               for i in range(0, len(images), self.max_batch)])

    def infer_device(self, images: np.ndarray) -> Any:
        """Heatmaps left on the device (GPU backends); a CPU engine refuses."""
        raise EngineError(f"the {self.backend} engine runs on the CPU: its heatmaps are host arrays, use infer()")

    def infer_decode(self, images: np.ndarray, *, boxes: Any = None, root_depth: Any = None,
                     intrinsics: Any = None, flip: bool = False) -> np.ndarray:
        """The network, then the fused decode straight from the engine's output (on its device).

        Args:
            images: (N, 3, S, S) network inputs; with flip, N = 2P: P crops, then their mirrors.
            boxes: (P, 4) crop boxes; root_depth: (P,) mm; intrinsics: (P, 4) (see decode).
            flip: the flip test: average each crop's joints with its mirror's.
        Returns:
            (P, J, 10) float32 on the host: cells (3), confidence, image px + depth mm (3),
            camera mm (3); fields not requested are NaN (the kernels' contract, csrc/softargmax.h).
        """
        images = self.check_input(images)
        n = len(images)
        if flip and n % 2:
            raise ValueError(f"with flip, images must hold P crops then their P mirrors (an even N), got N = {n}")
        people = n // 2 if flip else n
        post = _post_arrays(people, boxes, root_depth, intrinsics)
        step = self.max_batch // 2 if flip else self.max_batch
        if step < 1:
            return self._decode_on_host(self.infer(images), post, flip)
        parts = []
        for i in range(0, people, step):
            j = min(people, i + step)
            chunk = np.concatenate([images[i:j], images[people + i:people + j]]) if flip else images[i:j]
            parts.append(self._infer_decode(chunk, {k: None if v is None else v[i:j] for k, v in post.items()}, flip))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def enqueue_device(self, fill: Any, n: int, *, flip: bool = False, boxes: Any = None, root_depth: Any = None,
                       intrinsics: Any = None) -> Any:
        """The device-resident path: inputs written on the device, the network, the fused decode.

        Args:
            fill: called as fill(inputs, stream) once, before the network is enqueued: inputs is
                the engine's own (n, 3, S, S) input buffer on its device (a torch tensor or an
                object with __cuda_array_interface__, of the engine's input dtype), stream the
                integer CUDA stream the network will run on. fill enqueues its writes on that
                stream (e.g. cropping.crop_normalize(..., out=inputs, stream=stream)).
            n: inputs per call, 1..max_batch (with flip, 2P: P crops then their P mirrors).
            flip, boxes, root_depth, intrinsics: as infer_decode.
        Returns:
            a handle whose result() waits for the work and returns (P, J, 10) float32 on the host
            (see infer_decode). Handles may be collected in any order.
        Raises:
            EngineError: a CPU engine (use infer_decode).
        """
        if not self.on_device:
            raise EngineError(f"the {self.backend} engine runs on the CPU: it has no device input buffer, "
                              "use infer_decode()")
        raise EngineError(f"the {self.backend} engine on {self.device} offers no device input buffer: "
                          "use infer_decode()")

    def _device_call(self, n: int, flip: bool, boxes: Any, root_depth: Any, intrinsics: Any
                     ) -> tuple[int, dict[str, np.ndarray | None]]:
        """enqueue_device's arguments checked: (people, post-processing inputs)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be an integer in 1..{self.max_batch} (the engine's max_batch), got {n!r}")
        if flip and n % 2:
            raise ValueError(f"with flip, n must be even (P crops, then their P mirrors), got n = {n}")
        people = n // 2 if flip else int(n)
        return people, _post_arrays(people, boxes, root_depth, intrinsics)

    def _infer_decode(self, images: np.ndarray, post: dict[str, np.ndarray | None], flip: bool) -> np.ndarray:
        """One chunk (at most max_batch images); a GPU backend overrides this to stay on its device."""
        return self._decode_on_host(self._run(images), post, flip)

    def _decode_on_host(self, heatmaps: np.ndarray, post: dict[str, np.ndarray | None], flip: bool) -> np.ndarray:
        from ..ops.decoding import decode

        p = len(heatmaps) // 2 if flip else len(heatmaps)
        res = decode(heatmaps[:p], self.spec.joints, self.spec.depth_dim, flipped=heatmaps[p:] if flip else None,
                     **post)
        return np.asarray(res.packed, np.float32)

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds (GPU memory, sessions); idempotent."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec.name} {self.spec.head_tag}, {self.precision}, "
                f"max_batch={self.max_batch}, device={self.device}, path='{self.path}')")


def _post_arrays(people: int, boxes: Any, root_depth: Any, intrinsics: Any) -> dict[str, np.ndarray | None]:
    """infer_decode's per-person post-processing inputs as float64 arrays, checked once."""
    from ..ops.geometry import per_person

    out: dict[str, np.ndarray | None] = {"boxes": per_person("boxes", boxes, people, (4,)),
                                         "root_depth": per_person("root_depth", root_depth, people, ()),
                                         "intrinsics": per_person("intrinsics", intrinsics, people, (4,))}
    if (out["root_depth"] is not None or out["intrinsics"] is not None) and out["boxes"] is None:
        raise ValueError("root_depth and intrinsics need boxes (depth and camera coordinates start from image "
                         "pixels)")
    return out


def check_engine_io(found: dict[str, Any], path: Any, *, input_name: str, output_name: str,
                    input_shape: tuple[int, ...], output_shape: tuple[int, ...], max_batch: int,
                    input_dtype: str, output_dtype: str) -> None:
    """Compare what an engine says about itself with its sidecar, before any buffer exists; every
    backend calls this with what its runtime reports.

    found: {"inputs": [names], "outputs": [names], "input": {...}, "output": {...}} where
    input/output hold "shape" (-1 or None for the dynamic batch) and "dtype" (numpy name); optional
    "linear"/"on_device" (bools), and for engines with optimization profiles "profiles" (count) and
    input "profile" ((min, opt, max) shapes of profile 0). input_shape/output_shape are per image.
    Raises EngineError naming the first disagreement (a stale or foreign sidecar).
    """
    def refuse(what: str) -> EngineError:
        return EngineError(f"engine {path} does not match its metadata: {what}; rebuild with --force")

    if found["inputs"] != [input_name] or found["outputs"] != [output_name]:
        raise refuse(f"it has inputs {found['inputs']} and outputs {found['outputs']}, the metadata says "
                     f"[{input_name}] -> [{output_name}]")
    for role, name, per_image, dtype in (("input", input_name, input_shape, input_dtype),
                                         ("output", output_name, output_shape, output_dtype)):
        io = found[role]
        shape = tuple(-1 if d is None or isinstance(d, str) else int(d) for d in io["shape"])
        want = (-1, *per_image)
        if shape != want:
            raise refuse(f"{role} {name} has shape {shape}, the metadata says {want} (-1: any batch)")
        if io["dtype"] != dtype:
            raise refuse(f"{role} {name} is {io['dtype']}, the metadata says {dtype}")
        if not io.get("linear", True) or not io.get("on_device", True):
            raise refuse(f"{role} {name} is not a linear device tensor")
    if "profiles" in found:
        if found["profiles"] < 1:
            raise refuse("it has no optimization profile")
        lo, _, hi = (tuple(s) for s in found["input"]["profile"])
        if lo != (1, *input_shape) or hi != (max_batch, *input_shape):
            raise refuse(f"its optimization profile covers {lo} .. {hi}, the metadata says batch 1 .. {max_batch} "
                         f"of {input_shape}")


def load_engine(path: str | Path, *, verify: bool = True, variant: str | None = None,
                precision: str | None = None, weights_sha256: str | None = None, **options: Any) -> Engine:
    """Load an engine built by `python -m cnpose_trt.build`.

    Needs no lock and no write access: engines in a read-only folder load. A rebuild running at
    the same time is harmless: the sidecar names the engine file, is replaced atomically, and an
    engine file never changes once written; if the file the sidecar named is deleted by a
    rebuild before it was loaded, the new sidecar is read and its engine loaded.

    Args:
        path: the engine handle (<stem><ext>), an engine file or the .json sidecar; the sidecar
            decides which engine file is loaded (Engine.path).
        verify: check the engine file's sha256 against the sidecar (catches damaged files).
        variant, precision, weights_sha256: what the caller expects; a mismatch is refused.
        options: backend options: onnxruntime threads, spinning (see onnxruntime_backend); torch device,
            cuda_graphs, threads; tensorrt max_contexts. Others are refused naming the allowed ones.
    Raises:
        EngineError: missing/garbled sidecar, damaged or replaced engine file, unknown backend,
            an engine of another variant, precision or weights than expected, or (TensorRT) one
            built for another GPU or TensorRT version.
    """
    path = Path(path)
    side = sidecar_path(path)
    for attempt in range(_LOAD_ATTEMPTS):
        before = _identity(side)
        meta = read_sidecar(side)
        try:
            return _load(side, meta, verify, (variant, precision, weights_sha256), options)
        except (CnposeError, OSError):
            if attempt + 1 == _LOAD_ATTEMPTS or _identity(side) == before:
                raise
            log.debug("engine metadata %s was replaced while loading (a rebuild committed); reading it again", side)
    raise AssertionError("unreachable")


def _suffix_owner(suffix: str) -> str | None:
    """The backend whose engine files end in suffix (of those this installation can import)."""
    from .. import backends

    for name in backends.NAMES:
        try:
            if backends.get(name).ENGINE_SUFFIX == suffix:
                return name
        except EngineError:  # its dependencies are missing
            continue
    return None


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load(side: Path, meta: dict[str, Any], verify: bool, expected: tuple[str | None, str | None, str | None],
          options: dict[str, Any]) -> Engine:
    weights = meta.get("weights", {})
    for what, want, have in zip(("variant", "precision", "weights"), expected,
                                (meta.get("variant"), meta.get("precision"), weights.get("sha256")), strict=True):
        if want is not None and want != have:
            raise EngineError(f"engine {side} was built for {what} {have!r}, not {want!r}; build the one you "
                              "need with python -m cnpose_trt.build")
    engine_file = side.with_name(meta["engine_file"])
    if not engine_file.is_file():
        raise EngineError(f"engine file {engine_file} named by {side} is missing; rebuild with --force")
    if verify:
        try:
            sha = file_sha256(engine_file)
        except OSError as exc:
            raise EngineError(f"engine file {engine_file} is unreadable ({exc.strerror})") from None
        if sha != meta["engine_sha256"]:
            raise EngineError(f"engine file {engine_file} does not match its metadata (sha256 differs): the file is "
                              "damaged or was replaced; rebuild with `python -m cnpose_trt.build ... --force`")
    from .. import backends

    module = backends.get(meta["backend"], what=f"engine {engine_file}")
    # Another backend's engine file under this backend's name: its loader would fail with its own
    # message (torch.load on an ONNX file). A backend whose library is missing says so first.
    other = _suffix_owner(engine_file.suffix) if engine_file.suffix != module.ENGINE_SUFFIX else None
    if other is not None and other != module.NAME and module.available():
        raise _damaged(side, f"backend {module.NAME!r} loads {module.ENGINE_SUFFIX} engine files, but engine_file "
                             f"{engine_file.name} is {other}'s")
    backends.check_options(module, options)
    log.debug("loading %s engine %s (pid %d)", module.NAME, engine_file, os.getpid())
    return module.load(engine_file, meta, **options)
