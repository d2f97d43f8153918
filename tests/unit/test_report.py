"""The sweep's sensitivity report from a synthetic results table, compute accounting, and the sweep config."""

from __future__ import annotations

import csv
import json
import math

import pytest

from orchestrator.config import ConfigError
from orchestrator.tune import report
from orchestrator.tune.report import TrialRecord
from orchestrator.tune.sweep import SweepConfig, load_sweep_config, trial_job


def synthetic() -> list[TrialRecord]:
    """3 lrs × 2 batch sizes to 8 kimg; ASHA (rung 2, rf 2) stopped four of them."""
    recs = []
    table = [
        (1e-4, 16, 2.0, [90.0, 80.0]),
        (1e-4, 32, 4.0, [85.0, 70.0, 60.0, 58.0]),
        (1e-3, 16, 8.0, [60.0, 40.0, 30.0, 25.0, 22.0, 21.0, 20.5, 20.0]),
        (1e-3, 32, 8.0, [70.0, 50.0, 40.0, 30.0, 26.0, 24.0, 23.0, 22.0]),
        (1e-2, 16, 2.0, [95.0, 99.0]),
        (1e-2, 32, 4.0, [88.0, 75.0, 70.0, 72.0]),
    ]
    for i, (lr, bs, stop, values) in enumerate(table):
        history = [(k + 1.0, v) for k, v in enumerate(values)]
        accounting = {"wall_s": 10.0 * stop, "num_workers": 2, "cpus_per_worker": 1.0, "early_stopped": stop < 8.0}
        recs.append(TrialRecord(f"t{i}", lr, 1.0, bs, stop, history, **accounting))
    return recs


def test_report_files_and_recommendation(tmp_path):
    recs = synthetic()
    summary = report.write_report(recs, tmp_path, metric="fd_classifier", max_kimg=8.0, wall_s=123.0)
    assert summary["recommended"]["trial_id"] == "t2" and summary["recommended"]["best_metric"] == 20.0
    assert summary["recommended"]["config"] == {"lr": 1e-3, "d_lr": 1e-3, "d_lr_ratio": 1.0, "batch_size": 16}
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(rows) == 6 and rows[0]["trial_id"] == "t0" and float(rows[1]["best_metric"]) == 58.0
    assert rows[4]["best_metric"] == "95.0" and rows[4]["early_stopped"] == "True"
    for png in ("heatmap.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "trials.md").read_text().count("\n") == 8  # header, rule, 6 rows
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["compute"] == summary["compute"] and len(on_disk["trials"]) == 6
    assert "Recommended" in (tmp_path / "report.md").read_text()


def test_compute_accounting():
    c = report.compute_summary(synthetic(), max_kimg=8.0)
    assert c["kimg"] == 2 + 4 + 8 + 8 + 2 + 4 == 28
    assert c["full_grid_kimg"] == 48 and c["saving_x"] == pytest.approx(48 / 28, abs=1e-3)
    assert c["worker_kimg"] == 56 and c["early_stopped"] == 4
    assert c["cpu_s"] == 2 * 10 * 28  # wall 10 s per kimg × 2 workers × 1 CPU
    assert c["full_grid_cpu_s"] == 2 * 10 * 48 and c["cpu_saving_x"] == pytest.approx(48 / 28, abs=1e-3)


def test_no_finite_result_recommends_nothing():
    rec = report.recommend([TrialRecord("x", 1e-3, 1.0, 8, 1.0, [(1.0, math.inf)])])
    assert rec["trial_id"] is None


def test_sweep_config_and_trial_jobs(tmp_path):
    items = [
        "sweep.lrs=1e-4,1e-3",
        "sweep.batch_sizes=8,16",
        "sweep.max_kimg=1",
        "sweep.metric_kimg=0.25",
        "sweep.grace_kimg=0.5",
        "train.tick_steps=50",
    ]
    sweep = load_sweep_config(None, items)
    assert sweep.trials == 4 and sweep.overrides == ["train.tick_steps=50"]
    base = sweep.job().to_dict()
    job = trial_job(base, sweep, {"lr": 1e-3, "d_lr_ratio": 4.0, "batch_size": 16}, "t-1", "s3://ganforge/x")
    assert (job.hparams.g_lr, job.hparams.d_lr, job.data.batch_size) == (1e-3, 4e-3, 16)
    assert job.train.steps == 32 and job.train.tick_steps == 7  # 1 kimg / 32 per step; ticks ≤ 0.25 kimg
    assert (job.train.metric, job.train.metric_kimg, job.train.name) == ("fd_classifier", 0.25, "t-1")
    assert job.tracking.experiment == "biggan-sweep" and job.tracking.register is False
    with pytest.raises(ConfigError, match=r"sweep\.grace_kimg"):
        SweepConfig(metric_kimg=1.0, grace_kimg=1.5)
    with pytest.raises(ConfigError, match=r"unknown sweep key sweep\.lr;"):
        load_sweep_config(None, ["sweep.lr=1"])
