"""MLflow tracking against the real server: params/tags, finding a run by id or name, and an outage that costs no
steps and loses no metrics."""

from __future__ import annotations

import time
import uuid

import pytest

from orchestrator.tracking.mlflow import (
    BackgroundLogger,
    RegistryError,
    TrackingError,
    check_server,
    client,
    find_run,
    open_run,
)

pytestmark = pytest.mark.integration


def test_open_run_reopens_by_name(stack):
    name = f"t-{uuid.uuid4().hex[:6]}"
    a = open_run(stack.mlflow_url, "tracking-test", name, {"train.steps": 5}, {"git_sha": "abc"})
    b = open_run(stack.mlflow_url, "tracking-test", name, {"train.steps": 5}, {"git_sha": "abc"})
    assert a.run_id == b.run_id  # a resumed run continues the same MLflow run
    run = client(stack.mlflow_url).get_run(a.run_id)
    assert run.data.params["train.steps"] == "5" and run.data.tags["ganforge.resumed"] == "true"
    assert a.url.endswith(f"/#/experiments/{a.experiment_id}/runs/{a.run_id}")


def test_find_run_by_id_or_newest_name_optionally_in_one_experiment(stack):
    name = f"find-{uuid.uuid4().hex[:6]}"
    older = open_run(stack.mlflow_url, "tracking-test", name, {}, {})
    newer = open_run(stack.mlflow_url, "tracking-test-2", name, {}, {})  # the same run name in another experiment
    c = client(stack.mlflow_url)
    assert find_run(c, name).info.run_id == newer.run_id
    assert find_run(c, name, "tracking-test").info.run_id == older.run_id
    assert find_run(c, older.run_id).info.run_id == older.run_id
    assert find_run(c, older.run_id, "tracking-test").info.run_id == older.run_id
    with pytest.raises(
        RegistryError, match=rf"no MLflow run with id or name '{older.run_id}' in experiment 'tracking-"
    ):
        find_run(c, older.run_id, "tracking-test-2")
    with pytest.raises(RegistryError, match=r"^no MLflow experiment 'no-such-exp'; experiments: .*tracking-test"):
        find_run(c, name, "no-such-exp")
    with pytest.raises(RegistryError, match=r"^no MLflow run with id or name 'no-such-run'$"):
        find_run(c, "no-such-run")


def test_unreachable_server_is_one_line():
    with pytest.raises(TrackingError, match=r"MLflow tracking server http://127.0.0.1:9 is unreachable") as e:
        check_server("http://127.0.0.1:9", timeout=1)
    assert "\n" not in str(e.value)
    with pytest.raises(TrackingError, match="is unreachable"):  # the client factory checks first
        client("http://127.0.0.1:9")


def test_outage_buffers_and_flushes(stack):
    info = open_run(stack.mlflow_url, "tracking-test", f"outage-{uuid.uuid4().hex[:6]}", {}, {})
    logger = BackgroundLogger(info.run_id, stack.mlflow_url)
    logger.log_metrics({"loss/G": 1.0}, step=1)
    assert logger.flush(30)
    stack.stop_service("mlflow")
    try:
        t0 = time.monotonic()
        for step in range(2, 12):
            logger.log_metrics({"loss/G": float(step)}, step=step)
        assert time.monotonic() - t0 < 0.5  # the hot path never waits for the network
        assert not logger.flush(3) and logger.pending() > 0 and logger.failures > 0
    finally:
        stack.start_service("mlflow")
    assert logger.close(120)
    history = client(stack.mlflow_url).get_metric_history(info.run_id, "loss/G")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 12))
    assert logger.dropped == 0
