"""FID: our Inception vs the shipped TorchScript network, the distance vs scipy, stats merging, the cache key, errors.

The costliest unit file: ~550 Inception forwards on CPU, computed once in module-scoped fixtures.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from orchestrator.data import fashion_mnist
from orchestrator.metrics import inception
from orchestrator.metrics.features import FeatureExtractor, get_extractor, metric_name, register_extractor
from orchestrator.metrics.fid import (
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    reference_key,
    stats_for_generator,
    stats_for_images,
)

N_FASHION = 250  # per split; see test_fashion_mnist_fid for the measured values (~130 ms per image on 2 cores)
N_NOISE = 50


@pytest.fixture(scope="module")
def model() -> inception.InceptionV3:
    return inception.load_inception()


@pytest.fixture(scope="module")
def torchscript() -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception.default_weights_path()), map_location="cpu").eval()


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(device="cpu", batch_size=25)


def nvidia_resize(pixels: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Reference resize: the grid_sample formulation in NVIDIA's FID network (≡ TF1 resize_bilinear)."""
    n, c, h, w = pixels.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    out = F.grid_sample(pixels.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.float()


def test_matches_torchscript_network(model, torchscript, extractor):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 299, 299) * 2 - 1
    with torch.inference_mode():
        ref = torchscript(x)
        assert (model(x) - ref).abs().max() < 1e-4  # measured 9.5e-7 (features reach ~6)
        assert (extractor.network(x) - ref).abs().max() < 1e-4  # BN folded into convs: measured 6.9e-6
        # Other sizes go through our TF-style resize; the reference resizes the NVIDIA way, then runs TorchScript.
        for shape in [(1, 3, 32, 32), (1, 1, 64, 48)]:
            pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
            ref = torchscript((nvidia_resize(pixels.expand(-1, 3, -1, -1).float()) - 128) / 128)
            assert (extractor.extract(pixels) - ref).abs().max() < 1e-4  # measured ≤ 4e-6


def test_resize_is_tf1_legacy_bilinear():
    # TF1 resize_bilinear samples source x = i·in/out (no half-pixel shift), clamping at the border: 2 → 4 px
    # gives [a, (a+b)/2, b, b]. F.interpolate(bilinear, align_corners=False) would give [a, a+(b-a)/4, ...].
    pixels = torch.tensor([[0.0, 128.0], [0.0, 128.0]]).expand(1, 3, 2, 2)
    out = inception.to_network_input(pixels, size=4) * 128 + 128
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 64.0, 128.0, 128.0]))
    pixels = torch.rand(2, 3, 28, 40) * 255
    assert torch.allclose(inception.to_network_input(pixels) * 128 + 128, nvidia_resize(pixels), atol=1e-3)


