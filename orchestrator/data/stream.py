"""The sample stream behind :class:`~orchestrator.data.loader.ShardLoader`: its order, its reader thread, its batches.

- :class:`Order`: which shard, sample, flip and crop comes at which position. A pure function of the position, so a
  resumed loader continues with exactly the next sample.
- :class:`ShardReader`: one background thread that streams the rank's shards (S3 or the local cache) into a bounded
  queue, one item per position: a sample ready for DALI, or None for a hole (a bad or lost sample).
- :class:`Batches`: cuts the permuted windows into DALI's batches, keeps those in flight until they are delivered,
  and sends the good images of a batch DALI failed on out again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from botocore.exceptions import ClientError
from PIL import Image

from orchestrator.data.cache import ShardCache
from orchestrator.data.errors import DataError
from orchestrator.data.images import IMAGE_EXTS, image_size
from orchestrator.data.manifest import ShardEntry
from orchestrator.data.s3 import ObjectStream, describe_error
from orchestrator.data.tar import ShardIndex, iter_tar_samples
from orchestrator.env import Env

log = logging.getLogger(__name__)

_QUEUE_CHUNKS = 8  # read-ahead: this many chunks of at most _CHUNK samples wait for DALI
_CHUNK = 256
_PIECE = 1 << 20  # bytes per read from S3 / the cache: few, large reads


# ---------------------------------------------------------------------------------------------------------- samples
def sample_item(image: bytes, ext: str, label: bytes, resolution: int) -> tuple | None:
    """(image array, label, needs_resize) for DALI, or None when the sample is unusable."""
    try:
        value = int(label)
    except ValueError:
        return None
    if ext == "webp":  # no cheap structural check; DALI decides (a failure is handled after the fact)
        size = None
    elif (size := image_size(image)) is None:
        return None
    return np.frombuffer(image, np.uint8), value, size != (resolution, resolution)


def sample_from_parts(parts: dict[str, bytes], resolution: int) -> tuple | None:
    """:func:`sample_item` of a sample parsed from the tar stream (its members by extension)."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None or "cls" not in parts:
        return None
    return sample_item(parts[ext], ext, parts["cls"], resolution)


def indexed_samples(idx: ShardIndex, buf: bytes, base: int, lo: int, hi: int, resolution: int) -> list:
    """:func:`sample_item` of samples ``lo``..``hi`` cut out of ``buf`` (at tar offset ``base``) by the index."""
    return [None if m is None else sample_item(*m, resolution) for m in idx.members(buf, base, lo, hi)]


