"""Learning-rate × batch-size sweeps: Ray Tune over multi-worker Ray Train trials, ASHA on the quality metric.

Each trial is a *function* trainable that runs ``orchestrator.train.trainer.fit`` — the same pre-flight, MLflow run,
TorchTrainer and training loop as a single job — with ``RunConfig(callbacks=[TuneReportCallback()])`` so every
``ray.train.report`` of rank 0 becomes a Tune result (the Train V2 pattern of DESIGN.md §8). The trial function itself
holds no CPU (``{"cpu": 0, "memory": 64 MiB}``); its TorchTrainer asks for ``num_workers × cpus_per_worker``, and
``max_concurrent_trials`` (default: as many as the cluster's CPUs fit) queues the rest.

ASHA compares trials on ``metric`` (``fid`` or ``fd_<extractor>``, lower is better) with ``time_attr =
progress/kimg``. The loop evaluates the metric every ``metric_kimg`` and carries the last value in every result
(+inf before the first evaluation), and ``grace_kimg`` must be a multiple of ``metric_kimg``: every rung
(grace × rf^k) then falls on a tick that has just evaluated, so no trial is judged on a stale or missing value.

MLflow: one parent run per sweep (experiment ``<model>-sweep``), a nested child run per trial (opened by the trial,
logged into by the trial's rank 0: metrics, sample grids, best checkpoint tag); the sensitivity report
(``orchestrator.tune.report``) goes to the parent run and to ``outputs/<sweep>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig, build_config, default_config
from orchestrator.data import s3
from orchestrator.data.manifest import Manifest
from orchestrator.env import Env
from orchestrator.tracking import mlflow as tracking
from orchestrator.train.trainer import connect_ray, fit, git_sha, preflight, storage
from orchestrator.tune import report
from orchestrator.typed import ConfigError, build, check, field_types, load_yaml, parse_value, split_override

MIB = 1 << 20


@dataclass
class SweepConfig:
    model: str = "biggan"
    job_config: str = ""  # the base job's YAML; empty = jobs/configs/<model>.yaml
    overrides: list[str] = field(default_factory=list)  # the base job's section.key=value overrides
    name: str = ""  # empty = <model>-sweep-<timestamp>
    experiment: str = ""  # MLflow experiment; empty = <model>-sweep
    lrs: list[float] = field(default_factory=lambda: [2e-4, 1e-3, 4e-3])  # G lr (grid) or [min, max] (random)
    d_lr_ratios: list[float] = field(default_factory=lambda: [1.0])  # D lr = ratio × G lr (grid axis too)
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32])  # per worker
    search: str = "grid"  # grid | random (log-uniform lr in [min(lrs), max(lrs)], batch size and ratio from lists)
    num_samples: int = 1  # grid: repeats of the whole grid; random: number of trials
    seed: int = 0  # random search
    max_kimg: float = 10.0  # every trial's length (thousands of real images, all workers together)
    metric: str = "fd_classifier"
    metric_kimg: float = 1.0
    metric_n: int = 1000
    metric_ref_n: int = 5000
    scheduler: str = "asha"  # asha | none
    grace_kimg: float = 2.0  # ASHA grace period (a multiple of metric_kimg)
    reduction_factor: float = 2.0
    num_workers: int = 2  # Ray Train workers per trial
    cpus_per_worker: float = 1.0
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs fit
    output_dir: str = "outputs"

    def __post_init__(self):
        check(self.search in ("grid", "random"), "sweep.search", self.search, "grid or random")
        check(self.scheduler in ("asha", "none"), "sweep.scheduler", self.scheduler, "asha or none")
        check(bool(self.lrs) and all(v > 0 for v in self.lrs), "sweep.lrs", self.lrs, "learning rates > 0")
        ratios_ok = bool(self.d_lr_ratios) and all(v > 0 for v in self.d_lr_ratios)
        check(ratios_ok, "sweep.d_lr_ratios", self.d_lr_ratios, "ratios > 0")
        batches_ok = bool(self.batch_sizes) and all(v >= 1 for v in self.batch_sizes)
        check(batches_ok, "sweep.batch_sizes", self.batch_sizes, "integers ≥ 1")
        check(self.num_samples >= 1, "sweep.num_samples", self.num_samples, "an integer ≥ 1")
        check(self.max_kimg > 0, "sweep.max_kimg", self.max_kimg, "a number > 0")
        check(self.metric_kimg > 0, "sweep.metric_kimg", self.metric_kimg, "a number > 0 (ASHA needs the metric)")
        check(self.reduction_factor > 1, "sweep.reduction_factor", self.reduction_factor, "a number > 1")
        check(self.num_workers >= 1, "sweep.num_workers", self.num_workers, "an integer ≥ 1")
        check(self.cpus_per_worker > 0, "sweep.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        concurrent = "an integer ≥ 0 (0 = fit the cluster)"
        check(self.max_concurrent_trials >= 0, "sweep.max_concurrent_trials", self.max_concurrent_trials, concurrent)
        ratio = self.grace_kimg / self.metric_kimg
        valid = f"a positive multiple of sweep.metric_kimg={self.metric_kimg}, so every rung has a fresh metric"
        check(self.grace_kimg > 0 and abs(ratio - round(ratio)) < 1e-6, "sweep.grace_kimg", self.grace_kimg, valid)

    @property
    def trials(self) -> int:
        if self.search == "random":
            return self.num_samples
        return len(self.lrs) * len(self.batch_sizes) * len(self.d_lr_ratios) * self.num_samples

    def job(self) -> JobConfig:
        """The base job config (model YAML + overrides), validated."""
        return build_config(self.model, self.job_config or default_config(self.model), self.overrides)


def load_sweep_config(path: str | None = None, overrides: list[str] = ()) -> SweepConfig:
    """``SweepConfig`` from a YAML mapping (``sweep:`` keys) and ``sweep.key=value`` / ``section.key=value`` items:
    ``sweep.*`` set the sweep, anything else is an override of the base job."""
    values: dict[str, Any] = {}
    if path:
        data = load_yaml(path, "sweep config")
        values.update(data.get("sweep", data) if isinstance(data, dict) else {})
    job_overrides = list(values.pop("overrides", []) or [])
    types_ = field_types(SweepConfig)
    for item in overrides:
        key, value = split_override(item, "sweep.lrs=1e-4,1e-3 or train.tick_steps=5")
        name = key.removeprefix("sweep.")
        if name == key:
            job_overrides.append(item)
        else:
            values[name] = parse_value(value, types_.get(name, Any))
    return build(SweepConfig, {**values, "overrides": job_overrides}, "sweep", kind="sweep")


# ------------------------------------------------------------------------------------------------------ trials
def trial_job(base: dict, sweep: SweepConfig, params: dict, trial_name: str, storage_path: str) -> JobConfig:
    """The JobConfig of one trial: the base job with this trial's lr / D-lr ratio / batch size and the sweep's
    length, metric and resources."""
    cfg = JobConfig.from_dict(base)
    lr, ratio, batch = float(params["lr"]), float(params["d_lr_ratio"]), int(params["batch_size"])
    hp = {f.name for f in dataclasses.fields(cfg.hparams)}
    if not {"g_lr", "d_lr"} <= hp:
        raise ConfigError(f"model {cfg.model_name} has no hparams.g_lr/d_lr to sweep")
    global_batch = batch * sweep.num_workers
    steps = math.ceil(sweep.max_kimg * 1000 / global_batch)
    # ticks no longer than metric_kimg, so an evaluation lands on the tick that crosses each multiple (and rung)
    tick = max(1, min(cfg.train.tick_steps, int(sweep.metric_kimg * 1000 // global_batch)))
    d = cfg.to_dict()
    d["hparams"].update(g_lr=lr, d_lr=lr * ratio)
    d["data"].update(batch_size=batch)
    d["train"].update(
        name=trial_name,
        steps=steps,
        tick_steps=tick,
        num_workers=sweep.num_workers,
        cpus_per_worker=sweep.cpus_per_worker,
        storage_path=storage_path,
        metric=sweep.metric,
        metric_kimg=sweep.metric_kimg,
        metric_n=sweep.metric_n,
        metric_ref_n=sweep.metric_ref_n,
        checkpoint_ticks=steps // tick + 1,  # checkpoints at evaluations and the end only
    )
    d["tracking"].update(experiment=sweep.experiment or f"{sweep.model}-sweep", register=False)
    return JobConfig.from_dict(d)


def run_trial(params: dict, *, base: dict, sweep: dict, parent_run_id: str | None, storage_path: str) -> None:
    """Tune's function trainable: one multi-worker Ray Train run reporting to Tune through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    sw = SweepConfig(**sweep)
    ctx = tune.get_context()
    name = f"{sw.name}-{ctx.get_trial_id()}"
    cfg = trial_job(base, sw, params, name, storage_path)
    output_dir = str(Path(sw.output_dir).resolve() / sw.name / "trials")
    fit(cfg, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()], output_dir=output_dir)