def test_input_conventions_agree(extractor):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    feats = extractor.extract(grey)
    assert feats.shape == (2, inception.FEATURE_DIM) and feats.dtype == torch.float32
    rgb = torch.from_numpy(grey)[:, None].repeat(1, 3, 1, 1)
    as_float = rgb.float() / 127.5 - 1  # what a tanh generator emits for those pixels
    assert torch.equal(extractor.extract(rgb), feats)
    assert (extractor.extract(as_float) - feats).abs().max() < 1e-5
    with pytest.raises(TypeError, match="uint8"):
        extractor.extract(rgb.int())


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """pytorch-fid / TTUR reference formula with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _eigvals_fid(mu1, s1, mu2, s2) -> float:
    """The same formula with tr (Σ1 Σ2)^½ as Σ √λ over the eigenvalues of the non-symmetric product (LAPACK's
    general eigen-solver): what sqrtm's trace is, in 3 s instead of sqrtm's 1-2 min at 2048 dimensions on 2 cores."""
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.mark.parametrize(("dim", "samples"), [(2, 50), (64, 500), (512, 200), (2048, 4096)])
def test_frechet_distance_matches_scipy(dim, samples):
    # (512, 200): rank-deficient covariances, as with fewer samples than Inception's 2048 features.
    rng = np.random.default_rng(dim)

    def stats() -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((samples, dim)) @ rng.standard_normal((dim, dim)) * 0.1 + rng.standard_normal(dim)
        return x.mean(0), np.cov(x, rowvar=False)

    (mu1, s1), (mu2, s2) = stats(), stats()
    reference = _scipy_fid if dim <= 512 else _eigvals_fid  # sqrtm itself up to 512-d (and rank-deficient)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), reference(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)  # measured ≤ 3e-8 relative (the rank-deficient case)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8 * np.trace(s1))


@pytest.fixture(scope="module")
def fashion_stats(extractor) -> dict[str, tuple[torch.Tensor, FeatureStats]]:
    """Features and stats of N_FASHION train, N_FASHION test (first images) and N_NOISE uniform-noise images."""
    rng = np.random.default_rng(0)
    images = {
        "train": fashion_mnist.pad_to_32(fashion_mnist.load("train")[0][:N_FASHION]),
        "test": fashion_mnist.pad_to_32(fashion_mnist.load("test")[0][:N_FASHION]),
        "noise": rng.integers(0, 256, (N_NOISE, 32, 32), dtype=np.uint8),
    }
    out = {}
    for name, imgs in images.items():
        feats = extractor.extract(imgs)
        out[name] = (feats, FeatureStats.from_features(feats))
    return out


def test_fashion_mnist_fid(fashion_stats):
    train, test, noise = (fashion_stats[k][1] for k in ("train", "test", "noise"))
    assert abs(fid_from_stats(train, train)) < 1e-6  # measured 2e-13
    # FID's finite-sample bias dominates at these n (train vs test: 57.4 at n=250, 36.8 at n=500, 22.3 at n=1000).
    train_test = fid_from_stats(train, test)
    assert 45 < train_test < 70  # measured 57.4
    half = fashion_stats["train"][0]
    halves = fid_from_stats(FeatureStats.from_features(half[::2]), FeatureStats.from_features(half[1::2]))
    assert 65 < halves < 110  # measured 85.6 (125 vs 125): fewer samples, more bias
    noise = fid_from_stats(train, noise)
    assert noise > 300 and noise > 5 * train_test  # measured 418 (250 vs 50 noise images)


def test_feature_stats_merge_and_bytes(fashion_stats):
    feats = fashion_stats["test"][0].double()
    whole = FeatureStats.from_features(feats)
    merged = FeatureStats.from_features(feats[:123]).merge(FeatureStats.from_features(feats[123:]))
    assert merged.n == whole.n == len(feats)
    for a, b in zip(merged.tensors(), whole.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    mu, sigma = whole.mu_sigma()
    np.testing.assert_allclose(mu, feats.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.numpy(), rowvar=False), rtol=1e-9, atol=1e-11)
    back = FeatureStats.from_bytes(whole.to_bytes())
    assert all(torch.equal(a, b) for a, b in zip(back.tensors(), whole.tensors()))
    with pytest.raises(ValueError, match="dim"):
        whole.merge(FeatureStats(3))


def _all_reduce_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    feats = torch.arange(24.0).reshape(8, 3)
    stats = FeatureStats.from_features(feats[:3] if rank == 0 else feats[3:]).all_reduce()
    if rank == 0:
        Path(out_file).write_bytes(stats.to_bytes())
    torch.distributed.destroy_process_group()


def test_feature_stats_all_reduce(tmp_path):
    out = tmp_path / "stats.npz"
    torch.multiprocessing.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    reduced = FeatureStats.from_bytes(out.read_bytes())
    whole = FeatureStats.from_features(torch.arange(24.0).reshape(8, 3))
    assert all(torch.equal(a, b) for a, b in zip(reduced.tensors(), whole.tensors()))


class _Toy(torch.nn.Module):
    """A cheap stand-in network: per-channel means of the network input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_stats_for_generator_and_naming():
    toy = FeatureExtractor(_Toy(), name="toy", device="cpu", batch_size=4)
    torch.manual_seed(0)
    images = torch.rand(10, 3, 8, 8) * 2 - 1
    drawn = iter(images.split(3))
    from_gen = stats_for_generator(lambda k: next(drawn)[:k], n=10, batch=3, extractor=toy)
    from_images = stats_for_images(images.split(4), toy)
    assert from_gen.n == from_images.n == 10
    torch.testing.assert_close(from_gen.sum_outer, from_images.sum_outer)
    assert toy.metric_name == "fd_toy" and metric_name(inception.NETWORK_NAME) == "fid"
    with pytest.raises(ValueError, match="own name"):
        FeatureExtractor(_Toy(), device="cpu")
    with pytest.raises(ValueError, match="reserved"):
        register_extractor(inception.NETWORK_NAME, lambda **_: toy)
    register_extractor("toy", lambda **_: toy)
    assert get_extractor("toy") is toy


def test_reference_key_names_the_data_network_resolution_and_count():
    """The reference-statistics cache key (Evaluator.reference stores under it): independent of key order, different
    when any part that changes the features differs, and refused without one of them."""
    parts = {"manifest": "abc123", "network": inception.NETWORK_NAME, "resolution": 32, "n": 4}
    assert reference_key(dict(reversed(parts.items()))) == reference_key(parts)
    key = reference_key(parts)
    assert key.startswith("feature-stats/") and reference_key(parts, folder="feature-sets") != key
    for k, v in [("manifest", "abc124"), ("network", "other"), ("resolution", 64), ("n", 5)]:
        assert reference_key({**parts, k: v}) != reference_key(parts)
    with pytest.raises(ValueError, match="network"):
        reference_key({"manifest": "abc123", "resolution": 32, "n": 4})


def test_weights_errors_and_pytorch_fid_layout(model, tmp_path):
    missing = tmp_path / "nope" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        inception.load_inception(missing)
    bogus = tmp_path / "bogus.pth"
    torch.save({"foo": torch.zeros(1)}, bogus)
    with pytest.raises(inception.InceptionWeightsError, match=f"{bogus}.*missing keys"):
        inception.load_inception(bogus)
    with pytest.raises(inception.InceptionWeightsError, match="sha1"):
        inception.load_inception(bogus, expected_sha1=inception.DEFAULT_WEIGHTS_SHA1)
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(inception.InceptionWeightsError, match="unreadable"):
        inception.load_inception(bogus)
    # A pytorch-fid file is our state dict plus its 1008-way classifier (fc.*), without BN counters.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    buf = io.BytesIO()
    torch.save({**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, buf)
    loaded = inception.load_inception(buf.getvalue()).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert Path(inception.default_weights_path()).stat().st_size == inception.DEFAULT_WEIGHTS_SIZE
