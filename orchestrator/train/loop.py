"""The per-worker training loop that Ray Train runs on every rank. It reads top to bottom:

    restore (or init) → for each real batch: recipe.train_step → every tick: signals averaged over every rank's
    steps, the quality metric when due (every metric_kimg), the health monitor's verdict, report metrics, sample
    grid (rank 0), then by verdict: a full checkpoint every K ticks and at every evaluation (healthy), a rollback to
    the last healthy checkpoint with lower learning rates, or a stop → final checkpoint and health report.

It knows the GAN only through the Recipe interface and the data only through ShardLoader. Every rank runs its own
``HealthMonitor`` on the same all-reduced signals, so all reach the same verdict without another collective; the
rollback target is each rank's CPU copy of the last checkpoint written while healthy (no S3 round trip).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

import gan_models
from gan_models.protocol import Recipe
from gan_models.steps import read_metrics
from orchestrator.config import JobConfig
from orchestrator.data.loader import ShardLoader
from orchestrator.env import Env
from orchestrator.tracking.images import image_grid
from orchestrator.train import checkpoint as ckpt
from orchestrator.train import ddp, elastic, evaluation
from orchestrator.train.health import OK, ROLLBACK, STOP, WARN, HealthMonitor, ema_drift, events_note, loss_ratio

STOPPED, STOP_REASON = "health/stopped", "health/stop_reason"  # in the last report of a run the guard stopped


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fixed_latents(recipe: Recipe, cfg: JobConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same latents every tick, so grids show training progress rather than sampling noise.

    Row r of the grid holds class r (mod the class count) for conditional models.
    """
    n = cfg.train.grid_size**2
    g = torch.Generator().manual_seed(cfg.train.seed + 12345)
    z = recipe.latents(n, g).to(device)
    if not recipe.c_dim:
        return z, None
    c = (torch.arange(n) // cfg.train.grid_size) % recipe.c_dim
    return z, c.to(device)


def copy_state(obj: Any, device: torch.device | str = "cpu") -> Any:
    """A deep copy of a nested state dict with every tensor copied to ``device``. Optimisers update their state in
    place, and loading a state dict on the same device may share its tensors, so a snapshot is copied both when
    taken and when restored. Module state dicts keep their ``_metadata`` (version info ``load_state_dict`` reads)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        kind = OrderedDict if isinstance(obj, OrderedDict) else dict
        out = kind((k, copy_state(v, device)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(copy_state(v, device) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """The state of the last checkpoint written while healthy, in CPU memory: what a rollback restores."""

    step: int
    tick: int
    recipe: dict[str, Any]
    quality: dict[str, Any]


def reduce_tick(sums: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, float]:
    """The tick's mean of every signal over all steps of all ranks (Σ values / Σ counts, float64), identical on
    every rank, so every rank's health monitor reaches the same verdict. A NaN/inf on one rank makes the mean
    non-finite everywhere. A signal only some ranks reported is averaged over the steps that reported it.

    ``sums`` hold Python floats or 0-d device tensors (the recipes keep step metrics on the device): they are read
    back here once per tick, in one transfer, not once per metric per step."""
    if not ddp.active():
        return read_metrics({k: v / counts[k] for k, v in sums.items()})
    every: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(sums))
    keys = sorted(set().union(*every))
    if not keys:
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64).to(device).reshape(()) for k in keys]
    steps = torch.tensor([float(counts.get(k, 0)) for k in keys], dtype=torch.float64, device=device)
    t = torch.cat([torch.stack(values), steps])
    dist.all_reduce(t)
    n = len(keys)
    return dict(zip(keys, (t[:n] / t[n:]).tolist(), strict=True))


def apply_fire_drill(recipe: Recipe, drill, lr_scale: float) -> None:
    """Inject the configured fault (``health.fire_drill``); identical on every rank, as a real fault under DDP."""
    if drill.kind == "lr_spike":
        recipe.set_lr_scale(lr_scale * drill.factor)
    else:  # "nan": a corrupted update; the whole tensor, so every sample's forward is poisoned
        with torch.no_grad():
            next(recipe.G.parameters()).fill_(math.nan)


def quiet_ray_reports() -> None:
    """One line per report is ours, not Ray's: Ray Train V2 logs every ``report`` at INFO through a logger named by
    its module's file path (not under ``ray.train``), which its worker logging config sends to the console."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # another Ray layout: at worst the per-report lines come back
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


def train_loop(loop_config: dict[str, Any]) -> None:
    quiet_ray_reports()
    cfg = JobConfig.from_dict(loop_config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    use_amp = cfg.train.amp and device.type == "cuda"

    cfg, resized = elastic.adapt(cfg, world)  # an elastic run on fewer workers than configured
    if resized and rank == 0:
        print(f"elastic: {resized}", flush=True)
    seed_all(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    recipe: Recipe = gan_models.make_recipe(cfg.model_name, cfg.model, cfg.hparams)
    recipe.setup(device, ray.train.torch.prepare_model, amp=use_amp, accumulate=cfg.train.accumulate,
                 compile=cfg.train.compile)  # fmt: skip
    loader = ShardLoader(cfg.data, rank=rank, world_size=world, device=device, env=Env.from_environ())

    step, tick = 0, 0
    metric = cfg.train.metric
    # last/best value of the quality metric and where the best checkpoint is; +inf until the first evaluation
    quality: dict[str, Any] = {"last": math.inf, "best": math.inf, "best_checkpoint": None}
    monitor = HealthMonitor(cfg.health, base_lrs=recipe.base_lrs())
    drill, drill_done = cfg.health.drill, False
    restored = ray.train.get_checkpoint()
    if restored:
        # onto the CPU: modules and optimisers copy what they hold to the parameters' device themselves, and Adam's
        # step counters must stay on the CPU (load_optimizer_state)
        shared, mine = ckpt.restore(restored, rank, map_location="cpu")
        recipe.load_state_dict(shared["recipe"])
        step, tick = shared["step"], shared["tick"]
        quality.update(shared.get("quality", {}))
        if "health" in shared:  # resuming continues the guard's state: rollback count, lr scale, history
            monitor.load_state_dict(shared["health"])
            drill_done = shared.get("fire_drill_done", False)
        if mine is not None:  # same world size: continue this rank's streams exactly
            ckpt.set_rng_state(mine["rng"])
            loader.load_state_dict(mine["loader"])
        else:
            seed_all(cfg.train.seed + 1000 * rank + step)
    else:
        seed_all(cfg.train.seed + 1000 * rank + 1)  # different latents per rank from here on

    logger = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from orchestrator.tracking.mlflow import BackgroundLogger

        logger = BackgroundLogger(loop_config["mlflow_run_id"], loop_config["mlflow_uri"])
    evaluator = None
    if cfg.train.metric_kimg > 0:
        evaluator = evaluation.Evaluator(cfg, recipe, rank=rank, world=world, device=device, env=loader.env,
                                         manifest=loader.manifest, manifest_hash=loop_config.get("manifest_hash")
                                         or "unknown")  # fmt: skip
    grid_z, grid_c = fixed_latents(recipe, cfg, device)
    global_batch = cfg.data.batch_size * world
    prev_kimg = step * global_batch / 1000.0
    # The rollback target until the first healthy checkpoint: the state training starts (or resumes) from.
    good = Snapshot(step, tick, copy_state(recipe.state_dict()), copy.deepcopy(quality))
    health_dir = Path(tempfile.mkdtemp(prefix="ganforge-health-")) if logger else None  # files the logger sends

    def save_checkpoint(metrics: dict[str, Any], name: str | None) -> Snapshot:
        """Full checkpoint of the current state (every rank its part) reported with ``metrics``; returns the state
        it holds as a CPU snapshot, the next rollback target."""
        snap = Snapshot(step, tick, copy_state(recipe.state_dict()), copy.deepcopy(quality))
        with tempfile.TemporaryDirectory() as d:
            shared = meta = None
            if rank == 0:
                shared = {"recipe": snap.recipe, "step": step, "tick": tick, "config": cfg.to_dict(),
                          "quality": quality, "health": monitor.state_dict(),
                          "fire_drill_done": drill_done}  # fmt: skip
                meta = {"step": step, "tick": tick, "kimg": step * global_batch / 1000.0, "world_size": world,
                        "git_sha": loop_config.get("git_sha", "unknown"),
                        "manifest_hash": loop_config.get("manifest_hash")}  # fmt: skip
            rank_state = {"rng": ckpt.rng_state(), "loader": loader.state_dict(), "shards": list(loader.shards),
                          "fingerprint": ddp.assert_in_sync(replicas),
                          "node_id": ray.get_runtime_context().get_node_id()}  # fmt: skip
            ckpt.save(d, rank=rank, rank_state=rank_state, shared=shared, meta=meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        return snap

    def log_event(event) -> None:
        """Rank 0: the event in MLflow (tags, the run's note, events.json) as soon as it happens, so a run that
        dies later still tells what the guard saw."""
        line = f"{event.action} at step {event.step}: {event.reason}"
        if rank == 0:
            print(f"health: {line}", flush=True)
        if not logger:
            return
        logger.set_tag("health.rollbacks", str(monitor.rollbacks))
        logger.set_tag("health.last_event", line[:5000])
        logger.set_tag("mlflow.note.content", events_note(monitor.events))
        (health_dir / "events.json").write_text(json.dumps([e.to_dict() for e in monitor.events], indent=1))
        logger.log_artifact(str(health_dir / "events.json"), "health")

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    tick_steps, t_tick = 0, time.perf_counter()
    batches = iter(loader)
    replicas = {"G": recipe.G, "D": recipe.D, "G_ema": recipe.G_ema}
    stop_reason = None
    if monitor.stopped:  # resumed from the checkpoint of a stop that the config in force still upholds
        stop_reason = monitor.events[-1].reason if monitor.events else "stopped earlier"
        if rank == 0:
            print(f"health: this run was stopped by the divergence guard ({stop_reason}); resubmit it with "
                  f"health.max_rollbacks > {monitor.rollbacks} to continue from its last healthy state",
                  flush=True)  # fmt: skip
    while step < cfg.train.steps and not monitor.stopped:
        if drill and not drill_done and step >= drill.step:
            apply_fire_drill(recipe, drill, monitor.lr_scale)
            drill_done = True
            if rank == 0:
                print(f"health: fire drill at step {step}: {drill.describe()}", flush=True)
            if logger:
                logger.set_tag("health.fire_drill", f"{cfg.health.fire_drill} (applied at step {step})")
        images, labels = next(batches)
        for k, v in recipe.train_step(images, labels).items():  # phases like G or R1 steps report only when run
            sums[k] += v
            counts[k] += 1
        step += 1
        tick_steps += 1
        if step % cfg.train.tick_steps and step < cfg.train.steps:
            continue

        tick += 1
        elapsed = time.perf_counter() - t_tick
        ddp.broadcast_buffers(replicas)  # BN statistics drift per rank; rank 0's are the run's
        img_per_s = global_batch * tick_steps / elapsed
        metrics = reduce_tick(sums, counts)  # collective: every rank's steps, the same values on every rank
        metrics["health/ema_drift"] = ema_drift(recipe.G, recipe.G_ema)
        if (ratio := loss_ratio(metrics)) is not None:
            metrics["health/loss_ratio"] = ratio
        metrics.update({
            "perf/img_per_s": img_per_s,
            "perf/s_per_kimg": 1000.0 / img_per_s,
            "progress/kimg": step * global_batch / 1000.0,
            "data/skipped": float(loader.skipped),
        })  # fmt: skip
        last = step >= cfg.train.steps
        kimg = metrics["progress/kimg"]
        evaluated = evaluator is not None and evaluation.due(prev_kimg, kimg, cfg.train.metric_kimg, last)
        prev_kimg = kimg
        signals = dict(metrics)  # what the monitor sees: evaluations only on the tick they were measured
        quality_signals: dict[str, float] = {}
        if evaluated:
            value = evaluator.evaluate()  # collective: every rank, same value
            quality_signals = dict(getattr(evaluator, "last_signals", {}) or {})
            signals.update({metric: value, **quality_signals})
        verdict = monitor.update(signals, step=step, tick=tick)
        healthy = verdict.action in (OK, WARN)
        metrics.update(monitor.metrics())
        if verdict.action == STOP:
            metrics[STOPPED] = 1.0
        ckpt_name = None  # Ray's default name (a timestamp); chosen here when the path must be known in advance
        improved = False
        if evaluated:
            quality["last"] = value
            if healthy:  # weights a rollback discards are never the best checkpoint
                improved = value < quality["best"]
                ckpt_name = f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"  # Ray uses rank 0's name
                if improved:
                    quality.update(best=value, best_checkpoint=f"{loop_config.get('storage_uri', '')}/{ckpt_name}")
        if evaluator:
            # Schedulers (ASHA) need the metric in every result: carry the last value (+inf before the first one).
            # Checkpoints are scored by checkpoint/<metric>: the value of exactly these weights, +inf if unmeasured.
            measured = quality["last"] if evaluated and healthy else math.inf
            metrics.update(
                {metric: quality["last"], f"best/{metric}": quality["best"], f"checkpoint/{metric}": measured}
            )
        if rank == 0:  # Ray forwards worker stdout to the driver: the user's progress line
            eta = (cfg.train.steps - step) * elapsed / tick_steps
            losses = "  ".join(f"{k} {v:7.4f}" for k, v in sorted(metrics.items()) if k.startswith("loss/"))
            score = f"  {metric} {quality['last']:8.3f} ({evaluator.last_seconds:.1f} s)" if evaluated else ""
            print(f"step {step:>6}/{cfg.train.steps}  kimg {metrics['progress/kimg']:7.2f}  {losses}  "
                  f"{img_per_s:6.0f} img/s  eta {eta / 60:5.1f} min{score}", flush=True)  # fmt: skip
        if logger:
            carried = (metric, f"best/{metric}", f"checkpoint/{metric}") if evaluator else ()
            logger.log_metrics({k: v for k, v in metrics.items() if k not in carried}, step=step)
            if evaluated:  # MLflow gets one point per evaluation, not the carried copies
                logger.log_metrics({metric: quality["last"], f"best/{metric}": quality["best"],
                                    "perf/eval_s": evaluator.last_seconds, **quality_signals}, step=step)  # fmt: skip
                if improved:
                    logger.set_tag("best_checkpoint", quality["best_checkpoint"])
                logger.set_tag(f"{metric}.reference", "cached in S3" if evaluator.ref_cached
                               else f"computed in {evaluator.ref_seconds:.1f} s")  # fmt: skip
            if tick % cfg.train.sample_ticks == 0 or step >= cfg.train.steps or evaluated:
                grid = image_grid(recipe.sample(grid_z, grid_c), nrow=cfg.train.grid_size, scale=2)
                logger.log_image(grid, f"samples/grid_{step:07d}.png")
            if evaluated:  # a scheduler may stop the trial at this report: send the evaluation first (bounded wait)
                logger.flush(timeout=5)
        if verdict.event is not None:
            log_event(verdict.event)

        if verdict.action in (ROLLBACK, STOP):
            # Back to the last healthy checkpoint's weights, optimiser moments and counters; the data stream and
            # RNGs go on (the same batches would lead to the same place), the monitor keeps its rollback count.
            bad_step, step, tick = step, good.step, good.tick
            recipe.load_state_dict(copy_state(good.recipe, "cpu"))  # a private copy: loading on the CPU may share
            quality.clear()
            quality.update(copy.deepcopy(good.quality))
            prev_kimg = step * global_batch / 1000.0
            if evaluator:
                metrics[f"checkpoint/{metric}"] = math.inf  # the checkpoint below holds restored, unmeasured weights
        if verdict.action == ROLLBACK:
            recipe.set_lr_scale(verdict.lr_scale)
            lrs = ", ".join(f"{k} {v:.3g}" for k, v in (verdict.lrs or {}).items())
            if rank == 0:
                print(f"health: rolled back from step {bad_step} to step {step} (rollback {monitor.rollbacks}/"
                      f"{cfg.health.max_rollbacks}); learning rates now {lrs}", flush=True)  # fmt: skip
            # A checkpoint of the restored state with the lowered lrs and the monitor's count: a crash from here
            # resumes where the guard left it, not before the rollback.
            good = save_checkpoint(metrics, None)
        elif verdict.action == STOP:
            stop_reason = f"at step {bad_step}: {verdict.reason}"
            if logger:
                logger.set_tag("health.stop_reason", stop_reason[:5000])
            # The run's last checkpoint holds the last healthy state again, never the diverged weights, and its
            # report carries the reason to the driver (Ray's result is the latest checkpoint's report), which fails
            # the run with it. Resubmitting the run with a larger health.max_rollbacks continues from there.
            save_checkpoint({**metrics, STOP_REASON: stop_reason}, None)
            break
        elif tick % cfg.train.checkpoint_ticks == 0 or last or evaluated:
            good = save_checkpoint(metrics, ckpt_name)
        else:
            ray.train.report(metrics)
        sums.clear()
        counts.clear()
        tick_steps, t_tick = 0, time.perf_counter()

    loader.close()
    if logger:
        from orchestrator.report import write_report

        status = "stopped" if stop_reason else f"recovered ({monitor.rollbacks} rollbacks)" if monitor.rollbacks \
            else "healthy"  # fmt: skip
        logger.set_tag("health.status", status)
        logger.set_tag("health.rollbacks", str(monitor.rollbacks))
        try:
            write_report(monitor.events, monitor.history, health_dir, stopped=bool(stop_reason))
            logger.log_artifacts(str(health_dir), "health")
        except Exception as e:  # a report that cannot be drawn must not fail a finished run
            print(f"health: report not written ({type(e).__name__}: {e})", flush=True)
        logger.close(timeout=60)
        shutil.rmtree(health_dir, ignore_errors=True)
