"""Per-rank streaming loader: S3 tar shards → validated samples → DALI decode/flip/normalise → torch batches.

Order and position. Each rank owns a fixed, disjoint set of shards (round-robin over the sorted names). An epoch
reads them in an order seeded by (seed, epoch); the concatenated sample stream is cut into windows of
``shuffle_buffer`` samples and each window is permuted (and its flips and crops drawn) with a generator seeded by
(seed, rank, epoch, window). That mixes samples across shard boundaries like a shuffle buffer, but the order is a pure
function of the position, so the loader's state is two integers (epoch, samples delivered) and a resumed loader
re-reads at most one window (a ranged GET found through the shard's DALI index) and continues with exactly the next
sample, with the same flips and crops.

Reading runs in one background thread feeding a bounded queue; DALI pulls whole batches through
``fn.external_source`` (on CPU into ``num_threads`` single-threaded pipelines that take batches in turn). The thread
streams each shard in large pieces (boto3 GET, or the local shard cache when ``cache_dir`` is set) and cuts the
samples out with the shard's DALI index: the tar headers of a whole piece are checked at once with numpy, and what is
left per sample is slicing, the label's ``int`` and the image's structural check. A shard without a usable index
falls back to parsing the tar stream. Bad samples become holes in the stream: they keep their position, are counted
in ``skipped`` and never reach DALI. A broken connection is resumed at the exact byte by
:class:`~orchestrator.data.s3.ObjectStream`, so an S3 restart mid-epoch still yields every sample exactly once.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import os
import queue
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from botocore.exceptions import ClientError
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from orchestrator.config import DataConfig
from orchestrator.data.s3 import DataError, ObjectStream, check_prefix, client, describe_error
from orchestrator.data.shards import IMAGE_EXTS, iter_tar_samples
from orchestrator.env import Env, split_s3_uri

log = logging.getLogger(__name__)

_QUEUE_CHUNKS = 8  # read-ahead: this many chunks of at most _CHUNK samples wait for DALI
_CHUNK = 256
_PIECE = 1 << 20  # bytes per read from S3 / the cache: few, large reads
_SIZE_FIELD, _MAGIC_FIELD = np.arange(124, 136), np.arange(257, 262)  # in a tar header
_USTAR = np.frombuffer(b"ustar", np.uint8)


# ---------------------------------------------------------------------------------------------------------- checks
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


def _sample(parts: dict[str, bytes], resolution: int) -> tuple | None:
    """(image array, label, needs_resize) for DALI, or None when the sample is unusable."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        return None
    try:
        label = int(parts["cls"])
    except (KeyError, ValueError):
        return None
    data = parts[ext]
    if ext == "webp":  # no cheap structural check; let DALI decide (a failure is handled after the fact)
        size = None
    else:
        size = image_size(data)
        if size is None:
            return None
    return np.frombuffer(data, dtype=np.uint8), label, size != (resolution, resolution)


# ---------------------------------------------------------------------------------------------------------- decode
def decode_backend(device: torch.device | str | None) -> str:
    """DALI's decoder backend for batches on ``device``: ``"mixed"`` (on the GPU) for a CUDA device when CUDA is
    available, else ``"cpu"`` (the loader falls back). Part of the FID reference key: the backends' pixels differ."""
    device = torch.device(device or "cpu")
    return "mixed" if device.type == "cuda" and torch.cuda.is_available() else "cpu"


def decoder_args(use_gpu: bool, channels: int) -> dict:
    """``fn.decoders.image``'s arguments. nvJPEG (mixed) upsamples JPEG chroma unlike libjpeg-turbo (cpu) unless
    told to use fancy upsampling, as the cpu backend always does (it ignores the flag): without it, GPU training saw
    other pixels than the CPU decode of the same JPEG."""
    args = {"device": "mixed" if use_gpu else "cpu", "output_type": types.GRAY if channels == 1 else types.RGB}
    if use_gpu:
        args["jpeg_fancy_upsampling"] = True
    return args


