"""Elastic world size: what a run does when Ray Train gives it a different number of workers than configured.

``train.num_workers`` is the size the hyper-parameters were chosen for (the reference world, W). With
``train.min_workers`` > 0 Ray Train may start or restart the run with any world w in [min_workers, num_workers]
(fewer nodes free, a node lost); the run resumes from its latest checkpoint and adapts by ``train.elastic``:

``keep_batch`` (default)
    The global batch stays B = data.batch_size × W: each worker takes B / w samples per step in micro-batches of the
    configured size (``train.accumulate`` grows by W / w). Same optimisation problem, same step count, same kimg per
    step; only speed changes. Needs B / w to be a multiple of the micro-batch for every allowed w (checked before
    training starts).

``rescale``
    Each worker keeps its batch, so the global batch becomes B' = B · r with r = w / W, and the hyper-parameters that
    depend on it move by the rules in the models' ``HParams.for_batch_ratio``: Adam learning rates × √r (square-root
    scaling for adaptive optimisers, Malladi et al. 2022), an explicit R1 γ × 1/r (NVlabs' heuristic γ ∝ 1/B; the
    auto γ follows B by itself), StyleGAN2's EMA half-life × r (NVlabs: ema_kimg = B · 10/32). BigGAN's per-step EMA
    decay and the minibatch-stddev group (per worker) stay as they are.
"""

from __future__ import annotations

import dataclasses

from orchestrator.config import ConfigError, JobConfig


def world_sizes(cfg: JobConfig) -> range:
    """Every world size Ray Train may give this run."""
    t = cfg.train
    return range(t.min_workers or t.num_workers, t.num_workers + 1)


def scaling_workers(cfg: JobConfig) -> int | tuple[int, int]:
    """``ScalingConfig(num_workers=...)``: a (min, max) tuple makes Ray Train elastic."""
    t = cfg.train
    return (t.min_workers, t.num_workers) if t.min_workers and t.min_workers < t.num_workers else t.num_workers


def check(cfg: JobConfig) -> None:
    """One-line error before training when ``keep_batch`` cannot keep the batch at some allowed world size."""
    d, t = cfg.data, cfg.train
    if d.batch_size % t.accumulate:
        raise ConfigError(
            f"data.batch_size={d.batch_size} is not a multiple of train.accumulate={t.accumulate}; "
            "each step splits the batch into that many equal micro-batches"
        )
    if t.elastic != "keep_batch":
        return
    micro, total = d.batch_size // t.accumulate, d.batch_size * t.num_workers
    bad = [w for w in world_sizes(cfg) if total % (w * micro)]
    if bad:
        raise ConfigError(
            f"train.min_workers={t.min_workers}: with train.elastic=keep_batch the global batch {total} "
            f"must split into micro-batches of {micro} on every world size, but not on {bad[0]} "
            f"workers; pick data.batch_size/train.accumulate so {total} divides, or "
            "train.elastic=rescale"
        )


def adapt(cfg: JobConfig, world: int) -> tuple[JobConfig, str | None]:
    """The config a world of ``world`` workers trains with, and a one-line note of what changed (None if nothing)."""
    ref = cfg.train.num_workers
    if world == ref:
        return cfg, None
    if cfg.train.elastic == "keep_batch":
        micro = cfg.data.batch_size // cfg.train.accumulate
        per_worker = cfg.data.batch_size * ref // world
        new = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, batch_size=per_worker),
            train=dataclasses.replace(cfg.train, accumulate=per_worker // micro),
        )
        return new, (
            f"{world} of {ref} workers: global batch kept at {cfg.data.batch_size * ref} "
            f"({per_worker} per worker in {per_worker // micro} micro-batches of {micro})"
        )
    ratio = world / ref
    hp = cfg.hparams.for_batch_ratio(ratio)
    moved = [f.name for f in dataclasses.fields(hp) if getattr(hp, f.name) != getattr(cfg.hparams, f.name)]
    changed = ", ".join(f"{k} {getattr(cfg.hparams, k)} → {getattr(hp, k)}" for k in moved)
    note = (
        f"{world} of {ref} workers: global batch {cfg.data.batch_size * world} instead of "
        f"{cfg.data.batch_size * ref}; rescaled {changed or 'nothing'}"
    )
    return dataclasses.replace(cfg, hparams=hp), note
