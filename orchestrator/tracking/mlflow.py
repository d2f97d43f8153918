"""MLflow tracking: the driver opens the run; rank 0 logs through a background thread that never blocks training.

A synchronous ``log_metric`` against a dead server blocks for minutes while MLflow retries (DESIGN.md §8), so the
training loop only ever enqueues. The thread sends in order, keeps what failed, backs off, and sends it again once
the server answers: an outage costs no steps and loses no metrics (up to ``max_buffer`` items).

Everything else that talks to MLflow gets its client from :func:`client` and looks runs up with :func:`find_run`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.env import Env

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

RUN_NAME_TAG = "ganforge.run_name"
NEWEST_FIRST = ["attributes.start_time DESC"]


class TrackingError(RuntimeError):
    """MLflow is unreachable or refused a request; the message is one line."""


class RegistryError(TrackingError):
    """A run, experiment, model, alias or version that does not exist; the message is one line naming what does."""


def _quiet_http() -> None:
    # Low retries/timeouts: our own thread does the waiting, MLflow's retry loop would only hide an outage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}); start the local stack with `ganforge up` "
        "or set MLFLOW_TRACKING_URI"
    )


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    experiment_id: str
    tracking_uri: str

    @property
    def url(self) -> str:
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def client(tracking_uri: str | None = None, *, check: bool = True) -> MlflowClient:
    """The one way to an ``MlflowClient``: runs and the model registry on ``tracking_uri`` (default: the environment's
    MLflow). ``check`` fails fast, in one line, when the server does not answer; the training hot path passes False so
    that an outage is buffered, and closing a failed run passes False so the original error is the one raised."""
    from mlflow import MlflowClient

    uri = tracking_uri or Env.from_environ().mlflow_uri
    if check:
        check_server(uri)
    return MlflowClient(uri, registry_uri=uri)


def is_missing(e: Exception) -> bool:
    """Whether an MLflow error says the thing asked for does not exist."""
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def looks_like_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(ch in "0123456789abcdef" for ch in ref)


def find_run(client: MlflowClient, name: str, experiment: str | None = None):
    """The run ``name`` names: a run id, or a ganforge run name (``train.name``; the newest run of that name),
    optionally only within ``experiment``. RegistryError, in one line, when there is none."""
    from mlflow.exceptions import MlflowException

    where, exp_ids = "", None
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise RegistryError(f"no MLflow experiment {experiment!r}; experiments: {', '.join(names) or '(none)'}")
        where, exp_ids = f" in experiment {experiment!r}", [exp.experiment_id]
    if looks_like_run_id(name):
        try:
            run = client.get_run(name)
        except MlflowException as e:
            if not is_missing(e):
                raise TrackingError(f"MLflow error reading run {name}: {str(e).splitlines()[0]}") from None
        else:
            if exp_ids is None or run.info.experiment_id in exp_ids:
                return run
    if exp_ids is None:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, _name_filter(name), max_results=1, order_by=NEWEST_FIRST)
    if not runs:
        raise RegistryError(f"no MLflow run with id or name {name!r}{where}")
    return runs[0]


def _name_filter(run_name: str) -> str:
    return f"tags.`{RUN_NAME_TAG}` = '{run_name}'"


def open_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> RunInfo:
    """Create the run for ``run_name`` (or reopen it when a run of that name exists: a resumed training run)."""
    _quiet_http()
    from mlflow.entities import Param, RunTag

    mlflow_client = client(tracking_uri)
    exp_id = ensure_experiment(mlflow_client, experiment)
    found = mlflow_client.search_runs([exp_id], filter_string=_name_filter(run_name), max_results=1)
    tags = {**tags, RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if found:
        run_id = found[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        mlflow_client.set_tag(run_id, "ganforge.resumed", "true")
    else:
        run_id = mlflow_client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            mlflow_client.log_batch(run_id, params=items[i : i + 100])
    mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return RunInfo(run_id, exp_id, tracking_uri)


def ensure_experiment(client, name: str) -> str:
    """The experiment's id, created if missing; safe when two jobs create it at the same moment."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
        return client.get_experiment_by_name(name).experiment_id


def close_run(info: RunInfo, status: str = "FINISHED") -> None:
    client(info.tracking_uri, check=False).set_terminated(info.run_id, status=status)


@contextlib.contextmanager
def failed_on_error(info: RunInfo | None):
    """Ends ``info``'s run as FAILED when the block raises, then re-raises; ``None`` (tracking off) does nothing."""
    try:
        yield
    except Exception:
        if info is not None:
            close_run(info, status="FAILED")
        raise


class BackgroundLogger:
    """Queue-backed MLflow logger for the training hot path (rank 0 only)."""

    def __init__(self, run_id: str, tracking_uri: str, max_buffer: int = 100_000):
        _quiet_http()
        self.run_id = run_id
        self.client = client(tracking_uri, check=False)
        self.max_buffer = max_buffer
        self.dropped = 0
        self.failures = 0
        self._items: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    # -- producer side: never blocks on the network
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._put(("metrics", [Metric(k, float(v), ts, step) for k, v in metrics.items()]))

    def log_image(self, image, artifact_file: str) -> None:
        self._put(("image", (image, artifact_file)))

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self._put(("artifacts", (local_dir, artifact_path)))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """One file; it is read when sent, so it must exist until ``flush``/``close`` (rewriting it sends the
        newest content)."""
        self._put(("artifact", (local_path, artifact_path)))

    def set_tag(self, key: str, value: str) -> None:
        self._put(("tag", (key, value)))

    def pending(self) -> int:
        with self._cv:
            return len(self._items)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued was sent; False if the server stayed away for ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._items and time.monotonic() < deadline:
                self._cv.wait(timeout=0.2)
            return not self._items

    def close(self, timeout: float = 30.0) -> bool:
        ok = self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        if not ok:
            log.warning("MLflow unreachable: %d logging items not sent", self.pending())
        return ok

    def _put(self, item) -> None:
        with self._cv:
            if len(self._items) >= self.max_buffer:
                self._items.popleft()  # oldest first: recent state matters most after a long outage
                self.dropped += 1
            self._items.append(item)
            self._cv.notify_all()

    # -- consumer side
    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items and self._closed:
                    return
                item = self._items[0]
            try:
                self._send(item)
            except Exception as e:  # any failure: keep the item, wait, try again
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("MLflow logging failed (%s); buffering %d items", type(e).__name__, self.pending())
                with self._cv:
                    if self._closed:
                        return
                    self._cv.wait(timeout=backoff)
                backoff = min(backoff * 2, 15.0)
                continue
            backoff = 0.5
            with self._cv:
                if self._items and self._items[0] is item:
                    self._items.popleft()
                self._cv.notify_all()

    def _send(self, item) -> None:
        kind, payload = item
        if kind == "metrics":
            for i in range(0, len(payload), 1000):
                self.client.log_batch(self.run_id, metrics=payload[i : i + 1000], synchronous=True)
        elif kind == "image":
            image, artifact_file = payload
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)
        elif kind == "artifacts":
            local_dir, artifact_path = payload
            self.client.log_artifacts(self.run_id, local_dir, artifact_path)
        elif kind == "artifact":
            local_path, artifact_path = payload
            self.client.log_artifact(self.run_id, local_path, artifact_path)
        elif kind == "tag":
            self.client.set_tag(self.run_id, *payload)
