"""The domain classifier behind fd_classifier: accuracy on Fashion-MNIST's test split, feature shapes, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.data import fashion_mnist
from orchestrator.metrics import classifier as clf
from orchestrator.metrics.features import get_extractor, metric_name


@pytest.fixture(scope="module")
def fmnist():
    x, y = fashion_mnist.load("train")
    xt, yt = fashion_mnist.load("test")
    as_t = lambda a: torch.from_numpy(fashion_mnist.pad_to_32(a))[:, None]  # noqa: E731
    return as_t(x), torch.from_numpy(y).long(), as_t(xt), torch.from_numpy(yt).long()


def test_accuracy_on_the_test_split_after_training_on_a_subset(fmnist):
    x, y, xt, yt = fmnist
    model = clf.train_classifier(x[:8000], y[:8000], num_classes=10, epochs=2, seed=0)
    acc = clf.accuracy(model, xt, yt)
    print(f"Fashion-MNIST test accuracy after 2 epochs on 8000 images: {acc:.3f}")
    assert acc >= 0.83


def test_features_logits_and_naming(fmnist):
    x, y, _, _ = fmnist
    model = clf.train_classifier(x[:256], y[:256], num_classes=10, epochs=1, seed=0)
    ex = clf.ClassifierExtractor(model, weights_id="w", device="cpu", batch_size=64)
    assert ex.name == "classifier" and ex.metric_name == metric_name("classifier") == "fd_classifier"
    feats = ex.extract(x[:100])  # uint8 N×1×32×32
    assert feats.shape == (100, 128) and feats.dtype == torch.float32 and (feats >= 0).all()
    as_float = x[:100].float() / 127.5 - 1  # [-1, 1] floats score exactly like the uint8 images
    torch.testing.assert_close(ex.extract(as_float), feats)
    logits = ex.classify(x[:100].expand(-1, 3, -1, -1))
    assert logits.shape == (100, 10)
    share = clf.per_class_share(logits)
    assert share.shape == (10,) and np.isclose(share.sum(), 1)
    small = torch.from_numpy(fashion_mnist.load("test")[0][:8].copy())  # 28×28 N×H×W: resized to the net's 32×32
    assert ex.extract(small).shape == (8, 128)


def test_registered_as_an_extractor():
    from orchestrator.metrics import features

    assert "classifier" in features._FACTORIES and features._FACTORIES["classifier"] is clf.load_extractor
    with pytest.raises(KeyError):
        get_extractor("no-such-network")


def test_training_is_deterministic_and_weights_round_trip(fmnist):
    x, y, _, _ = fmnist
    a = clf.train_classifier(x[:512], y[:512], num_classes=10, epochs=1, seed=3)
    b = clf.train_classifier(x[:512], y[:512], num_classes=10, epochs=1, seed=3)
    c = clf.train_classifier(x[:512], y[:512], num_classes=10, epochs=1, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    rng_before = torch.get_rng_state()
    clf.train_classifier(x[:128], y[:128], num_classes=10, epochs=1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched

    data = clf.to_bytes(a, "hash", {"holdout_accuracy": 0.5})
    model, info = clf.from_bytes(data)
    assert info["manifest_hash"] == "hash" and info["weights_id"] == clf.from_bytes(data)[1]["weights_id"]
    with torch.inference_mode():
        torch.testing.assert_close(
            model.features(x[:16].float().expand(-1, 3, -1, -1) / 127.5 - 1),
            a.features(x[:16].float().expand(-1, 3, -1, -1) / 127.5 - 1),
        )
