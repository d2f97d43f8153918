"""The image-quality metric during training: ``fid`` (Inception) or a fast domain distance (``fd_classifier``).

Every rank takes part; nothing here is rank-0 only:

- Reference statistics of the real data are computed once per (dataset manifest hash, network and its weights,
  resolution, n) and cached in S3 beside the dataset (``<dataset>/feature-stats/<sha256>.npz``). Rank 0 looks the
  entry up and tells the others; when it is missing, every rank reads its own shards (no flips), extracts features
  for its share of ``metric_ref_n`` images, the float64 sums are all-reduced, and rank 0 stores them.
- Generated statistics: each rank draws its share of ``metric_n`` samples from G_ema with its own fixed-seed
  generator (the same latents at every evaluation, so a curve shows the model changing, not sampling noise; random
  classes for conditional models), extracts features in batches, and the sums are all-reduced in float64.
- Every rank then computes the same distance from the same global statistics.

The caller's RNG streams are left untouched (``fork_rng``), so evaluating does not change training.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.distributed as dist

from orchestrator.config import JobConfig
from orchestrator.env import Env, split_s3_uri
from orchestrator.metrics.features import STANDARD_NETWORK, FeatureExtractor, get_extractor
from orchestrator.metrics.fid import FeatureStats, frechet_distance, reference_key

GEN_BATCH = 250  # generator samples per forward


def extractor_name(metric: str) -> str:
    """``fid`` → the standard Inception network; ``fd_<name>`` → the registered extractor ``<name>``."""
    if metric == "fid":
        return STANDARD_NETWORK
    if metric.startswith("fd_"):
        return metric[3:]
    raise ValueError(f"metric {metric!r} is neither `fid` nor `fd_<extractor>`")


def due(prev_kimg: float, kimg: float, every: float, last: bool) -> bool:
    """True when ``kimg`` crossed a multiple of ``every`` since ``prev_kimg``, or at the end (``every`` > 0)."""
    if every <= 0:
        return False
    eps = 1e-9
    return last or math.floor(kimg / every + eps) > math.floor(prev_kimg / every + eps)


def split(n: int, world: int, rank: int) -> int:
    """Rank ``rank``'s share of ``n`` items; the shares sum to ``n``."""
    return n // world + (rank < n % world)


def proportional_shares(n: int, sizes: list[int]) -> list[int]:
    """Split ``n`` ≤ sum(sizes) in proportion to ``sizes`` (largest remainder), never above a size."""
    total = sum(sizes)
    n = min(n, total)
    exact = [n * s / total for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - out[i], reverse=True)[: n - sum(out)]:
        out[i] += 1
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(obj):
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def make_extractor(cfg: JobConfig, device: torch.device | str, env: Env | None = None) -> FeatureExtractor:
    name = extractor_name(cfg.train.metric)
    kwargs: dict = {"device": device}
    if name != STANDARD_NETWORK:  # domain extractors are trained on (and stored beside) the dataset
        kwargs.update(dataset=cfg.data.dataset, env=env)
    return get_extractor(name, **kwargs)


class Evaluator:
    """``evaluate()`` → the metric for the recipe's current G_ema; call it on every rank at the same time."""

    def __init__(self, cfg: JobConfig, recipe, *, rank: int, world: int, device: torch.device, env: Env | None,
                 manifest: dict, manifest_hash: str) -> None:  # fmt: skip
        self.cfg, self.recipe, self.rank, self.world = cfg, recipe, rank, world
        self.device, self.env = torch.device(device), env
        self.metric = cfg.train.metric
        self.extractor = make_extractor(cfg, self.device, env)
        self.resolution = int(manifest["resolution"])
        self.ref_n = min(cfg.train.metric_ref_n, int(manifest["num_samples"]))
        self.key_parts = {
            "manifest": manifest_hash,
            "network": self.extractor.name,
            "weights": getattr(self.extractor, "weights_id", ""),
            "resolution": self.resolution,
            "n": self.ref_n,
            "hflip": False,
        }
        bucket, prefix = split_s3_uri(cfg.data.dataset)
        from orchestrator.data.s3 import S3BytesStore

        self.store = S3BytesStore(bucket, prefix, env)
        self._ref: FeatureStats | None = None
        self.ref_seconds = 0.0
        self.ref_cached: bool | None = None  # whether the reference came from the S3 cache
        self.last_seconds = 0.0

    # ---------------------------------------------------------------------------------------------- reference
    def reference(self) -> FeatureStats:
        if self._ref is None:
            t0 = time.perf_counter()
            key = reference_key(self.key_parts)
            data = self.store.get(key) if self.rank == 0 else None
            self.ref_cached = bool(_broadcast(data is not None))
            if self.ref_cached:
                self._ref = FeatureStats.from_bytes(data if self.rank == 0 else self.store.get(key))
            else:
                self._ref = self._compute_reference()
                if self.rank == 0:
                    self.store.put(key, self._ref.to_bytes())
            self.ref_seconds = time.perf_counter() - t0
        return self._ref

    @torch.inference_mode()
    def _compute_reference(self) -> FeatureStats:
        from orchestrator.data.loader import ShardLoader

        data_cfg = dataclasses.replace(self.cfg.data, hflip=False, batch_size=min(256, self.ref_n))
        loader = ShardLoader(data_cfg, rank=self.rank, world_size=self.world, device=self.device, env=self.env)
        sizes = [loader.epoch_size] * self.world
        if _distributed():
            dist.all_gather_object(sizes, loader.epoch_size)
        want = proportional_shares(self.ref_n, sizes)[self.rank]
        stats = FeatureStats(self._dim(), self.extractor.device)
        try:
            for images, _ in loader:
                if stats.n >= want:
                    break
                stats.update(self.extractor.extract(images[: want - stats.n]))
        finally:
            loader.close()
        return stats.all_reduce() if _distributed() else stats

    def _dim(self) -> int:
        if not hasattr(self, "_feature_dim"):
            probe = torch.zeros(2, 3, self.resolution, self.resolution, device=self.device)
            self._feature_dim = int(self.extractor.extract(probe).shape[1])
        return self._feature_dim

    # ---------------------------------------------------------------------------------------------- generated
    def generated(self) -> FeatureStats:
        recipe, n = self.recipe, split(self.cfg.train.metric_n, self.world, self.rank)
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + 1_000_003 + self.rank)
        stats = FeatureStats(self._dim(), self.extractor.device)
        for i in range(0, n, GEN_BATCH):
            k = min(GEN_BATCH, n - i)
            z = recipe.latents(k, g).to(self.device)
            c = torch.randint(recipe.c_dim, (k,), generator=g).to(self.device) if recipe.c_dim else None
            with torch.no_grad():  # not inference_mode: G_ema's buffers are later updated in place by training
                images = recipe.sample(z, c)
            stats.update(self.extractor.extract(images))
        return stats.all_reduce() if _distributed() else stats

    def evaluate(self) -> float:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ref = self.reference()
            t1 = time.perf_counter()
            gen = self.generated()
        value = frechet_distance(*ref.mu_sigma(), *gen.mu_sigma())
        self.gen_seconds = time.perf_counter() - t1
        self.last_seconds = time.perf_counter() - t0
        return value
