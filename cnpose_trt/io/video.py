"""Video files in and out: frames read sequentially (never one seek per frame), an annotated-video
writer, and synthetic videos with known ground truth for tests and benchmarks.

OpenCV's FFMPEG backend reads the files (mp4, avi, mkv, mov, webm, ...; whatever codecs its FFmpeg
has). Seeking in a compressed stream decodes from the previous key frame, so a frame per seek costs
up to a group of pictures per frame; read_frames walks the file once instead, grab() past the frames
nobody wants (demuxed and decoded, but not converted to RGB nor copied out) and retrieve() for the
wanted ones. The frame count the container reports (CAP_PROP_FRAME_COUNT) is what VideoInfo gives:
exact for intact mp4 and avi files here, an estimate (duration x fps) for some containers, and wrong
for damaged files (a truncated avi reports its full length), so readers trust the frames they decode,
not the count.

For batch jobs (resume per frame): group a job's records by video, take the frames not yet done,
and pass them, sorted, as `frames` to read_frames: one pass per video, the finished frames grabbed
past. A wanted frame past the end raises VideoError with `.frame` set after every frame before it
was yielded, so a job can write error rows for that frame and the ones after it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import checks
from ..errors import VideoError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv")
# What VideoWriter writes per suffix: each checked to open and round-trip with this OpenCV
# (tests/test_video.py). mp4v and MJPG are lossy and play everywhere; FFV1 is lossless (exact frames).
WRITE_CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "FFV1"}
LOSSLESS_CODEC = "FFV1"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video: frame size, frames per second (0.0 where it does not say)
    and frame_count (the reported count, 0 where unknown; see the module docstring)."""

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int


def _capture(path: str | Path) -> tuple[Any, VideoInfo]:
    """An opened cv2.VideoCapture and the file's VideoInfo, or one clear error naming the file."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}" if not path.exists() else f"video {path} is not a file")
    if path.suffix.lower() in _IMAGE_SUFFIXES:  # FFmpeg opens an image as a one-frame "video"
        raise VideoError(f"{path} is an image, not a video: give it as an image")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path} cannot be opened as a video (not a video, damaged, or a codec this OpenCV's "
                         "FFmpeg lacks)")
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    fps = cap.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(path, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     float(fps) if math.isfinite(fps) and fps > 0 else 0.0,
                     int(count) if math.isfinite(count) and 0 < count < 2**40 else 0)
    return cap, info


def video_info(path: str | Path) -> VideoInfo:
    """The size, fps and reported frame count of a video file (nothing is decoded).

    Raises:
        FileNotFoundError: no such file. VideoError: not a video this OpenCV can open.
    """
    cap, info = _capture(path)
    cap.release()
    return info


def wanted_frames(frames: Iterable[Any]) -> list[int]:
    """Frame indices -> sorted, each once; each must be a non-negative integer (the message names it)."""
    out = set()
    for i, f in enumerate(frames):
        checks.integer(f"frames[{i}]", f, 0, hint="a frame index, 0 is the first frame")
        out.add(int(f))
    return sorted(out)


def read_frames(path: str | Path, frames: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, (H, W, 3) uint8 RGB image) for every frame of a video, in order, or for the wanted
    `frames` only (any order, repeats once), decoded in one sequential pass.

    Raises:
        FileNotFoundError, VideoError: the file (at the first next()). VideoError with `.frame`: a wanted
            frame past the end of the decodable video (every wanted frame before it was yielded), or a
            frame that cannot be decoded; reading all frames, the decodable ones are yielded and a
            shortfall against the reported count is logged (the count is not to be trusted).
    """
    want = None if frames is None else wanted_frames(frames)
    cap, info = _capture(path)
    try:
        yield from (_all_frames(cap, info) if want is None else _some_frames(cap, info, want))
    finally:
        cap.release()


