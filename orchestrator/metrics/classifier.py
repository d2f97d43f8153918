"""A small CNN classifier trained on the dataset's own shards: fast domain features (``fd_classifier``) and logits.

Inception-v3 at 299² costs ~6 GFLOP per image, far too slow for CPU sweeps. This network costs ~8 MFLOP per image at
32², trains in about a minute on a CPU and reaches ~90 % accuracy on Fashion-MNIST. Its penultimate layer (128-d,
after ReLU) is registered as the feature extractor ``classifier``; the distance it gives is called ``fd_classifier``,
never ``fid`` (DESIGN.md §5). ``classify(images)`` returns its logits, for per-class coverage of generated samples.

Weights live beside the dataset, ``<dataset>/classifier.pt``, keyed by the dataset's manifest hash: trained once on
first use (``orchestrator.train.domain_classifier.ensure_classifier``, with a progress bar, or ``ganforge classifier
--dataset s3://…``), then loaded by every worker (``stored`` / ``load_extractor`` here). The file also holds a weights
id that enters the reference-statistics cache key, so retraining the classifier never mixes statistics from two
networks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from botocore.exceptions import ClientError
from torch import nn

from orchestrator.data import s3
from orchestrator.data.manifest import Manifest
from orchestrator.metrics.features import FeatureExtractor, ImageBatch, register_extractor

log = logging.getLogger(__name__)

NAME = "classifier"
WEIGHTS_FILE = "classifier.pt"
_FORMAT = 1


@dataclass
class Arch:
    num_classes: int = 10
    resolution: int = 32
    width: int = 16
    feature_dim: int = 128


class DomainClassifier(nn.Module):
    """conv16 → pool → conv32 ×2 → pool → conv64 ×2 → pool(4×4) → fc128 (features) → fc(num_classes).

    Input: N×3×H×W in [-1, 1] at ``arch.resolution`` (other sizes are resized by the extractor)."""

    def __init__(self, arch: Arch | None = None) -> None:
        super().__init__()
        self.arch = arch = arch or Arch()
        w = arch.width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        stage1 = [*block(3, w), nn.MaxPool2d(2)]
        stage2 = [*block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2)]
        stage3 = [*block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(4)]
        self.body = nn.Sequential(*stage1, *stage2, *stage3)
        self.fc = nn.Linear(4 * w * 16, arch.feature_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(arch.feature_dim, arch.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


class _Features(nn.Module):
    def __init__(self, model: DomainClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class ClassifierExtractor(FeatureExtractor):
    """The classifier's penultimate features as a ``FeatureExtractor`` (metric ``fd_classifier``), plus logits."""

    def __init__(
        self,
        model: DomainClassifier,
        *,
        weights_id: str = "",
        device: str | torch.device = "auto",
        batch_size: int = 500,
    ) -> None:
        super().__init__(_Features(model), name=NAME, device=device, batch_size=batch_size)
        self.model = self.network.model
        self.weights_id = weights_id  # part of the reference-stats cache key

    def network_input(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels / 127.5 - 1.0
        res = self.model.arch.resolution
        if x.shape[-2:] != (res, res):
            x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.inference_mode()
    def classify(self, images: ImageBatch) -> torch.Tensor:
        """Logits N×num_classes for images in any form ``FeatureExtractor`` accepts (uint8 or [-1, 1] float)."""
        out = [self.model(self.network_input(self.to_pixels(chunk))).float() for chunk in self.batches(images)]
        return torch.cat(out) if out else torch.empty(0, self.model.arch.num_classes, device=self.device)


# ------------------------------------------------------------------------------------------------------ training
def _to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W (C = 1 or 3) → float [-1, 1] N×3×H×W."""
    x = images.float() / 127.5 - 1.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
    arch: Arch | None = None,
) -> DomainClassifier:
    """Train on uint8 images N×C×H×W (C = 1 or 3) and int labels; deterministic for a seed and thread count."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images N×C×H×W, got {images.dtype} {tuple(images.shape)}")
    n = len(images)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    k = num_classes or int(labels.max()) + 1
    arch = arch or Arch(num_classes=k, resolution=images.shape[-1])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # init and dropout: deterministic, without touching the caller's RNG
        model = DomainClassifier(arch).to(memory_format=torch.channels_last)  # ~1.5× faster on CPU
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * (n // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
        model.train()
        bar = _progress(progress, steps, "training domain classifier")
        done = 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                x = _to_input(images[idx]).contiguous(memory_format=torch.channels_last)
                if torch.rand((), generator=g) < 0.5:  # horizontal flip: cheap augmentation
                    x = x.flip(-1)
                loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                done += 1
                bar(done, f"loss {loss.item():.3f}")
        bar(None, "")
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.inference_mode()
def accuracy(model: DomainClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    labels = torch.as_tensor(labels, dtype=torch.int64)
    correct = 0
    for i in range(0, len(images), batch_size):
        predicted = model(_to_input(images[i : i + batch_size])).argmax(1)
        correct += int((predicted == labels[i : i + batch_size]).sum())
    return correct / max(1, len(images))


def _progress(enabled: bool, total: int, what: str):
    """A rich progress bar (callable: update(done, text); update(None, '') closes), or a no-op."""
    if not enabled:
        return lambda done, text: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    p = Progress(*columns, transient=False)
    task = p.add_task("", total=total)
    p.start()

    def update(done, text):
        if done is None:
            p.stop()
        else:
            p.update(task, completed=done, description=text)

    return update


# ------------------------------------------------------------------------------------------------------ storage
def weights_key(dataset: str) -> tuple[str, str]:
    """(bucket, key) of the classifier stored beside ``dataset``."""
    bucket, prefix = s3.split_prefix(dataset)
    return bucket, prefix + WEIGHTS_FILE


def to_bytes(model: DomainClassifier, manifest_hash: str, info: dict) -> bytes:
    buf = io.BytesIO()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    arch = dataclasses.asdict(model.arch)
    torch.save(
        {"format": _FORMAT, "manifest_hash": manifest_hash, "arch": arch, "state_dict": state, "info": info}, buf
    )
    return buf.getvalue()


def from_bytes(data: bytes) -> tuple[DomainClassifier, dict]:
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if blob.get("format") != _FORMAT:
        raise ValueError(f"classifier weights format {blob.get('format')} != {_FORMAT}")
    model = DomainClassifier(Arch(**blob["arch"]))
    model.load_state_dict(blob["state_dict"])
    weights_id = hashlib.sha256(data).hexdigest()[:16]
    return model.eval(), {**blob["info"], "manifest_hash": blob["manifest_hash"], "weights_id": weights_id}


_lock = threading.Lock()
_cache: dict[tuple[str, str], tuple[DomainClassifier, dict]] = {}


def stored(
    dataset: str, env=None, *, manifest: Manifest | None = None, log=print
) -> tuple[tuple[DomainClassifier, dict] | None, str]:
    """(the classifier stored beside ``dataset`` for its current manifest, or None; that manifest's hash), from
    this process's cache or S3. Unreadable weights, or weights of another version of the dataset, count as none.
    ``manifest``: the dataset's, when the caller has read it already (it is fetched otherwise)."""
    manifest_h = (manifest or s3.check_prefix(dataset, env)).hash
    with _lock:
        if (dataset, manifest_h) in _cache:
            return _cache[(dataset, manifest_h)], manifest_h
    bucket, key = weights_key(dataset)
    found = None
    try:
        found = from_bytes(s3.client(env).get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as e:
        if not s3.is_missing(e):
            raise
    except (ValueError, RuntimeError, KeyError, EOFError) as e:
        log(f"domain classifier s3://{bucket}/{key} unreadable ({type(e).__name__}); retraining")
    if found is not None and found[1]["manifest_hash"] != manifest_h:
        log(f"domain classifier s3://{bucket}/{key} belongs to another version of the dataset; retraining")
        found = None
    if found is not None:
        with _lock:
            _cache[(dataset, manifest_h)] = found
    return found, manifest_h


def store(dataset: str, env, model: DomainClassifier, manifest_h: str, info: dict) -> tuple[DomainClassifier, dict]:
    """Write the classifier beside ``dataset`` in S3 (and this process's cache); returns it as ``stored`` would."""
    data = to_bytes(model, manifest_h, info)
    bucket, key = weights_key(dataset)
    s3.client(env).put_object(Bucket=bucket, Key=key, Body=data)
    found = from_bytes(data)
    with _lock:
        _cache[(dataset, manifest_h)] = found
    return found


def load_extractor(
    dataset: str,
    env=None,
    *,
    manifest: Manifest | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 500,
) -> ClassifierExtractor:
    """The ``classifier`` feature extractor for ``dataset`` (registered with ``get_extractor``): the stored
    classifier; training it is ``ganforge classifier`` / ``orchestrator.train.domain_classifier.ensure_classifier``."""
    found, _ = stored(dataset, env, manifest=manifest, log=log.info)
    if found is None:
        bucket, key = weights_key(dataset)
        raise FileNotFoundError(
            f"no domain classifier at s3://{bucket}/{key}; train it with `ganforge classifier --dataset {dataset}`"
        )
    model, info = found
    return ClassifierExtractor(model, weights_id=info["weights_id"], device=device, batch_size=batch_size)


register_extractor(NAME, load_extractor)


def per_class_share(logits: torch.Tensor, num_classes: int | None = None) -> np.ndarray:
    """Fraction of samples the classifier assigns to each class (coverage of generated samples)."""
    k = num_classes or logits.shape[1]
    return np.bincount(logits.argmax(1).cpu().numpy(), minlength=k) / max(1, len(logits))
