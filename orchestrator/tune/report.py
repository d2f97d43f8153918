"""Sensitivity report of a sweep: best metric over lr × batch size, metric-vs-kimg curves, a table, compute used.

Pure functions of a list of ``TrialRecord`` (built from Tune's ResultGrid by ``records_from_results``), so the report
is unit-testable from a synthetic table. Files written to ``outputs/<sweep>/``:

    heatmap.png   best metric per (lr, batch size) cell (min over D/G ratios and repeats), stopped-at kimg per cell
    curves.png    metric vs kimg for every trial (ASHA-stopped trials end early)
    trials.csv    one row per trial: id, lr, d_lr_ratio, batch_size, stopped_kimg, best_metric, ... (also trials.md)
    summary.json  compute used vs the full grid run to the end, and the recommended configuration
    report.md     all of the above as one page

Compute: ``kimg`` is the sum over trials of the images each trial trained on (progress/kimg counts every worker's
images); the full grid would be trials × max_kimg. ``cpu_s`` is Σ wall-seconds × workers × CPUs per worker of each
trial (training plus its evaluations and start-up), and ``full_grid_cpu_s`` extrapolates each trial linearly in kimg
to max_kimg.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = [
    "trial_id",
    "lr",
    "d_lr_ratio",
    "batch_size",
    "stopped_kimg",
    "early_stopped",
    "best_metric",
    "best_at_kimg",
    "final_metric",
    "evaluations",
    "wall_s",
    "cpu_s",
    "num_workers",
    "status",
]


@dataclass
class TrialRecord:
    trial_id: str
    lr: float
    d_lr_ratio: float
    batch_size: int
    stopped_kimg: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (kimg, metric) at each evaluation
    wall_s: float = 0.0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    early_stopped: bool = False
    status: str = "TERMINATED"

    @property
    def best_metric(self) -> float:
        values = [v for _, v in self.history if math.isfinite(v)]
        return min(values) if values else math.inf

    @property
    def best_at_kimg(self) -> float:
        finite = [(v, k) for k, v in self.history if math.isfinite(v)]
        return min(finite)[1] if finite else math.nan

    @property
    def final_metric(self) -> float:
        return self.history[-1][1] if self.history else math.inf

    @property
    def cpu_s(self) -> float:
        return self.wall_s * self.num_workers * self.cpus_per_worker

    @property
    def config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "d_lr": self.lr * self.d_lr_ratio,
            "d_lr_ratio": self.d_lr_ratio,
            "batch_size": self.batch_size,
        }

    def row(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "lr": self.lr,
            "d_lr_ratio": self.d_lr_ratio,
            "batch_size": self.batch_size,
            "stopped_kimg": round(self.stopped_kimg, 3),
            "early_stopped": self.early_stopped,
            "best_metric": _r(self.best_metric),
            "best_at_kimg": _r(self.best_at_kimg),
            "final_metric": _r(self.final_metric),
            "evaluations": len(self.history),
            "wall_s": round(self.wall_s, 1),
            "cpu_s": round(self.cpu_s, 1),
            "num_workers": self.num_workers,
            "status": self.status,
        }


def _r(x: float) -> float:
    return round(x, 5) if math.isfinite(x) else x


# ------------------------------------------------------------------------------------------------------ from Tune
def records_from_results(grid, sweep) -> list[TrialRecord]:
    """TrialRecords from a Tune ``ResultGrid`` of a sweep (``sweep``: the SweepConfig)."""
    score = f"checkpoint/{sweep.metric}"  # finite exactly at the ticks that evaluated
    records = []
    for result in grid:
        df = result.metrics_dataframe
        cfg = result.config or {}
        history: list[tuple[float, float]] = []
        kimg = wall = 0.0
        if df is not None and len(df):
            kimg = float(df["progress/kimg"].max()) if "progress/kimg" in df else 0.0
            wall = float(df["time_total_s"].max()) if "time_total_s" in df else 0.0
            if score in df:
                rows = df[df[score].apply(lambda v: v is not None and math.isfinite(float(v)))]
                history = [(float(k), float(v)) for k, v in zip(rows["progress/kimg"], rows[score])]
        trial_id = str((result.metrics or {}).get("trial_id") or Path(str(result.path)).name)
        records.append(
            TrialRecord(
                trial_id=trial_id,
                lr=float(cfg.get("lr", math.nan)),
                d_lr_ratio=float(cfg.get("d_lr_ratio", 1.0)),
                batch_size=int(cfg.get("batch_size", 0)),
                stopped_kimg=kimg,
                history=history,
                wall_s=wall,
                num_workers=sweep.num_workers,
                cpus_per_worker=sweep.cpus_per_worker,
                early_stopped=kimg < sweep.max_kimg - 1e-9 and result.error is None,
                status="ERROR" if result.error is not None else "TERMINATED",
            )
        )
    return sorted(records, key=lambda r: (r.lr, r.batch_size, r.d_lr_ratio, r.trial_id))


# ------------------------------------------------------------------------------------------------------ summary
def compute_summary(records: list[TrialRecord], max_kimg: float) -> dict[str, Any]:
    kimg = sum(r.stopped_kimg for r in records)
    full = len(records) * max_kimg
    full_cpu = sum(r.cpu_s * max_kimg / r.stopped_kimg for r in records if r.stopped_kimg > 0)
    cpu = sum(r.cpu_s for r in records)
    return {
        "trials": len(records),
        "early_stopped": sum(r.early_stopped for r in records),
        "kimg": round(kimg, 3),
        "full_grid_kimg": round(full, 3),
        "saving_x": round(full / kimg, 3) if kimg else math.inf,
        "worker_kimg": round(sum(r.stopped_kimg * r.num_workers for r in records), 3),
        "cpu_s": round(cpu, 1),
        "full_grid_cpu_s": round(full_cpu, 1),
        "cpu_saving_x": round(full_cpu / cpu, 3) if cpu else math.inf,
    }


def recommend(records: list[TrialRecord]) -> dict[str, Any]:
    """The trial with the lowest best metric (ties: the earlier kimg, then the id)."""
    ok = [r for r in records if math.isfinite(r.best_metric)]
    if not ok:
        return {"trial_id": None, "config": None, "best_metric": math.inf}
    best = min(ok, key=lambda r: (r.best_metric, r.best_at_kimg, r.trial_id))
    return {
        "trial_id": best.trial_id,
        "config": best.config,
        "best_metric": best.best_metric,
        "best_at_kimg": best.best_at_kimg,
        "stopped_kimg": best.stopped_kimg,
    }


def markdown_table(records: list[TrialRecord]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        row = r.row()
        lines.append("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_text(summary: dict) -> str:
    c, rec = summary["compute"], summary["recommended"]
    return (
        f"sweep: {c['trials']} trials, {c['early_stopped']} stopped early; {c['kimg']:.1f} kimg trained vs "
        f"{c['full_grid_kimg']:.1f} for the full grid ({c['saving_x']:.2f}× less); {c['cpu_s']:.0f} CPU-s\n"
        f"recommended: {rec['config']}  best {summary['metric']} {rec['best_metric']:.4g} "
        f"(trial {rec['trial_id']})\nreport: {summary['report_dir']}"
    )


# ------------------------------------------------------------------------------------------------------ files
def write_report(
    records: list[TrialRecord], out: str | Path, *, metric: str, max_kimg: float, wall_s: float | None = None
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in records:
            w.writerow(r.row())
    table = markdown_table(records)
    (out / "trials.md").write_text(table)
    heatmap(records, out / "heatmap.png", metric)
    curves(records, out / "curves.png", metric, max_kimg)
    summary = {
        "metric": metric,
        "max_kimg": max_kimg,
        "report_dir": str(out),
        "wall_s": wall_s,
        "compute": compute_summary(records, max_kimg),
        "recommended": recommend(records),
        "trials": [{**r.row(), "history": r.history} for r in records],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    c, rec = summary["compute"], summary["recommended"]
    (out / "report.md").write_text(
        f"# Sweep sensitivity ({metric}, lower is better)\n\n![best {metric}](heatmap.png)\n\n![curves](curves.png)\n\n"
        f"## Trials\n\n{table}\n## Compute\n\n"
        f"- trained: {c['kimg']} kimg over {c['trials']} trials ({c['early_stopped']} stopped early by the scheduler)\n"
        f"- full grid to {max_kimg} kimg: {c['full_grid_kimg']} kimg → {c['saving_x']}× less\n"
        f"- CPU-seconds: {c['cpu_s']} (full grid, extrapolated: {c['full_grid_cpu_s']}; {c['cpu_saving_x']}× less)\n\n"
        f"## Recommended\n\n`{rec['config']}` — best {metric} {rec['best_metric']} at {rec.get('best_at_kimg')} kimg "
        f"(trial {rec['trial_id']})\n"
    )
    return summary


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(records: list[TrialRecord], path: str | Path, metric: str) -> None:
    """Best metric per (lr, batch size): min over ratios/repeats; the cell text also says where it stopped."""
    import numpy as np

    plt = _plt()
    lrs = sorted({r.lr for r in records})
    batches = sorted({r.batch_size for r in records})
    grid = np.full((len(batches), len(lrs)), np.nan)
    stopped = np.zeros_like(grid)
    for r in records:
        i, j = batches.index(r.batch_size), lrs.index(r.lr)
        if math.isfinite(r.best_metric) and not (grid[i, j] <= r.best_metric):
            grid[i, j], stopped[i, j] = r.best_metric, r.stopped_kimg
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(lrs), 1.4 + 0.9 * len(batches)), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")
    for i in range(len(batches)):
        for j in range(len(lrs)):
            if np.isfinite(grid[i, j]):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.3g}\n@{stopped[i, j]:.3g} kimg",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="w" if grid[i, j] > np.nanmean(grid) else "k",
                )
    ax.set_xticks(range(len(lrs)), [f"{v:.2g}" for v in lrs])
    ax.set_yticks(range(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("learning rate (G)")
    ax.set_ylabel("batch size per worker")
    ax.set_title(f"best {metric} (lower is better)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curves(records: list[TrialRecord], path: str | Path, metric: str, max_kimg: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in records:
        if r.history:
            k, v = zip(*r.history)
            label = f"lr {r.lr:.2g} bs {r.batch_size}" + (f" r {r.d_lr_ratio:g}" if r.d_lr_ratio != 1 else "")
            ax.plot(k, v, marker="o", ms=3, ls="--" if r.early_stopped else "-", label=label)
    ax.set_xlabel("kimg")
    ax.set_ylabel(metric)
    ax.set_xlim(0, max_kimg * 1.02)
    ax.set_title(f"{metric} vs kimg (dashed: stopped early)")
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
