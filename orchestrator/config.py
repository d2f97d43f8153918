"""Typed job configuration: one source of defaults, YAML files, ``key=value`` overrides, validation.

A job config has six sections. ``model`` and ``hparams`` are the model's own dataclasses from ``gan_models`` (so the
paper defaults live beside the architecture); ``data``, ``train`` and ``tracking`` are defined here, ``health`` (the
divergence guard's thresholds) in ``orchestrator.train.health``. Sections are
built from plain dicts *after* all overrides are merged, so a model's resolution-dependent defaults are derived from
the final values. Secrets never enter a config: they come from the environment (``orchestrator.env``). Turning
strings and YAML values into typed fields, with one-line errors, is ``orchestrator.typed``'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gan_models
import orchestrator.metrics.classifier  # noqa: F401  registers the `classifier` extractor (fd_classifier)
from orchestrator.metrics import features
from orchestrator.train.health import HealthConfig
from orchestrator.typed import ConfigError, build, check, field_types, load_yaml, parse_value, split_override


@dataclass
class DataConfig:
    dataset: str = "s3://ganforge/datasets/fashion-mnist"  # prefix holding manifest.json + train-*.tar
    batch_size: int = 32  # per worker
    num_threads: int = 1  # DALI CPU threads per worker (on CPU: as many one-thread pipelines, batches in turn)
    prefetch: int = 4  # batches each DALI pipeline prepares ahead (docs/benchmarks.md)
    shuffle_buffer: int = 512  # samples shuffled across shard boundaries
    hflip: bool = True
    crop_scale: float = 1.0  # < 1: random square crops of [crop_scale, 1] of the area, resized back; 1 = off
    seed: int = 0
    cache_dir: str = ""  # local folder keeping verified shards for later epochs; empty = stream every epoch from S3
    cache_gb: float = 20.0  # size cap of cache_dir (least recently used shards are evicted)

    def __post_init__(self):
        check(self.dataset.startswith("s3://"), "data.dataset", self.dataset, "an s3://bucket/prefix URI")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer ≥ 1")
        check(self.num_threads >= 1, "data.num_threads", self.num_threads, "an integer ≥ 1")
        check(self.prefetch >= 1, "data.prefetch", self.prefetch, "an integer ≥ 1")
        check(self.cache_gb > 0, "data.cache_gb", self.cache_gb, "a size in GB > 0")
        check(0 < self.crop_scale <= 1, "data.crop_scale", self.crop_scale, "an area fraction in (0, 1]; 1 = no crop")


JOB_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"  # each model's default job YAML


def default_config(model: str) -> Path | None:
    """``jobs/configs/<model>.yaml`` when it exists (the job's defaults beyond the dataclasses')."""
    path = JOB_CONFIGS / f"{model}.yaml"
    return path if path.exists() else None


ELASTIC_RULES = ("keep_batch", "rescale")  # see orchestrator/train/elastic.py
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")  # Ray placement-group strategies


@dataclass
class TrainConfig:
    name: str = ""  # run name; empty = <model>-<timestamp>. Re-using a name resumes that run.
    num_workers: int = 2  # workers (one per GPU); with min_workers > 0 the most Ray may give the run
    min_workers: int = 0  # > 0: elastic, Ray Train runs with anything from min_workers to num_workers workers
    elastic: str = "keep_batch"  # how a world size other than num_workers is absorbed; see docs/scaling.md
    accumulate: int = 1  # micro-batches per step: data.batch_size is split in this many forward/backward passes
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one worker per node) | STRICT_PACK
    steps: int = 1000  # real batches per worker
    tick_steps: int = 20  # steps between metric reports
    sample_ticks: int = 5  # ticks between sample grids
    checkpoint_ticks: int = 5  # ticks between checkpoints
    keep_checkpoints: int = 3
    max_failures: int = 2
    storage_path: str = "s3://ganforge/runs"
    seed: int = 0
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU
    compile: bool = False  # torch.compile the G and D main passes (regularisers stay eager: they double-backward)
    grid_size: int = 8  # the sample grid is grid_size × grid_size
    metric: str = "fid"  # `fid` (Inception) or `fd_<extractor>` (a registered domain extractor, e.g. fd_classifier)
    metric_kimg: float = 0.0  # evaluate each time progress/kimg crosses a multiple of this, and at the end; 0 = off
    metric_n: int = 2000  # generated samples per evaluation (split across workers)
    metric_ref_n: int = 10000  # real samples for the reference statistics (capped at the dataset size)
    # Mode-collapse signals from each evaluation's samples (no extra generation): precision/recall and diversity in
    # the metric's feature space; per-class coverage/accuracy under the dataset's domain classifier (trained once,
    # beside the dataset, if missing). They feed health.collapse_thresholds.
    quality_signals: bool = True
    pr_n: int = 2000  # real and generated feature vectors kept for precision/recall and diversity (≤ metric_n, ref n)

    def __post_init__(self):
        check(self.use_gpu in ("auto", "true", "false"), "train.use_gpu", self.use_gpu, "auto, true or false")
        check(self.num_workers >= 1, "train.num_workers", self.num_workers, "an integer ≥ 1")
        workers = f"an integer in 0..train.num_workers ({self.num_workers}); 0 = fixed size"
        check(0 <= self.min_workers <= self.num_workers, "train.min_workers", self.min_workers, workers)
        check(self.elastic in ELASTIC_RULES, "train.elastic", self.elastic, " or ".join(ELASTIC_RULES))
        check(self.accumulate >= 1, "train.accumulate", self.accumulate, "an integer ≥ 1")
        placements = " | ".join(PLACEMENTS)
        check(self.placement_strategy in PLACEMENTS, "train.placement_strategy", self.placement_strategy, placements)
        check(self.steps >= 1, "train.steps", self.steps, "an integer ≥ 1")
        check(self.tick_steps >= 1, "train.tick_steps", self.tick_steps, "an integer ≥ 1")
        check(self.checkpoint_ticks >= 1, "train.checkpoint_ticks", self.checkpoint_ticks, "an integer ≥ 1")
        check(self.sample_ticks >= 1, "train.sample_ticks", self.sample_ticks, "an integer ≥ 1")
        check(self.storage_path.startswith("s3://"), "train.storage_path", self.storage_path, "an s3:// URI")
        check(self.metric_kimg >= 0, "train.metric_kimg", self.metric_kimg, "a number ≥ 0 (0 = off)")
        check(self.metric_n >= 2, "train.metric_n", self.metric_n, "an integer ≥ 2")
        check(self.metric_ref_n >= 2, "train.metric_ref_n", self.metric_ref_n, "an integer ≥ 2")
        check(self.pr_n >= 4, "train.pr_n", self.pr_n, "an integer ≥ 4 (k-NN manifolds with k = 3 need 4 points)")
        valid = known_metrics()
        check(self.metric in valid, "train.metric", self.metric, " or ".join(valid))


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = ""  # empty = the model name
    register: bool = True  # register G_ema in the MLflow model registry at the end of the run
    model_name: str = ""  # registered model name; empty = the model kind (e.g. "biggan")


@dataclass
class JobConfig:
    model_name: str
    model: Any
    hparams: Any
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("model", "hparams", "data", "train", "tracking", "health")}

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **{k: dataclasses.asdict(v) for k, v in self.sections().items()}}

    def flat(self) -> dict[str, Any]:
        """``{"train.steps": 1000, ...}`` for MLflow params."""
        out = {"model_name": self.model_name}
        for name, d in self.to_dict().items():
            if isinstance(d, dict):
                out.update({f"{name}.{k}": v for k, v in d.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        return build_config(d["model_name"], overrides=[], base=d)


SECTION_TYPES = {"data": DataConfig, "train": TrainConfig, "tracking": TrackingConfig, "health": HealthConfig}


def build_config(
    model_name: str, yaml_path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None
) -> JobConfig:
    """Defaults ← ``base`` dict ← YAML file ← ``key=value`` overrides, validated into a JobConfig."""
    module = _model_module(model_name)
    types_ = {"model": module.Config, "hparams": module.HParams, **SECTION_TYPES}
    merged: dict[str, dict] = {k: {} for k in types_}
    for source in (base, _load_sections(yaml_path) if yaml_path else None):
        for section, values in (source or {}).items():
            if section == "model_name":
                continue
            if section not in types_:
                raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(types_)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            merged[section].update(values)
    for item in overrides:
        section, key, value = _split_override(item, types_)
        merged[section][key] = parse_value(value, field_types(types_[section])[key])
    sections = {section: build(cls, merged[section], section) for section, cls in types_.items()}
    return JobConfig(model_name=model_name, **sections)


def _model_module(name: str):
    try:
        return gan_models.module(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _load_sections(path: str | Path) -> dict:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(Path(path))!r} must hold a mapping of sections")
    return data


def _split_override(item: str, types_: dict) -> tuple[str, str, str]:
    """``section.key=value`` → (section, key, value text) for a key the section's dataclass has."""
    key, value = split_override(item, "train.steps=500")
    section, _, name = key.partition(".")
    if section not in types_ or not name:
        valid = ", ".join(types_)
        raise ConfigError(f"unknown config key {key!r}; keys look like <section>.<name> with section in {valid}")
    valid = field_types(types_[section])
    if name not in valid:
        raise ConfigError(f"unknown config key {key!r}; valid {section} keys: {', '.join(sorted(valid))}")
    return section, name, value


def known_metrics() -> list[str]:
    """`fid` plus `fd_<name>` for every registered domain feature extractor (DESIGN.md §5 naming)."""
    return sorted(features.metric_name(n) for n in features.registered())
