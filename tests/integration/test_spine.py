"""The spine end to end on the real local stack: shards in S3 → `ray job submit jobs/biggan.py` with 2 DDP workers →
checkpoints in S3 and an MLflow run with metrics and sample grids. Plus the one-line errors before training."""

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
from orchestrator.stack import free_ports
from orchestrator.train import checkpoint as ckpt
from tests.jobs import REPO, TINY_BIGGAN, ray_job_submit

pytestmark = pytest.mark.integration
TINY = [
    *TINY_BIGGAN,
    "train.tick_steps=2",
    "train.checkpoint_ticks=1",
    "train.keep_checkpoints=5",
]


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://ganforge/datasets/spine-{uuid.uuid4().hex[:6]}"
    manifest = write_shards("fashion-mnist", uri, max_samples=2400, samples_per_shard=600, progress=False)
    assert len(manifest.shards) == 4
    return uri


def job(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/biggan.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_ray_job_submit_trains_with_two_workers(stack, s3, dataset, tmp_path):
    name = f"spine-{uuid.uuid4().hex[:6]}"
    args = [
        f"data.dataset={dataset}",
        "train.storage_path=s3://ganforge/runs-test",
        f"train.name={name}",
        "train.num_workers=2",
        "train.steps=6",
        *TINY,
    ]
    proc = ray_job_submit(stack.ray_url, args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "MLflow run" in proc.stdout and "final samples" in proc.stdout

    # checkpoints: 3 ticks of 2 steps, one checkpoint per tick, each with both ranks' files merged by Ray Train
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ganforge", Prefix=f"runs-test/{name}/")["Contents"]]
    ckpt_dirs = sorted({k.split("/")[2] for k in keys if k.count("/") == 3 and "/checkpoint_" in k})
    assert len(ckpt_dirs) == 3, keys
    last = f"runs-test/{name}/{ckpt_dirs[-1]}"
    files = {k.rsplit("/", 1)[1] for k in keys if k.startswith(last)}
    assert {ckpt.STATE, ckpt.META, ckpt.rank_file(0), ckpt.rank_file(1)} <= files

    def load(key):
        return torch.load(io.BytesIO(s3.get_object(Bucket="ganforge", Key=key)["Body"].read()), weights_only=False)

    state = load(f"{last}/{ckpt.STATE}")
    assert state["step"] == 6 and state["config"]["train"]["num_workers"] == 2
    g = state["recipe"]["G_ema"]
    assert all(torch.isfinite(t).all() for t in g.values() if t.is_floating_point())
    r0, r1 = load(f"{last}/{ckpt.rank_file(0)}"), load(f"{last}/{ckpt.rank_file(1)}")
    assert r0["shards"] and r1["shards"] and not set(r0["shards"]) & set(r1["shards"])
    assert len(set(r0["shards"]) | set(r1["shards"])) == 4
    # DDP replicas identical: every parameter and buffer (BN stats, SN vectors, G_ema) hashed on each rank
    assert r0["fingerprint"] == r1["fingerprint"] and len(r0["fingerprint"]) > 50

    # MLflow: metric history per tick, finite losses, sample PNGs, tags
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    runs = client.search_runs(
        [client.get_experiment_by_name("biggan").experiment_id], f"tags.`ganforge.run_name` = '{name}'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/D")
    assert [m.step for m in history] == [2, 4, 6]
    for key in ("loss/G", "loss/D"):
        assert all(math.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, key))
    assert client.get_metric_history(run.info.run_id, "perf/img_per_s")[-1].value > 0
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/grid_0000002.png" in samples and "samples/samples_final.png" in samples
    assert len(run.data.tags["dataset.manifest_hash"]) == 64
    assert run.data.params["train.num_workers"] == "2"
    assert not any(os.environ["AWS_SECRET_ACCESS_KEY"] in v for v in run.data.params.values())
    png = client.download_artifacts(run.info.run_id, "samples/grid_0000006.png", str(tmp_path))
    from PIL import Image

    img = Image.open(png)
    assert img.size[0] > 4 * 32 and 10 < sum(img.convert("L").getdata()) / (img.size[0] * img.size[1]) < 245


@pytest.mark.parametrize(
    "case",
    ["wrong_secret", "mlflow_down", "missing_prefix", "missing_bucket", "unknown_key", "bad_value"],
)
def test_bad_input_fails_in_one_line_before_training(stack, dataset, case):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    env, args = {}, [f"data.dataset={dataset}", "train.storage_path=s3://ganforge/runs-test", *TINY]
    expect = {
        "wrong_secret": "rejected the credentials",
        "mlflow_down": "unreachable",
        "missing_prefix": "no manifest.json",
        "missing_bucket": "does not exist",
        "unknown_key": "unknown config key",
        "bad_value": "is not an integer",
    }[case]
    if case == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "mlflow_down":
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_ports(1)[0]}"
    elif case == "missing_prefix":
        args[0] = "data.dataset=s3://ganforge/datasets/nothing-here"
    elif case == "missing_bucket":
        args[0] = "data.dataset=s3://no-such-bucket-gf/datasets/x"
    elif case == "unknown_key":
        args.append("train.stepz=3")
    elif case == "bad_value":
        args.append("train.steps=many")
    proc = job(args, env, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert secret not in proc.stderr + proc.stdout and "not-the-secret" not in proc.stderr + proc.stdout


def test_unknown_dataset_fails_in_one_line(stack):
    cli = str(Path(sys.executable).parent / "ganforge")
    proc = subprocess.run(
        [cli, "shards", "--dataset", "imagenet-99", "--out", "s3://ganforge/datasets/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "imagenet-99" in proc.stderr and "fashion-mnist" in proc.stderr
