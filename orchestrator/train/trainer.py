"""Driver side of a training run: pre-flight checks, MLflow run, Ray Train TorchTrainer, final artifacts.

Everything that can be wrong with the inputs (config, S3 credentials, dataset prefix, MLflow) is checked here, before
any worker starts, and reported in one line.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator import __version__
from orchestrator.config import JobConfig
from orchestrator.data import s3
from orchestrator.env import Env, split_s3_uri
from orchestrator.generator import Generator, fixed_latents
from orchestrator.tracking import mlflow as tracking
from orchestrator.tracking.images import image_grid
from orchestrator.train import elastic
from orchestrator.train.health import STOP_REASON, STOPPED, TrainingStopped

RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keeps Ray on 127.0.0.1 (DESIGN.md §8)


@dataclass
class RunOutcome:
    name: str
    checkpoint_uri: str | None
    checkpoint_dir: str | None  # local copy of the final checkpoint (driver side)
    mlflow_url: str | None
    grid_path: str | None
    metrics: dict[str, Any]
    wall_s: float


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[2],
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_use_gpu(setting: str) -> bool:
    if setting == "auto":
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


def storage(cfg: JobConfig, env: Env):
    """(storage_path, pyarrow filesystem) for RunConfig: checkpoints go straight to S3."""
    from pyarrow import fs

    bucket, prefix = split_s3_uri(cfg.train.storage_path)
    kwargs: dict[str, Any] = {"region": env.region, "access_key": env.access_key, "secret_key": env.secret_key}
    if env.s3_endpoint:
        scheme, _, host = env.s3_endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    return f"{bucket}/{prefix}".rstrip("/"), fs.S3FileSystem(**kwargs)


def connect_ray(cfg: JobConfig, env: Env) -> None:
    """Join the cluster a job was submitted to, or start a private local Ray for a direct `python jobs/...` run."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update(RAY_LOCAL_ENV)
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        # A dashboard URL is for `ray job submit`; a script run directly gets its own local Ray instead.
        os.environ.pop("RAY_ADDRESS")
        address = ""
    # Ray Train V2 turns a worker's print into a log record and also tees it to stdout once anything (MLflow, rich)
    # has wrapped sys.stdout: every progress line reached the driver twice. Plain prints arrive once. MKL_CBWR: the
    # same reproducible BLAS code path as the driver (orchestrator/__init__.py); workers import torch before us.
    worker_env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO")}
    runtime_env = {"env_vars": {**env.worker_environ(), **RAY_LOCAL_ENV, **worker_env}}
    if address and address != "auto":
        # Ray Train's detached PlacementGroupCleaner asks the state API whether a (killed) controller is alive; with
        # several Ray instances on one host that API cannot pick one unless RAY_ADDRESS names it, and the cleaner
        # dies without freeing the CPUs — a Tune trial stopped by ASHA would then hold its workers' CPUs forever.
        runtime_env["env_vars"]["RAY_ADDRESS"] = address
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, int(cfg.train.num_workers * cfg.train.cpus_per_worker) + 1)
        ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", runtime_env=runtime_env, include_dashboard=False)


def preflight(cfg: JobConfig, env: Env) -> dict:
    """Check S3 credentials, the dataset prefix and MLflow before any worker starts; returns the manifest."""
    elastic.check(cfg)
    manifest = s3.check_prefix(cfg.data.dataset, env)
    bucket, _ = split_s3_uri(cfg.train.storage_path)
    try:
        s3.client(env, fail_fast=True).head_bucket(Bucket=bucket)
    except Exception as e:
        raise s3.DataError(s3.describe_error(e, env, f"s3://{bucket}")) from None
    if cfg.tracking.enabled:
        tracking.check_server(env.mlflow_uri)
    # The domain classifier serves fd_classifier and the quality signals' coverage: train it here, once, so no worker
    # pauses at its first evaluation.
    if cfg.train.metric_kimg > 0 and (cfg.train.metric == "fd_classifier" or cfg.train.quality_signals):
        from orchestrator.train.domain_classifier import ensure_classifier  # DALI loads only when it is needed

        try:
            ensure_classifier(
                cfg.data.dataset, env, manifest=manifest
            )  # trained once here (driver), so workers only load it
        except Exception:
            if cfg.train.metric == "fd_classifier":
                raise
            # coverage/accuracy are optional signals: the evaluator leaves them out and logs why
    return manifest


