"""The domain classifier of a dataset, trained on its shards once and stored beside them in S3.

It serves the ``fd_classifier`` metric and the quality signals' coverage/accuracy. The network, its training and its
storage format live in ``orchestrator.metrics.classifier``; this module reads the dataset through the training data
path (``ShardLoader``), so it sits with training, above both the data and the metrics packages.
"""

from __future__ import annotations

import threading
import time

import torch

from orchestrator.config import DataConfig
from orchestrator.data.loader import ShardLoader
from orchestrator.data.manifest import Manifest
from orchestrator.metrics.classifier import DomainClassifier, accuracy, store, stored, train_classifier, weights_key


def load_dataset_images(dataset: str, env=None, max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the dataset's shards (no flips) as uint8 N×3×H×W and int64 labels."""
    cfg = DataConfig(dataset=dataset, batch_size=500, num_threads=2, hflip=False, shuffle_buffer=1)
    images, labels = [], []
    with ShardLoader(cfg, env=env) as loader:
        want = loader.epoch_size if max_samples is None else min(max_samples, loader.epoch_size)
        got = 0
        for x, y in loader:
            x = ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
            images.append(x[: want - got])
            labels.append(y[: want - got])
            got += len(images[-1])
            if got >= want:
                break
    return torch.cat(images), torch.cat(labels)


def train_for_dataset(
    dataset: str,
    env=None,
    *,
    epochs: int = 2,
    max_samples: int | None = 15000,
    seed: int = 0,
    holdout: float = 0.05,
    progress: bool = True,
    log=print,
) -> tuple[DomainClassifier, dict]:
    """Train on the dataset's shards, holding out a fraction to measure accuracy; (model, info)."""
    t0 = time.monotonic()
    images, labels = load_dataset_images(dataset, env, max_samples)
    t_load = time.monotonic() - t0
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_hold = int(len(images) * holdout)
    hold, train = perm[:n_hold], perm[n_hold:]
    k = int(labels.max()) + 1
    log(f"domain classifier: {len(train)} training images from {dataset} (read in {t_load:.0f} s), {epochs} epochs")
    model = train_classifier(images[train], labels[train], num_classes=k, epochs=epochs, seed=seed, progress=progress)
    acc = accuracy(model, images[hold], labels[hold]) if n_hold else float("nan")
    info = {
        "holdout_accuracy": acc,
        "n_train": len(train),
        "n_holdout": n_hold,
        "epochs": epochs,
        "train_s": round(time.monotonic() - t0, 1),
    }
    log(f"domain classifier: hold-out accuracy {acc:.3f} after {info['train_s']:.0f} s")
    return model, info


_training = threading.Lock()  # one training per dataset in a process, however many threads ask


def ensure_classifier(
    dataset: str,
    env=None,
    *,
    manifest: Manifest | None = None,
    train: bool = True,
    progress: bool = True,
    log=print,
    **train_kwargs,
) -> tuple[DomainClassifier, dict]:
    """The classifier for ``dataset`` (whose ``manifest`` the caller may have read already): from this process's
    cache, from S3, or (``train``) trained now and stored."""
    with _training:
        found, manifest_h = stored(dataset, env, manifest=manifest, log=log)
        if found is not None:
            return found
        bucket, key = weights_key(dataset)
        if not train:
            raise FileNotFoundError(
                f"no domain classifier at s3://{bucket}/{key}; train it with `ganforge classifier --dataset {dataset}`"
            )
        model, info = train_for_dataset(dataset, env, progress=progress, log=log, **train_kwargs)
        found = store(dataset, env, model, manifest_h, info)
        log(f"domain classifier stored at s3://{bucket}/{key}")
        return found
