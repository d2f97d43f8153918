"""A 4-trial Ray Tune sweep of tiny 2-worker BigGANs on the real stack: ASHA on fd_classifier over progress/kimg,
a parent MLflow run with 4 nested trial runs, and the sensitivity report on disk and in MLflow.

The grid is ordered so ASHA must stop a trial: Tune creates grid trials lr-major in list order, so the two
lr=3e-3 trials start first (2 at a time on the 4-CPU test cluster) and pass the single rung (0.32 kimg) before either
lr=1e-5 trial gets there (a queued trial starts only when one of them has finished); an lr of 1e-5 leaves G near its
(shared, seeded) initialisation, which scores clearly worse, so with reduction factor 2 (keep the better half) every
lr=1e-5 trial is stopped at the rung. (Of two near-equal lr=3e-3 trials ASHA may stop the second one too.)
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.data.writer import write_shards

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://ganforge/datasets/sweep-{uuid.uuid4().hex[:6]}"
    write_shards("fashion-mnist", uri, max_samples=2400, samples_per_shard=600, progress=False)
    return uri


def test_asha_sweep_with_nested_runs_and_report(stack, s3, dataset, tmp_path):
    from mlflow import MlflowClient

    name = f"sweep-{uuid.uuid4().hex[:6]}"
    args = [
        f"sweep.name={name}",
        f"sweep.output_dir={tmp_path}",
        "sweep.lrs=3e-3,1e-5",
        "sweep.batch_sizes=8,16",
        "sweep.max_kimg=0.64",
        "sweep.metric_kimg=0.32",
        "sweep.grace_kimg=0.32",
        "sweep.reduction_factor=2",
        "sweep.metric_n=200",
        "sweep.metric_ref_n=1000",
        "sweep.num_workers=2",
        "sweep.max_concurrent_trials=2",
        f"data.dataset={dataset}",
        "train.storage_path=s3://ganforge/runs-sweep",
        "model.ch=8",
        "model.dim_z=32",
        "model.shared_dim=16",
        "train.tick_steps=5",
        "train.grid_size=4",
        "train.sample_ticks=4",
    ]
    env = {**os.environ, "RAY_ADDRESS": stack.ray_gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "jobs/tune_sweep.py", *args], cwd=REPO, env=env, text=True, capture_output=True, timeout=900
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "NaN or Inf found" not in proc.stdout + proc.stderr  # the +inf before a first evaluation is meant
    print(f"sweep wall time {wall:.0f} s")

    out = tmp_path / name
    summary = json.loads((out / "summary.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials)
    # every trial evaluated at least once (at the rung), and ASHA stopped at least one before max_kimg
    assert all(t["evaluations"] >= 1 and math.isfinite(t["best_metric"]) for t in trials)
    stopped = [t for t in trials if t["early_stopped"]]
    assert stopped and all(t["stopped_kimg"] < 0.64 for t in stopped)
    assert all(t["early_stopped"] for t in trials if t["lr"] == 1e-5)  # worse than a recorded lr=3e-3 trial
    c = summary["compute"]
    assert c["full_grid_kimg"] == pytest.approx(4 * 0.64) and c["kimg"] < c["full_grid_kimg"] and c["saving_x"] > 1
    rec = summary["recommended"]
    assert rec["best_metric"] == pytest.approx(min(t["best_metric"] for t in trials), abs=1e-4)
    assert rec["config"]["lr"] == 3e-3

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and {r["trial_id"] for r in rows} == {t["trial_id"] for t in trials}
    for png in ("heatmap.png", "curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "Recommended" in (out / "report.md").read_text()

    # MLflow: the sweep's parent run with the report; 4 nested trial runs with the metric, samples, best checkpoint
    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("biggan-sweep")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`ganforge.run_name` = '{name}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["recommended_trial"] == rec["trial_id"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/heatmap.png",
        "report/curves.png",
        "report/trials.csv",
        "report/summary.json",
    }
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    for child in children:
        history = client.get_metric_history(child.info.run_id, "fd_classifier")
        assert history and all(math.isfinite(m.value) and m.value > 0 for m in history)
        assert child.data.tags["best_checkpoint"].startswith("s3://ganforge/runs-sweep/")
        assert any(a.path.startswith("samples/") for a in client.list_artifacts(child.info.run_id, "samples"))
    statuses = sorted(child.info.status for child in children)
    assert statuses.count("KILLED") == len(stopped) and statuses.count("FINISHED") == 4 - len(stopped)