def make_trainer(
    cfg: JobConfig, env: Env, *, mlflow_run_id: str | None, manifest_hash: str, sha: str, callbacks: list | None = None
):
    """The Ray Train TorchTrainer for one run of ``cfg`` (``fit`` and every Tune trial build theirs here)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.train.loop import LaunchContext, train_loop  # Ray Train and DALI load on the driver only here

    use_gpu = resolve_use_gpu(cfg.train.use_gpu)
    storage_path, filesystem = storage(cfg, env)
    # With the quality metric on, retention keeps the num_to_keep best checkpoints by checkpoint/<metric> (the value
    # measured on exactly those weights; +inf for unmeasured ones); Ray always keeps the latest one too, for resume.
    score = f"checkpoint/{cfg.train.metric}" if cfg.train.metric_kimg > 0 else None
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "launch": LaunchContext(
                job=cfg.to_dict(),
                storage_uri=f"s3://{storage_path}/{cfg.train.name}",
                manifest_hash=manifest_hash,
                git_sha=sha,
                mlflow_run_id=mlflow_run_id,
                mlflow_uri=env.mlflow_uri,
            )
        },
        scaling_config=ScalingConfig(
            num_workers=elastic.scaling_workers(cfg),  # (min, max) when elastic
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.train.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=score, checkpoint_score_order="min"
            ),
            callbacks=callbacks,
        ),
    )


def fit(
    cfg: JobConfig,
    *,
    env: Env | None = None,
    output_dir: str | None = None,
    log=print,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
) -> RunOutcome:
    """Pre-flight, MLflow run, TorchTrainer.fit, final artifacts. A Tune trial passes its sweep's ``parent_run_id``
    (the run becomes a nested child) and ``callbacks=[TuneReportCallback()]``."""
    env = env or Env.from_environ()
    t0 = time.monotonic()
    name = cfg.train.name or f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.train.name = name
    manifest = preflight(cfg, env)
    data_hash = manifest.hash
    sha = git_sha()

    run = _open_run(cfg, env, sha=sha, data_hash=data_hash, parent_run_id=parent_run_id, log=log)
    connect_ray(cfg, env)
    trainer = make_trainer(
        cfg, env, mlflow_run_id=run.run_id if run else None, manifest_hash=data_hash, sha=sha, callbacks=callbacks
    )
    # the device and storage make_trainer resolved, not a second resolution that could disagree
    device = "GPU" if trainer.scaling_config.use_gpu else "CPU"
    log(
        f"training {cfg.model_name} on {cfg.train.num_workers} worker(s), {device}, "
        f"checkpoints → s3://{trainer.run_config.storage_path}/{name}"
    )
    with tracking.failed_on_error(run):
        result = trainer.fit()

    checkpoint_uri = f"s3://{result.checkpoint.path}" if result.checkpoint else None
    _raise_if_stopped(result.metrics or {}, name, checkpoint_uri, run)
    local_ckpt = grid_path = None
    if result.checkpoint:
        out = Path(output_dir or os.environ.get("GANFORGE_OUTPUT_DIR", "outputs")).resolve() / name
        out.mkdir(parents=True, exist_ok=True)
        local_ckpt = str(result.checkpoint.to_directory(str(out / "checkpoint")))
        grid_path = str(out / "samples_final.png")
        final_grid(local_ckpt, grid_path)
        if run:
            _finish_run(cfg, run, result, local_ckpt, grid_path, checkpoint_uri, log)
    return RunOutcome(
        name,
        checkpoint_uri,
        local_ckpt,
        run.url if run else None,
        grid_path,
        dict(result.metrics or {}),
        time.monotonic() - t0,
    )


def _open_run(cfg: JobConfig, env: Env, *, sha: str, data_hash: str, parent_run_id: str | None, log):
    """The run's MLflow run with its parameters and provenance tags, or None with tracking off."""
    if not cfg.tracking.enabled:
        return None
    tags = {
        "git_sha": sha,
        "dataset.manifest_hash": data_hash,
        "dataset.uri": cfg.data.dataset,
        "model": cfg.model_name,
        "ganforge.version": __version__,
    }
    experiment = cfg.tracking.experiment or cfg.model_name
    run = tracking.open_run(env.mlflow_uri, experiment, cfg.train.name, cfg.flat(), tags, parent_run_id=parent_run_id)
    log(f"MLflow run: {run.url}")
    return run


