"""Images in shards: cheap structural checks of encoded PNG/JPEG (no decode) and the writers' resize and encoding."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # what a sample's image may be called in a WebDataset
JPEG_QUALITY = 95


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG or JPEG if its structure is intact, else None.

    PNG: every chunk's CRC is checked (zlib.crc32, C speed) — a flipped byte anywhere is caught. JPEG has no
    checksum: the marker segments up to the scan and the end marker are checked, which catches truncation and
    header damage; damage inside the entropy-coded data decodes to noisy pixels rather than failing.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    pos, size, view = 8, None, memoryview(data)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return None
        kind = data[pos + 4 : pos + 8]
        if zlib.crc32(view[pos + 4 : pos + 8 + length]) != struct.unpack_from(">I", data, end - 4)[0]:
            return None
        if kind == b"IHDR":
            size = struct.unpack_from(">II", data, pos + 8)
        elif kind == b"IEND":
            return size
        pos = end
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > len(data):
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack_from(">HH", data, pos + 5)
            size = (w, h)
        if marker == 0xDA:  # start of scan: the header is over
            return size
        pos += 2 + length
    return None


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """NVlabs dataset_tool's ``center-crop``: the largest centred square, LANCZOS-resized (antialiased)."""
    w, h = img.size
    crop = min(w, h)
    box = ((w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2)
    if img.size == (resolution, resolution):
        return img
    # crop first, as dataset_tool does: resizing with box= would let LANCZOS's support pull in pixels outside it
    return img.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)


def encode(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
