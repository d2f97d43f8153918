"""The divergence guard on the real stack: a fire drill breaks a 2-worker BigGAN run on purpose and the guard must
roll it back to the last healthy checkpoint with lower learning rates and finish it (or, with no rollbacks allowed,
stop it with a one-line reason), recording everything in MLflow; `ganforge report` shows the run's health report.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator.data.writer import write_shards
from orchestrator.train import checkpoint as ckpt
from tests.jobs import REPO, TINY_BIGGAN

pytestmark = pytest.mark.integration
BUCKET, PREFIX = "ganforge", "runs-health"
# Tiny BigGAN, 10-step ticks, a checkpoint every 2 ticks; the guard armed after 3 ticks so a short run can use it.
TINY = [
    *TINY_BIGGAN,
    "train.num_workers=2",
    "train.tick_steps=10",
    "train.checkpoint_ticks=2",
    "train.sample_ticks=100",
    "train.keep_checkpoints=50",
    "health.warmup_ticks=3",
    "health.grad_min_history=3",
]
CLI = str(Path(sys.executable).parent / "ganforge")


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://{BUCKET}/datasets/health-{uuid.uuid4().hex[:6]}"
    write_shards("fashion-mnist", uri, max_samples=1600, samples_per_shard=400, progress=False)
    return uri


@pytest.fixture(scope="module")
def mlflow_client(stack):
    from mlflow import MlflowClient

    return MlflowClient(stack.mlflow_url)


def job(stack, dataset, name: str, extra: list[str]) -> subprocess.CompletedProcess:
    args = [
        f"data.dataset={dataset}",
        f"train.storage_path=s3://{BUCKET}/{PREFIX}",
        f"train.name={name}",
        *TINY,
        *extra,
    ]
    env = {**os.environ, "RAY_ADDRESS": stack.ray_gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run(
        [sys.executable, "jobs/biggan.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def checkpoint_states(s3, name: str) -> list[dict]:
    """Every checkpoint's state.pt of run ``name``, oldest first (Ray names them by time)."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{name}/").get("Contents", [])]
    dirs = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith(ckpt.META)})
    return [
        torch.load(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=f"{d}/{ckpt.STATE}")["Body"].read()), weights_only=False)
        for d in dirs
    ]


