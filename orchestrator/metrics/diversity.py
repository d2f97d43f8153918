"""Sample diversity and class coverage: cheap mode-collapse signals for the health monitor.

**Diversity** (``diversity_score``): the mean pairwise L2 distance between the features of samples generated from a
fixed latent batch, divided by the same statistic of real data's features:

    diversity = mean_{i≠j} ‖φ(G(z_i)) − φ(G(z_j))‖₂ / mean_{i≠j} ‖φ(x_i) − φ(x_j)‖₂

≈ 1 when samples are as varied as the data, → 0 as G collapses onto a few outputs (> 1 is possible: noisy samples
can be more spread out than the data). φ is any feature extractor (``FeatureExtractor.extract``: Inception pool3 or a
domain classifier); the pixel variant is φ = flatten (``images.flatten(1)``), which needs no network but mostly
measures colour/layout spread. Use a fixed latent batch so the score moves with G rather than with sampling noise,
and the same φ (and a fixed set of real features, or a cached reference value) for every evaluation.

**Class report** (``class_report``): from a classifier's logits on generated samples and the labels they were
generated for (conditional G), or ``None`` (unconditional G):

- ``accuracy``  = fraction of samples whose predicted class (argmax of the logits) is their intended label
  (``None`` without intended labels);
- ``coverage``  = fraction of the ``n_classes`` classes that are *covered*: predicted for at least
  ``max(1, min_share · N / n_classes)`` of the N samples, i.e. for at least ``min_share`` of the share a uniform
  generator would give them (default 0.1; ``min_share=0`` → a class is covered if it is predicted at all);
- ``entropy``   = Shannon entropy of the predicted-class histogram divided by ln(n_classes): 1 for a uniform
  histogram, 0 when every sample falls into one class;
- ``per_class`` = list indexed by class id of ``{"intended": int, "predicted": int, "accuracy": float | None,
  "covered": bool}``; ``accuracy`` there is the fraction of samples intended as that class that are predicted as it
  (``None`` when none were intended / no intended labels).

All results are plain Python types (logged as metrics, stored in JSON).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["class_report", "diversity_score", "mean_pairwise_distance"]


@torch.inference_mode()
def mean_pairwise_distance(feats: torch.Tensor | np.ndarray, batch: int = 4096) -> float:
    """Mean L2 distance over all ordered pairs i ≠ j of the N ≥ 2 rows of ``feats`` (N×dim; images: flatten first).

    Identical rows are exactly 0 apart, so a generator that makes one image for every latent scores exactly 0.
    ``torch.cdist``'s fast matmul form (‖a‖² + ‖b‖² − 2a·b) leaves rounding noise of order √eps·‖a‖ between equal
    rows (a collapsed G read as 6e-4, not 0): distances are taken between the distinct rows only, each pair weighted
    by how often the two rows occur, after centring (which shrinks ‖a‖, and so the noise, for near-equal rows).
    Float32 ``cdist`` blocks of ``batch`` × ``batch``, float64 accumulation."""
    x = torch.as_tensor(feats)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feats must be N×dim with N ≥ 2, got shape {tuple(x.shape)}")
    n = x.shape[0]
    rows, counts = torch.unique(x.float(), dim=0, return_counts=True)
    rows = rows - rows.double().mul(counts[:, None]).sum(0).div(n).float()  # centred on the mean of all N rows
    w = counts.double()
    total = 0.0
    for i in range(0, len(rows), batch):
        for j in range(0, len(rows), batch):
            d = torch.cdist(rows[i : i + batch], rows[j : j + batch]).double()
            if i == j:  # a distinct row's distance to itself (its copies are 0 apart)
                d.fill_diagonal_(0.0)
            total += (w[i : i + batch, None] * d * w[None, j : j + batch]).sum().item()
    return total / (n * (n - 1))


def diversity_score(
    fake_feats: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray | float, batch: int = 4096
) -> float:
    """``mean_pairwise_distance(fake_feats) / mean_pairwise_distance(reference)``.

    ``reference`` is either real features (N×dim, same extractor as ``fake_feats``) or that real mean pairwise
    distance as a float, computed once with ``mean_pairwise_distance`` and cached. ≈ 1 healthy, → 0 collapsed.
    """
    if isinstance(reference, int | float):
        ref = float(reference)
    else:
        r = torch.as_tensor(reference)
        f = torch.as_tensor(fake_feats)
        if r.ndim == 2 and f.ndim == 2 and r.shape[1] != f.shape[1]:
            raise ValueError(f"feature dims differ: fake {f.shape[1]}, reference {r.shape[1]}")
        ref = mean_pairwise_distance(r, batch)
    if not (math.isfinite(ref) and ref > 0):
        raise ValueError(f"reference mean pairwise distance must be finite and > 0, got {ref}")
    return mean_pairwise_distance(fake_feats, batch) / ref


def class_report(
    logits: torch.Tensor | np.ndarray,
    intended_labels: torch.Tensor | np.ndarray | None,
    n_classes: int,
    min_share: float = 0.1,
) -> dict[str, Any]:
    """Accuracy, coverage, normalised entropy and per-class counts of generated samples (see the module docstring).

    ``logits``: N×n_classes classifier outputs on N generated samples; ``intended_labels``: the N class ids the
    samples were generated for, or ``None``. Returns ``{"accuracy": float | None, "coverage": float,
    "entropy": float, "n": int, "min_count": float, "per_class": [...]}``.
    """
    lg = torch.as_tensor(logits)
    if lg.ndim != 2 or lg.shape[0] == 0 or lg.shape[1] != n_classes:
        raise ValueError(f"logits must be N×{n_classes} with N ≥ 1, got shape {tuple(lg.shape)}")
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes!r} is invalid; expected an integer ≥ 2")
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share={min_share!r} is invalid; expected 0 ≤ min_share ≤ 1")
    n = lg.shape[0]
    pred = lg.argmax(dim=1).cpu()
    predicted = torch.bincount(pred, minlength=n_classes)
    min_count = max(1.0, min_share * n / n_classes)
    covered = predicted.double() >= min_count

    p = predicted.double() / n
    nz = p[p > 0]
    entropy = max(0.0, float(-(nz * nz.log()).sum() / math.log(n_classes)))  # no -0.0

    accuracy = None
    intended = torch.zeros(n_classes, dtype=torch.long)
    correct = torch.zeros(n_classes, dtype=torch.long)
    if intended_labels is not None:
        y = torch.as_tensor(intended_labels).cpu().long().flatten()
        if y.shape[0] != n:
            raise ValueError(f"intended_labels has {y.shape[0]} entries for {n} logits rows")
        if y.numel() and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"intended_labels must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")
        hit = pred == y
        accuracy = float(hit.double().mean())
        intended = torch.bincount(y, minlength=n_classes)
        correct = torch.bincount(y[hit], minlength=n_classes)

    per_class = [
        {
            "intended": int(intended[c]),
            "predicted": int(predicted[c]),
            "accuracy": float(correct[c] / intended[c]) if intended[c] > 0 else None,
            "covered": bool(covered[c]),
        }
        for c in range(n_classes)
    ]
    return {
        "accuracy": accuracy,
        "coverage": float(covered.double().mean()),
        "entropy": entropy,
        "n": n,
        "min_count": min_count,
        "per_class": per_class,
    }
