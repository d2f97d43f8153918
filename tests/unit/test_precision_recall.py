"""Improved precision/recall: hand-computed example, brute-force reference, the textbook failure cases."""

import numpy as np
import pytest
import torch

from orchestrator.metrics.precision_recall import in_manifold, manifold_radii, precision_recall


def col(*values: float) -> torch.Tensor:
    return torch.tensor(values).reshape(-1, 1)


def test_hand_computed_1d_example():
    real = col(0, 1, 3, 10)  # k=1 radii: 1, 1, 2, 7
    fake = col(0.5, 4.5, 18, 19.5)  # k=1 radii: 4, 4, 1.5, 1.5
    torch.testing.assert_close(manifold_radii(real, k=1), torch.tensor([1.0, 1.0, 2.0, 7.0]))
    torch.testing.assert_close(manifold_radii(fake, k=1), torch.tensor([4.0, 4.0, 1.5, 1.5]))
    # precision: 0.5 (|0.5−0| ≤ 1) and 4.5 (|4.5−3| ≤ 2) are inside; 18 and 19.5 are 8+ from 10 (radius 7)
    # recall: 0, 1, 3 lie within 4 of 0.5 or 4.5; 10 is 5.5 from 4.5 (radius 4) and 8 from 18 (radius 1.5)
    for batch in (1, 3, 4096):
        assert precision_recall(real, fake, k=1, batch=batch) == pytest.approx((0.5, 0.75))
    # k=2 radii of real: 0→3, 1→2, 3→3, 10→9; then 18 is 8 ≤ 9 from 10 and counts, 19.5 (9.5 away) does not
    torch.testing.assert_close(manifold_radii(real, k=2), torch.tensor([3.0, 2.0, 3.0, 9.0]))
    assert in_manifold(fake, real, manifold_radii(real, k=2)).tolist() == [True, True, True, False]


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def inside(q, p, r):
        return (np.linalg.norm(q[:, None] - p[None], axis=-1) <= r[None]).any(1)

    return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


def test_matches_brute_force_for_any_block_size():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 6))
    fake = rng.normal(0.5, 1.3, size=(120, 6))
    want = brute_force(real, fake, k=3)
    assert 0.1 < want[0] < 0.95 and 0.1 < want[1] < 0.95  # a non-trivial case
    for batch in (7, 64, 4096):
        got = precision_recall(real.astype(np.float32), fake.astype(np.float32), k=3, batch=batch)
        assert got == pytest.approx(want, abs=1.5 / 120)  # float32 vs float64 may flip a boundary point


def test_identical_sets_score_one():
    x = torch.randn(300, 32)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_disjoint_far_apart_clusters_score_zero():
    real = torch.randn(200, 8)
    fake = torch.randn(200, 8) + 100.0
    assert precision_recall(real, fake, batch=64) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_and_halves_recall():
    g = torch.Generator().manual_seed(0)
    centre = torch.zeros(4)
    centre[0] = 20.0
    real = torch.cat([torch.randn(400, 4, generator=g) + centre, torch.randn(400, 4, generator=g) - centre])
    collapsed = torch.randn(400, 4, generator=g) + centre  # G produces only the first mode
    healthy = torch.cat([collapsed, torch.randn(400, 4, generator=g) - centre])  # both modes
    p_healthy, r_healthy = precision_recall(real, healthy, k=3, batch=128)
    precision, recall = precision_recall(real, collapsed, k=3, batch=128)
    assert p_healthy > 0.9 and r_healthy > 0.9
    assert precision > 0.9
    assert recall == pytest.approx(r_healthy / 2, abs=0.03)  # the real half around −centre is never reached
    assert 0.4 < recall <= 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="k=3 is invalid"):
        precision_recall(torch.zeros(3, 2), torch.zeros(5, 2), k=3)
    with pytest.raises(ValueError, match="feature dims differ"):
        precision_recall(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="N×dim"):
        precision_recall(torch.zeros(5), torch.zeros(5, 3))
