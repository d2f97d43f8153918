"""``ganforge report <run>``: fetch a run's training-health report from MLflow, or rebuild it from the run's metric
history when the run logged none (older runs, or one that crashed before its end). The report itself, its artifacts
and the rebuild are ``orchestrator.train.health.render``'s."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.tracking import mlflow as tracking
from orchestrator.train.health.monitor import HealthConfig, HealthEvent
from orchestrator.train.health.render import (
    ARTIFACT_DIR,
    EVENTS_JSON,
    PLOT_PNG,
    REPORT_MD,
    events_from_history,
    history_from_points,
    write_report,
)


@dataclass
class Report:
    run_id: str
    run_name: str
    markdown: str
    markdown_path: Path
    plot_path: Path
    rebuilt: bool  # True: built from the metric history (the run logged no report artifacts)


def health_report(
    ref: str,
    *,
    experiment: str | None = None,
    out_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
) -> Report:
    """Fetch run ``ref``'s health report artifacts into ``out_dir`` (default ``outputs/<run name>/health``), or
    rebuild them from its metric history when it has none."""
    client = tracking.client(tracking_uri)
    run = tracking.find_run(client, ref, experiment)
    run_id = run.info.run_id
    name = run.data.tags.get(tracking.RUN_NAME_TAG) or run.info.run_name or run_id
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
