"""Damage that only a decoder sees, shared by the loader's integration test and the GPU smoke check."""

from __future__ import annotations

import struct
import zlib


def scramble_png(tar: bytearray, offset: int, size: int) -> None:
    """Scramble the image data of the PNG at ``tar[offset:offset + size]`` in place and recompute each chunk's CRC,
    so the file passes every cheap check (signature, chunk CRCs, the shard's sha256 once updated) and fails only in
    the decoder."""
    pos, end = offset + 8, offset + size
    while pos < end:  # PNG chunks: length, type, data, CRC
        length, kind = struct.unpack(">I", tar[pos : pos + 4])[0], bytes(tar[pos + 4 : pos + 8])
        if kind == b"IDAT":
            for i in range(pos + 10, pos + 8 + length, 3):  # past the zlib header
                tar[i] ^= 0xA5
            tar[pos + 8 + length : pos + 12 + length] = struct.pack(">I", zlib.crc32(tar[pos + 4 : pos + 8 + length]))
        pos += 12 + length
