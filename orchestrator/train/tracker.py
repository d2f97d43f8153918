"""What a training run tells people while it runs: rank 0's progress line on stdout (Ray forwards worker output to
the driver) and its MLflow record (metrics, evaluations, sample grids, health events and report) through the
non-blocking ``BackgroundLogger``. On other ranks, and with tracking off, the MLflow side does nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from orchestrator.config import JobConfig
from orchestrator.tracking.mlflow import BackgroundLogger
from orchestrator.train.checkpoint import Quality
from orchestrator.train.evaluation import Evaluation
from orchestrator.train.health import HealthMonitor, events_note, write_report


class Tracker:
    def __init__(self, cfg: JobConfig, rank: int, *, mlflow_run_id: str | None, mlflow_uri: str | None) -> None:
        self.cfg, self.rank, self.metric = cfg, rank, cfg.train.metric
        self.evaluating = cfg.train.metric_kimg > 0
        self.logger = BackgroundLogger(mlflow_run_id, mlflow_uri) if rank == 0 and mlflow_run_id else None
        # the health report's files, which the logger sends from here
        self.health_dir = Path(tempfile.mkdtemp(prefix="ganforge-health-")) if self.logger else None

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def set_tag(self, key: str, value: str) -> None:
        if self.logger:
            self.logger.set_tag(key, value[:5000])

    def progress(
        self,
        step: int,
        metrics: dict[str, float],
        img_per_s: float,
        eta_s: float,
        evaluation: Evaluation | None,
        quality: Quality,
    ) -> None:
        losses = "  ".join(f"{k} {v:7.4f}" for k, v in sorted(metrics.items()) if k.startswith("loss/"))
        score = f"  {self.metric} {quality.last:8.3f} ({evaluation.seconds:.1f} s)" if evaluation else ""
        self.say(
            f"step {step:>6}/{self.cfg.train.steps}  kimg {metrics['progress/kimg']:7.2f}  {losses}  "
            f"{img_per_s:6.0f} img/s  eta {eta_s / 60:5.1f} min{score}"
        )

    def log_tick(
        self,
        step: int,
        tick: int,
        metrics: dict[str, float],
        evaluation: Evaluation | None,
        quality: Quality,
        improved: bool,
        grid: Callable[[], Image.Image],
    ) -> None:
        """The tick's metrics; with an evaluation its one point per metric (not the copies carried in every
        report for the scheduler), the best checkpoint and the reference's origin; a sample grid when due."""
        if not self.logger:
            return
        metric = self.metric
        carried = (metric, f"best/{metric}", f"checkpoint/{metric}") if self.evaluating else ()
        self.logger.log_metrics({k: v for k, v in metrics.items() if k not in carried}, step=step)
        if evaluation:
            self.logger.log_metrics(
                {
                    metric: quality.last,
                    f"best/{metric}": quality.best,
                    "perf/eval_s": evaluation.seconds,
                    **evaluation.signals,
                },
                step=step,
            )
            if improved:
                self.logger.set_tag("best_checkpoint", quality.best_checkpoint)
            self.logger.set_tag(f"{metric}.reference", evaluation.reference_note)
        if tick % self.cfg.train.sample_ticks == 0 or step >= self.cfg.train.steps or evaluation:
            self.logger.log_image(grid(), f"samples/grid_{step:07d}.png")
        if evaluation:  # a scheduler may stop the trial at this report: send the evaluation first (bounded wait)
            self.logger.flush(timeout=5)

    def health_event(self, event, monitor: HealthMonitor) -> None:
        """The guard's event in MLflow (tags, the run's note, events.json) as soon as it happens, so a run that dies
        later still tells what the guard saw."""
        line = f"{event.action} at step {event.step}: {event.reason}"
        self.say(f"health: {line}")
        if not self.logger:
            return
        self.logger.set_tag("health.rollbacks", str(monitor.rollbacks))
        self.logger.set_tag("health.last_event", line[:5000])
        self.logger.set_tag("mlflow.note.content", events_note(monitor.events))
        (self.health_dir / "events.json").write_text(json.dumps([e.to_dict() for e in monitor.events], indent=1))
        self.logger.log_artifact(str(self.health_dir / "events.json"), "health")

    def close(self, monitor: HealthMonitor, stopped: bool) -> None:
        """The run's health status and report, then every pending item sent (bounded wait)."""
        if not self.logger:
            return
        rollbacks = monitor.rollbacks
        status = "stopped" if stopped else f"recovered ({rollbacks} rollbacks)" if rollbacks else "healthy"
        self.logger.set_tag("health.status", status)
        self.logger.set_tag("health.rollbacks", str(rollbacks))
        try:
            write_report(monitor.events, monitor.history, self.health_dir, stopped=stopped)
            self.logger.log_artifacts(str(self.health_dir), "health")
        except Exception as e:  # a report that cannot be drawn must not fail a finished run
            print(f"health: report not written ({type(e).__name__}: {e})", flush=True)
        self.logger.close(timeout=60)
        shutil.rmtree(self.health_dir, ignore_errors=True)