def param_space(sweep: SweepConfig) -> dict:
    from ray import tune

    if sweep.search == "grid":
        return {
            "lr": tune.grid_search(list(sweep.lrs)),
            "batch_size": tune.grid_search(list(sweep.batch_sizes)),
            "d_lr_ratio": tune.grid_search(list(sweep.d_lr_ratios)),
        }
    return {
        "lr": tune.loguniform(min(sweep.lrs), max(sweep.lrs)) if len(sweep.lrs) > 1 else sweep.lrs[0],
        "batch_size": tune.choice(list(sweep.batch_sizes)),
        "d_lr_ratio": tune.choice(list(sweep.d_lr_ratios)),
    }


# ------------------------------------------------------------------------------------------------------ driver
@dataclass
class SweepOutcome:
    name: str
    report_dir: str
    parent_run_url: str | None
    summary: dict
    records: list


def run_sweep(sweep: SweepConfig, *, env: Env | None = None, log=print) -> SweepOutcome:
    env = env or Env.from_environ()
    t0 = time.monotonic()
    sweep.name = sweep.name or f"{sweep.model}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep.experiment = sweep.experiment or f"{sweep.model}-sweep"
    base = sweep.job()
    # validate one trial's config up front (one-line errors before anything starts)
    first = {"lr": sweep.lrs[0], "d_lr_ratio": sweep.d_lr_ratios[0], "batch_size": sweep.batch_sizes[0]}
    probe = trial_job(base.to_dict(), sweep, first, "probe", base.train.storage_path)
    manifest = preflight(probe, env)  # S3, dataset, MLflow; trains the domain classifier once if needed
    parent = _open_parent(sweep, base, manifest, env) if base.tracking.enabled else None
    if parent:
        log(f"MLflow sweep run: {parent.url}")

    connect_ray(probe, env)
    tuner, concurrent = _tuner(sweep, base, parent, env)
    log(
        f"sweep {sweep.name}: {sweep.trials} trials × {sweep.num_workers} workers, {concurrent} at a time, "
        f"{sweep.scheduler} on {sweep.metric} over progress/kimg ≤ {sweep.max_kimg}"
    )
    # Until a trial's first evaluation its metric is +inf (no value yet: the worst for "min"), and Tune's TensorBoard
    # logger warned once per trial about it. The value is meant; MLflow holds the curves.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    with tracking.failed_on_error(parent):
        grid = tuner.fit()

    records = report.records_from_results(grid, sweep)
    out = Path(sweep.output_dir).resolve() / sweep.name
    wall_s = time.monotonic() - t0
    summary = report.write_report(records, out, metric=sweep.metric, max_kimg=sweep.max_kimg, wall_s=wall_s)
    if parent:
        _finish_mlflow(parent, sweep, out, summary, records)
    log(report.summary_text(summary))
    return SweepOutcome(sweep.name, str(out), parent.url if parent else None, summary, records)


