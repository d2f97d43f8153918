"""A run's training-health report: written by rank 0 at the end of every run, shown by ``ganforge report <run>``.

The report is three MLflow artifacts under ``health/``: ``report.md`` (status, signal table, events; the markdown of
``health_report_markdown``), ``health.png`` (``health_plot``: losses, D outputs and sign accuracy, gradient norms,
evaluations, rollback markers) and ``events.json`` (every health event, machine-readable). A run without them (older
runs, or one that crashed before its end) gets the report rebuilt from its MLflow metric history.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.train.health import (
    ROLLBACK,
    HealthConfig,
    HealthEvent,
    health_plot,
    health_report_markdown,
)

ARTIFACT_DIR = "health"
REPORT_MD, PLOT_PNG, EVENTS_JSON = "report.md", "health.png", "events.json"


def write_report(events: Sequence[HealthEvent], history: Sequence[Mapping[str, Any]], directory: str | os.PathLike,
                 *, note: str = "", stopped: bool | None = None) -> Path:  # fmt: skip
    """``report.md`` + ``health.png`` + ``events.json`` in ``directory``; returns the markdown's path. ``note`` (one
    line) goes under the report's heading, e.g. where a rebuilt report came from; ``stopped`` as in
    :func:`~orchestrator.train.health.health_report_markdown`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    health_plot(history, d / PLOT_PNG, events)
    markdown = health_report_markdown(events, history, plot_path=PLOT_PNG, stopped=stopped)
    if note:
        head, _, rest = markdown.partition("\n\n")
        markdown = f"{head}\n\n_{note}_\n\n{rest}"
    (d / REPORT_MD).write_text(markdown)
    (d / EVENTS_JSON).write_text(json.dumps([e.to_dict() for e in events], indent=1) + "\n")
    return d / REPORT_MD


def history_from_points(points: Iterable[tuple[int, int, str, float]]) -> list[dict[str, Any]]:
    """Per-tick history entries (as ``HealthMonitor.history`` holds them) from MLflow metric points
    ``(timestamp_ms, step, key, value)``.

    A rollback or resume logs a step again, so points are taken in time order and a key seen twice at the same
    step starts a new entry for that step; evaluation metrics logged moments after their tick join its entry. Where
    ``health/rollbacks`` goes up, the entry is marked ``action: rollback`` (the plot's red line).
    """
    entries: list[dict[str, Any]] = []
    current: dict[int, dict[str, Any]] = {}
    for _, step, key, value in sorted(points, key=lambda p: (p[0], p[1])):
        entry = current.get(step)
        if entry is None or key in entry:
            entry = {"step": int(step)}
            entries.append(entry)
            current[step] = entry
        entry[key] = float(value)
    rollbacks = 0.0
    for i, entry in enumerate(entries, start=1):
        entry["tick"] = i
        n = entry.get("health/rollbacks")
        if n is not None and math.isfinite(n):
            if n > rollbacks:
                entry["action"] = ROLLBACK
            rollbacks = n
    return [{"tick": e.pop("tick"), **e} for e in entries]


def events_from_history(history: Sequence[Mapping[str, Any]]) -> list[HealthEvent]:
    """Stand-in events for a rebuilt report: one per rollback marked in ``history`` (the rule and its signals were
    not stored as metrics, so the event says so)."""
    out = []
    for h in history:
        if h.get("action") == ROLLBACK:
            scale = float(h.get("health/lr_scale", math.nan))
            reason = "rollback recorded in the health/rollbacks metric (rule and signals not stored for this run)"
            out.append(HealthEvent(int(h["tick"]), int(h["step"]), "unknown", [], {}, reason, ROLLBACK, scale))
    return out


# --------------------------------------------------------------------------------------------- `ganforge report`
@dataclass
class Report:
    run_id: str
    run_name: str
    markdown: str
    markdown_path: Path
    plot_path: Path
    rebuilt: bool  # True: built from the metric history (the run logged no report artifacts)


def find_run(client, ref: str, experiment: str | None = None):
    """The MLflow run ``ref`` (a run id or a ganforge run name; the newest of that name), optionally only within
    ``experiment``; RegistryError in one line when there is none."""
    from orchestrator.tracking import registry
    from orchestrator.tracking.mlflow import RUN_NAME_TAG

    if experiment is None:
        return registry.find_run(client, ref)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise registry.RegistryError(
            f"no MLflow experiment {experiment!r}; experiments: {', '.join(names) or '(none)'}"
        )
    id_filter = f"attributes.run_id = '{ref}'" if _looks_like_run_id(ref) else None
    for flt in filter(None, (id_filter, f"tags.`{RUN_NAME_TAG}` = '{ref}'")):
        runs = client.search_runs([exp.experiment_id], flt, max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0]
    raise registry.RegistryError(f"no MLflow run with id or name {ref!r} in experiment {experiment!r}")


def _looks_like_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(ch in "0123456789abcdef" for ch in ref)


def health_report(ref: str, *, experiment: str | None = None, out_dir: str | os.PathLike | None = None,
                  tracking_uri: str | None = None) -> Report:  # fmt: skip
    """Fetch run ``ref``'s health report artifacts into ``out_dir`` (default ``outputs/<run name>/health``), or
    rebuild them from its metric history when it has none."""
    from orchestrator.tracking import registry
    from orchestrator.tracking.mlflow import RUN_NAME_TAG

    client = registry.client(tracking_uri)
    run = find_run(client, ref, experiment)
    run_id = run.info.run_id
    name = run.data.tags.get(RUN_NAME_TAG) or run.info.run_name or run_id
    root = Path(out_dir) if out_dir else Path(os.environ.get("GANFORGE_OUTPUT_DIR", "outputs")) / name / "health"
    root.mkdir(parents=True, exist_ok=True)
    stored = {Path(a.path).name for a in client.list_artifacts(run_id, ARTIFACT_DIR)}
    if {REPORT_MD, PLOT_PNG} <= stored:
        with tempfile.TemporaryDirectory() as tmp:
            for f in sorted(stored & {REPORT_MD, PLOT_PNG, EVENTS_JSON}):
                shutil.move(client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{f}", tmp), root / f)
        return Report(run_id, name, (root / REPORT_MD).read_text(), root / REPORT_MD, root / PLOT_PNG, rebuilt=False)

    patterns = HealthConfig().history_keys
    keys = [k for k in run.data.metrics if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    points = [(m.timestamp, m.step, k, m.value) for k in keys for m in client.get_metric_history(run_id, k)]
    history = history_from_points(points)
    events = events_from_history(history)
    if EVENTS_JSON in stored:  # a run that crashed after an event still has the events it logged
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{EVENTS_JSON}", tmp)
            events = [HealthEvent.from_dict(e) for e in json.loads(Path(path).read_text())]
    note = "rebuilt from the MLflow metric history: this run logged no health report"
    md = write_report(events, history, root, note=note)
    return Report(run_id, name, md.read_text(), md, root / PLOT_PNG, rebuilt=True)