def _rgb(cap: Any, info: VideoInfo, index: int, grabbed: bool) -> np.ndarray:
    import cv2

    ok, bgr = cap.retrieve() if grabbed else (False, None)
    if not ok or bgr is None:
        raise VideoError(f"{info.path}: frame {index} cannot be decoded", frame=index)
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _all_frames(cap: Any, info: VideoInfo) -> Iterator[tuple[int, np.ndarray]]:
    index = 0
    while cap.grab():
        yield index, _rgb(cap, info, index, True)
        index += 1
    if index == 0:
        raise VideoError(f"{info.path}: no frame can be decoded (damaged, or a codec this OpenCV's FFmpeg lacks)",
                         frame=0)
    if info.frame_count and index < info.frame_count:
        log.warning("%s: decoding stopped after %d frames, the file reports %d (truncated or damaged?)",
                    info.path, index, info.frame_count)


def _some_frames(cap: Any, info: VideoInfo, want: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    index = 0  # the frame the next grab() reaches
    for target in want:
        while index <= target:
            if not cap.grab():
                reported = f", the file reports {info.frame_count}" if info.frame_count else ""
                raise VideoError(f"{info.path}: frame {target} is past the end of the video ({index} frames can be "
                                 f"decoded{reported})", frame=target, end=index)
            index += 1
        yield target, _rgb(cap, info, target, True)


class VideoWriter:
    """Writes (H, W, 3) uint8 RGB frames to a video file, codec by suffix (WRITE_CODECS), or `codec`
    (a FourCC such as LOSSLESS_CODEC). The frame size is the first frame's; every frame must match it.
    A context manager; close() finishes the file (nothing is readable before it).

    Raises:
        ValueError: a suffix or codec it cannot write, a frame of another size or type.
        VideoError: OpenCV cannot open a writer for the file.
    """

    def __init__(self, path: str | Path, fps: float = 25.0, codec: str | None = None) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if codec is None:
            if suffix not in WRITE_CODECS:
                raise ValueError(f"video file {str(self.path)!r} must end in {', '.join(WRITE_CODECS)}, got "
                                 f"{suffix or 'no suffix'!r}")
            codec = WRITE_CODECS[suffix]
        if not (isinstance(codec, str) and len(codec) == 4):
            raise ValueError(f"codec must be a 4-character FourCC such as 'mp4v' or 'FFV1', got {codec!r}")
        self.fps = checks.number("fps", fps, above=0.0)
        self.codec = codec
        self.frames_written = 0
        self._writer: Any = None
        self._size: tuple[int, int] | None = None

    def write(self, image: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        import cv2

        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"a video frame must be an (H, W, 3) uint8 RGB array, got "
                             f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        size = (image.shape[1], image.shape[0])
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.codec), self.fps, size)
            if not self._writer.isOpened():
                self._writer = None
                raise VideoError(f"cannot write video {self.path} with codec {self.codec!r} (this OpenCV writes "
                                 f"{', '.join(f'{s} ({c})' for s, c in WRITE_CODECS.items())})")
            self._size = size
        elif size != self._size:
            raise ValueError(f"video frame {self.frames_written} is {size[0]}x{size[1]}, the video's frames are "
                             f"{self._size[0]}x{self._size[1]}")
        self._writer.write(np.ascontiguousarray(image[:, :, ::-1]))
        self.frames_written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_synthetic_video(path: str | Path, count: int, *, seed: int = 0, fps: float = 25.0, codec: str | None = None,
                         keep_images: bool = True, **scene_options: Any) -> list[Any]:
    """Write a video of `count` synthetic scenes (frame i is io.synthetic.synthesize((seed, i),
    **scene_options)) and return their SyntheticScenes: the ground truth of every frame (boxes,
    joints, root depth, intrinsics). keep_images=False drops each scene's image from what is
    returned (a long video's frames need not stay in memory); the file holds them.

    Args:
        codec: a FourCC, default by suffix (WRITE_CODECS); LOSSLESS_CODEC (with .mkv or .avi) keeps
            the frames exact.
    """
    from .synthetic import synthesize

    checks.integer("count", count, 1)
    scenes = []
    with VideoWriter(path, fps, codec) as writer:
        for i in range(count):
            scene = synthesize((seed, i), **scene_options)
            writer.write(scene.image)
            scenes.append(scene if keep_images else dataclasses.replace(scene, image=None))
    return scenes
