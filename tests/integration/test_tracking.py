"""MLflow tracking against the real server: params/tags, and an outage that costs no steps and loses no metrics."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow import MlflowClient

from orchestrator.tracking.mlflow import BackgroundLogger, TrackingError, check_server, open_run

pytestmark = pytest.mark.integration


def test_open_run_reopens_by_name(stack):
    name = f"t-{uuid.uuid4().hex[:6]}"
    a = open_run(stack.mlflow_url, "tracking-test", name, {"train.steps": 5}, {"git_sha": "abc"})
    b = open_run(stack.mlflow_url, "tracking-test", name, {"train.steps": 5}, {"git_sha": "abc"})
    assert a.run_id == b.run_id  # a resumed run continues the same MLflow run
    run = MlflowClient(stack.mlflow_url).get_run(a.run_id)
    assert run.data.params["train.steps"] == "5" and run.data.tags["ganforge.resumed"] == "true"
    assert a.url.endswith(f"/#/experiments/{a.experiment_id}/runs/{a.run_id}")


def test_unreachable_server_is_one_line():
    with pytest.raises(TrackingError, match=r"MLflow tracking server http://127.0.0.1:9 is unreachable") as e:
        check_server("http://127.0.0.1:9", timeout=1)
    assert "\n" not in str(e.value)


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
    history = MlflowClient(stack.mlflow_url).get_metric_history(info.run_id, "loss/G")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 12))
    assert logger.dropped == 0