# Out-of-memory and CUDA failures are the device's, not an image's: "recovering" would re-send every image forever.
_DEVICE_ERRORS = ("out of memory", "cudaerror", "cuda error", "cuda_error", "cuda runtime error")


def is_decode_error(exc: BaseException) -> bool:
    """Whether DALI failed because of an image in the batch (the loader drops it and goes on), judged from DALI's
    message, e.g. "Error in CPU operator `nvidia.dali.fn.decoders.image` ... Failed to decode sample #16 : "."""
    if isinstance(exc, torch.OutOfMemoryError) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    if any(marker in text for marker in _DEVICE_ERRORS):
        return False
    return "failed to decode" in text or "operator `nvidia.dali.fn.decoders.image`" in text


# ---------------------------------------------------------------------------------------------------------- index
class _Index:
    """A shard's DALI index as arrays: where each sample's members, image and label lie in the tar.

    ``members`` holds every member's header offset and data size, sample after sample (``first[i]`` is sample ``i``'s
    first entry in it); ``start``/``end`` bound each sample's bytes (its first header to its last data byte).
    """

    def __init__(self, lines: list[bytes], resolution: int):
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
        self.count, self.resolution = len(start), resolution

    @classmethod
    def parse(cls, body: bytes, count: int, resolution: int) -> _Index | None:
        """The index, or None when it is not one we can trust for a shard of ``count`` samples."""
        lines = body.split(b"\n")
        head = lines[0].split()
        try:
            if len(head) != 2 or not head[0].startswith(b"v1.") or int(head[1]) != count:
                return None
            idx = cls([ln for ln in lines[1 : count + 1]], resolution)
        except (ValueError, IndexError):
            return None
        return idx if idx.count == count and all(s >= 0 for s in idx.start) else None

    def samples(self, buf: bytes, base: int, lo: int, hi: int) -> list:
        """Samples ``lo``..``hi`` (all inside ``buf``, which starts at tar offset ``base``): a :func:`_sample`-like
        tuple each, or None where the sample is unusable. Every member's tar header is checked against the index in
        one numpy pass."""
        m0, m1 = int(self.first[lo]), int(self.first[hi])
        ok = _headers_ok(np.frombuffer(buf, np.uint8), self.heads[m0:m1] - base, self.sizes[m0:m1])
        bad = set((np.searchsorted(self.first, np.flatnonzero(~ok) + m0, side="right") - 1).tolist())
        out, res = [], (self.resolution, self.resolution)
        for i in range(lo, hi):
            img, lab = self.img[i], self.cls[i]
            if img is None or lab is None or i in bad:
                out.append(None)
                continue
            try:
                label = int(buf[lab[0] - base : lab[0] - base + lab[1]])
            except ValueError:
                out.append(None)
                continue
            data = buf[img[0] - base : img[0] - base + img[1]]
            if img[2] == "webp":  # no cheap structural check; DALI decides (a failure is handled after the fact)
                size = None
            elif (size := image_size(data)) is None:
                out.append(None)
                continue
            out.append((np.frombuffer(data, np.uint8), label, size != res))
        return out


def _octal(field: np.ndarray) -> np.ndarray:
    """Vectorised tar numeric fields (rows of ASCII octal digits then NUL/space); -1 where a row is not that."""
    digit = (field >= 48) & (field <= 55)
    n = digit.sum(1)
    lead = np.arange(field.shape[1]) < n[:, None]
    power = np.where(lead, 8 ** np.clip(n[:, None] - 1 - np.arange(field.shape[1]), 0, None), 0)
    value = ((field.astype(np.int64) - 48) * power).sum(1)
    return np.where((digit == lead).all(1) & (n > 0), value, -1)


