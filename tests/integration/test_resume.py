"""Robust training on the real local Ray cluster: bit-exact continuation, and a SIGKILLed worker that costs nothing.

All runs use 2 DDP workers (gloo on CPU), fixed seeds and a tiny BigGAN; the comparison is exact (tolerance 0): on
CPU with gloo the same inputs in the same order give the same bits, so any difference means state was lost.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch

from orchestrator.data.writer import write_shards
from orchestrator.train import checkpoint as ckpt
from tests.jobs import REPO, TINY_BIGGAN

pytestmark = pytest.mark.integration
TINY = [
    *TINY_BIGGAN,
    "train.keep_checkpoints=10",
    "tracking.enabled=false",
    "train.num_workers=2",
]


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://ganforge/datasets/resume-{uuid.uuid4().hex[:6]}"
    write_shards("fashion-mnist", uri, max_samples=1600, samples_per_shard=400, progress=False)
    return uri


def start(stack, dataset, name: str, steps: int, extra=()) -> subprocess.Popen:
    args = [
        f"data.dataset={dataset}",
        "train.storage_path=s3://ganforge/runs-resume",
        f"train.name={name}",
        f"train.steps={steps}",
        *TINY,
        *extra,
    ]
    env = {**os.environ, "RAY_ADDRESS": stack.ray_gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen(
        [sys.executable, "jobs/biggan.py", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return out


def checkpoints(s3, name: str) -> list[str]:
    resp = s3.list_objects_v2(Bucket="ganforge", Prefix=f"runs-resume/{name}/")
    keys = [o["Key"] for o in resp.get("Contents", [])]
    return sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith(ckpt.META)})


def final_state(s3, name: str) -> dict:
    last = checkpoints(s3, name)[-1]
    body = s3.get_object(Bucket="ganforge", Key=f"{last}/{ckpt.STATE}")["Body"].read()
    return torch.load(io.BytesIO(body), weights_only=False)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("G", "D", "G_ema"):
        sa, sb = a["recipe"][part], b["recipe"][part]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k} differs"


@pytest.fixture(scope="module")
def straight(stack, s3, dataset):
    """The reference: 8 steps without interruption, a checkpoint every 2."""
    name = f"straight-{uuid.uuid4().hex[:6]}"
    finish(start(stack, dataset, name, 8, ["train.tick_steps=2", "train.checkpoint_ticks=1"]))
    return final_state(s3, name)


def test_stop_and_resume_is_bit_exact(stack, s3, dataset, straight):
    name = f"resume-{uuid.uuid4().hex[:6]}"
    finish(start(stack, dataset, name, 4, ["train.tick_steps=2", "train.checkpoint_ticks=1"]))
    assert final_state(s3, name)["step"] == 4
    # re-submitting the same run name continues from its latest checkpoint in S3
    out = finish(start(stack, dataset, name, 8, ["train.tick_steps=2", "train.checkpoint_ticks=1"]))
    assert out.count("step      6/8") == 1  # it continued at step 5, not from scratch; each line printed once
    assert "step      2/8" not in out
    assert_same_weights(final_state(s3, name), straight)


def test_killed_worker_recovers_without_losing_state(stack, s3, dataset, straight):
    name = f"kill-{uuid.uuid4().hex[:6]}"
    proc = start(stack, dataset, name, 8, ["train.tick_steps=2", "train.checkpoint_ticks=1", "train.max_failures=2"])
    deadline = time.monotonic() + 300
    while not checkpoints(s3, name):  # wait for the first checkpoint, then kill a worker mid-run
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.5)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no Ray Train worker process found"
    workers[-1].kill()
    out = finish(proc)
    state = final_state(s3, name)
    assert state["step"] == 8
    # the restarted group resumed from a checkpoint (not step 0): steps lost ≤ one checkpoint interval
    restarts = out.count("Attempting to start training worker group")
    assert restarts >= 2, out[-3000:]
    assert_same_weights(state, straight)


def test_elastic_resume_on_fewer_workers_keeps_the_global_batch(stack, s3, dataset):
    """A run started on 2 workers resumes on the 1 worker the cluster can still place (num_workers=(1, 2)): it
    continues from its checkpoint with the same global batch, one worker taking both halves in 2 micro-batches."""
    name = f"elastic-{uuid.uuid4().hex[:6]}"
    common = ["train.tick_steps=2", "train.checkpoint_ticks=1", "train.min_workers=1"]
    out = finish(start(stack, dataset, name, 4, common))
    assert "elastic:" not in out and final_state(s3, name)["step"] == 4
    # 3 CPUs per worker: only one fits on the 4-CPU test cluster, so Ray Train starts the elastic run with one
    out = finish(start(stack, dataset, name, 8, [*common, "train.cpus_per_worker=3"]))
    note = "elastic: 1 of 2 workers: global batch kept at 16 (16 per worker in 2 micro-batches of 8)"
    assert note in out, out[-3000:]
    assert "step      6/8" in out and "step      2/8" not in out  # resumed at step 5
    last = checkpoints(s3, name)[-1]
    meta = json.loads(s3.get_object(Bucket="ganforge", Key=f"{last}/{ckpt.META}")["Body"].read())
    assert (meta["step"], meta["world_size"]) == (8, 1)
    assert meta["kimg"] == pytest.approx(8 * 16 / 1000)  # every step still consumed a global batch of 16
    state = final_state(s3, name)
    assert all(torch.isfinite(t).all() for t in state["recipe"]["G"].values() if t.is_floating_point())