def _finish_run(cfg: JobConfig, run, result, local_ckpt: str, grid_path: str, checkpoint_uri: str | None, log):
    """The best checkpoint's tag, the final grid and checkpoint as artifacts, the registry (when asked)."""
    if cfg.train.metric_kimg > 0 and result.best_checkpoints:
        best = result.get_best_checkpoint(f"checkpoint/{cfg.train.metric}", "min")
        if best is not None:
            tracking.client(run.tracking_uri, check=False).set_tag(run.run_id, "best_checkpoint", f"s3://{best.path}")
    _log_final(run, local_ckpt, grid_path, checkpoint_uri)
    if cfg.tracking.register:  # G_ema as a new version of the registered model (orchestrator/tracking/registry.py)
        _register(cfg, run, local_ckpt, log)


def _raise_if_stopped(metrics: dict[str, Any], name: str, checkpoint_uri: str | None, run) -> None:
    """The divergence guard ended the run (its rollbacks were used up): fail the MLflow run and say why, in one
    line, with where the last healthy checkpoint and the health report are."""
    if not metrics.get(STOPPED):
        return
    if run:
        tracking.close_run(run, status="FAILED")
    where = f"; last healthy checkpoint {checkpoint_uri}" if checkpoint_uri else ""
    report = f"; details: `ganforge report {name}`" if run else ""
    reason = str(metrics.get(STOP_REASON, "no reason recorded")).replace("\n", " ")
    raise TrainingStopped(f"run {name} stopped by the divergence guard: {reason}{where}{report}")


def final_grid(checkpoint_dir: str, path: str, seed: int = 0) -> None:
    """The run's last G_ema on the training grid's fixed latents (the one loader of G_ema from a checkpoint)."""
    gen, job = Generator.with_job_from_checkpoint(checkpoint_dir)
    cfg = JobConfig.from_dict(job)
    cfg.train.seed = seed
    z, c = fixed_latents(gen, cfg.train.grid_size, cfg.train.seed, torch.device("cpu"))
    image_grid(gen.sample(z, c), nrow=cfg.train.grid_size, scale=2).save(path)


def _log_final(run, local_ckpt: str, grid_path: str, checkpoint_uri: str | None) -> None:
    client = tracking.client(run.tracking_uri, check=False)
    client.log_artifact(run.run_id, grid_path, "samples")
    client.log_artifacts(run.run_id, local_ckpt, "checkpoint")
    if checkpoint_uri:
        client.set_tag(run.run_id, "checkpoint_uri", checkpoint_uri)
    client.set_terminated(run.run_id, "FINISHED")


def _register(cfg: JobConfig, run, local_ckpt: str, log) -> None:
    """A failed registration does not fail the finished run: say so in one line, with the command to retry."""
    from orchestrator.tracking.registry import register_run  # MLflow's model flavour loads only to register

    try:
        register_run(
            run.run_id,
            model_name=cfg.tracking.model_name or cfg.model_name,
            tracking_uri=run.tracking_uri,
            checkpoint_dir=local_ckpt,
            log=log,
        )
    except Exception as e:
        log(
            f"model registry: not registered ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"retry with `ganforge models register {run.run_id}`"
        )
