"""Image sizes read from file headers, so that an image bomb is refused before anything is decoded.

A PNG of a few hundred bytes can claim 100000 x 100000 pixels (30 GB decoded): OpenCV then
fails with an assertion from deep inside its decoder, or allocates gigabytes for a larger
limit. check_image_file reads the width and height from the header (PNG, JPEG, BMP, GIF,
TIFF, PNM; WebP cannot exceed 16383 x 16383) and refuses more than max_pixels with one line.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import BinaryIO

MAX_IMAGE_PIXELS = 1 << 28  # 268 M pixels, e.g. 16384 x 16384: 805 MB as RGB uint8


def _png(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    if head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _gif(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    return struct.unpack("<HH", head[6:10])


def _bmp(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    (dib,) = struct.unpack("<I", head[14:18])
    if dib == 12:  # BITMAPCOREHEADER
        return struct.unpack("<HH", head[18:22])
    w, h = struct.unpack("<ii", head[18:26])
    return abs(w), abs(h)  # a negative height means top-down rows


def _jpeg(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":  # garbage between segments: skip, as decoders do
            byte = f.read(1)
        while byte == b"\xff":  # fill bytes
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers: no length
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        size = f.read(2)
        if len(size) < 2:
            return None
        (length,) = struct.unpack(">H", size)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: P, Y, X
            body = f.read(5)
            if len(body) < 5:
                return None
            height, width = struct.unpack(">HH", body[1:5])
            return width, height
        if length < 2:
            return None
        f.seek(length - 2, 1)


def _tiff(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    order = "<" if head[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", head[4:8])
    f.seek(offset)
    raw = f.read(2)
    if len(raw) < 2:
        return None
    (count,) = struct.unpack(order + "H", raw)
    found: dict[int, int] = {}
    for _ in range(min(count, 4096)):
        entry = f.read(12)
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            fmt = {3: "H", 4: "I"}.get(kind)
            if fmt is None:
                return None
            (found[tag],) = struct.unpack(order + fmt, entry[8:8 + struct.calcsize(fmt)])
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    text = re.sub(rb"#[^\n]*", b" ", head[2:])
    fields = text.split()
    if len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
        return None
    return int(fields[0]), int(fields[1])


_FORMATS = (
    (b"\x89PNG\r\n\x1a\n", _png), (b"GIF87a", _gif), (b"GIF89a", _gif), (b"BM", _bmp), (b"\xff\xd8", _jpeg),
    (b"II*\x00", _tiff), (b"MM\x00*", _tiff), *((f"P{k}".encode(), _pnm) for k in range(1, 7)),
)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) claimed by the header of a PNG, JPEG, BMP, GIF, TIFF or PNM file; None for
    other formats and for headers too short to say."""
    with open(path, "rb") as f:
        head = f.read(1024)
        for magic, parse in _FORMATS:
            if head.startswith(magic):
                try:
                    return parse(f, head)
                except (struct.error, KeyError, OSError, ValueError):
                    return None
    return None


def check_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse, before decoding, an image whose header claims more than max_pixels pixels.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the header claims more than max_pixels pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    size = image_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ValueError(f"image {path} claims {size[0]} x {size[1]} pixels, more than the {max_pixels:,} this "
                         "program decodes (a damaged file or an image bomb); resize it first")


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation (1..8) of a JPEG held in `data`, or None when it has none.

    OpenCV applies it when decoding (a phone photo taken upright comes out upright); a decoder
    that does not must not be given such a file. Reads the APP1 'Exif' segment's IFD0 only.
    """
    view = memoryview(data)
    pos = 2
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no EXIF before the pixels
            return None
        (length,) = struct.unpack(">H", view[pos + 2:pos + 4])
        if length < 2:
            return None
        body = bytes(view[pos + 4:pos + 2 + length])
        if marker == 0xE1 and body[:6] == b"Exif\x00\x00":
            return _tiff_orientation(body[6:])
        pos += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int | None:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    end = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack(end + "H", tiff[ifd:ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        if len(entry) < 12:
            return None
        tag, kind = struct.unpack(end + "HH", entry[:4])
        if tag == 0x0112 and kind == 3:  # Orientation, SHORT
            (value,) = struct.unpack(end + "H", entry[8:10])
            return int(value)
    return None
