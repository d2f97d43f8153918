"""The model registry on the real local stack: two short `python jobs/biggan.py` runs register G_ema (one at the end
of fit(), one through `ganforge models register`), FIDs logged to the runs move `champion`, `challenger` follows the
newest version, and `ganforge sample models:/…@champion` in a fresh shell with only MLFLOW_TRACKING_URI writes the
same PNG every time."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator import cli
from orchestrator.data.writer import write_shards
from orchestrator.sample import sample_grid
from orchestrator.tracking import mlflow as tracking
from orchestrator.tracking import registry
from tests.jobs import REPO, TINY_BIGGAN

pytestmark = pytest.mark.integration
GANFORGE = str(Path(sys.executable).parent / "ganforge")
TINY = [
    *TINY_BIGGAN,
    "train.tick_steps=2",
    "train.checkpoint_ticks=1",
    "train.keep_checkpoints=1",
    "train.steps=2",
    "train.num_workers=1",
    "train.max_failures=0",
]


@pytest.fixture(scope="module")
def dataset(stack):
    uri = f"s3://ganforge/datasets/registry-{uuid.uuid4().hex[:6]}"
    write_shards("fashion-mnist", uri, max_samples=1200, samples_per_shard=300, progress=False)
    return uri


def train(stack, dataset, runs: dict[str, list[str]], outputs: Path) -> dict[str, str]:
    """Run the jobs ``{name: extra overrides}`` side by side; their stdout by name."""
    # RAY_ADDRESS = the stack's GCS: each job joins the running Ray head instead of starting a private one
    env = {**os.environ, "RAY_ADDRESS": stack.ray_gcs_address, "GANFORGE_OUTPUT_DIR": str(outputs)}
    procs = {}
    for name, extra in runs.items():
        args = [
            f"data.dataset={dataset}",
            "train.storage_path=s3://ganforge/runs-test",
            f"train.name={name}",
            *TINY,
            *extra,
        ]
        log = open(outputs / f"{name}.log", "w+")  # noqa: SIM115 - a file, not a pipe: Ray's output may be long
        procs[name] = (
            subprocess.Popen(
                [sys.executable, "jobs/biggan.py", *args],
                cwd=REPO,
                env=env,
                text=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            log,
        )
    out = {}
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=600)
        log.seek(0)
        out[name] = log.read()
        log.close()
        assert code == 0, out[name][-6000:]
    return out


@pytest.fixture(scope="module")
def registered(stack, dataset, tmp_path_factory):
    """Two runs trained side by side, four versions; the aliases after each registration."""
    client = tracking.client(stack.mlflow_url)
    tag = uuid.uuid4().hex[:6]
    model, outputs = f"biggan-reg-{tag}", tmp_path_factory.mktemp("outputs")
    run_a, run_b = f"reg-a-{tag}", f"reg-b-{tag}"
    # A registers itself at the end of fit() (no FID yet); B does not
    client.create_experiment(model)  # up front: two jobs starting together would race to create it
    common = [f"tracking.experiment={model}", f"tracking.model_name={model}"]
    jobs = {run_a: common, run_b: [*common, "tracking.register=false"]}
    logs = train(stack, dataset, jobs, outputs)
    assert f"registered       models:/{model}/1" in logs[run_a] and "registered  " not in logs[run_b]
    ids = {k: tracking.find_run(client, name).info.run_id for k, name in (("a", run_a), ("b", run_b))}

    def aliases():
        return dict(client.get_registered_model(model).aliases)

    steps = {1: aliases()}  # v1: the first version is champion
    # v2: run B with FID 50, through the CLI in its own process → an FID beats a champion without one
    client.log_metric(ids["b"], "fid", 50.0, step=2)
    reg = subprocess.run(
        [GANFORGE, "models", "register", run_b, "--model-name", model], capture_output=True, text=True, timeout=300
    )
    assert reg.returncode == 0, reg.stdout[-3000:] + reg.stderr[-3000:]
    assert f"models:/{model}/2" in reg.stdout
    steps[2] = aliases()
    # v3: run A with a worse FID → challenger only; v4: a better FID → champion moves
    client.log_metric(ids["a"], "fid", 80.0, step=2)
    assert registry.register_run(run_a, model_name=model, log=lambda *_: None).version == "3"
    steps[3] = aliases()
    client.log_metric(ids["a"], "fid", 20.0, step=3)
    assert registry.register_run(ids["a"], model_name=model, log=lambda *_: None).version == "4"
    steps[4] = aliases()
    return {
        "model": model,
        "client": client,
        "steps": steps,
        "runs": ids,
        "checkpoint_a": str(outputs / run_a / "checkpoint"),
    }


def test_aliases_follow_fid_and_versions_carry_metadata(registered):
    model, client, runs = registered["model"], registered["client"], registered["runs"]
    assert registered["steps"] == {
        1: {"champion": "1", "challenger": "1"},  # the first version, without FID
        2: {"champion": "2", "challenger": "2"},  # FID 50 vs none
        3: {"champion": "2", "challenger": "3"},  # FID 80 > 50: challenger only
        4: {"champion": "4", "challenger": "4"},  # FID 20 < 50
    }
    versions = {v.version: v for v in registry.versions(client, model)}
    assert [versions[k].run_id for k in "1234"] == [runs["a"], runs["b"], runs["a"], runs["a"]]
    assert [versions[k].tags.get("fid") for k in "1234"] == [None, "50.0", "80.0", "20.0"]
    manifest_hash = client.get_run(runs["b"]).data.tags["dataset.manifest_hash"]
    assert len(manifest_hash) == 64 and versions["2"].tags["dataset.manifest_hash"] == manifest_hash
    assert client.get_model_version_by_alias(model, "champion").version == "4"

    # the artifacts are G_ema + its config, not the training checkpoint; the MLmodel carries the metadata
    import mlflow

    files = {Path(a.path).name for a in client.list_artifacts(runs["b"], "generator/artifacts")}
    assert files == {"weights.pt", "model.json"}
    info = mlflow.models.get_model_info(f"models:/{model}/2")
    meta = info.metadata["ganforge"]
    assert meta["config"]["model"]["ch"] == 8 and meta["source_run_id"] == runs["b"] and meta["fid"] == 50.0
    assert meta["dataset_manifest_hash"] == manifest_hash
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["seed", "class", "truncation"]


def test_sample_champion_in_a_fresh_shell_is_bit_identical(stack, registered, tmp_path):
    model = registered["model"]
    env = {"MLFLOW_TRACKING_URI": stack.mlflow_url, "PATH": os.environ["PATH"]}  # no AWS_*: artifacts are proxied

    def sample(out: str, seed: int) -> bytes:
        cmd = [
            GANFORGE,
            "sample",
            f"models:/{model}@champion",
            "--n",
            "16",
            "--seed",
            str(seed),
            "--truncation",
            "0.7",
            "--out",
            out,
        ]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"models:/{model}/4" in proc.stdout
        return (tmp_path / out).read_bytes()

    a = sample("a.png", 0)
    img = np.asarray(Image.open(tmp_path / "a.png").convert("L"), dtype=np.float64)
    assert img.shape == (4 * 34 + 2, 4 * 34 + 2)  # 4×4 tiles of 32² with 2 px gaps
    assert 10 < img.mean() < 245 and img.std() > 5
    assert sample("b.png", 0) == a
    assert sample("c.png", 1) != a
    # the pyfunc path and the checkpoint path give the same grid: v4 is run A's final G_ema
    sample_grid(registered["checkpoint_a"], str(tmp_path / "d.png"), n=16, seed=0, truncation=0.7, log=print)
    assert (tmp_path / "d.png").read_bytes() == a


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sample", "models:/{model}x@champion"], ["no registered model '{model}x'", "{model}"]),
        (["sample", "models:/{model}@champ"], ["has no alias 'champ'", "aliases: challenger, champion"]),
        (["sample", "models:/{model}/9"], ["has no version 9", "versions: 1, 2, 3, 4"]),
        (["sample", "models:/{model}"], ["bad model URI"]),
        (["sample", "no/such/checkpoint"], ["checkpoint directory 'no/such/checkpoint' not found"]),
        (["models", "show", "{model}x"], ["no registered model '{model}x'"]),
        (["models", "register", "no-such-run"], ["no MLflow run with id or name 'no-such-run'"]),
    ],
)
def test_bad_names_fail_in_one_line(registered, capsys, tmp_path, argv, expected):
    model = registered["model"]
    argv = [a.format(model=model) for a in argv] + (["--out", str(tmp_path / "x.png")] if argv[0] == "sample" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for text in expected:
        assert text.format(model=model) in err, err
    assert not (tmp_path / "x.png").exists()


def test_models_list_and_show(registered, capsys):
    model, runs = registered["model"], registered["runs"]
    assert cli.main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if model in line)
    assert "20.000" in row and " 4 " in row
    assert cli.main(["models", "show", model]) == 0
    lines = capsys.readouterr().out.splitlines()
    v2 = next(line for line in lines if runs["b"] in line)
    assert "champion" not in v2 and "50.000" in v2 and "reg-b-" in v2
    v4 = next(line for line in lines if "20.000" in line)
    assert "challenger, champion" in v4 and runs["a"] in v4
