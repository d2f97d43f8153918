"""Per-rank streaming loader: S3 tar shards → validated samples → DALI decode/flip/normalise → torch batches.

Order and position. Each rank owns a fixed, disjoint set of shards (round-robin over the sorted names). An epoch
reads them in an order seeded by (seed, epoch); the concatenated sample stream is cut into windows of
``shuffle_buffer`` samples and each window is permuted (and its flips and crops drawn) with a generator seeded by
(seed, rank, epoch, window). That mixes samples across shard boundaries like a shuffle buffer, but the order is a pure
function of the position, so the loader's state is two integers (epoch, samples delivered) and a resumed loader
re-reads at most one window (a ranged GET found through the shard's DALI index) and continues with exactly the next
sample, with the same flips and crops.

Reading runs in one background thread (:mod:`orchestrator.data.stream`) feeding a bounded queue; DALI pulls whole
batches through ``fn.external_source`` (on CPU into ``num_threads`` single-threaded pipelines that take batches in
turn). Bad samples become holes in the stream: they keep their position, are counted in ``skipped`` and never reach
DALI. A broken connection is resumed at the exact byte by :class:`~orchestrator.data.s3.ObjectStream`, so an S3
restart mid-epoch still yields every sample exactly once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from botocore.exceptions import ClientError
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from orchestrator.config import DataConfig
from orchestrator.data.cache import ShardCache
from orchestrator.data.errors import DataError
from orchestrator.data.manifest import Manifest
from orchestrator.data.s3 import check_prefix, client, describe_error, split_prefix
from orchestrator.data.stream import Batches, Order, ShardReader
from orchestrator.env import Env

log = logging.getLogger(__name__)


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
        self.manifest: Manifest = check_prefix(cfg.dataset, self.env)
        self.bucket, self.prefix = split_prefix(cfg.dataset)
        entries = list(self.manifest.shards)  # in name order
        if len(entries) < world_size:
            raise DataError(
                f"{cfg.dataset} has {len(entries)} shards but {world_size} ranks need at least one each; "
                "re-write it with a smaller samples_per_shard"
            )
        self._entries = entries[rank::world_size]
        self.shards = [e.name for e in self._entries]
        self.resolution = self.manifest.resolution
        self.num_classes = self.manifest.num_classes
        self.channels = self.manifest.channels  # of the stored images; batches are always RGB
        self._crop = cfg.crop_scale < 1
        self.epoch_size = sum(e.count for e in self._entries)  # samples per epoch on this rank
        self.window = max(1, cfg.shuffle_buffer)
        self.order = Order(cfg.seed, rank, self.window, cfg.hflip, cfg.crop_scale)
        self.skipped = 0  # samples never delivered: undecodable, unlabeled, or lost to a truncated shard
        self._epoch, self._pos = 0, 0  # the next sample to deliver: its epoch and index in that epoch's order
        self._started = False  # whether the reader thread runs
        self._iters: list | None = None
        cache = ShardCache(cfg.cache_dir, int(cfg.cache_gb * 2**30)) if cfg.cache_dir else None
        self._reader = ShardReader(
            self.bucket,
            self.prefix,
            self._entries,
            self.order,
            resolution=self.resolution,
            env=self.env,
            cache=cache,
            name=f"gf-shards-r{rank}",
        )
        self._check_shards()

    # ------------------------------------------------------------------------------------------------ public
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def checksum_errors(self) -> int:
        """Shards whose streamed sha256 differed from the manifest."""
        return self._reader.checksum_errors

    def state_dict(self) -> dict:
        """Where the next batch starts; JSON-able. Store it with the checkpoint."""
        return {
            "epoch": self._epoch,
            "position": self._pos,
            "skipped": self.skipped,
            "shards": self.shards,
            "seed": self.cfg.seed,
            "window": self.window,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (before iterating). Under a different shard split (the world size changed) the
        old position means nothing here, so the saved epoch restarts from its beginning."""
        if self._started:
            raise RuntimeError("load_state_dict must be called before iterating the loader")
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])
        self.skipped = int(state.get("skipped", 0))
        same = (
            state.get("shards") == self.shards
            and state.get("seed") == self.cfg.seed
            and state.get("window") == self.window
        )
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
                self._recover(exc)
                continue
            self._epoch, self._pos = self._batches.delivered()
            images = out["images"].to(self.device, non_blocking=True)
            if self.channels == 1:  # a read-only view: models copy their input into their own layout anyway
                images = images.expand(-1, 3, -1, -1)
            labels = out["labels"].to(self.device, non_blocking=True)
            yield images, labels

    def close(self) -> None:
        if self._started:
            self._reader.close()
            self._started = False
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
                return e, s3.head_object(Bucket=self.bucket, Key=self.prefix + e.name)["ContentLength"]
            except ClientError as err:
                return e, err

        with ThreadPoolExecutor(8) as pool:
            for e, size in pool.map(head, self._entries):
                uri = f"s3://{self.bucket}/{self.prefix}{e.name}"
                if isinstance(size, Exception):
                    raise DataError(
                        f"shard {uri} listed in manifest.json cannot be read: {describe_error(size, self.env, uri)}"
                    )
                if size != e.bytes:
                    raise DataError(
                        f"shard {uri} is {size} bytes but manifest.json says {e.bytes}: the shards "
                        "changed after the manifest was written; re-write the dataset"
                    )

    def _start(self) -> None:
        # The stream allocates a few objects per sample that live just long enough to be promoted, so full
        # collections keep coming and each re-scans every object alive at start-up (torch, Ray, MLflow, botocore):
        # freezing those long-lived objects takes them out of the scans (measured: docs/benchmarks.md, Data).
        gc.collect()  # garbage now would be frozen with the rest, never to be freed
        gc.freeze()
        block = self._pos // self.window * self.window
        self._reader.start(self._epoch, block)
        self._started = True
        self._batches = Batches(
            self._reader,
            self.order,
            batch_size=self.cfg.batch_size,
            epoch_size=self.epoch_size,
            epoch=self._epoch,
            pos=self._pos,
            on_skip=self._skip,
        )
        # On CPU, one single-threaded pipeline per thread, each decoding whole batches (DALI's hand-offs between the
        # threads of one pipeline leave cores idle on small images: docs/benchmarks.md, Data). The mixed GPU decoder
        # parallelises on the device: one pipeline there.
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
                self._recover(exc)  # raises when it keeps failing without a bad image

    def _recover(self, exc: RuntimeError) -> None:
        """Drop the bad images of the batch DALI failed on and re-send the rest, or raise what no skip would fix."""
        if self._reader.failure is not None:  # the reader gave up (S3 gone for minutes): say so, plainly
            raise self._reader.failure from None
        if not is_decode_error(exc):  # out of memory, CUDA, a bug: nothing a skipped image would fix
            raise exc
        self._batches.recover(exc)

    def _skip(self, n: int) -> None:
        self.skipped += n

    def _feed(self, j: int):
        """Pipeline ``j``'s source: batches are made in stream order and dealt round-robin, so pipeline ``j`` gets
        batches j, j + P, j + 2P, ... (P pipelines) whenever it asks."""
        while not self._staged[j]:
            self._staged[self._made % len(self._staged)].append(self._batches.next_batch())
            self._made += 1
        return self._staged[j].popleft()

    def _build_pipeline(self, j: int, n: int, use_gpu: bool):
        res, ch = self.resolution, 1 if self.channels == 1 else 3

        # DALI's AutoGraph (there for the ``if`` below) would rewrite a source written in the pipeline definition,
        # which makes it several times slower (docs/benchmarks.md, Data)
        @do_not_convert
        def source():
            return self._feed(j)

        # The dynamic executor (DALI 2.4's default) on both backends: it hands its output buffers to torch without a
        # copy (DLPack), and it is the executor whose recovery from a failed batch is tested (on CPU,
        # tests/integration/test_data_s3.py). Said explicitly so a change of DALI's default cannot change either.
        @pipeline_def(enable_conditionals=True, exec_dynamic=True)
        def pipe():
            dtypes = [types.UINT8, types.INT64, types.INT32, types.BOOL] + ([types.FLOAT] * 2 if self._crop else [])
            data, labels, mirror, resize, *box = fn.external_source(
                source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes
            )
            # A grey dataset (manifest "channels": 1) is decoded and normalised as one channel, broadcast to RGB
            # only as a view (__iter__): DALI's float output is what costs at large sizes.
            images = fn.decoders.image(data, **decoder_args(use_gpu, ch))
            if resize:  # per sample: a random crop, or a stored size that differs (never, for shards we wrote)
                crop = {"roi_start": box[0], "roi_end": box[1], "roi_relative": True} if box else {}
                images = fn.resize(images, size=[res, res], antialias=True, **crop)
            images = fn.crop_mirror_normalize(
                images, mirror=mirror, mean=[127.5] * ch, std=[127.5] * ch, dtype=types.FLOAT, output_layout="CHW"
            )
            return images, labels

        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device()) if use_gpu else None
        )
        p = pipe(
            batch_size=self.cfg.batch_size,
            num_threads=self.cfg.num_threads if use_gpu else 1,
            device_id=device_id,
            prefetch_queue_depth=self.cfg.prefetch,
            seed=(self.cfg.seed * 1000 + self.rank) * n + j,
        )
        p.build()
        return p
