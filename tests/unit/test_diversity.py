"""Diversity score and class report on synthetic features and logits."""

import math

import numpy as np
import pytest
import torch

from orchestrator.metrics.diversity import class_report, diversity_score, mean_pairwise_distance


def test_mean_pairwise_distance_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # pair distances 1, 3, 2 → mean 2
    for batch in (1, 2, 4096):
        assert mean_pairwise_distance(x, batch=batch) == pytest.approx(2.0)
    # 3-4-5 triangle in 2-d
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="N ≥ 2"):
        mean_pairwise_distance(torch.zeros(1, 3))


def test_identical_rows_are_exactly_zero_apart_at_any_scale():
    # a G that makes one image for every latent: cdist's matmul form alone gave ~1e-3 of the feature norm here
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 100.0, 1e4):
        one = torch.randn(1, 2048, generator=g) * scale
        assert mean_pairwise_distance(one.expand(500, -1)) == 0.0
    # duplicates among distinct rows: every ordered pair counted, as a float64 brute force over all N rows
    x = torch.randn(120, 32, generator=g) * 50
    x = torch.cat([x, x[:40], x[:5]])
    exact = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    for batch in (7, 4096):
        assert mean_pairwise_distance(x, batch=batch) == pytest.approx(float(exact.sum()) / (165 * 164), rel=1e-6)


def test_diversity_score():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 16, generator=g)
    assert diversity_score(real, real) == pytest.approx(1.0)
    assert diversity_score(2 * real, real, batch=64) == pytest.approx(2.0, rel=1e-5)
    collapsed = real[:1].repeat(200, 1) + 1e-3 * torch.randn(200, 16, generator=g)
    assert diversity_score(collapsed, real) < 0.01
    # the reference may be given as the cached real mean pairwise distance
    ref = mean_pairwise_distance(real)
    fresh = torch.randn(200, 16, generator=g)
    assert diversity_score(fresh, ref) == pytest.approx(diversity_score(fresh, real))
    assert 0.85 < diversity_score(fresh, ref) < 1.15
    # pixel variant: flatten images
    images = torch.rand(10, 3, 8, 8, generator=g) * 2 - 1
    assert diversity_score(images.flatten(1), images.flatten(1)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="> 0"):
        diversity_score(fresh, 0.0)
    with pytest.raises(ValueError, match="feature dims differ"):
        diversity_score(fresh, torch.zeros(5, 3))


def one_hot_logits(pred: list[int], n_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), n_classes).float() * 5 - 1


def test_class_report_by_hand():
    logits = one_hot_logits([0, 0, 1, 1, 2, 2, 2, 2], 4)
    intended = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3])
    r = class_report(logits, intended, n_classes=4)
    assert r["accuracy"] == pytest.approx(5 / 8)
    assert r["coverage"] == pytest.approx(3 / 4)  # class 3 never predicted
    # predicted histogram (¼, ¼, ½, 0): H = 1.5 ln 2, normalised by ln 4
    assert r["entropy"] == pytest.approx(0.75)
    assert r["n"] == 8 and r["min_count"] == 1.0
    assert [c["predicted"] for c in r["per_class"]] == [2, 2, 4, 0]
    assert [c["intended"] for c in r["per_class"]] == [1, 3, 2, 2]
    assert [c["accuracy"] for c in r["per_class"]] == pytest.approx([1.0, 2 / 3, 1.0, 0.0])
    assert [c["covered"] for c in r["per_class"]] == [True, True, True, False]


def test_class_report_collapse_and_min_share():
    n_classes = 10
    pred = [0] * 973 + [c for c in range(1, 10) for _ in range(3)]  # 3 stray samples in every other class
    logits = one_hot_logits(pred, n_classes)
    r = class_report(logits, None, n_classes)  # unconditional: no accuracy
    assert r["accuracy"] is None and all(c["accuracy"] is None for c in r["per_class"])
    assert r["min_count"] == pytest.approx(10.0)  # 0.1 × 1000 / 10
    assert r["coverage"] == pytest.approx(0.1)
    assert class_report(logits, None, n_classes, min_share=0.0)["coverage"] == 1.0
    assert r["entropy"] < 0.1

    uniform = class_report(one_hot_logits([i % 10 for i in range(1000)], 10), np.arange(1000) % 10, 10)
    assert uniform["accuracy"] == 1.0 and uniform["coverage"] == 1.0
    assert uniform["entropy"] == pytest.approx(1.0)
    single = class_report(one_hot_logits([3] * 50, 10), None, 10)
    assert single["entropy"] == 0.0 and math.copysign(1, single["entropy"]) == 1


def test_class_report_bad_inputs():
    with pytest.raises(ValueError, match="N×4"):
        class_report(torch.zeros(5, 3), None, 4)
    with pytest.raises(ValueError, match="entries"):
        class_report(torch.zeros(5, 4), torch.zeros(4), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        class_report(torch.zeros(2, 4), torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="min_share"):
        class_report(torch.zeros(2, 4), None, 4, min_share=2.0)