# ---------------------------------------------------------------------------------------------------------- order
@dataclass(frozen=True)
class Order:
    """Each rank owns a fixed set of shards; an epoch reads them in an order seeded by (seed, epoch), and the
    concatenated stream is cut into windows of ``window`` samples, each permuted (and its flips and crops drawn) by
    (seed, rank, epoch, window)."""

    seed: int
    rank: int
    window: int
    hflip: bool
    crop_scale: float

    def shards(self, entries: list[ShardEntry], epoch: int) -> list[ShardEntry]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(entries))
        return [entries[i] for i in order]

    def window_order(self, epoch: int, window: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's permutation and, per delivered sample, its augmentation: a row (flip, y0, x0, y1, x1) with
        the crop box relative to the image (the whole image unless ``crop_scale`` < 1)."""
        rng = np.random.default_rng([self.seed, self.rank, epoch, window])
        perm = rng.permutation(n)
        aug = np.zeros((n, 5), np.float32)
        aug[:, 0] = rng.integers(0, 2, n, dtype=np.int32) * int(self.hflip)
        aug[:, 3:] = 1
        if self.crop_scale < 1:
            side = np.sqrt(rng.uniform(self.crop_scale, 1, n)).astype(np.float32)
            aug[:, 1:3] = rng.uniform(0, 1, (n, 2)) * (1 - side)[:, None]
            aug[:, 3:] = aug[:, 1:3] + side[:, None]
        return perm, aug


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


class ShardReader:
    """Streams one rank's shards in stream order from a position, forever, in one background thread.

    Each shard streams in large pieces (boto3 GET, or the local shard cache) and the samples are cut out with the
    shard's DALI index; a shard without a usable index falls back to parsing the tar stream. A broken connection is
    resumed at the exact byte by :class:`~orchestrator.data.s3.ObjectStream`.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        entries: list[ShardEntry],
        order: Order,
        *,
        resolution: int,
        env: Env,
        cache: ShardCache | None,
        name: str,
    ):
        self.bucket, self.prefix, self.entries, self.order = bucket, prefix, entries, order
        self.resolution, self.env, self.cache, self.name = resolution, env, cache, name
        self.checksum_errors = 0  # shards whose streamed sha256 differed from the manifest
        self.failure: Exception | None = None  # why the thread gave up, once the consumer met it
        self._indexes: dict[str, ShardIndex | None] = {}  # shard → its parsed index (None: parse the tar instead)
        self._thread: threading.Thread | None = None

    def start(self, epoch: int, start: int) -> None:
        self.failure = None
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(epoch, start), daemon=True, name=self.name)
        self._thread.start()

    def get(self) -> list:
        """The next chunk of items; raises the reader's failure (S3 gone for minutes) in the consumer."""
        chunk = self._queue.get()
        if isinstance(chunk, Exception):
            self.failure = chunk
            raise chunk
        return chunk

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):  # unblock a reader waiting on a full queue
                    self._queue.get(timeout=0.1)
            self._thread = None

    def _read(self, epoch: int, start: int) -> None:
        """Stream this rank's samples in stream order from (epoch, start), forever: one item per position."""
        try:
            while not self._stop.is_set():
                offset = 0
                for entry in self.order.shards(self.entries, epoch):
                    if offset + entry.count > start:
                        for items in self._read_shard(entry, max(0, start - offset)):
                            for i in range(0, len(items), _CHUNK):
                                self._put(items[i : i + _CHUNK])
                    offset += entry.count
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

    def _index(self, entry: ShardEntry) -> ShardIndex | None:
        """The shard's parsed DALI index (one small GET, then kept), or None if it is missing or does not fit."""
        if entry.name not in self._indexes:
            idx = None
            if entry.index:
                try:
                    idx = ShardIndex.parse(self._get(entry.index), entry.count)
                except ClientError as e:
                    uri = f"s3://{self.bucket}/{self.prefix}{entry.index}"
                    log.warning(
                        "%s: index unreadable (%s); parsing the tar instead",
                        entry.name,
                        describe_error(e, self.env, uri),
                    )
                if idx is None:
                    log.warning("%s: no usable index; parsing the tar stream instead", entry.name)
            self._indexes[entry.name] = idx
        return self._indexes[entry.name]

    def _source(self, entry: ShardEntry, start: int, whole: bool) -> tuple[object, object, bool]:
        """(readable from tar offset ``start``, cache file to fill or None, whether it was verified already)."""
        if self.cache is not None:
            f = self.cache.open(entry)
            if f is not None:  # verified when it entered the cache
                f.seek(start)
                return f, None, True
        # the shard's sha256 (from the manifest) is checked over the stream: botocore's CRC32 of the same bytes would
        # cost the reader thread ~6%
        stream = ObjectStream(self.bucket, self.prefix + entry.name, start=start, env=self.env, checksums=False)
        return stream, (self.cache.writer(entry) if self.cache is not None and whole else None), False

    def _read_shard(self, entry: ShardEntry, skip: int) -> Iterator[list]:
        """Exactly ``count - skip`` items for one shard, in lists: a sample, or None where it is bad or missing."""
        uri = f"s3://{self.bucket}/{self.prefix}{entry.name}"
        idx = self._index(entry)
        base = idx.start[skip] if idx is not None else 0
        raw, copy, verified = self._source(entry, base, whole=skip == 0)
        src = _Pieces(raw, copy, hash=not verified and skip == 0)
        intact = False
        try:
            if idx is not None:
                clean = yield from self._indexed(src, idx, skip, base, uri)
            else:
                clean = yield from self._parsed(src, entry.count, skip, uri)
            if clean and src.sha is not None:
                while src.read(_PIECE):  # the tar's end padding, so the hash covers the whole object
                    pass
                intact = src.sha.hexdigest() == entry.sha256
                if not intact:
                    self.checksum_errors += 1
                    log.warning("%s: sha256 differs from manifest.json; its samples were checked one by one", uri)
        finally:
            if copy is not None:
                self.cache.commit(entry, copy, intact and src.copy is not None)
            raw.close()

    def _indexed(self, src: _Pieces, idx: ShardIndex, skip: int, base: int, uri: str) -> Iterator[list]:
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
            items = indexed_samples(idx, buf, base, i, j, self.resolution)
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
            sample = sample_from_parts(parts, self.resolution)
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


