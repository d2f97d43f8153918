"""Fréchet Inception Distance: mergeable float64 feature statistics, the distance, and the reference-stats cache key.

Policy: the value is called ``fid`` only when the features come from the standard Inception-v3 "2015-12-05" network.

Distributed use: every rank runs ``stats_for_generator`` on its share of samples, then ``stats.all_reduce()`` sums
the raw (n, Σx, Σxxᵀ) tensors, after which every rank holds the global statistics. The reference statistics are
cached (``to_bytes``, under ``reference_key``) by ``orchestrator.train.evaluation.Evaluator.reference``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from orchestrator.hashing import sha256_json
from orchestrator.metrics.features import FeatureExtractor, ImageBatch

REQUIRED_KEY_PARTS = ("manifest", "network", "resolution", "n")
_STATS_FORMAT = 1


def _sqrt_factor(sigma: torch.Tensor) -> torch.Tensor:
    """d×r matrix F with F Fᵀ = Σ, over Σ's numerical rank r (eigenvalues ≤ d·eps·λmax are rounding noise)."""
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = w > w[-1].clamp(min=0) * sigma.shape[0] * torch.finfo(sigma.dtype).eps
    return v[:, keep] * w[keep].sqrt()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½, in float64.

    tr (Σ1 Σ2)^½ is the nuclear norm of F1ᵀ F2 for factors Σi = Fi Fiᵀ from ``eigh``. Unlike ``sqrtm`` of the
    non-symmetric product, this needs no eps-on-the-diagonal workaround when Σ is singular (fewer samples than
    dimensions), never goes complex, and takes no square roots of tiny noisy eigenvalues, so the distance of a set
    to itself stays ~1e-12 instead of ~1e-4 for rank-deficient 2048-d covariances. With n < d samples the SVD is
    only (n−1)×(n−1).
    """
    mu1, mu2 = (torch.as_tensor(np.atleast_1d(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.atleast_2d(s), dtype=torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, sigma {s1.shape} / {s2.shape}")
    tr_covmean = torch.linalg.svdvals(_sqrt_factor(s1).T @ _sqrt_factor(s2)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


class FeatureStats:
    """Running n, Σx and Σxxᵀ of feature vectors in float64; parts merge (or all-reduce) by plain addition."""

    def __init__(self, dim: int, device: str | torch.device = "cpu") -> None:
        self.dim = dim
        self.count = torch.zeros(1, dtype=torch.float64, device=device)  # a tensor so it can be all-reduced too
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        return int(self.count.item())

    @property
    def device(self) -> torch.device:
        return self.sum.device

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        f = torch.as_tensor(features)
        return cls(f.shape[1], f.device).update(f)

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        f = torch.as_tensor(features).to(self.device, torch.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features N×{self.dim}, got {tuple(f.shape)}")
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer.addmm_(f.T, f)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add ``other`` into ``self`` (in place) and return ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine += theirs.to(self.device)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The raw [count, Σx, Σxxᵀ] tensors (live, not copies): all-reducing them with SUM merges the ranks."""
        return [self.count, self.sum, self.sum_outer]

    def all_reduce(self, group: torch.distributed.ProcessGroup | None = None) -> FeatureStats:
        """Sum the statistics over all ranks in place (backend must support ``self.device``: gloo CPU, NCCL CUDA)."""
        for t in self.tensors():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
        return self

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased (n−1) covariance, as np.cov in the TF FID reference code."""
        n = self.n
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {n}")
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            format=np.int64(_STATS_FORMAT),
            count=self.count.cpu().numpy(),
            sum=self.sum.cpu().numpy(),
            sum_outer=self.sum_outer.cpu().numpy(),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: str | torch.device = "cpu") -> FeatureStats:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if int(z["format"]) != _STATS_FORMAT:
                raise ValueError(f"feature stats format {int(z['format'])} != {_STATS_FORMAT}")
            stats = cls(z["sum"].shape[0], device)
            stats.count.copy_(torch.from_numpy(z["count"]))
            stats.sum.copy_(torch.from_numpy(z["sum"]))
            stats.sum_outer.copy_(torch.from_numpy(z["sum_outer"]))
        return stats


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mu_sigma(), *b.mu_sigma())


def stats_for_images(batches: Iterable[ImageBatch], extractor: FeatureExtractor) -> FeatureStats:
    """Statistics of every image in ``batches`` (each uint8 or [-1, 1] float, any size the extractor accepts)."""
    stats: FeatureStats | None = None
    for batch in batches:
        if len(batch) == 0:
            continue
        feats = extractor.extract(batch)
        stats = stats or FeatureStats(feats.shape[1], feats.device)
        stats.update(feats)
    if stats is None:
        raise ValueError("no images to compute feature statistics from")
    return stats


def stats_for_generator(
    sample_fn: Callable[[int], ImageBatch], n: int, batch: int, extractor: FeatureExtractor
) -> FeatureStats:
    """Statistics of ``n`` samples drawn as ``sample_fn(k)`` (k ≤ ``batch`` images per call) without gradients."""

    def draws() -> Iterable[ImageBatch]:
        left = n
        while left > 0:
            k = min(batch, left)
            with torch.no_grad():
                images = sample_fn(k)
            if len(images) != k:
                raise ValueError(f"sample_fn({k}) returned {len(images)} images")
            left -= k
            yield images

    return stats_for_images(draws(), extractor)


def reference_key(key_parts: Mapping[str, object], folder: str = "feature-stats") -> str:
    """Store key: a sha256 of the canonical JSON of ``key_parts``, which must name at least REQUIRED_KEY_PARTS.

    ``folder`` separates kinds of cached reference data (``feature-stats``: statistics; ``feature-sets``: the
    feature vectors themselves, for k-NN metrics) so a listing of one kind never shows the other."""
    missing = [k for k in REQUIRED_KEY_PARTS if k not in key_parts]
    if missing:
        raise ValueError(f"reference stats key lacks {missing}; need {list(REQUIRED_KEY_PARTS)}")
    return f"{folder}/{sha256_json(dict(key_parts))}.npz"
