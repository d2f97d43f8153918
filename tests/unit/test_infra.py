"""The cluster deployment configs (infra/ray/cluster.yaml, infra/k8s/) parse, carry the fields their tools need,
provide every environment variable the code reads, and hold no literal secrets.

What is validated, and how:
- every YAML parses (``yaml.safe_load_all``); required fields are checked structurally: the Ray launcher keys, the
  KubeRay v1 RayCluster/RayJob shape (head group, GPU worker groups with ``nvidia.com/gpu`` limits, /dev/shm), the
  RayJob entrypoint (its overrides are resolved with ganforge's own config builder), MLflow's Postgres backend store
  and S3 artifact destination;
- cluster.yaml against Ray's own schema (``ray/autoscaler/ray-schema.json`` shipped in the Ray wheel, validated with
  ``jsonschema``, a Ray dependency) and its shell commands with ``bash -n``;
- the env var names orchestrator/env.py reads (parsed from its source) are set in every Ray container, from the
  Secret/ConfigMap keys templated in secrets.example.yaml;
- with ``kubectl`` on PATH, ``kubectl kustomize`` builds the kustomization offline. ``kubectl apply --dry-run=client``
  needs an API server (and the KubeRay CRDs) even in client mode, and none runs here, so it is not part of the suite.
  The manifests were also checked once against the KubeRay v1.7 CRD schemas (strict field names), which
  are not vendored here.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
CLUSTER_YAML = INFRA / "ray" / "cluster.yaml"
EXAMPLE = K8S / "secrets.example.yaml"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
# Injected into every Ray container by the KubeRay operator as <head>:6379 (controllers/ray/common/pod.go, only when
# the container does not set it); an http:// value here would make a direct `python jobs/...` start a private Ray.
KUBERAY_INJECTED = {"RAY_ADDRESS"}


@functools.cache
def docs(path: Path) -> list[dict]:
    """The YAML documents of a file (parsed once; callers must not mutate them)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in docs(p) if d.get("kind") == kind]


def only(kind: str) -> dict:
    objs = k8s_objects(kind)
    assert len(objs) == 1, f"expected one {kind}, found {[str(p) for p, _ in objs]}"
    return objs[0][1]


def ray_cluster_specs() -> dict[str, dict]:
    """The RayCluster spec and the RayJob's embedded rayClusterSpec."""
    return {"RayCluster": only("RayCluster")["spec"], "RayJob": only("RayJob")["spec"]["rayClusterSpec"]}


