"""The tar side of a shard: one module for the ustar layout, read two ways, and written one way.

- :func:`iter_tar_samples` streams a tar member by member (the fallback without an index, and source WebDatasets).
- :class:`ShardIndex` cuts samples out of large buffers at the offsets of the shard's DALI index and checks every
  member's header against the index in one numpy pass (the loader's fast path).
- :class:`TarBuilder` writes deterministic members; :func:`write_index` writes DALI's index for them.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from orchestrator.data.images import IMAGE_EXTS

_MB = 1 << 20
# ustar header fields both readers use (byte ranges inside the 512-byte header)
_SIZE = slice(124, 136)
_MAGIC = slice(257, 262)
_USTAR = b"ustar"
_SIZE_FIELD, _MAGIC_FIELD = np.arange(_SIZE.start, _SIZE.stop), np.arange(_MAGIC.start, _MAGIC.stop)
_USTAR_ARRAY = np.frombuffer(_USTAR, np.uint8)


# ---------------------------------------------------------------------------------------------------------- stream
class _Chunks:
    """Reads a stream in large chunks and hands out exact byte counts (network reads stay few and big)."""

    def __init__(self, fileobj, chunk: int = _MB):
        self.f, self.chunk, self.buf, self.at, self.pos = fileobj, chunk, b"", 0, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.buf):
            parts = [self.buf[self.at :]]
            have = len(parts[0])
            while have < n:
                data = self.f.read(max(self.chunk, n - have))
                if not data:
                    break
                parts.append(data)
                have += len(data)
            self.buf, self.at = b"".join(parts), 0
        out = self.buf[self.at : self.at + n]
        self.at += len(out)
        self.pos += len(out)
        return out


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):  # "<len> key=value"
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode()
    return None


def iter_tar_samples(fileobj, *, errors: list | None = None) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """Group a streamed WebDataset tar into samples: ``(key, {ext: bytes}, header offset of the sample)``.

    A minimal ustar/GNU/pax reader, because ``tarfile``'s stream mode parses headers several times slower (it capped
    the loader's thread: docs/benchmarks.md, Data). A truncated or corrupt tar ends the iteration (noted in
    ``errors`` if given) instead of raising: the samples before the damage are still good, and the last one holds
    only the parts read completely (the caller decides whether it is usable). Offsets count from where ``fileobj``
    started.
    """
    r = _Chunks(fileobj)
    key, parts, start, long_name = None, {}, 0, None
    while True:
        at = r.pos
        hdr = r.take(512)
        if len(hdr) < 512 or hdr == bytes(512):  # clean end (or end-of-archive blocks)
            if hdr and len(hdr) < 512 and errors is not None:
                errors.append(f"truncated tar header after sample {key!r}")
            break
        chk = hdr[148:156].strip(b"\0 ")
        try:
            ok = int(chk, 8) == sum(hdr[:148]) + 256 + sum(hdr[156:])  # the checksum field counts as 8 spaces
            size = int(hdr[_SIZE].strip(b"\0 ") or b"0", 8)
        except ValueError:
            ok = False
        if not ok:
            if errors is not None:
                errors.append(f"corrupt tar header at byte {at} after sample {key!r}")
            break
        data = r.take(size)
        r.take(-size % 512)
        if len(data) < size:
            if errors is not None:
                errors.append(f"truncated tar: member at byte {at} after sample {key!r} is cut short")
            break
        kind = hdr[156:157]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind in (b"x", b"g"):
            long_name = _pax_path(data) if kind == b"x" else long_name
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = hdr[:100].rstrip(b"\0").decode()
            if hdr[_MAGIC] == _USTAR and hdr[262] == 0 and hdr[345]:  # POSIX ustar splits long paths into prefix + name
                name = hdr[345:500].rstrip(b"\0").decode() + "/" + name
        if kind not in (b"0", b"\0"):  # directories, links: not sample parts
            continue
        base = name.rsplit("/", 1)[-1]
        dot = base.find(".")
        if dot <= 0:  # hidden files and extension-less names are not sample parts
            continue
        k, ext = name[: len(name) - len(base) + dot], base[dot + 1 :]
        if k != key:
            if parts:
                yield key, parts, start
            key, parts, start = k, {}, at
        parts[ext] = data
    if parts:
        yield key, parts, start


# ---------------------------------------------------------------------------------------------------------- index
class ShardIndex:
    """A shard's DALI index as arrays: where each sample's members, image and label lie in the tar.

    ``heads``/``sizes`` hold every member's header offset and data size, sample after sample (``first[i]`` is sample
    ``i``'s first entry in them); ``start``/``end`` bound each sample's bytes (its first header to its last data byte).
    """

    def __init__(self, lines: list[bytes]):
        heads, sizes, first, start, end, img, cls = [], [], [], [], [], [], []
        for line in lines:
            f = line.split()
            if not f or len(f) % 4:
                raise ValueError(f"index line {line[:80]!r} is not (ext offset size name)*")
            first.append(len(heads))
            offs = [int(o) for o in f[1::4]]
            lens = [int(n) for n in f[2::4]]
            exts = [e.decode() for e in f[0::4]]
            heads += [o - 512 for o in offs]
            sizes += lens
            start.append(min(offs) - 512)
            end.append(max(o + n for o, n in zip(offs, lens)))
            i = next((exts.index(e) for e in IMAGE_EXTS if e in exts), None)
            img.append((offs[i], lens[i], exts[i]) if i is not None else None)
            c = exts.index("cls") if "cls" in exts else None
            cls.append((offs[c], lens[c]) if c is not None else None)
        first.append(len(heads))
        self.heads, self.sizes = np.array(heads, np.int64), np.array(sizes, np.int64)
        self.first = np.array(first, np.int64)
        self.start, self.end, self.img, self.cls = start, end, img, cls
        self.count = len(start)

    @classmethod
    def parse(cls, body: bytes, count: int) -> ShardIndex | None:
        """The index, or None when it is not one we can trust for a shard of ``count`` samples."""
        lines = body.split(b"\n")
        head = lines[0].split()
        try:
            if len(head) != 2 or not head[0].startswith(b"v1.") or int(head[1]) != count:
                return None
            idx = cls(lines[1 : count + 1])
        except (ValueError, IndexError):
            return None
        return idx if idx.count == count and all(s >= 0 for s in idx.start) else None

    def members(self, buf: bytes, base: int, lo: int, hi: int) -> list[tuple[bytes, str, bytes] | None]:
        """(image bytes, image ext, label bytes) of samples ``lo``..``hi`` (all inside ``buf``, which starts at tar
        offset ``base``), or None where the index lacks a part or a member's tar header disagrees with it."""
        m0, m1 = int(self.first[lo]), int(self.first[hi])
        ok = headers_ok(np.frombuffer(buf, np.uint8), self.heads[m0:m1] - base, self.sizes[m0:m1])
        bad = set((np.searchsorted(self.first, np.flatnonzero(~ok) + m0, side="right") - 1).tolist())
        out: list[tuple[bytes, str, bytes] | None] = []
        for i in range(lo, hi):
            img, lab = self.img[i], self.cls[i]
            if img is None or lab is None or i in bad:
                out.append(None)
                continue
            image = buf[img[0] - base : img[0] - base + img[1]]
            out.append((image, img[2], buf[lab[0] - base : lab[0] - base + lab[1]]))
        return out


