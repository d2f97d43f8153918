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

``Evaluator.evaluate()`` returns an ``Evaluation``: the value, the mode-collapse signals (``train.quality_signals``)
and the timings. The signals come from the same samples and features — no second generation pass — and are identical
on every rank:

- ``precision`` / ``recall`` (Kynkäänniemi et al. 2019, k-NN manifolds with k = 3) and ``diversity`` (mean pairwise
  feature distance of the generated set over the real set's) between ``pr_n`` real feature vectors and the first
  ``pr_n`` generated ones (fixed latents), in the metric's feature space. The real set is kept from the reference
  pass (spread evenly over it) and cached beside the statistics, ``<dataset>/feature-sets/<sha256>.npz``; generated
  vectors are all-gathered from the ranks. Rank 0 computes the values and broadcasts them.
- ``coverage`` (share of the dataset's classes the generated samples fall into) and, for conditional models,
  ``accuracy`` (share classified as the class they were generated for; per class as ``accuracy/class_<c>``), under
  the dataset's domain classifier (``metrics/classifier.py``) over all ``metric_n`` samples. A missing classifier is
  trained once by rank 0 and stored beside the dataset, as ``fd_classifier`` does; if that fails, or the dataset has
  fewer than 2 classes, or the classes do not match the model's, the two are left out with a logged reason
  (``signals_skipped``).

The caller's RNG streams are left untouched (``fork_rng``), so evaluating does not change training.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gan_models.protocol import Recipe
from orchestrator.config import JobConfig
from orchestrator.data.loader import ShardLoader, decode_backend
from orchestrator.data.manifest import Manifest
from orchestrator.data.s3 import S3BytesStore
from orchestrator.env import Env, split_s3_uri
from orchestrator.metrics.classifier import ClassifierExtractor, load_extractor
from orchestrator.metrics.diversity import class_report, diversity_score, mean_pairwise_distance
from orchestrator.metrics.features import STANDARD_NETWORK, FeatureExtractor, get_extractor
from orchestrator.metrics.fid import FeatureStats, frechet_distance, reference_key
from orchestrator.metrics.precision_recall import precision_recall
from orchestrator.train import ddp
from orchestrator.train.domain_classifier import ensure_classifier

log = logging.getLogger(__name__)

GEN_BATCH = 250  # generator samples per forward
PR_K = 3  # k of the k-NN manifolds, as in Kynkäänniemi et al. 2019
# A class counts as covered when predicted for ≥ 25 % of a uniform generator's share. The domain classifier is only
# ~75-90 % accurate, so a generator making 3 Fashion-MNIST classes still has ~1-5 % of its samples misread as each of
# several others: at 0.1 (class_report's default) those spills made coverage 0.6, at 0.25 it is 0.4, while real data
# (hardest class predicted at 0.4 of its share) stays at 1.0.
COVERAGE_MIN_SHARE = 0.25
_SET_FORMAT = 1


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


def spread_positions(k: int, n: int) -> torch.Tensor:
    """``k`` ≤ ``n`` indices spread evenly over ``range(n)`` (sorted, distinct): which of n items to keep."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} items")
    return torch.arange(k, dtype=torch.int64) * n // max(k, 1)


def signal_set_size(pr_n: int, metric_n: int, ref_n: int) -> int:
    """Real and generated feature vectors for precision/recall and diversity: both sets the same size, since k-NN
    radii shrink with density and unequal sets would bias precision against recall."""
    return min(pr_n, metric_n, ref_n)


def features_to_bytes(feats: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, format=np.int64(_SET_FORMAT), features=feats.detach().cpu().float().numpy())
    return buf.getvalue()


def features_from_bytes(data: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if int(z["format"]) != _SET_FORMAT:
            raise ValueError(f"feature set format {int(z['format'])} != {_SET_FORMAT}")
        feats = z["features"]
    if feats.ndim != 2 or feats.dtype != np.float32:
        raise ValueError(f"feature set must be float32 N×dim, got {feats.dtype} {feats.shape}")
    return torch.from_numpy(feats).to(device)


def quality_signals(
    real: torch.Tensor | None,
    fake: torch.Tensor | None,
    *,
    real_spread: float | None = None,
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    k: int = PR_K,
    min_share: float = COVERAGE_MIN_SHARE,
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Mode-collapse signals from feature sets and classifier output; ``(signals, class report or None)``.

    ``real``/``fake``: N×dim feature sets (precision/recall need more than ``k`` rows in each, diversity 2 fake
    rows); ``real_spread``: ``mean_pairwise_distance(real)`` if already known; ``logits``: M×classes classifier
    output on generated samples, ``labels``: the M classes they were generated for (``None``: unconditional, no
    accuracy); ``min_share``: see ``diversity.class_report``. Keys present are those the inputs allow: precision,
    recall, diversity, coverage, accuracy and ``accuracy/class_<c>`` for every class some sample was generated for.
    """
    out: dict[str, float] = {}
    if real is not None and fake is not None:
        if len(real) > k and len(fake) > k:
            out["precision"], out["recall"] = precision_recall(real, fake, k=k)
        if len(fake) >= 2:
            spread = real_spread if real_spread is not None else mean_pairwise_distance(real)
            out["diversity"] = diversity_score(fake, spread)
    report = None
    if logits is not None and len(logits):
        report = class_report(logits, labels, logits.shape[1], min_share=min_share)
        out["coverage"] = report["coverage"]
        if report["accuracy"] is not None:
            out["accuracy"] = report["accuracy"]
            for c, row in enumerate(report["per_class"]):
                if row["accuracy"] is not None:
                    out[f"accuracy/class_{c}"] = row["accuracy"]
    return out, report


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (counts may differ; trailing dims and dtype must not), concatenated in rank order,
    on every rank."""
    if not ddp.active():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of G_ema, the same on every rank."""

    value: float  # the metric
    signals: dict[str, float]  # the mode-collapse signals (empty with train.quality_signals=false)
    class_report: dict[str, Any] | None  # the domain classifier's per-class detail (diversity.class_report)
    seconds: float  # the whole evaluation, reference included
    gen_seconds: float  # generating and extracting the samples
    ref_cached: bool  # whether the reference statistics came from the S3 cache
    ref_seconds: float  # getting them (reading from S3, or computing and storing them)

    @property
    def reference_note(self) -> str:
        return "cached in S3" if self.ref_cached else f"computed in {self.ref_seconds:.1f} s"


@dataclass
class Generated:
    stats: FeatureStats  # global (all-reduced)
    feats: torch.Tensor | None  # the signal set: this rank's first share of pr_n features, gathered from all ranks
    logits: torch.Tensor | None  # domain-classifier logits of all metric_n samples, gathered
    labels: torch.Tensor | None  # the classes they were generated for (conditional models), gathered


def make_extractor(
    cfg: JobConfig, device: torch.device | str, env: Env | None = None, manifest: Manifest | None = None
) -> FeatureExtractor:
    name = extractor_name(cfg.train.metric)
    kwargs: dict = {"device": device}
    if name != STANDARD_NETWORK:  # domain extractors are trained on (and stored beside) the dataset
        kwargs.update(dataset=cfg.data.dataset, env=env, manifest=manifest)
    return get_extractor(name, **kwargs)


class Evaluator:
    """``evaluate()`` → an ``Evaluation`` of the recipe's current G_ema; call it on every rank at the same time."""

    def __init__(
        self,
        cfg: JobConfig,
        recipe: Recipe,
        *,
        rank: int,
        world: int,
        device: torch.device,
        env: Env | None,
        manifest: Manifest,
        manifest_hash: str,
    ) -> None:
        self.cfg, self.recipe, self.rank, self.world = cfg, recipe, rank, world
        self.device, self.env = torch.device(device), env
        self.metric = cfg.train.metric
        self.manifest = manifest  # the loader's: the manifest is read once per process
        self.extractor = make_extractor(cfg, self.device, env, manifest)
        self.resolution = manifest.resolution
        self.num_classes = manifest.num_classes
        self.ref_n = min(cfg.train.metric_ref_n, manifest.num_samples)
        self.key_parts = {
            "manifest": manifest_hash,
            "network": self.extractor.name,
            "weights": getattr(self.extractor, "weights_id", ""),
            "resolution": self.resolution,
            "n": self.ref_n,
            "hflip": False,
            "decoder": decode_backend(self.device),  # the reference pass's loader decodes there: GPU pixels differ
        }
        self.signals_on = bool(cfg.train.quality_signals)
        self.pr_n = signal_set_size(cfg.train.pr_n, cfg.train.metric_n, self.ref_n) if self.signals_on else 0
        bucket, prefix = split_s3_uri(cfg.data.dataset)
        self.store = S3BytesStore(bucket, prefix, env)
        self._ref: FeatureStats | None = None
        self._real_set: torch.Tensor | None = None  # rank 0 only: the real signal set
        self._real_spread: float | None = None  # its mean pairwise distance (diversity's denominator)
        self._classifier = None  # ClassifierExtractor for coverage/accuracy, once loaded
        self._classifier_tried = False
        self.ref_seconds = 0.0
        self.ref_cached: bool | None = None  # whether the reference came from the S3 cache
        self.signals_skipped: dict[str, str] = {}  # signal group → why it is not computed (logged once)
        if self.signals_on and self.pr_n <= PR_K:
            self._skip(
                "precision/recall/diversity",
                f"only {self.pr_n} samples per set (train.pr_n, metric_n, "
                f"metric_ref_n); k-NN with k = {PR_K} needs {PR_K + 1}",
            )

    def _skip(self, what: str, why: str) -> None:
        if what not in self.signals_skipped:
            self.signals_skipped[what] = why
            if self.rank == 0:
                log.warning("quality signals: %s skipped: %s", what, why)

    # ---------------------------------------------------------------------------------------------- reference
    def reference(self) -> FeatureStats:
        """The real data's statistics (and, with signals on, rank 0's real signal set): from S3, or computed once
        in one pass over the shards and stored there."""
        if self._ref is None:
            t0 = time.perf_counter()
            stats_key = reference_key(self.key_parts)
            set_key = self._set_key()
            data = self.store.get(stats_key) if self.rank == 0 else None
            if set_key and self.rank == 0:
                self._real_set = self._read_set(set_key)
            found = (data is not None, set_key is None or self._real_set is not None)
            self.ref_cached, set_cached = ddp.broadcast_object(found)
            if self.ref_cached:
                self._ref = FeatureStats.from_bytes(data if self.rank == 0 else self.store.get(stats_key))
            if not (self.ref_cached and set_cached):
                stats, real_set = self._read_real(want_stats=not self.ref_cached, want_set=not set_cached)
                if stats is not None:
                    self._ref = stats
                    if self.rank == 0:
                        self.store.put(stats_key, stats.to_bytes())
                if real_set is not None and self.rank == 0:
                    self._real_set = real_set
                    self.store.put(set_key, features_to_bytes(real_set))
            self.ref_seconds = time.perf_counter() - t0
        return self._ref

    def _set_key(self) -> str | None:
        if self.pr_n <= PR_K:
            return None
        return reference_key({**self.key_parts, "n": self.pr_n, "set": "features"}, folder="feature-sets")

    def _read_set(self, key: str) -> torch.Tensor | None:
        data = self.store.get(key)
        if data is None:
            return None
        try:
            feats = features_from_bytes(data, self.extractor.device)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
            log.warning("real feature set %s unreadable (%s); recomputing", key, e)
            return None
        if feats.shape != (self.pr_n, self._dim()):
            log.warning(
                "real feature set %s has shape %s, expected (%d, %d); recomputing",
                key,
                tuple(feats.shape),
                self.pr_n,
                self._dim(),
            )
            return None
        return feats

    @torch.inference_mode()
    def _read_real(self, *, want_stats: bool, want_set: bool) -> tuple[FeatureStats | None, torch.Tensor | None]:
        """One pass over each rank's shards (no flips): the statistics of its share of ``ref_n`` images and/or its
        share of the real signal set, spread evenly over the images read so the set does not come from the first
        shard alone. Returns the global statistics and the gathered set (each ``None`` when not wanted)."""
        data_cfg = dataclasses.replace(self.cfg.data, hflip=False, crop_scale=1.0, batch_size=min(256, self.ref_n))
        loader = ShardLoader(data_cfg, rank=self.rank, world_size=self.world, device=self.device, env=self.env)
        sizes = [loader.epoch_size] * self.world
        if ddp.active():
            dist.all_gather_object(sizes, loader.epoch_size)
        stats_share = proportional_shares(self.ref_n, sizes)[self.rank] if want_stats else 0
        set_share = proportional_shares(self.pr_n, sizes)[self.rank] if want_set else 0
        want = max(stats_share, set_share)
        keep = spread_positions(set_share, want)
        stats = FeatureStats(self._dim(), self.extractor.device)
        kept: list[torch.Tensor] = []
        seen = 0
        try:
            for images, _ in loader:
                if seen >= want:
                    break
                feats = self.extractor.extract(images[: want - seen])
                if seen < stats_share:
                    stats.update(feats[: stats_share - seen])
                pick = keep[(keep >= seen) & (keep < seen + len(feats))] - seen
                kept.append(feats[pick.to(feats.device)])
                seen += len(feats)
        finally:
            loader.close()
        if want_stats and ddp.active():
            stats.all_reduce()
        real_set = None
        if want_set:
            mine = torch.cat(kept) if kept else torch.zeros(0, self._dim(), device=self.extractor.device)
            real_set = gather_rows(mine)
        return (stats if want_stats else None), real_set

    def _dim(self) -> int:
        if not hasattr(self, "_feature_dim"):
            probe = torch.zeros(2, 3, self.resolution, self.resolution, device=self.device)
            self._feature_dim = int(self.extractor.extract(probe).shape[1])
        return self._feature_dim

    # ---------------------------------------------------------------------------------------------- classifier
    def classifier(self):
        """The dataset's domain classifier for coverage/accuracy, or ``None`` (reason in ``signals_skipped``).

        With ``fd_classifier`` it is the metric's own extractor. Otherwise rank 0 loads it from S3 — training and
        storing it first when missing (``ensure_classifier``, ~1 min on a CPU, once per dataset) — and the other
        ranks load what rank 0 found, so every rank takes the same path."""
        if self._classifier_tried:
            return self._classifier
        self._classifier_tried = True
        c_dim = int(self.recipe.c_dim or 0)
        if self.num_classes < 2:
            self._skip("coverage/accuracy", f"the dataset has {self.num_classes} class(es); coverage needs ≥ 2")
            return None
        if c_dim and c_dim != self.num_classes:
            self._skip("coverage/accuracy", f"the model has {c_dim} classes, the dataset {self.num_classes}")
            return None
        if isinstance(self.extractor, ClassifierExtractor):
            self._classifier = self.extractor
            return self._classifier
        error = None
        if self.rank == 0:
            try:
                # its progress lines go to stdout like the loop's, so a pause at the first evaluation is explained
                ensure_classifier(
                    self.cfg.data.dataset, self.env, manifest=self.manifest, train=True, progress=False, log=print
                )
            except Exception as e:  # an auxiliary signal: say why and keep training
                error = f"no domain classifier ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        error = ddp.broadcast_object(error)
        if error is None:
            model = load_extractor(self.cfg.data.dataset, self.env, manifest=self.manifest, device=self.device)
            if model.model.arch.num_classes != self.num_classes:
                error = (
                    f"the domain classifier has {model.model.arch.num_classes} classes, the dataset {self.num_classes}"
                )
            else:
                self._classifier = model
        if error is not None:
            self._skip("coverage/accuracy", error)
        return self._classifier

    def _logits(self, images: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        if self._classifier is self.extractor:  # fd_classifier: the head on the features already computed
            with torch.inference_mode():
                return self._classifier.model.head(feats)
        return self._classifier.classify(images)

    # ---------------------------------------------------------------------------------------------- generated
    def generated(self) -> Generated:
        recipe, n = self.recipe, split(self.cfg.train.metric_n, self.world, self.rank)
        keep = split(self.pr_n, self.world, self.rank) if self._set_key() else 0
        classifier = self.classifier() if self.signals_on else None
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + 1_000_003 + self.rank)
        stats = FeatureStats(self._dim(), self.extractor.device)
        kept, logits, labels = [], [], []
        for i in range(0, n, GEN_BATCH):
            k = min(GEN_BATCH, n - i)
            z = recipe.latents(k, g).to(self.device)
            c = torch.randint(recipe.c_dim, (k,), generator=g).to(self.device) if recipe.c_dim else None
            with torch.no_grad():  # not inference_mode: G_ema's buffers are later updated in place by training
                images = recipe.sample(z, c)
            feats = self.extractor.extract(images)
            stats.update(feats)
            if i < keep:
                kept.append(feats[: keep - i])
            if classifier is not None:
                logits.append(self._logits(images, feats))
                if c is not None:
                    labels.append(c.to(logits[-1].device))
        if ddp.active():
            stats.all_reduce()
        out = Generated(stats, None, None, None)
        if self._set_key():  # every rank joins the gather, even one whose share is empty
            out.feats = gather_rows(torch.cat(kept) if kept else torch.zeros(0, self._dim(), device=stats.device))
        if classifier is not None:
            out.logits = gather_rows(torch.cat(logits))
            out.labels = gather_rows(torch.cat(labels)) if labels else None
        return out

    def signals(self, gen: Generated) -> tuple[dict[str, float], dict[str, Any] | None]:
        """(the mode-collapse signals of ``gen``, the class report): computed on rank 0, the same on every rank."""
        result = None
        if self.rank == 0:
            if self._real_set is not None and self._real_spread is None:
                self._real_spread = mean_pairwise_distance(self._real_set)
            real = self._real_set if gen.feats is not None else None
            result = quality_signals(
                real, gen.feats, real_spread=self._real_spread, logits=gen.logits, labels=gen.labels
            )
        return ddp.broadcast_object(result)

    def evaluate(self) -> Evaluation:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ref = self.reference()
            if self.signals_on:
                self.classifier()  # loaded (or trained) once, before the timed generation
            t1 = time.perf_counter()
            gen = self.generated()
        value = frechet_distance(*ref.mu_sigma(), *gen.stats.mu_sigma())
        gen_seconds = time.perf_counter() - t1
        signals, report = self.signals(gen) if self.signals_on else ({}, None)
        return Evaluation(
            value=value,
            signals=signals,
            class_report=report,
            seconds=time.perf_counter() - t0,
            gen_seconds=gen_seconds,
            ref_cached=bool(self.ref_cached),
            ref_seconds=self.ref_seconds,
        )