def ray_containers() -> list[tuple[str, dict]]:
    out = []
    for owner, spec in ray_cluster_specs().items():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for group, g in groups:
            out += [(f"{owner}/{group}/{c['name']}", c) for c in g["template"]["spec"]["containers"]]
    return out


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def env_groups_read_by_code() -> list[set[str]]:
    """Each group is a set of alternatives (``e.get("A") or e.get("B")``) Env.from_environ reads; one must be set."""
    tree = ast.parse((ROOT / "orchestrator" / "env.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "from_environ")

    def names(node) -> set[str]:
        found = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "get" and n.args:
                arg = n.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.isupper():
                    found.add(arg.value)
        return found

    groups, seen = [], set()
    for n in ast.walk(fn):
        if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.Or):
            g = names(n) - seen
            if g:
                groups.append(g)
                seen |= g
    groups += [{name} for name in sorted(names(fn) - seen)]
    return groups


# --- every file ---------------------------------------------------------------------------------------------------


def test_infra_files_exist():
    for rel in [
        "ray/cluster.yaml",
        "k8s/raycluster.yaml",
        "k8s/rayjob-biggan.yaml",
        "k8s/mlflow.yaml",
        "k8s/secrets.example.yaml",
        "k8s/kustomization.yaml",
        "local/README.md",
    ]:
        assert (INFRA / rel).is_file(), rel
    assert (ROOT / "docs" / "cluster.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    assert docs(path), f"{path} holds no YAML document"
    if path.parent == K8S and path.name != "kustomization.yaml":
        for d in docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(d), (
                f"{path}: {d.get('kind')} lacks apiVersion/kind/metadata"
            )
            assert d["metadata"].get("name"), f"{path}: {d['kind']} without metadata.name"


# AWS access key ids (AKIA… long-term, ASIA… temporary) and 40-character secret access keys.
KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
SECRETISH_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY")


def scalars(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from scalars(k)
            yield from scalars(v)
    elif isinstance(node, list):
        for v in node:
            yield from scalars(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("path", [*YAML_FILES, ROOT / "docs" / "cluster.md"], ids=lambda p: p.name)
def test_no_literal_secrets(path):
    text = path.read_text()
    assert not KEY_ID.search(text), f"{path}: looks like an AWS access key id"
    values = [s for d in docs(path) for s in scalars(d)] if path.suffix == ".yaml" else text.split()
    leaked = [v for v in values if SECRET.search(v) and not re.fullmatch(r"[a-z0-9/]+", v)]
    assert not leaked, f"{path}: value(s) look like a secret key: {leaked}"


def test_secrets_only_in_the_example():
    for path in sorted(K8S.glob("*.yaml")):
        for d in docs(path):
            if d.get("kind") == "Secret":
                assert path == EXAMPLE, f"{path}: Secrets belong in secrets.example.yaml (templates) only"
                for key, value in {**d.get("stringData", {}), **d.get("data", {})}.items():
                    if SECRETISH_NAME.search(key):
                        assert "EXAMPLE" in value, f"{key}: example value must be a marked placeholder"
            for c in containers_of(d):
                for e in c.get("env", []):
                    if SECRETISH_NAME.search(e["name"]):
                        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (
                            f"{path}: {e['name']} must come from a Secret (valueFrom.secretKeyRef)"
                        )


def containers_of(obj) -> list[dict]:
    """Every container spec anywhere inside a manifest (pod templates, RayCluster groups, RayJob cluster)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                found += v
            else:
                found += containers_of(v)
    elif isinstance(obj, list):
        for v in obj:
            found += containers_of(v)
    return found


# --- Ray cluster launcher -----------------------------------------------------------------------------------------


def cluster_cfg() -> dict:
    (cfg,) = docs(CLUSTER_YAML)
    return cfg


def test_cluster_yaml_required_fields():
    cfg = cluster_cfg()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers, "no worker node type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert any(t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5.")) for t in workers.values())
    assert cfg["head_start_ray_commands"] and cfg["worker_start_ray_commands"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    setup = " ".join(cfg["setup_commands"])
    assert "torch==" in setup and "download.pytorch.org/whl/cu" in setup, "a CUDA torch build, pinned"
    assert "ganforge" in setup


def test_cluster_yaml_nccl_and_env_file():
    cfg = cluster_cfg()
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "NCCL_SOCKET_IFNAME=" in run_options and "NCCL_IB_DISABLE=" in run_options
    # the head's environment comes from Secrets Manager into an env-file, never from this file
    head = cfg["available_node_types"][cfg["head_node_type"]]
    init = " ".join(head["initialization_commands"])
    assert "secretsmanager get-secret-value" in init and "umask 077" in init
    assert "--env-file" in " ".join(cfg["docker"]["head_run_options"])


def test_cluster_yaml_ray_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a Ray dependency) is not installed")
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed, so its cluster-config schema is unavailable")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"this Ray has no {schema_path.name}")
    jsonschema.validate(cluster_cfg(), json.loads(schema_path.read_text()))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_cluster_yaml_commands_are_valid_shell():
    cfg = cluster_cfg()
    cmds = [
        *cfg["setup_commands"],
        *cfg["head_setup_commands"],
        *cfg["head_start_ray_commands"],
        *cfg["worker_start_ray_commands"],
    ]
    for t in cfg["available_node_types"].values():
        cmds += t.get("initialization_commands", [])
    script = "\n".join(f"{{\n{c}\n}}" for c in cmds)  # one bash -n for all of them
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


# --- KubeRay ------------------------------------------------------------------------------------------------------


def test_raycluster_structure():
    rc = only("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    for name, spec in ray_cluster_specs().items():
        assert spec["headGroupSpec"]["template"]["spec"]["containers"], name
        assert spec["workerGroupSpecs"], name
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (name, g["groupName"])
            (c,) = g["template"]["spec"]["containers"]
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            assert isinstance(gpus, int) and gpus >= 1, f"{name}/{g['groupName']}: no nvidia.com/gpu limit"
            assert c["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env.get("NCCL_SOCKET_IFNAME") and env.get("NCCL_IB_DISABLE") == "1"


def test_ray_pods_mount_memory_backed_shm():
    for owner, spec in ray_cluster_specs().items():
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = g["template"]["spec"]
            shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
            (c,) = pod["containers"]
            assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in c["volumeMounts"]), owner


def test_ray_containers_get_every_env_var_the_code_reads():
    groups = env_groups_read_by_code()
    assert {"AWS_ACCESS_KEY_ID"} in groups and {"MLFLOW_TRACKING_URI"} in groups  # the parser found them
    for where, c in ray_containers():
        names = env_names(c) | KUBERAY_INJECTED
        missing = [sorted(g) for g in groups if not g & names]
        assert not missing, f"{where}: none of {missing} set"
        ray_address = {e["name"]: e for e in c["env"]}.get("RAY_ADDRESS", {}).get("value", "")
        assert not ray_address.startswith("http"), f"{where}: RAY_ADDRESS must be a GCS address, not the dashboard"


def test_env_refs_match_the_example_secrets_and_configmap():
    keys = {
        (d["kind"], d["metadata"]["name"]): set(d.get("stringData", {})) | set(d.get("data", {})) for d in docs(EXAMPLE)
    }
    assert {("Secret", "ganforge-s3"), ("ConfigMap", "ganforge-config")} <= set(keys)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys[("Secret", "ganforge-s3")]
    assert {"AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "GANFORGE_BUCKET"} <= keys[("ConfigMap", "ganforge-config")]
    for path in sorted(K8S.glob("*.yaml")):
        for d in docs(path):
            for c in containers_of(d):
                for e in c.get("env", []):
                    for kind, ref in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                        r = e.get("valueFrom", {}).get(ref)
                        if r:
                            assert r["key"] in keys.get((kind, r["name"]), set()), f"{path}: {e['name']} → {r}"


def test_raycluster_and_rayjob_cluster_agree():
    specs = ray_cluster_specs()
    by_owner = {}
    for where, c in ray_containers():
        owner, group, _ = where.split("/")
        by_owner.setdefault(owner, {})[group] = (c["image"], env_names(c))
    assert by_owner["RayCluster"] == by_owner["RayJob"], "rayjob-biggan.yaml's cluster drifted from raycluster.yaml"
    assert specs["RayCluster"]["rayVersion"] == specs["RayJob"]["rayVersion"]


def test_rayjob_runs_biggan_on_its_gpus():
    from orchestrator.config import build_config

    job = only("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/biggan.py"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    cfg = build_config("biggan", ROOT / "jobs" / "configs" / "biggan.yaml", entry[2:])  # the overrides are valid
    assert cfg.train.use_gpu == "true" and cfg.train.name, "a fixed train.name makes re-submitting resume"
    gpus = sum(
        g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.train.num_workers == gpus, "train.num_workers should use every GPU of the job's cluster"
    cpus = min(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    per_pod = gpus // sum(g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.train.cpus_per_worker * per_pod <= cpus, "the workers' CPUs do not fit one pod"


def test_mlflow_server_uses_postgres_and_s3():
    dep = next(d for _, d in k8s_objects("Deployment") if d["metadata"]["name"] == "mlflow")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = [*c.get("command", []), *c.get("args", [])]
    joined = " ".join(args)
    assert "server" in args
    assert re.search(r"--backend-store-uri[= ]postgresql(\+psycopg2)?://", joined)
    assert re.search(r"--artifacts-destination[= ]s3://", joined)
    names = env_names(c)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names
    service_ports = {
        p["port"] for _, s in k8s_objects("Service") if s["metadata"]["name"] == "mlflow" for p in s["spec"]["ports"]
    }
    assert 5000 in service_ports
    # the in-cluster tracking URI in the ConfigMap must pass MLflow's Host-header check
    cm = next(d for d in docs(EXAMPLE) if d["kind"] == "ConfigMap")
    host = cm["data"]["MLFLOW_TRACKING_URI"].split("://", 1)[1].rstrip("/")
    allowed = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")).split(",")
    import fnmatch

    assert any(fnmatch.fnmatch(host, pat) for pat in allowed), f"{host} not in --allowed-hosts"
    assert any(s.get("kind") == "StatefulSet" for _, s in k8s_objects("StatefulSet"))


def test_kustomization_lists_the_services_not_the_example():
    (k,) = docs(K8S / "kustomization.yaml")
    assert k["kind"] == "Kustomization"
    resources = k["resources"]
    for r in resources:
        assert (K8S / r).is_file(), r
    assert {"raycluster.yaml", "mlflow.yaml"} <= set(resources)
    assert "secrets.example.yaml" not in resources, "applying the kustomization must not overwrite real secrets"


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH; the structural checks above still ran")
def test_kustomize_builds_offline():
    r = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(r.stdout) if d}
    assert {"RayCluster", "Deployment", "StatefulSet", "Service"} <= kinds
    assert all(d["metadata"].get("namespace") == "ganforge" for d in yaml.safe_load_all(r.stdout) if d)
