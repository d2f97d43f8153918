"""Per-rank streaming loader: S3 tar shards → validated samples → DALI decode/flip/normalise → torch batches.

Order and position. Each rank owns a fixed, disjoint set of shards (round-robin over the sorted names). An epoch
reads them in an order seeded by (seed, epoch); the concatenated sample stream is cut into windows of
``shuffle_buffer`` samples and each window is permuted (and its flips drawn) with a generator seeded by
(seed, rank, epoch, window). That mixes samples across shard boundaries like a shuffle buffer, but the order is a pure
function of the position, so the loader's state is two integers (epoch, samples delivered) and a resumed loader
re-reads at most one window (a ranged GET found through the shard's DALI index) and continues with exactly the next
sample, with the same flips.

Reading runs in one background thread (boto3 streaming GET → tar stream → cheap validation) feeding a bounded queue;
DALI pulls whole batches through ``fn.external_source``. Bad samples become holes in the stream: they keep their
position, are counted in ``skipped`` and never reach DALI. A broken connection is resumed at the exact byte by
:class:`~orchestrator.data.s3.ObjectStream`, so an S3 restart mid-epoch still yields every sample exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import queue
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from botocore.exceptions import ClientError
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from orchestrator.config import DataConfig
from orchestrator.data.s3 import DataError, ObjectStream, check_prefix, client, describe_error
from orchestrator.data.shards import IMAGE_EXTS, iter_tar_samples
from orchestrator.env import Env, split_s3_uri

log = logging.getLogger(__name__)

_QUEUE_CHUNKS = 16  # read-ahead: this many chunks of _CHUNK samples wait for DALI at most
_CHUNK = 64


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


# ---------------------------------------------------------------------------------------------------------- reading
class _HashingReader:
    """Passes reads through while hashing them: the shard's sha256 is checked at no extra pass."""

    def __init__(self, raw):
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
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
        self.epoch_size = sum(int(e["count"]) for e in self._entries)  # samples per epoch on this rank
        self.window = max(1, cfg.shuffle_buffer)
        self.skipped = 0  # samples never delivered: undecodable, unlabeled, or lost to a truncated shard
        self.checksum_errors = 0  # shards whose streamed sha256 differed from the manifest
        self._epoch, self._pos = 0, 0  # the next sample to deliver: its epoch and index in that epoch's order
        self._thread: threading.Thread | None = None
        self._iter = None
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
        if self._iter is None:
            self._start()
        while True:
            try:
                out = next(self._iter)[0]
            except RuntimeError:
                if self._failure is not None:  # the reader gave up (S3 gone for minutes): say so, plainly
                    raise self._failure from None
                self._recover_from_decode_error()
                continue
            (self._epoch, self._pos), skipped = self._pending.popleft()[:2]
            self.skipped += skipped
            images = out["images"].to(self.device, non_blocking=True)
            labels = out["labels"].to(self.device, non_blocking=True)
            yield images, labels

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):  # unblock a reader waiting on a full queue
                    self._queue.get(timeout=0.1)
            self._thread = None
        self._iter = self._pipe = None

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
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._failure: Exception | None = None
        self._pending: deque = deque()  # batches handed to DALI, not yet delivered: (position after, skipped, data)
        self._requeued: deque = deque()  # samples from a batch DALI failed on, to go out again
        block = self._pos // self.window * self.window
        self._thread = threading.Thread(target=self._read, args=(self._epoch, block), daemon=True,
                                        name=f"gf-shards-r{self.rank}")  # fmt: skip
        self._thread.start()
        self._samples = self._ordered(self._epoch, self._pos)
        self._pipe = self._build_pipeline()
        self._iter = DALIGenericIterator(self._pipe, ["images", "labels"])

    def _build_pipeline(self):
        use_gpu = self.device.type == "cuda" and torch.cuda.is_available()
        res = self.resolution

        @pipeline_def(enable_conditionals=True)
        def pipe():
            data, labels, mirror, resize = fn.external_source(
                source=self._next_batch, num_outputs=4, batch=True, dtype=[types.UINT8, types.INT64, types.INT32,
                                                                            types.BOOL])  # fmt: skip
            images = fn.decoders.image(data, device="mixed" if use_gpu else "cpu", output_type=types.RGB)
            if resize:  # per sample, only where the stored size differs (never, for shards we wrote)
                images = fn.resize(images, size=[res, res], antialias=True)
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3,
                                              dtype=types.FLOAT, output_layout="CHW")  # fmt: skip
            return images, labels

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if use_gpu else None  # fmt: skip
        p = pipe(batch_size=self.cfg.batch_size, num_threads=self.cfg.num_threads, device_id=device_id,
                 prefetch_queue_depth=self.cfg.prefetch, seed=self.cfg.seed * 1000 + self.rank)  # fmt: skip
        p.build()
        return p

    # ------------------------------------------------------------------------------------------------ order
    def _epoch_shards(self, epoch: int) -> list[dict]:
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self._entries))
        return [self._entries[i] for i in order]

    def _window_order(self, epoch: int, window: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, window])
        return rng.permutation(n), rng.integers(0, 2, n, dtype=np.int32) * int(self.cfg.hflip)

    def _ordered(self, epoch: int, pos: int) -> Iterator[tuple[tuple[int, int], tuple | None, int]]:
        """((epoch, position after), sample or None, mirror) in delivery order, starting at ``pos``."""
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
            perm, flips = self._window_order(epoch, w, n)
            for j in range(skip, n):
                after = (
                    (epoch, w * self.window + j + 1) if w * self.window + j + 1 < self.epoch_size else (epoch + 1, 0)
                )
                yield after, block[perm[j]], int(flips[j])
            skip, w = 0, w + 1
            if w * self.window >= self.epoch_size:
                epoch, w = epoch + 1, 0

    def _next_batch(self):
        """DALI's source: one full batch of encoded images, labels, mirror flags and resize flags."""
        data, labels, mirror, resize, kept = [], [], [], [], []
        skipped, after = 0, (self._epoch, self._pos)
        while len(data) < self.cfg.batch_size:
            pos, sample, flip = self._requeued.popleft() if self._requeued else next(self._samples)
            after = max(after, pos)
            if sample is None:
                skipped += 1
                continue
            data.append(sample[0])
            labels.append(np.array(sample[1], dtype=np.int64))
            resize.append(np.array(sample[2]))
            mirror.append(np.array(flip, dtype=np.int32))
            kept.append((pos, sample, flip))
        self._pending.append((after, skipped, kept))
        return data, labels, mirror, resize

    def _recover_from_decode_error(self) -> None:
        """DALI failed on a batch that passed the cheap checks: find the bad images with PIL (rare, so the slow
        probe is fine) and send the good ones out again. DALI keeps running after a failed iteration."""
        _, skipped, kept = self._pending.popleft()
        self.skipped += skipped
        good = []
        for item in kept:
            try:
                with Image.open(io.BytesIO(item[1][0].tobytes())) as im:
                    im.convert("RGB")
                good.append(item)
            except (OSError, ValueError):
                self.skipped += 1
        log.warning("DALI could not decode a batch; %d of %d images were bad and are skipped",
                    len(kept) - len(good), len(kept))  # fmt: skip
        self._requeued.extendleft(reversed(good))

    # ------------------------------------------------------------------------------------------------ reader thread
    def _read(self, epoch: int, start: int) -> None:
        """Stream this rank's samples in stream order from (epoch, start), forever: one item per position."""
        try:
            chunk: list = []
            while not self._stop.is_set():
                offset = 0
                for entry in self._epoch_shards(epoch):
                    count = int(entry["count"])
                    if offset + count > start:
                        for item in self._read_shard(entry, max(0, start - offset)):
                            chunk.append(item)
                            if len(chunk) >= _CHUNK:
                                self._put(chunk)
                                chunk = []
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

    def _read_shard(self, entry: dict, skip: int) -> Iterator[tuple | None]:
        """Exactly ``count - skip`` items for one shard: a sample, or None where it is bad or missing."""
        key = self.prefix + entry["name"]
        uri = f"s3://{self.bucket}/{key}"
        stream = ObjectStream(self.bucket, key, start=self._sample_offset(entry, skip) if skip else 0, env=self.env)
        reader = _HashingReader(stream)
        want, got, errors = int(entry["count"]) - skip, 0, []
        try:
            for name, parts, _ in iter_tar_samples(reader, errors=errors):
                if got == want:
                    log.warning("%s holds more samples than manifest.json says (%d); ignoring the rest", uri, want)
                    break
                got += 1
                sample = _sample(parts, self.resolution)
                if sample is None:
                    log.warning("%s: sample %s is unusable (bad image or label); skipped", uri, name)
                yield sample
            else:
                if not errors:
                    while reader.read(1 << 20):  # the tar's end padding, so the hash covers the whole object
                        pass
                    if skip == 0 and reader.sha.hexdigest() != entry["sha256"]:
                        self.checksum_errors += 1
                        log.warning("%s: sha256 differs from manifest.json; its samples were checked one by one", uri)
        finally:
            stream.close()
        if got < want:  # truncated: the rest of this shard is lost, its positions stay (as holes)
            log.warning("%s: %s; %d of its samples skipped", uri, errors[0] if errors else "ends early", want - got)
            yield from [None] * (want - got)

    def _sample_offset(self, entry: dict, i: int) -> int:
        """Byte offset of sample ``i``'s first tar header, from the shard's DALI index (one small GET)."""
        body = client(self.env).get_object(Bucket=self.bucket, Key=self.prefix + entry["index"])["Body"].read()
        line = body.split(b"\n", i + 2)[i + 1].split()
        return int(line[1]) - 512  # a one-block ustar header precedes each member's data in shards we write