def _open_parent(sweep: SweepConfig, base: JobConfig, manifest: Manifest, env: Env) -> tracking.RunInfo:
    """The sweep's parent MLflow run: the sweep config as params, the dataset and code version as tags."""
    params = {f"sweep.{k}": v for k, v in dataclasses.asdict(sweep).items()}
    tags = {
        "ganforge.sweep": sweep.name,
        "git_sha": git_sha(),
        "dataset.uri": base.data.dataset,
        "dataset.manifest_hash": manifest.hash,
        "model": sweep.model,
    }
    return tracking.open_run(env.mlflow_uri, sweep.experiment, sweep.name, params, tags)


def _tuner(sweep: SweepConfig, base: JobConfig, parent: tracking.RunInfo | None, env: Env):
    """(the Tuner of the sweep's trials, how many run at a time). Trials and Tune's state go to
    ``<train.storage_path>/<sweep name>``."""
    import ray
    from ray import tune

    trials_storage = s3.join_uri(base.train.storage_path, sweep.name)
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = sweep.max_concurrent_trials or max(1, int(cpus // (sweep.num_workers * sweep.cpus_per_worker)))
    trainable = tune.with_parameters(
        run_trial,
        base=base.to_dict(),
        sweep=dataclasses.asdict(sweep),
        parent_run_id=parent.run_id if parent else None,
        storage_path=trials_storage,
    )
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 64 * MIB})  # the trial's workers hold the CPUs
    trials_job = dataclasses.replace(base, train=dataclasses.replace(base.train, storage_path=trials_storage))
    tune_path, tune_fs = storage(trials_job, env)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode="min",
            scheduler=make_scheduler(sweep),
            num_samples=sweep.num_samples,
            max_concurrent_trials=concurrent,
            search_alg=_random_search(sweep),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=tune_path, storage_filesystem=tune_fs, verbose=1),
    )
    return tuner, concurrent