def the_run(client, name: str):
    runs = client.search_runs(
        [client.get_experiment_by_name("biggan").experiment_id], f"tags.`ganforge.run_name` = '{name}'"
    )
    assert len(runs) == 1
    return runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def test_lr_spike_rolls_back_to_the_healthy_checkpoint_and_finishes(stack, s3, dataset, mlflow_client, tmp_path):
    name = f"spike-{uuid.uuid4().hex[:6]}"
    proc = job(stack, dataset, name, ["train.steps=120", "health.fire_drill=lr_spike@60x1e4"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "health: fire drill at step 60: learning rates × 1e+04 after step 60" in out
    assert "health: rollback at step 70: " in out and "rolled back from step 70 to step 60 (rollback 1/3)" in out

    # the state after the rollback is the healthy checkpoint of step 60 (tick 6), bit for bit, with halved lrs
    states = checkpoint_states(s3, name)
    at_60 = [s for s in states if s["step"] == 60]
    assert len(at_60) == 2, [s["step"] for s in states]
    healthy, restored = at_60
    for part in ("G", "D", "G_ema"):
        for k, t in healthy["recipe"][part].items():
            assert torch.equal(t, restored["recipe"][part][k]), f"{part}.{k}"
    for opt in ("opt_G", "opt_D"):
        lr_healthy = healthy["recipe"][opt]["param_groups"][0]["lr"]
        assert restored["recipe"][opt]["param_groups"][0]["lr"] == pytest.approx(lr_healthy * 0.5, rel=1e-12)
    assert healthy["health"]["rollbacks"] == 0 and restored["health"]["rollbacks"] == 1
    assert restored["health"]["events"][0]["action"] == "rollback" and restored["fire_drill_done"]
    final = states[-1]
    assert final["step"] == 120 and final["health"]["lr_scale"] == 0.5
    assert all(torch.isfinite(t).all() for t in final["recipe"]["G_ema"].values() if t.is_floating_point())

    # MLflow: tags, the note, the lr scale and rollback count as metrics, finite losses back at the pre-spike scale
    run = the_run(mlflow_client, name)
    run_id, tags = run.info.run_id, run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["health.rollbacks"] == "1" and tags["health.status"] == "recovered (1 rollbacks)"
    assert tags["health.last_event"].startswith("rollback at step 70: ")
    assert "lr_spike@60x1e4" in tags["health.fire_drill"]
    assert "**rollback** at step 70" in tags["mlflow.note.content"]
    assert history(mlflow_client, run_id, "health/lr_scale")[-1] == (120, 0.5)
    assert history(mlflow_client, run_id, "health/rollbacks")[-1] == (120, 1.0)
    grad_g = dict(history(mlflow_client, run_id, "health/grad_norm_G"))  # the last value logged at each step
    loss_d = history(mlflow_client, run_id, "loss/D")
    # step 70 twice: the spiked tick that fired, then the first tick after going back to 60
    assert [s for s, _ in loss_d] == [10, 20, 30, 40, 50, 60, 70, 70, 80, 90, 100, 110, 120]
    before = [v for s, v in loss_d[:6]]
    after = [v for s, v in loss_d[7:]]
    assert all(math.isfinite(v) for v in after) and max(after) < 10 * max(before), loss_d
    assert grad_g[120] < 10 * max(v for s, v in history(mlflow_client, run_id, "health/grad_norm_G")[:6])
    assert all(0 <= v < 10 for _, v in history(mlflow_client, run_id, "health/ema_drift"))

    # the report: artifacts in MLflow, and `ganforge report` prints the markdown and saves the plot
    stored = {a.path for a in mlflow_client.list_artifacts(run_id, "health")}
    assert {"health/report.md", "health/health.png", "health/events.json"} <= stored
    cli = subprocess.run([CLI, "report", name, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "## Training health" in cli.stdout and "recovered: 1 rollback(s)" in cli.stdout
    assert "| 7 | 70 | rollback |" in cli.stdout and "rebuilt" not in cli.stdout
    assert f"plot             {tmp_path / 'health.png'}" in cli.stdout
    assert (tmp_path / "health.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_rollbacks_left_stops_the_run_with_a_one_line_reason(stack, s3, dataset, mlflow_client, tmp_path):
    name = f"stop-{uuid.uuid4().hex[:6]}"
    proc = job(stack, dataset, name, ["train.steps=80", "health.fire_drill=nan@30", "health.max_rollbacks=0"])
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    # Ray forwards the workers' logs to stderr too; ours is the one `error:` line
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert lines[0].startswith(f"error: run {name} stopped by the divergence guard: at step 40: non-finite values")
    assert "max_rollbacks" in lines[0] and f"`ganforge report {name}`" in lines[0]
    assert f"last healthy checkpoint s3://{BUCKET}/{PREFIX}/{name}/checkpoint_" in lines[0]

    # nothing diverged was checkpointed: the stop's checkpoint holds the healthy state of step 20 again
    states = checkpoint_states(s3, name)
    assert [s["step"] for s in states] == [20, 20]
    for part in ("G", "D", "G_ema"):
        for k, t in states[0]["recipe"][part].items():
            assert torch.equal(t, states[1]["recipe"][part][k]) and (not t.is_floating_point() or t.isfinite().all())
    assert states[1]["health"]["stopped"] and not states[0]["health"]["stopped"]

    run = the_run(mlflow_client, name)
    assert run.info.status == "FAILED"
    assert run.data.tags["health.status"] == "stopped" and "non-finite" in run.data.tags["health.stop_reason"]
    assert history(mlflow_client, run.info.run_id, "health/stopped") == [(40, 1.0)]
    cli = subprocess.run(
        [CLI, "report", run.info.run_id, "--experiment", "biggan", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert "**stopped** at step 40 after 0 rollback(s): nonfinite" in cli.stdout

    # resubmitted with a rollback allowed, the run continues from its last healthy state (the drill fired already)
    again = job(stack, dataset, name, ["train.steps=40", "health.fire_drill=nan@30", "health.max_rollbacks=1"])
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "step     30/40" in again.stdout + again.stderr and "step     10/40" not in again.stdout + again.stderr
    final = checkpoint_states(s3, name)[-1]
    assert final["step"] == 40 and not final["health"]["stopped"] and final["health"]["rollbacks"] == 0
    assert all(t.isfinite().all() for t in final["recipe"]["G"].values() if t.is_floating_point())
    cli = subprocess.run([CLI, "report", name, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "resumed after a stop at step 40 (nonfinite) and finished" in cli.stdout and "**stopped**" not in cli.stdout


def test_report_rebuilds_an_older_run_from_its_metric_history(stack, mlflow_client, tmp_path):
    """A run from before the guard (no health artifacts): the report comes from its metrics, rollbacks included."""
    exp = mlflow_client.get_experiment_by_name("health-old") or None
    exp_id = exp.experiment_id if exp else mlflow_client.create_experiment("health-old")
    name = f"old-{uuid.uuid4().hex[:6]}"
    run_id = mlflow_client.create_run(exp_id, run_name=name, tags={"ganforge.run_name": name}).info.run_id
    from mlflow.entities import Metric

    t, rows = 1_000_000, []
    for step, loss, rollbacks in [(10, 1.0, 0), (20, 0.9, 0), (30, 50.0, 0), (20, 0.8, 1), (30, 0.7, 1)]:
        t += 1000
        values = {"loss/D": loss, "health/rollbacks": rollbacks, "health/lr_scale": 0.5**rollbacks, "perf/img_per_s": 1}
        rows += [Metric(k, v, t, step) for k, v in values.items()]
    mlflow_client.log_batch(run_id, metrics=rows)
    mlflow_client.set_terminated(run_id)

    cli = subprocess.run([CLI, "report", name, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "rebuilt from the MLflow metric history" in cli.stdout
    assert "Watched 5 ticks, last step 30." in cli.stdout
    assert "| `loss/D` | 0.7 | 0.7 | 50 |" in cli.stdout and "perf/img_per_s" not in cli.stdout
    assert "recovered: 1 rollback(s), learning-rate scale now 0.5" in cli.stdout
    assert (tmp_path / "health.png").exists() and (tmp_path / "report.md").exists()

    unknown = subprocess.run([CLI, "report", "no-such-run-xyz"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: no MLflow run with id or name 'no-such-run-xyz'"