def _headers_ok(buf: np.ndarray, heads: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per member: a ustar header where the index says, giving the index's size (one small gather for all).

    This checks that tar and index agree, which is all the index path relies on (the header's other fields are never
    used). The content is covered by each image's own check and by the shard's sha256.
    """
    size = _octal(buf[heads[:, None] + _SIZE_FIELD])
    magic = buf[heads[:, None] + _MAGIC_FIELD]
    return (size == sizes) & (magic == _USTAR).all(1)


# ---------------------------------------------------------------------------------------------------------- cache
class _ShardCache:
    """Local copies of verified shards under ``root``, least recently used evicted beyond ``max_bytes``.

    A shard enters the cache only after it streamed whole with the manifest's sha256, and is renamed into place, so
    a reader never sees a partial or unverified copy; several ranks on one node can share the folder.
    """

    def __init__(self, root: str, max_bytes: int):
        self.root, self.max_bytes = Path(root).expanduser(), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, entry: dict) -> Path:
        return self.root / f"{entry['sha256'][:16]}-{entry['name']}"  # content-addressed: a re-written dataset misses

    def open(self, entry: dict):
        p = self.path(entry)
        try:
            if p.stat().st_size != entry["bytes"]:
                return None
            os.utime(p)  # recently used
            return open(p, "rb")
        except OSError:
            return None

    def writer(self, entry: dict):
        if entry["bytes"] > self.max_bytes:
            return None
        with contextlib.suppress(OSError):
            return open(self.path(entry).with_suffix(f".partial-{os.getpid()}-{threading.get_ident()}"), "wb")
        return None

    def commit(self, entry: dict, f, ok: bool) -> None:
        f.close()
        tmp = Path(f.name)
        if not ok:
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, self.path(entry))
        files = sorted(self.root.glob("*.tar"), key=lambda q: q.stat().st_mtime)
        total = sum(q.stat().st_size for q in files)
        for q in files[:-1]:
            if total <= self.max_bytes:
                break
            total -= q.stat().st_size
            q.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------- reading
class _Pieces:
    """A byte source (S3 stream or local file) read in large pieces, hashed and optionally copied as it goes."""

    def __init__(self, raw, copy=None, *, hash: bool = True):
        self.raw, self.copy, self.sha = raw, copy, hashlib.sha256() if hash else None

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        if self.sha is not None:
            self.sha.update(data)
        if self.copy is not None:
            try:
                self.copy.write(data)
            except OSError:  # a full disk disables the copy, never the read
                self.copy = None
        return data


class ShardLoader:
    """Infinite iterator of ``(images, labels)``: float32 N×3×H×W in [-1, 1] and int64 (N,), on ``device``."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        env: Env | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device or "cpu")
        self.env = env or Env.from_environ()
        self.manifest = check_prefix(cfg.dataset, self.env)
        self.bucket, prefix = split_s3_uri(cfg.dataset)
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        entries = sorted(self.manifest["shards"], key=lambda s: s["name"])
        if len(entries) < world_size:
            raise DataError(
                f"{cfg.dataset} has {len(entries)} shards but {world_size} ranks need at least one each; "
                "re-write it with a smaller samples_per_shard"
            )
        self._entries = entries[rank::world_size]
        self.shards = [e["name"] for e in self._entries]
        self.resolution = int(self.manifest["resolution"])
        self.num_classes = int(self.manifest["num_classes"])
        self.channels = int(self.manifest.get("channels", 3))  # of the stored images; batches are always RGB
        self._crop = cfg.crop_scale < 1
        self.epoch_size = sum(int(e["count"]) for e in self._entries)  # samples per epoch on this rank
        self.window = max(1, cfg.shuffle_buffer)
        self.skipped = 0  # samples never delivered: undecodable, unlabeled, or lost to a truncated shard
        self.checksum_errors = 0  # shards whose streamed sha256 differed from the manifest
        self._epoch, self._pos = 0, 0  # the next sample to deliver: its epoch and index in that epoch's order
        self._thread: threading.Thread | None = None
        self._iters: list | None = None
        self._indexes: dict[str, _Index | None] = {}  # shard name → its parsed index (None: parse the tar instead)
        self._cache = _ShardCache(cfg.cache_dir, int(cfg.cache_gb * 2**30)) if cfg.cache_dir else None
        self._check_shards()

    # ------------------------------------------------------------------------------------------------ public
    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        """Where the next batch starts; JSON-able. Store it with the checkpoint."""
        return {"epoch": self._epoch, "position": self._pos, "skipped": self.skipped, "shards": self.shards,
                "seed": self.cfg.seed, "window": self.window}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (before iterating). Under a different shard split (the world size changed) the
        old position means nothing here, so the saved epoch restarts from its beginning."""
        if self._thread is not None:
            raise RuntimeError("load_state_dict must be called before iterating the loader")
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])
        self.skipped = int(state.get("skipped", 0))
        same = (state.get("shards") == self.shards and state.get("seed") == self.cfg.seed
                and state.get("window") == self.window)  # fmt: skip
        if not same:
            log.warning("data position saved for another shard split/seed/window; restarting epoch %d", self._epoch)
            self._pos = 0
        if self._pos >= self.epoch_size:
            self._epoch, self._pos = self._epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iters is None:
            self._start()
        while True:
            # Pipeline j decodes batches j, j + P, j + 2P, ... (see _feed): taking them in turn keeps stream order.
            it = self._iters[self._turn]
            self._turn = (self._turn + 1) % len(self._iters)
            try:
                out = next(it)[0]
            except RuntimeError as exc:
                if self._failure is not None:  # the reader gave up (S3 gone for minutes): say so, plainly
                    raise self._failure from None
                if not is_decode_error(exc):  # out of memory, CUDA, a bug: nothing a skipped image would fix
                    raise
                self._recover_from_decode_error(exc)
                continue
            self._fruitless = 0
            (self._epoch, self._pos), skipped = self._pending.popleft()[:2]
            self.skipped += skipped
            images = out["images"].to(self.device, non_blocking=True)
            if self.channels == 1:  # a read-only view: models copy their input into their own layout anyway
                images = images.expand(-1, 3, -1, -1)
            labels = out["labels"].to(self.device, non_blocking=True)
            yield images, labels

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):  # unblock a reader waiting on a full queue
                    self._queue.get(timeout=0.1)
            self._thread = None
        self._iters = self._pipes = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter shutdown modules may already be gone
            self.close()

    # ------------------------------------------------------------------------------------------------ setup
    def _check_shards(self) -> None:
        """Cheap start-up check (HEAD, sizes): shards changed or lost after the manifest was written fail now, not
        hours into training. The full sha256 is checked as each shard streams."""
        s3 = client(self.env)

        def head(e):
            try:
                return e, s3.head_object(Bucket=self.bucket, Key=self.prefix + e["name"])["ContentLength"]
            except ClientError as err:
                return e, err

        with ThreadPoolExecutor(8) as pool:
            for e, size in pool.map(head, self._entries):
                uri = f"s3://{self.bucket}/{self.prefix}{e['name']}"
                if isinstance(size, Exception):
                    raise DataError(f"shard {uri} listed in manifest.json cannot be read: "
                                    f"{describe_error(size, self.env, uri)}")  # fmt: skip
                if size != e["bytes"]:
                    raise DataError(f"shard {uri} is {size} bytes but manifest.json says {e['bytes']}: the shards "
                                    "changed after the manifest was written; re-write the dataset")  # fmt: skip

    def _start(self) -> None:
        # The stream allocates a few container objects per sample that live just long enough to be promoted, so
        # full collections keep coming, and each re-scans every object alive at start-up (torch, Ray, MLflow,
        # botocore: ~350k). Freezing those long-lived objects cut the loader's CPU per image at 64² from ~81 to ~70 µs.
        gc.collect()  # garbage now would be frozen with the rest, never to be freed
        gc.freeze()
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._failure: Exception | None = None
        self._pending: deque = deque()  # batches handed to DALI, not yet delivered: (position after, skipped, data)
        self._requeued: tuple | None = None  # (position after, samples) of a batch DALI failed on, to go out again
        self._fruitless = 0  # decode failures in a row whose batch held no image PIL rejects
        block = self._pos // self.window * self.window
        self._thread = threading.Thread(target=self._read, args=(self._epoch, block), daemon=True,
                                        name=f"gf-shards-r{self.rank}")  # fmt: skip
        self._thread.start()
        self._samples = self._windows(self._epoch, self._pos)
        self._cur, self._j = None, 0  # the window being delivered, and the next index in it
        # On CPU, one single-threaded pipeline per thread, each decoding whole batches: DALI's per-operator
        # hand-offs between the threads of one pipeline left the cores idle a third of the time on small images
        # (in-memory decode at 64² on 2 cores: 2 pipelines × 1 thread 45k img/s, 1 pipeline × 2 threads 32k).
        # The mixed GPU decoder parallelises on the device: one pipeline there.
        use_gpu = decode_backend(self.device) == "mixed"
        n = 1 if use_gpu else self.cfg.num_threads
        self._staged: list[deque] = [deque() for _ in range(n)]  # batches made for each pipeline, not yet fed
        self._made, self._turn = 0, 0
        self._pipes = [self._build_pipeline(j, n, use_gpu) for j in range(n)]
        self._iters = [self._iterator(p) for p in self._pipes]

    def _iterator(self, pipe) -> DALIGenericIterator:
        """DALI's iterator decodes its first batch when it is built, outside ``__iter__``'s recovery: a decode error
        there is recovered the same way (the good images go out again), then the iterator is built anew."""
        while True:
            try:
                return DALIGenericIterator(pipe, ["images", "labels"])
            except RuntimeError as exc:
                if self._failure is not None:
                    raise self._failure from None
                if not is_decode_error(exc):
                    raise
                self._recover_from_decode_error(exc)  # raises when it keeps failing without a bad image

    def _build_pipeline(self, j: int, n: int, use_gpu: bool):
        res, ch = self.resolution, 1 if self.channels == 1 else 3

        # DALI's AutoGraph (there for the ``if`` below) would rewrite a source written in the pipeline definition,
        # which made it ~3× slower
        @do_not_convert
        def source():
            return self._feed(j)

        # The dynamic executor (DALI 2.4's default) on both backends: it hands its output buffers to torch without a
        # copy (DLPack; DALIGenericIterator copies otherwise, into freshly allocated tensors: in-memory decode at 64²
        # on CPU, 52k img/s against 33k), and it is the executor whose recovery from a failed batch is tested (on CPU,
        # tests/integration/test_data_s3.py). Said explicitly so a change of DALI's default cannot change either.
        @pipeline_def(enable_conditionals=True, exec_dynamic=True)
        def pipe():
            dtypes = [types.UINT8, types.INT64, types.INT32, types.BOOL] + ([types.FLOAT] * 2 if self._crop else [])
            data, labels, mirror, resize, *box = fn.external_source(source=source, num_outputs=len(dtypes),
                                                                     batch=True, dtype=dtypes)  # fmt: skip
            # A grey dataset (manifest "channels": 1) is decoded and normalised as one channel, broadcast to RGB
            # only as a view (__iter__): DALI's float output is what costs at 256² (decode 148 µs/img, normalising
            # three channels 180 µs, one channel 70 µs).
            images = fn.decoders.image(data, **decoder_args(use_gpu, ch))
            if resize:  # per sample: a random crop, or a stored size that differs (never, for shards we wrote)
                crop = {"roi_start": box[0], "roi_end": box[1], "roi_relative": True} if box else {}
                images = fn.resize(images, size=[res, res], antialias=True, **crop)
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=[127.5] * ch, std=[127.5] * ch,
                                              dtype=types.FLOAT, output_layout="CHW")  # fmt: skip
            return images, labels

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if use_gpu else None  # fmt: skip
        p = pipe(batch_size=self.cfg.batch_size, num_threads=self.cfg.num_threads if use_gpu else 1,
                 device_id=device_id, prefetch_queue_depth=self.cfg.prefetch,
                 seed=(self.cfg.seed * 1000 + self.rank) * n + j)  # fmt: skip
        p.build()
        return p

    # ------------------------------------------------------------------------------------------------ order
    def _epoch_shards(self, epoch: int) -> list[dict]:
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self._entries))
        return [self._entries[i] for i in order]

    def _window_order(self, epoch: int, window: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's permutation and, per delivered sample, its augmentation: a row (flip, y0, x0, y1, x1) with
        the crop box relative to the image (the whole image unless ``crop_scale`` < 1)."""
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, window])
        perm = rng.permutation(n)
        aug = np.zeros((n, 5), np.float32)
        aug[:, 0] = rng.integers(0, 2, n, dtype=np.int32) * int(self.cfg.hflip)
        aug[:, 3:] = 1
        if self._crop:
            side = np.sqrt(rng.uniform(self.cfg.crop_scale, 1, n)).astype(np.float32)
            aug[:, 1:3] = rng.uniform(0, 1, (n, 2)) * (1 - side)[:, None]
            aug[:, 3:] = aug[:, 1:3] + side[:, None]
        return perm, aug

    def _windows(self, epoch: int, pos: int) -> Iterator[tuple[int, int, list, np.ndarray, int]]:
        """(epoch, window, its samples in delivery order (None = hole), their augmentation, first index to
        deliver)."""
        pending: list = []
        w, skip = divmod(pos, self.window)
        while True:
            n = min(self.window, self.epoch_size - w * self.window)
            while len(pending) < n:
                chunk = self._queue.get()
                if isinstance(chunk, Exception):
                    self._failure = chunk
                    raise chunk
                pending.extend(chunk)
            block, pending = pending[:n], pending[n:]
            perm, aug = self._window_order(epoch, w, n)
            yield epoch, w, [block[i] for i in perm.tolist()], aug, skip
            skip, w = 0, w + 1
            if w * self.window >= self.epoch_size:
                epoch, w = epoch + 1, 0

    def _feed(self, j: int):
        """Pipeline ``j``'s source: batches are made in stream order and dealt round-robin, so pipeline ``j`` gets
        batches j, j + P, j + 2P, ... (P pipelines) whenever it asks."""
        while not self._staged[j]:
            self._staged[self._made % len(self._staged)].append(self._next_batch())
            self._made += 1
        return self._staged[j].popleft()

    def _next_batch(self):
        """The next batch in stream order: encoded images, labels, mirror flags, resize flags (and with random
        crops, the crop boxes' corners)."""
        size = self.cfg.batch_size
        kept: list = []  # (sample, augmentation row)
        skipped, after = 0, (self._epoch, self._pos)
        if self._requeued:
            after = max(after, self._requeued[0])
            while self._requeued[1] and len(kept) < size:
                kept.append(self._requeued[1].popleft())
        while len(kept) < size:
            if self._cur is None or self._j >= len(self._cur[2]):
                self._cur = next(self._samples)
                self._j = self._cur[4]
            epoch, w, items, aug, _ = self._cur
            j, k = self._j, min(len(items), self._j + size - len(kept))
            part = items[j:k]
            got = [(x, a) for x, a in zip(part, aug[j:k].tolist()) if x is not None]
            skipped += len(part) - len(got)
            kept += got
            self._j = k
            at = w * self.window + k
            after = max(after, (epoch, at) if at < self.epoch_size else (epoch + 1, 0))
        self._pending.append((after, skipped, kept))
        # One zero-padded array instead of a list: DALI takes a dense batch in one call, where a list costs it a
        # conversion per sample (~8 µs/img at 64²). Decoders stop at the image's end marker; the zeros are ignored.
        encoded = np.zeros((len(kept), max(len(x[0]) for x, _ in kept)), np.uint8)
        for i, (x, _) in enumerate(kept):
            encoded[i, : len(x[0])] = x[0]
        aug = np.array([a for _, a in kept], np.float32)
        resize = np.array([x[2] for x, _ in kept], bool) | self._crop
        batch = (encoded, np.array([x[1] for x, _ in kept], np.int64), aug[:, 0].astype(np.int32), resize)
        return (*batch, aug[:, 1:3].copy(), aug[:, 3:].copy()) if self._crop else batch

    def _recover_from_decode_error(self, exc: BaseException) -> None:
        """DALI failed on a batch that passed the cheap checks: find the bad images with PIL (rare, so the slow
        probe is fine) and send the good ones out again. DALI keeps running after a failed iteration.

        Each failure is blamed on the oldest batch in flight. More failures in a row than there are batches in flight
        (+1: the re-sent one) without an image PIL rejects mean DALI fails on images PIL decodes, or not on an image
        at all: re-sending them would loop forever, so that is a DataError."""
        said = [ln.strip() for ln in str(exc).split("encountered:")[-1].splitlines() if ln.strip()]
        reason = said[0] if said else type(exc).__name__  # DALI's own words, e.g. "Failed to decode sample #16 :"
        if not self._pending:
            raise DataError(f"DALI reported a decode error with no batch in flight: {reason}") from exc
        in_flight = len(self._pending)
        after, skipped, kept = self._pending.popleft()
        self.skipped += skipped
        good = []
        for item in kept:
            try:
                with Image.open(io.BytesIO(item[0][0].tobytes())) as im:
                    im.convert("RGB")
                good.append(item)
            except (OSError, ValueError):
                self.skipped += 1
        log.warning("DALI could not decode a batch; %d of %d images were bad and are skipped",
                    len(kept) - len(good), len(kept))  # fmt: skip
        self._fruitless = self._fruitless + 1 if len(good) == len(kept) else 0
        if self._fruitless > in_flight + 1:
            raise DataError(f"DALI failed {self._fruitless} times in a row on batches whose images PIL decodes "
                            f"({reason}); giving up rather than re-sending them forever") from exc  # fmt: skip
        if self._requeued and self._requeued[1]:  # (cannot happen: a requeued batch is re-sent before new ones)
            good += list(self._requeued[1])
        self._requeued = (max(after, self._requeued[0]) if self._requeued else after, deque(good))

    # ------------------------------------------------------------------------------------------------ reader thread
    def _read(self, epoch: int, start: int) -> None:
        """Stream this rank's samples in stream order from (epoch, start), forever: one item per position."""
        try:
            while not self._stop.is_set():
                offset = 0
                for entry in self._epoch_shards(epoch):
                    count = int(entry["count"])
                    if offset + count > start:
                        for items in self._read_shard(entry, max(0, start - offset)):
                            for i in range(0, len(items), _CHUNK):
                                self._put(items[i : i + _CHUNK])
                    offset += count
                    if self._stop.is_set():
                        return
                epoch, start = epoch + 1, 0
        except Exception as e:  # handed to the consumer, which raises it in the training process
            self._put(DataError(f"reading s3://{self.bucket}/{self.prefix}: {type(e).__name__}: {e}"))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _index(self, entry: dict) -> _Index | None:
        """The shard's parsed DALI index (one small GET, then kept), or None if it is missing or does not fit."""
        name = entry["name"]
        if name not in self._indexes:
            idx = None
            if entry.get("index"):
                try:
                    idx = _Index.parse(self._get(entry["index"]), int(entry["count"]), self.resolution)
                except ClientError as e:
                    log.warning("%s: index unreadable (%s); parsing the tar instead", name, describe_error(
                        e, self.env, f"s3://{self.bucket}/{self.prefix}{entry['index']}"))  # fmt: skip
                if idx is None:
                    log.warning("%s: no usable index; parsing the tar stream instead", name)
            self._indexes[name] = idx
        return self._indexes[name]

    def _source(self, entry: dict, start: int, whole: bool) -> tuple[object, object, bool]:
        """(readable from tar offset ``start``, cache file to fill or None, whether it was verified already)."""
        if self._cache is not None:
            f = self._cache.open(entry)
            if f is not None:  # verified when it entered the cache
                f.seek(start)
                return f, None, True
        # the shard's sha256 (from the manifest) is checked over the stream: botocore's CRC32 of the same bytes would
        # cost the reader thread ~6%
        stream = ObjectStream(self.bucket, self.prefix + entry["name"], start=start, env=self.env, checksums=False)
        return stream, (self._cache.writer(entry) if self._cache is not None and whole else None), False

    def _read_shard(self, entry: dict, skip: int) -> Iterator[list]:
        """Exactly ``count - skip`` items for one shard, in lists: a sample, or None where it is bad or missing."""
        uri = f"s3://{self.bucket}/{self.prefix}{entry['name']}"
        idx = self._index(entry)
        count = int(entry["count"])
        base = idx.start[skip] if idx is not None else 0
        raw, copy, verified = self._source(entry, base, whole=skip == 0)
        src = _Pieces(raw, copy, hash=not verified and skip == 0)
        intact = False
        try:
            if idx is not None:
                clean = yield from self._indexed(src, idx, skip, base, uri)
            else:
                clean = yield from self._parsed(src, count, skip, uri)
            if clean and src.sha is not None:
                while src.read(_PIECE):  # the tar's end padding, so the hash covers the whole object
                    pass
                intact = src.sha.hexdigest() == entry["sha256"]
                if not intact:
                    self.checksum_errors += 1
                    log.warning("%s: sha256 differs from manifest.json; its samples were checked one by one", uri)
        finally:
            if copy is not None:
                self._cache.commit(entry, copy, intact and src.copy is not None)
            raw.close()

    def _indexed(self, src: _Pieces, idx: _Index, skip: int, base: int, uri: str) -> Iterator[list]:
        """Samples cut out of large pieces of the stream by the index; returns whether the stream held them all."""
        buf, i = b"", skip
        while i < idx.count:
            need = idx.end[i] - base  # at least the next whole sample, and as much as one read brings
            parts, have = [buf], len(buf)
            while have < need or have == len(buf):
                data = src.read(max(_PIECE, need - have))
                if not data:
                    break
                parts.append(data)
                have += len(data)
            buf = b"".join(parts)
            top = base + len(buf)
            j = i
            while j < idx.count and idx.end[j] <= top:
                j += 1
            if j == i:  # the stream ended inside sample i: the rest of the shard is lost, its positions stay as holes
                log.warning("%s: ends early (truncated); %d of its samples skipped", uri, idx.count - i)
                yield [None] * (idx.count - i)
                return False
            items = idx.samples(buf, base, i, j)
            for k, item in enumerate(items):
                if item is None:
                    log.warning("%s: sample %d is unusable (bad image, label or tar header); skipped", uri, i + k)
            yield items
            cut = idx.start[j] - base if j < idx.count else len(buf)
            buf, base, i = buf[cut:], base + cut, j
        return True

    def _parsed(self, src: _Pieces, want: int, skip: int, uri: str) -> Iterator[list]:
        """The fallback without an index: the tar stream parsed member by member from its start (the first ``skip``
        samples are dropped); returns whether it ended cleanly."""
        got, errors, items, clean = 0, [], [], True
        for name, parts, _ in iter_tar_samples(src, errors=errors):
            if got == want:
                log.warning("%s holds more samples than manifest.json says (%d); ignoring the rest", uri, want)
                clean = False
                break
            got += 1
            if got <= skip:
                continue
            sample = _sample(parts, self.resolution)
            if sample is None:
                log.warning("%s: sample %s is unusable (bad image or label); skipped", uri, name)
            items.append(sample)
            if len(items) == _CHUNK:
                yield items
                items = []
        if got < want:  # truncated: the rest of this shard is lost, its positions stay (as holes)
            log.warning("%s: %s; %d of its samples skipped", uri, errors[0] if errors else "ends early", want - got)
            items += [None] * (want - max(got, skip))
        if items:
            yield items
        return clean and not errors

    def _get(self, name: str) -> bytes:
        """A small object under the prefix, whole; retried through S3 restarts like the shards' streams."""
        stream = ObjectStream(self.bucket, self.prefix + name, env=self.env)
        try:
            parts = []
            while data := stream.read(_PIECE):
                parts.append(data)
            return b"".join(parts)
        finally:
            stream.close()