def _octal(field: np.ndarray) -> np.ndarray:
    """Vectorised tar numeric fields (rows of ASCII octal digits then NUL/space); -1 where a row is not that."""
    digit = (field >= 48) & (field <= 55)
    n = digit.sum(1)
    lead = np.arange(field.shape[1]) < n[:, None]
    power = np.where(lead, 8 ** np.clip(n[:, None] - 1 - np.arange(field.shape[1]), 0, None), 0)
    value = ((field.astype(np.int64) - 48) * power).sum(1)
    return np.where((digit == lead).all(1) & (n > 0), value, -1)


def headers_ok(buf: np.ndarray, heads: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per member: a ustar header where the index says, giving the index's size (one small gather for all).

    This checks that tar and index agree, which is all the index path relies on (the header's other fields are never
    used). The content is covered by each image's own check and by the shard's sha256.
    """
    size = _octal(buf[heads[:, None] + _SIZE_FIELD])
    magic = buf[heads[:, None] + _MAGIC_FIELD]
    return (size == sizes) & (magic == _USTAR_ARRAY).all(1)


# ---------------------------------------------------------------------------------------------------------- write
class TarBuilder:
    """One shard being written: deterministic tar members, so equal input gives equal bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed by close()
        self.count = 0
        self.size = 1024  # end-of-archive blocks

    @staticmethod
    def cost(sample_parts: list[bytes]) -> int:
        return sum(512 + (len(b) + 511) // 512 * 512 for b in sample_parts)

    def add(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.size += self.cost(list(files.values()))
        self.count += 1

    def close(self) -> None:
        self.tar.close()


def write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's index (format v1.2) via DALI's own ``wds2idx``, so the format is DALI's by construction."""
    from wds2idx import IndexCreator  # installed by the nvidia-dali wheel

    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as ic:
        ic.create_index()
