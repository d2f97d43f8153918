"""The per-worker training loop that Ray Train runs on every rank: ``TrainLoop(ctx).run()``.

    restore (or init) → for each real batch: recipe.train_step → every tick: signals averaged over every rank's
    steps, the quality metric when due (every metric_kimg), the health monitor's verdict, reports (progress line,
    MLflow, sample grid), then by verdict: a full checkpoint every K ticks and at every evaluation (healthy), a
    rollback to the last healthy checkpoint with lower learning rates, or a stop → final checkpoint and health report.

It knows the GAN only through the Recipe interface and the data only through ShardLoader. Every rank runs its own
``HealthMonitor`` on the same all-reduced signals, so all reach the same verdict without another collective; the
rollback target is each rank's CPU copy of the last checkpoint written while healthy (no S3 round trip).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

import gan_models
from gan_models.protocol import Recipe
from orchestrator.config import JobConfig
from orchestrator.data.loader import ShardLoader
from orchestrator.env import Env
from orchestrator.generator import fixed_latents
from orchestrator.tracking.images import image_grid
from orchestrator.train import checkpoint as ckpt
from orchestrator.train import ddp, elastic, evaluation
from orchestrator.train.checkpoint import Quality, Snapshot, TrainState
from orchestrator.train.health import (
    OK,
    ROLLBACK,
    STOP,
    STOP_REASON,
    STOPPED,
    WARN,
    HealthMonitor,
    Verdict,
    ema_drift,
    loss_ratio,
)
from orchestrator.train.tracker import Tracker


@dataclass(frozen=True)
class LaunchContext:
    """What the driver hands every worker (through Ray's ``train_loop_config``) besides the config."""

    job: dict[str, Any]  # JobConfig.to_dict() of the resolved config
    storage_uri: str  # s3://bucket/prefix/<run name>: where Ray Train writes this run's checkpoints
    manifest_hash: str = "unknown"  # of the dataset the driver checked
    git_sha: str = "unknown"
    mlflow_run_id: str | None = None  # None: tracking off
    mlflow_uri: str | None = None


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    """Ray Train's entry point on every worker."""
    TrainLoop(loop_config["launch"]).run()


class TrainLoop:
    def __init__(self, ctx: LaunchContext) -> None:
        quiet_ray_reports()
        ray_ctx = ray.train.get_context()
        self.ctx, self.rank, self.world = ctx, ray_ctx.get_world_rank(), ray_ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        cfg = JobConfig.from_dict(ctx.job)
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        cfg, resized = elastic.adapt(cfg, self.world)  # an elastic run on fewer workers than configured
        self.cfg, self.metric = cfg, cfg.train.metric
        if resized and self.rank == 0:
            print(f"elastic: {resized}", flush=True)
        seed_all(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.recipe: Recipe = gan_models.make_recipe(cfg.model_name, cfg.model, cfg.hparams)
        self.recipe.setup(
            self.device,
            ray.train.torch.prepare_model,
            amp=cfg.train.amp and self.device.type == "cuda",
            accumulate=cfg.train.accumulate,
            compile=cfg.train.compile,
        )
        self.loader = ShardLoader(
            cfg.data, rank=self.rank, world_size=self.world, device=self.device, env=Env.from_environ()
        )
        self.replicas = {"G": self.recipe.G, "D": self.recipe.D, "G_ema": self.recipe.G_ema}
        self.monitor = HealthMonitor(cfg.health, base_lrs=self.recipe.base_lrs())
        self.step, self.tick, self.quality, self.drill_done = 0, 0, Quality(), False
        self.restore()
        self.global_batch = cfg.data.batch_size * self.world
        self.tracker = Tracker(cfg, self.rank, mlflow_run_id=ctx.mlflow_run_id, mlflow_uri=ctx.mlflow_uri)
        self.evaluator = None
        if cfg.train.metric_kimg > 0:
            self.evaluator = evaluation.Evaluator(
                cfg,
                self.recipe,
                rank=self.rank,
                world=self.world,
                device=self.device,
                env=self.loader.env,
                manifest=self.loader.manifest,
                manifest_hash=ctx.manifest_hash,
            )
        self.grid_latents = fixed_latents(self.recipe, cfg.train.grid_size, cfg.train.seed, self.device)
        self.prev_kimg = self.kimg
        # The rollback target until the first healthy checkpoint: the state training starts (or resumes) from.
        self.good = Snapshot.take(self.step, self.tick, self.recipe.state_dict(), self.quality)
        self.stats = ddp.TickStats()
        self.stop_reason: str | None = None

    @property
    def kimg(self) -> float:
        return self.step * self.global_batch / 1000.0

    def restore(self) -> None:
        """Continue from Ray Train's latest checkpoint, if any; then seed this rank's own streams."""
        restored = ray.train.get_checkpoint()
        if not restored:
            seed_all(self.cfg.train.seed + 1000 * self.rank + 1)  # different latents per rank from here on
            return
        # onto the CPU: modules and optimisers copy what they hold to the parameters' device themselves, and Adam's
        # step counters must stay on the CPU (load_optimizer_state)
        state, mine = ckpt.restore(restored, self.rank, map_location="cpu")
        self.recipe.load_state_dict(state.recipe)
        self.step, self.tick, self.quality = state.step, state.tick, state.quality
        if state.health is not None:  # resuming continues the guard's state: rollback count, lr scale, history
            self.monitor.load_state_dict(state.health)
            self.drill_done = state.fire_drill_done
        if mine is not None:  # same world size: continue this rank's streams exactly
            ckpt.set_rng_state(mine.rng)
            self.loader.load_state_dict(mine.loader)
        else:
            seed_all(self.cfg.train.seed + 1000 * self.rank + self.step)

    def run(self) -> None:
        if self.monitor.stopped:  # resumed from the checkpoint of a stop that the config in force still upholds
            self.stop_reason = self.monitor.events[-1].reason if self.monitor.events else "stopped earlier"
            self.tracker.say(
                f"health: this run was stopped by the divergence guard ({self.stop_reason}); resubmit "
                f"it with health.max_rollbacks > {self.monitor.rollbacks} to continue from its last "
                "healthy state"
            )
        batches = iter(self.loader)
        self.t_tick, self.tick_steps = time.perf_counter(), 0
        while self.step < self.cfg.train.steps and not self.monitor.stopped:
            self.maybe_fire_drill()
            self.stats.add(self.recipe.train_step(*next(batches)))
            self.step += 1
            self.tick_steps += 1
            if (
                self.step % self.cfg.train.tick_steps == 0 or self.step >= self.cfg.train.steps
            ) and not self.end_tick():
                break
        self.loader.close()
        self.tracker.close(self.monitor, stopped=bool(self.stop_reason))

    def maybe_fire_drill(self) -> None:
        """Inject the configured fault (``health.fire_drill``) once; identical on every rank, as a real fault."""
        drill = self.cfg.health.drill
        if not drill or self.drill_done or self.step < drill.step:
            return
        drill.apply(self.recipe, self.monitor.lr_scale)
        self.drill_done = True
        self.tracker.say(f"health: fire drill at step {self.step}: {drill.describe()}")
        self.tracker.set_tag("health.fire_drill", f"{self.cfg.health.fire_drill} (applied at step {self.step})")

    def end_tick(self) -> bool:
        """Signals, evaluation, verdict, reports and the verdict's checkpoint; False when the guard stops the run."""
        self.tick += 1
        elapsed = time.perf_counter() - self.t_tick
        ddp.broadcast_buffers(self.replicas)  # BN statistics drift per rank; rank 0's are the run's
        img_per_s = self.global_batch * self.tick_steps / elapsed
        metrics = self.tick_metrics(img_per_s)
        last = self.step >= self.cfg.train.steps
        result = self.maybe_evaluate(last)
        signals = dict(metrics)  # what the monitor sees: evaluations only on the tick they were measured
        if result:
            signals.update({self.metric: result.value, **result.signals})
        verdict = self.monitor.update(signals, step=self.step, tick=self.tick)
        metrics.update(self.monitor.metrics())
        if verdict.action == STOP:
            metrics[STOPPED] = 1.0
        ckpt_name, improved = self.record_quality(result, healthy=verdict.action in (OK, WARN), metrics=metrics)
        eta_s = (self.cfg.train.steps - self.step) * elapsed / self.tick_steps
        self.tracker.progress(self.step, metrics, img_per_s, eta_s, result, self.quality)
        self.tracker.log_tick(self.step, self.tick, metrics, result, self.quality, improved, grid=self.grid)
        if verdict.event is not None:
            self.tracker.health_event(verdict.event, self.monitor)
        go_on = self.act_on(verdict, metrics, ckpt_name, checkpoint_due=last or result is not None)
        self.stats.clear()
        self.t_tick, self.tick_steps = time.perf_counter(), 0
        return go_on

    def tick_metrics(self, img_per_s: float) -> dict[str, float]:
        metrics = self.stats.reduce()  # collective: every rank's steps, the same values on every rank
        metrics["health/ema_drift"] = ema_drift(self.recipe.G, self.recipe.G_ema)
        if (ratio := loss_ratio(metrics)) is not None:
            metrics["health/loss_ratio"] = ratio
        metrics.update(
            {
                "perf/img_per_s": img_per_s,
                "perf/s_per_kimg": 1000.0 / img_per_s,
                "progress/kimg": self.kimg,
                "data/skipped": float(self.loader.skipped),
            }
        )
        return metrics

    def maybe_evaluate(self, last: bool) -> evaluation.Evaluation | None:
        """The quality metric when a multiple of metric_kimg was crossed (and at the end); collective."""
        due = self.evaluator is not None and evaluation.due(self.prev_kimg, self.kimg, self.cfg.train.metric_kimg, last)
        self.prev_kimg = self.kimg
        return self.evaluator.evaluate() if due else None

    def record_quality(
        self, result: evaluation.Evaluation | None, *, healthy: bool, metrics: dict[str, float]
    ) -> tuple[str | None, bool]:
        """Update the quality record; returns (the checkpoint's name when its path must be known in advance, whether
        the metric improved). Every report carries the metric for schedulers (ASHA)."""
        ckpt_name, improved = None, False  # None: Ray's default name (a timestamp)
        if result:
            self.quality.last = result.value
            if healthy:  # weights a rollback discards are never the best checkpoint
                improved = result.value < self.quality.best
                ckpt_name = f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"  # Ray uses rank 0's name
                if improved:
                    self.quality.best = result.value
                    self.quality.best_checkpoint = f"{self.ctx.storage_uri}/{ckpt_name}"
        if self.evaluator:
            # Carry the last value (+inf before the first one). Checkpoints are scored by checkpoint/<metric>: the
            # value of exactly these weights, +inf if unmeasured.
            measured = self.quality.last if result and healthy else math.inf
            metrics.update(
                {
                    self.metric: self.quality.last,
                    f"best/{self.metric}": self.quality.best,
                    f"checkpoint/{self.metric}": measured,
                }
            )
        return ckpt_name, improved

    def act_on(self, verdict: Verdict, metrics: dict[str, float], ckpt_name: str | None, checkpoint_due: bool) -> bool:
        """Checkpoint, roll back or stop, as the verdict says; False when the run must stop."""
        bad_step = self.step
        if verdict.action in (ROLLBACK, STOP):
            self.roll_back()
            if self.evaluator:  # the checkpoint below holds restored, unmeasured weights
                metrics[f"checkpoint/{self.metric}"] = math.inf
        if verdict.action == ROLLBACK:
            self.recipe.set_lr_scale(verdict.lr_scale)
            lrs = ", ".join(f"{k} {v:.3g}" for k, v in (verdict.lrs or {}).items())
            self.tracker.say(
                f"health: rolled back from step {bad_step} to step {self.step} (rollback "
                f"{self.monitor.rollbacks}/{self.cfg.health.max_rollbacks}); learning rates now {lrs}"
            )
            # A checkpoint of the restored state with the lowered lrs and the monitor's count: a crash from here
            # resumes where the guard left it, not before the rollback.
            self.good = self.save(metrics, None)
        elif verdict.action == STOP:
            self.stop_reason = f"at step {bad_step}: {verdict.reason}"
            self.tracker.set_tag("health.stop_reason", self.stop_reason)
            # The run's last checkpoint holds the last healthy state again, never the diverged weights, and its
            # report carries the reason to the driver (Ray's result is the latest checkpoint's report), which fails
            # the run with it. Resubmitting the run with a larger health.max_rollbacks continues from there.
            self.save({**metrics, STOP_REASON: self.stop_reason}, None)
            return False
        elif self.tick % self.cfg.train.checkpoint_ticks == 0 or checkpoint_due:
            self.good = self.save(metrics, ckpt_name)
        else:
            ray.train.report(metrics)
        return True

    def roll_back(self) -> None:
        """Back to the last healthy checkpoint's weights, optimiser moments and counters; the data stream and RNGs
        go on (the same batches would lead to the same place), the monitor keeps its rollback count."""
        self.step, self.tick = self.good.step, self.good.tick
        self.recipe.load_state_dict(ckpt.copy_state(self.good.recipe, "cpu"))  # private: loading on CPU may share
        self.quality = Quality(**vars(self.good.quality))
        self.prev_kimg = self.kimg

    def save(self, metrics: dict[str, Any], name: str | None) -> Snapshot:
        """Full checkpoint of the current state (every rank its part) reported with ``metrics``; returns the state
        it holds as a CPU snapshot, the next rollback target."""
        snap = Snapshot.take(self.step, self.tick, self.recipe.state_dict(), self.quality)
        state = meta = None
        if self.rank == 0:
            state = TrainState(
                recipe=snap.recipe,
                step=self.step,
                tick=self.tick,
                config=self.cfg.to_dict(),
                quality=self.quality,
                health=self.monitor.state_dict(),
                fire_drill_done=self.drill_done,
            )
            meta = ckpt.Meta(
                step=self.step,
                tick=self.tick,
                kimg=self.kimg,
                world_size=self.world,
                git_sha=self.ctx.git_sha,
                manifest_hash=self.ctx.manifest_hash,
            )
        mine = ckpt.RankState(
            rng=ckpt.rng_state(),
            loader=self.loader.state_dict(),
            shards=list(self.loader.shards),
            fingerprint=ddp.assert_in_sync(self.replicas),
            node_id=ray.get_runtime_context().get_node_id(),
        )
        with tempfile.TemporaryDirectory() as d:
            ckpt.save(d, rank=self.rank, rank_state=mine, train=state, meta=meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        return snap

    def grid(self):
        z, c = self.grid_latents
        return image_grid(self.recipe.sample(z, c), nrow=self.cfg.train.grid_size, scale=2)
