"""Multi-node DDP, shown rather than asserted: a real 3-node Ray cluster on this host (the session's head plus two
more raylets, each with its own object store and workers), training placed one worker per node, and a whole node
killed mid-run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch

from orchestrator.data.writer import write_shards
from orchestrator.train import checkpoint as ckpt
from tests.jobs import REPO, TINY_BIGGAN, ray_job_submit

pytestmark = pytest.mark.integration
TINY = [
    *TINY_BIGGAN,
    "train.keep_checkpoints=10",
    "tracking.enabled=false",
    "train.placement_strategy=STRICT_SPREAD",
    "train.tick_steps=2",
    "train.checkpoint_ticks=1",
]


@pytest.fixture(scope="module")
def cluster(stack):
    names = [stack.add_node(num_cpus=1) for _ in range(2)]
    assert len(stack.ray_nodes()) == 3
    yield stack
    for name in names:
        stack.stop_service(name)


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://ganforge/datasets/multinode-{uuid.uuid4().hex[:6]}"
    write_shards("fashion-mnist", uri, max_samples=1800, samples_per_shard=300, progress=False)
    return uri


def rank_states(s3, prefix: str) -> dict[str, list[dict]]:
    """checkpoint dir → the rank files in it."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ganforge", Prefix=prefix).get("Contents", [])]
    out: dict[str, list[dict]] = {}
    for key in sorted(k for k in keys if "/rank-" in k):
        body = s3.get_object(Bucket="ganforge", Key=key)["Body"].read()
        out.setdefault(key.rsplit("/", 1)[0], []).append(torch.load(io.BytesIO(body), weights_only=False))
    return out


def test_ray_job_submit_places_one_worker_per_node(cluster, s3, dataset):
    name = f"mn-{uuid.uuid4().hex[:6]}"
    args = [
        f"data.dataset={dataset}",
        "train.storage_path=s3://ganforge/runs-mn",
        f"train.name={name}",
        "train.num_workers=3",
        "train.steps=4",
        *TINY,
    ]
    proc = ray_job_submit(cluster.ray_url, args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    states = rank_states(s3, f"runs-mn/{name}/")
    last = states[max(states)]
    assert len(last) == 3
    node_ids = {r["node_id"] for r in last}
    assert len(node_ids) == 3, "STRICT_SPREAD must put each DDP worker on its own node"
    assert {cluster.node_name(n) for n in node_ids} == {"head", "ray-node-1", "ray-node-2"}
    assert last[0]["fingerprint"] == last[1]["fingerprint"] == last[2]["fingerprint"]  # DDP agrees across nodes


def test_run_survives_losing_a_whole_node(cluster, s3, dataset):
    name = f"mn-loss-{uuid.uuid4().hex[:6]}"
    args = [
        f"data.dataset={dataset}",
        "train.storage_path=s3://ganforge/runs-mn",
        f"train.name={name}",
        "train.num_workers=2",
        "train.steps=10",
        "train.max_failures=3",
        *TINY,
    ]
    env = {**os.environ, "RAY_ADDRESS": cluster.ray_gcs_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "jobs/biggan.py", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    victim = None
    while victim is None:  # the first checkpoint tells which nodes the workers are on; kill a non-head one
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
        states = rank_states(s3, f"runs-mn/{name}/")
        complete = [v for v in states.values() if len(v) == 2]
        if complete:
            names = {cluster.node_name(r["node_id"]) for r in complete[0]}
            victim = next(n for n in sorted(names) if n and n != "head")
        time.sleep(0.5)
    cluster.kill_node(victim)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    states = rank_states(s3, f"runs-mn/{name}/")
    final = torch.load(
        io.BytesIO(s3.get_object(Bucket="ganforge", Key=f"{max(states)}/{ckpt.STATE}")["Body"].read()),
        weights_only=False,
    )
    assert final["step"] == 10
    survivors = {cluster.node_name(r["node_id"]) for r in states[max(states)]}
    assert victim not in survivors and len(survivors) == 2
    # nothing half-written: every checkpoint in S3 has its meta and a state file matching the recorded sha256
    for d in states:
        meta = s3.get_object(Bucket="ganforge", Key=f"{d}/{ckpt.META}")["Body"].read()
        body = s3.get_object(Bucket="ganforge", Key=f"{d}/{ckpt.STATE}")["Body"].read()
        assert json.loads(meta)["files"][ckpt.STATE] == hashlib.sha256(body).hexdigest()