# ---------------------------------------------------------------------------------------------------------- batches
class Batches:
    """DALI's batches in stream order, made from the reader's permuted windows; the batches handed to DALI wait in
    ``pending`` (position after them, holes skipped, their samples) until delivered. Samples that never reach the
    model (holes, images DALI failed on) are counted through ``on_skip``."""

    def __init__(
        self,
        reader: ShardReader,
        order: Order,
        *,
        batch_size: int,
        epoch_size: int,
        epoch: int,
        pos: int,
        on_skip: Callable[[int], None],
    ):
        self.reader, self.order, self.batch_size, self.epoch_size = reader, order, batch_size, epoch_size
        self.on_skip = on_skip
        self.crop = order.crop_scale < 1
        self.position = (epoch, pos)  # after the last batch delivered
        self.pending: deque = deque()  # batches handed to DALI, not yet delivered: (position after, skipped, data)
        self.requeued: tuple | None = None  # (position after, samples) of a batch DALI failed on, to go out again
        self.fruitless = 0  # decode failures in a row whose batch held no image PIL rejects
        self._windows = self._iter_windows(epoch, pos)
        self._cur, self._j = None, 0  # the window being delivered, and the next index in it

    def _iter_windows(self, epoch: int, pos: int) -> Iterator[tuple[int, int, list, np.ndarray, int]]:
        """(epoch, window, its samples in delivery order (None = hole), their augmentation, first index to
        deliver)."""
        window = self.order.window
        pending: list = []
        w, skip = divmod(pos, window)
        while True:
            n = min(window, self.epoch_size - w * window)
            while len(pending) < n:
                pending.extend(self.reader.get())
            block, pending = pending[:n], pending[n:]
            perm, aug = self.order.window_order(epoch, w, n)
            yield epoch, w, [block[i] for i in perm.tolist()], aug, skip
            skip, w = 0, w + 1
            if w * window >= self.epoch_size:
                epoch, w = epoch + 1, 0

    def next_batch(self) -> tuple:
        """The next batch in stream order: encoded images, labels, mirror flags, resize flags (and with random
        crops, the crop boxes' corners)."""
        size = self.batch_size
        kept: list = []  # (sample, augmentation row)
        skipped, after = 0, self.position
        if self.requeued:
            after = max(after, self.requeued[0])
            while self.requeued[1] and len(kept) < size:
                kept.append(self.requeued[1].popleft())
        while len(kept) < size:
            if self._cur is None or self._j >= len(self._cur[2]):
                self._cur = next(self._windows)
                self._j = self._cur[4]
            epoch, w, items, aug, _ = self._cur
            j, k = self._j, min(len(items), self._j + size - len(kept))
            part = items[j:k]
            got = [(x, a) for x, a in zip(part, aug[j:k].tolist()) if x is not None]
            skipped += len(part) - len(got)
            kept += got
            self._j = k
            at = w * self.order.window + k
            after = max(after, (epoch, at) if at < self.epoch_size else (epoch + 1, 0))
        self.pending.append((after, skipped, kept))
        return _dense(kept, self.crop)

    def delivered(self) -> tuple[int, int]:
        """DALI delivered the oldest batch in flight: the position (epoch, index) after it."""
        self.fruitless = 0
        after, skipped, _ = self.pending.popleft()
        self.on_skip(skipped)
        self.position = after
        return after

    def recover(self, exc: BaseException) -> None:
        """DALI failed on a batch that passed the cheap checks: find the bad images with PIL (rare, so the slow
        probe is fine) and send the good ones out again. DALI keeps running after a failed iteration.

        Each failure is blamed on the oldest batch in flight. More failures in a row than there are batches in flight
        (+1: the re-sent one) without an image PIL rejects mean DALI fails on images PIL decodes, or not on an image
        at all: re-sending them would loop forever, so that is a DataError."""
        said = [ln.strip() for ln in str(exc).split("encountered:")[-1].splitlines() if ln.strip()]
        reason = said[0] if said else type(exc).__name__  # DALI's own words, e.g. "Failed to decode sample #16 :"
        if not self.pending:
            raise DataError(f"DALI reported a decode error with no batch in flight: {reason}") from exc
        in_flight = len(self.pending)
        after, skipped, kept = self.pending.popleft()
        good = [item for item in kept if _pil_decodes(item[0][0])]
        self.on_skip(skipped + len(kept) - len(good))
        log.warning(
            "DALI could not decode a batch; %d of %d images were bad and are skipped", len(kept) - len(good), len(kept)
        )
        self.fruitless = self.fruitless + 1 if len(good) == len(kept) else 0
        if self.fruitless > in_flight + 1:
            raise DataError(
                f"DALI failed {self.fruitless} times in a row on batches whose images PIL decodes "
                f"({reason}); giving up rather than re-sending them forever"
            ) from exc
        if self.requeued and self.requeued[1]:  # (cannot happen: a requeued batch is re-sent before new ones)
            good += list(self.requeued[1])
        self.requeued = (max(after, self.requeued[0]) if self.requeued else after, deque(good))


def _pil_decodes(encoded: np.ndarray) -> bool:
    try:
        with Image.open(io.BytesIO(encoded.tobytes())) as im:
            im.convert("RGB")
        return True
    except (OSError, ValueError):
        return False


def _dense(kept: list, crop: bool) -> tuple:
    # One zero-padded array instead of a list: DALI takes a dense batch in one call, where a list costs it a
    # conversion per sample (docs/benchmarks.md, Data). Decoders stop at the image's end marker; the zeros are ignored.
    encoded = np.zeros((len(kept), max(len(x[0]) for x, _ in kept)), np.uint8)
    for i, (x, _) in enumerate(kept):
        encoded[i, : len(x[0])] = x[0]
    aug = np.array([a for _, a in kept], np.float32)
    resize = np.array([x[2] for x, _ in kept], bool) | crop
    batch = (encoded, np.array([x[1] for x, _ in kept], np.int64), aug[:, 0].astype(np.int32), resize)
    return (*batch, aug[:, 1:3].copy(), aug[:, 3:].copy()) if crop else batch