def make_scheduler(sweep: SweepConfig):
    """ASHA on ``progress/kimg`` (or FIFO) for the sweep's trials; a trial that reaches max_kimg always finishes."""
    from ray.tune.schedulers import FIFOScheduler

    from orchestrator.tune.scheduler import FinishingASHA

    if sweep.scheduler != "asha":
        return FIFOScheduler()
    return FinishingASHA(
        time_attr="progress/kimg",
        max_t=sweep.max_kimg,
        grace_period=sweep.grace_kimg,
        reduction_factor=sweep.reduction_factor,
        stop_last_trials=False,
    )


def _random_search(sweep: SweepConfig):
    if sweep.search != "random":
        return None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed)


def _finish_mlflow(parent, sweep: SweepConfig, out: Path, summary: dict, records: list) -> None:
    """Report artifacts and summary metrics on the parent; children that ASHA stopped are closed as KILLED (the
    scheduler ends their process mid-run, so they cannot close themselves)."""
    from mlflow.entities import Metric, RunTag

    client = tracking.client(parent.tracking_uri, check=False)
    stopped = {f"{sweep.name}-{r.trial_id}" for r in records if r.early_stopped}
    for child in client.search_runs([parent.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'"):
        if child.data.tags.get("ganforge.run_name") in stopped:
            client.set_tag(child.info.run_id, "ganforge.stopped_early", "true")
            client.set_terminated(child.info.run_id, "KILLED")
        elif child.info.status == "RUNNING":  # not stopped by ASHA, yet never closed: its process died
            client.set_tag(child.info.run_id, "ganforge.unclosed", "true")
            client.set_terminated(child.info.run_id, "FAILED")
    client.log_artifacts(parent.run_id, str(out), "report")
    rec = summary["recommended"]
    c = summary["compute"]
    metrics = {
        f"best/{sweep.metric}": rec["best_metric"],
        "compute/kimg": c["kimg"],
        "compute/full_grid_kimg": c["full_grid_kimg"],
        "compute/saving_x": c["saving_x"],
        "compute/cpu_s": c["cpu_s"],
    }
    ts = int(time.time() * 1000)
    tags = [RunTag("recommended", str(rec["config"])), RunTag("recommended_trial", str(rec["trial_id"]))]
    client.log_batch(parent.run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()], tags=tags)
    client.set_terminated(parent.run_id, "FINISHED")
