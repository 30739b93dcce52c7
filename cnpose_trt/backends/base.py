"""The Engine protocol every backend implements, and the checks every backend shares. No torch needed.

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
Backends live one per subpackage (onnxruntime/, tensorrt/, torch/), found
through the registry (backends/__init__.py); runtime/engine.py's load_engine loads engine files.
This module is below both (it imports neither), so no backend imports the runtime or the registry.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..cache import sidecar_path
from ..checks import integer, is_integer
from ..errors import EngineError
from ..ops.decoding import decode
from ..ops.geometry import per_person
from ..spec import MODELS, RootNetSpec, VariantSpec, network_weight_shapes, spec_from_dict

MAX_ENGINE_BATCH = 1 << 16
IO_DTYPES = ("float32", "float16")
# bf16: the FP32 graph run with bfloat16 inference (the openvino backend, on CPUs with AMX-BF16 or AVX512-BF16).
PRECISIONS = ("fp32", "fp16", "int8", "bf16")
# ONNX Runtime session defaults (onnxruntime/runtime.py), from benchmarks/results/ort-threads-*: on the
# 2-core machine spinning off was faster end to end in 10 of the 12 on/off pairs (not at threads 1
# under load), quiet and under load (XS 1.47-1.65x, M 1.09-1.12x at threads 0); threads 1 helped M on the quiet
# machine (1.27x) but cost it 0.81x under load, so threads stay ONNX Runtime's own choice (0: one per core).
ORT_DEFAULT_THREADS = 0
ORT_DEFAULT_SPINNING = False
# The load options each backend takes (each module's LOAD_OPTIONS is its row), here so that a backend
# refusing an option can name the backends that take it without importing them.
LOAD_OPTIONS = {"onnxruntime": ("threads", "spinning"), "tensorrt": ("max_contexts",),
                "torch": ("device", "cuda_graphs", "threads"), "openvino": ("threads",)}


def importable(library: str) -> bool:
    """True when the library a backend runs on can be imported (a backend's available())."""
    try:
        importlib.import_module(library)
    except ImportError:
        return False
    return True


def library_version(library: str) -> str:
    """The library's __version__ (a backend's version(), part of the engine cache key)."""
    return str(importlib.import_module(library).__version__)


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (/proc/cpuinfo); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def check_options(module: ModuleType, options: dict[str, Any]) -> None:
    """Refuse load options the backend does not take, naming the ones it does."""
    unknown = sorted(set(options) - set(module.LOAD_OPTIONS))
    if unknown:
        owners = {opt: [n for n, taken in LOAD_OPTIONS.items() if n != module.NAME and opt in taken]
                  for opt in unknown}
        notes = [f"{opt} is an option of {' and '.join(who)}" for opt, who in owners.items() if who]
        allowed = module.LOAD_OPTIONS
        raise ValueError(f"the {module.NAME} backend takes the option{'s' if len(allowed) > 1 else ''} "
                         f"{', '.join(allowed) or '(none)'}, got {', '.join(unknown)}"
                         + (f" ({'; '.join(notes)})" if notes else ""))




def _damaged(side: Path, what: str) -> EngineError:
    return EngineError(f"engine metadata {side} is damaged ({what}); rebuild with --force")


def engine_mismatch(path: Any, what: str) -> EngineError:
    """The error for an engine file whose contents contradict its sidecar (edited, or another engine's bytes)."""
    return EngineError(f"engine {path} does not match its metadata (damaged or swapped): {what}; "
                       "rebuild with --force")


def check_engine_contents(path: Any, meta: dict[str, Any], *, precision: str | None = None,
                          conv_shapes: dict[tuple[int, ...], int] | None = None) -> None:
    """Compare what an engine file's contents show with its sidecar; a backend passes what it can
    read cheaply (precision: from the graph's tensors and nodes; conv_shapes: its convolution
    weights by shape, which give the variant when the heads agree). Raises engine_mismatch."""
    spec = engine_spec(meta)
    if precision is not None and precision != meta.get("precision"):
        evidence = {"int8": "quantize/dequantize nodes", "fp16": "float16 tensors, no quantize/dequantize nodes",
                    "fp32": "no float16 tensors, no quantize/dequantize nodes"}[precision]
        raise engine_mismatch(path, f"precision says {meta.get('precision')!r}, its graph is {precision} ({evidence})")
    if conv_shapes is not None:
        want = network_weight_shapes(spec)
        missing = sorted(k for k in want if conv_shapes.get(k, 0) < want[k])
        extra = sorted(k for k in conv_shapes if conv_shapes[k] > want.get(k, 0))
        if missing or extra:
            example = "; ".join(part for part in (
                f"lacks {missing[0]}" if missing else "", f"has {extra[0]}" if extra else "") if part)
            raise engine_mismatch(path, f"spec says {_network_words(spec)}, its convolution weights "
                                        f"are another network's ({example})")


def _network_words(spec: VariantSpec | RootNetSpec) -> str:
    return "RootNet (ResNet-50)" if isinstance(spec, RootNetSpec) else f"variant {spec.name} ({spec.head_tag})"


def engine_model(meta: dict[str, Any]) -> str:
    """The network a sidecar says its engine runs: its "model" ("convnextpose" when absent: engines
    built before RootNet engines existed). Raises ValueError for another value."""
    model = meta.get("model", "convnextpose")
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return model


def engine_spec(meta: dict[str, Any]) -> VariantSpec | RootNetSpec:
    """The spec a sidecar records, of the network its "model" names (ValueError/TypeError if malformed)."""
    return spec_from_dict(engine_model(meta), meta["spec"])


def _max_batch(value: Any, where: Path) -> int:
    if not is_integer(value) or not 1 <= value <= MAX_ENGINE_BATCH:
        raise _damaged(where, f"max_batch must be an integer in 1..{MAX_ENGINE_BATCH}, got {value!r}")
    return value


class Engine:
    """A compiled network: ConvNeXtPose, (N, 3, S, S) float32 images -> (N, J*D, H, W) heatmaps, or
    RootNet (model "rootnet"), the same images -> (N, 3) roots: x, y (output cells) and gamma.

    The protocol every backend implements (module docstring); subclasses provide _run, and GPU
    backends infer_device and _infer_decode. The decode calls (infer_decode, infer_device,
    enqueue_device) are ConvNeXtPose's: a RootNet engine refuses them (require_model).
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = meta
        try:
            # The network's name (the sidecar's "model"); not `model`, which TorchEngine holds its module in.
            self.network = engine_model(meta)
            self.spec: Any = engine_spec(meta)
            self.output_shape: tuple[int, ...] = tuple(self.spec.output_shape)
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

    def require_model(self, model: str, what: str) -> None:
        """Refuse, in one line, an engine of another network than `what` runs (a RootNet engine given
        to the pose decode, say), before its output is read as the wrong thing.

        Raises:
            EngineError: self.network is not model.
        """
        if self.network != model:
            names = {"convnextpose": "a ConvNeXtPose (pose) engine", "rootnet": "a RootNet engine"}
            raise EngineError(f"{what} needs {names.get(model, model)}, but {self.path} is "
                              f"{names.get(self.network, self.network)} (its outputs are "
                              f"{'(N, 3) roots: x, y cells and gamma' if self.network == 'rootnet' else 'heatmaps'})")

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
            heatmaps (N, J*D, H, W) of the engine's output dtype, on the host; a RootNet engine's
            (N, 3) float32 roots: x, y in output cells (0..63), gamma (depth mm = gamma * k, outside).
        """
        images = self.check_input(images)
        if len(images) <= self.max_batch:
            return self._run(images)
        return np.concatenate([self._run(images[i:i + self.max_batch])
                               for i in range(0, len(images), self.max_batch)])

    def infer_device(self, images: np.ndarray) -> Any:
        """Heatmaps left on the device (GPU backends); a CPU engine refuses."""
        self.require_model("convnextpose", "infer_device")
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
            camera mm (3); fields not requested are NaN (the kernels' contract, csrc/decode/softargmax.h).
        """
        self.require_model("convnextpose", "infer_decode (the pose decode)")
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
        self.require_model("convnextpose", "enqueue_device (the pose decode)")
        if not self.on_device:
            raise EngineError(f"the {self.backend} engine runs on the CPU: it has no device input buffer, "
                              "use infer_decode()")
        raise EngineError(f"the {self.backend} engine on {self.device} offers no device input buffer: "
                          "use infer_decode()")

    def _device_call(self, n: int, flip: bool, boxes: Any, root_depth: Any, intrinsics: Any
                     ) -> tuple[int, dict[str, np.ndarray | None]]:
        """enqueue_device's arguments checked: (people, post-processing inputs)."""
        self.require_model("convnextpose", "enqueue_device (the pose decode)")
        n = integer("n", n, 1, self.max_batch, hint="the engine's max_batch")
        if flip and n % 2:
            raise ValueError(f"with flip, n must be even (P crops, then their P mirrors), got n = {n}")
        people = n // 2 if flip else n
        return people, _post_arrays(people, boxes, root_depth, intrinsics)

    def _infer_decode(self, images: np.ndarray, post: dict[str, np.ndarray | None], flip: bool) -> np.ndarray:
        """One chunk (at most max_batch images); a GPU backend overrides this to stay on its device."""
        return self._decode_on_host(self._run(images), post, flip)

    def _decode_on_host(self, heatmaps: np.ndarray, post: dict[str, np.ndarray | None], flip: bool) -> np.ndarray:
        self.require_model("convnextpose", "the pose decode")
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


