"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"), on feature vectors (e.g. ``FeatureExtractor.extract`` output: Inception pool3 or a domain
classifier's features).

Each set of features defines a manifold: the union of balls centred on its points, the radius of a point's ball
being the distance to its k-th nearest neighbour in the same set (the point itself excluded). Then

- precision = fraction of *generated* features that lie in the *real* manifold (are the samples realistic?),
- recall    = fraction of *real* features that lie in the *generated* manifold (is the data covered? mode collapse
  lowers it).

"Lies in" means ‖f − x‖ ≤ r(x) for at least one manifold point x (boundary included). The paper uses k = 3 and
50k samples per set with VGG-16 features; values from other extractors / sample counts are not comparable to theirs.

Distances are computed with ``torch.cdist`` in float32 on the features' device, in blocks of ``batch`` × ``batch``
(radii keep a running top-k), so memory is O(batch² + N) and 10k × 10k (or 50k × 50k) sets fit anywhere; the cost
is O(N² · dim) — about 2·10⁸·dim flops for two 10k sets.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["in_manifold", "manifold_radii", "precision_recall"]

Features = torch.Tensor | np.ndarray


def _as_features(x: Features, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty N×dim array, got shape {tuple(t.shape)}")
    return t.to(device or t.device, torch.float32)


def manifold_radii(feats: Features, k: int = 3, batch: int = 4096) -> torch.Tensor:
    """Distance from each of the N features to its k-th nearest neighbour among the others (self excluded): float32
    tensor of N radii on the features' device. Needs N > k."""
    x = _as_features(feats, "feats")
    n = x.shape[0]
    if not (isinstance(k, int) and 1 <= k < n):
        raise ValueError(f"k={k!r} is invalid; expected an integer with 1 ≤ k < number of features ({n})")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for i in range(0, n, batch):
        rows = x[i : i + batch]
        best = torch.full((rows.shape[0], k), float("inf"), device=x.device)
        for j in range(0, n, batch):
            d = torch.cdist(rows, x[j : j + batch])
            if j == i:  # row and column blocks share boundaries: only this one holds the rows' self-distances
                d.fill_diagonal_(float("inf"))
            kk = min(k, d.shape[1])
            best = torch.cat([best, d.topk(kk, dim=1, largest=False).values], dim=1).topk(k, dim=1, largest=False)[0]
        radii[i : i + rows.shape[0]] = best[:, k - 1]
    return radii


def in_manifold(queries: Features, points: Features, radii: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Boolean tensor: for each query, is it within ``radii[j]`` of some ``points[j]``? (the manifold test)."""
    p = _as_features(points, "points")
    q = _as_features(queries, "queries", p.device)
    r = torch.as_tensor(radii, dtype=torch.float32, device=p.device)
    if q.shape[1] != p.shape[1] or r.shape != (p.shape[0],):
        raise ValueError(f"shape mismatch: queries {tuple(q.shape)}, points {tuple(p.shape)}, radii {tuple(r.shape)}")
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=p.device)
    for i in range(0, q.shape[0], batch):
        rows = q[i : i + batch]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=p.device)
        for j in range(0, p.shape[0], batch):
            hit |= (torch.cdist(rows, p[j : j + batch]) <= r[j : j + batch]).any(dim=1)
        inside[i : i + rows.shape[0]] = hit
    return inside


@torch.inference_mode()
def precision_recall(real_feats: Features, fake_feats: Features, k: int = 3, batch: int = 4096) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake_feats`` (M×dim) against real ``real_feats`` (N×dim).

    precision = mean over fake f of [∃ real x: ‖f − x‖ ≤ r_k(x)]; recall = mean over real x of
    [∃ fake f: ‖x − f‖ ≤ r_k(f)]; r_k = distance to the k-th nearest neighbour within the own set, self excluded.
    Both sets need more than k points. Computed on ``real_feats``' device (fake features are moved there), float32;
    ``batch`` bounds the distance blocks (batch² floats each). Identical sets give (1, 1); a generator that
    reproduces only half of the data's modes gives precision ≈ 1, recall ≈ 0.5.
    """
    real = _as_features(real_feats, "real_feats")
    fake = _as_features(fake_feats, "fake_feats", real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if batch < 1:
        raise ValueError(f"batch={batch!r} is invalid; expected an integer ≥ 1")
    real_radii = manifold_radii(real, k, batch)
    fake_radii = manifold_radii(fake, k, batch)
    precision = in_manifold(fake, real, real_radii, batch).float().mean().item()
    recall = in_manifold(real, fake, fake_radii, batch).float().mean().item()
    return precision, recall
