"""MLflow model registry for trained generators: register G_ema as a pyfunc model, move the aliases, resolve and
list models.

One registered model per name (default: the model kind, e.g. ``biggan``); one version per registration of a run. A
version's artifacts are the G_ema weights (``weights.pt``) and the resolved architecture config (``model.json``),
wrapped by :class:`GeneratorModel`; its metadata (MLmodel ``metadata`` and version tags) holds the resolved job
config, the dataset manifest hash, the FID and the source run (the version's ``run_id``).

Aliases: ``challenger`` always marks the newest version; ``champion`` moves to a new version only when its FID is
lower than the current champion's. The first version becomes champion; a version without FID never takes champion
from one with FID.

Loading needs only the installed package: ``mlflow.pyfunc.load_model("models:/biggan@champion")`` rebuilds G from
``gan_models`` and loads the weights; artifacts come through the MLflow server (no S3 credentials, no Ray).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from rich.console import Console
from rich.table import Table

from orchestrator.generator import Generator, predict_rows
from orchestrator.tracking.mlflow import RUN_NAME_TAG, RegistryError, TrackingError, client, find_run, is_missing
from orchestrator.train import checkpoint as ckpt

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_PATH = "generator"  # run artifact folder of the pyfunc model (generator-2, -3 … on re-registration)
FID_TAG, FID_METRIC_TAG, MANIFEST_TAG = "fid", "fid_metric", "dataset.manifest_hash"


# -- pure rules ------------------------------------------------------------------------------------------------------


def pick_fid(metrics: dict[str, float]) -> tuple[str, float] | None:
    """(metric name, value) for a run's quality: ``fid`` if logged, else the lowest ``fd_*``, else None."""
    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if "fid" in finite:
        return "fid", finite["fid"]
    fds = sorted((v, k) for k, v in finite.items() if k.startswith("fd_"))
    return (fds[0][1], fds[0][0]) if fds else None


def takes_champion(new_fid: float | None, champion_fid: float | None, has_champion: bool) -> bool:
    """The champion rule: the first version wins; after that only a strictly lower FID does, and a version with no
    FID never displaces a champion (with or without one)."""
    if not has_champion:
        return True
    if new_fid is None:
        return False
    return champion_fid is None or new_fid < champion_fid


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


# -- the pyfunc model ------------------------------------------------------------------------------------------------


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with ``seed`` (int), ``class`` (int, conditional models) and optional ``truncation``
    (float; NaN = none), one image per row. Output: float32 N×C×H×W in [-1, 1]. Rows sharing a seed take
    consecutive latents of that seed, so ``n`` rows of seed s reproduce ``ganforge sample … --n n --seed s``."""

    def load_context(self, context):
        self.generator = Generator.from_files(context.artifacts["weights"], context.artifacts["config"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return predict_rows(self.generator, model_input)


MODEL_CODE = '''"""MLflow models-from-code entry point of a ganforge generator (orchestrator.tracking.registry)."""

import mlflow.models

from orchestrator.tracking.registry import GeneratorModel

mlflow.models.set_model(GeneratorModel())
'''


def example(c_dim: int) -> pd.DataFrame:
    rows = {"seed": np.array([0, 0, 1], dtype=np.int64), "truncation": np.array([0.7, 0.7, 0.7])}
    if c_dim:
        rows["class"] = np.array([0, 1, 2], dtype=np.int64) % c_dim
    return pd.DataFrame(rows)


def signature(c_dim: int, image_shape: tuple[int, ...]):
    inputs = Schema(
        [
            ColSpec("long", "seed"),
            ColSpec("long", "class", required=bool(c_dim)),
            ColSpec("double", "truncation", required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))]))


def _requirements() -> list[str]:
    reqs = []
    for pkg in ("ganforge", "torch", "mlflow", "pandas"):
        try:
            reqs.append(f"{pkg}=={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


# -- client helpers --------------------------------------------------------------------------------------------------


def registered_names(c) -> list[str]:
    names, token = [], None
    while True:
        page = c.search_registered_models(max_results=100, page_token=token)
        names += [m.name for m in page]
        token = page.token
        if not token:
            return sorted(names)


def versions(c, name: str) -> list:
    """All versions of ``name``, newest first."""
    vs = c.search_model_versions(f"name = '{name}'")
    return sorted(vs, key=lambda v: int(v.version), reverse=True)


def get_model(c, name: str):
    try:
        return c.get_registered_model(name)
    except MlflowException as e:
        if is_missing(e):
            names = registered_names(c)
            raise RegistryError(f"no registered model {name!r}; registered: {', '.join(names) or '(none)'}") from None
        raise TrackingError(f"MLflow registry error for {name!r}: {str(e).splitlines()[0]}") from None


def resolve(c, source) -> Any:
    """The ModelVersion a parsed ``models:/`` source (``orchestrator.sample.Source``) names; RegistryError in one line
    naming what exists when it does not."""
    rm = get_model(c, source.name)
    aliases = dict(rm.aliases or {})
    if source.alias:
        if source.alias not in aliases:
            listed = ", ".join(sorted(aliases)) or "(none)"
            raise RegistryError(f"model {source.name!r} has no alias {source.alias!r}; aliases: {listed}")
        return c.get_model_version(source.name, aliases[source.alias])
    all_versions = versions(c, source.name)
    if source.version == "latest" and all_versions:
        return all_versions[0]
    for v in all_versions:
        if v.version == source.version:
            return v
    listed = ", ".join(v.version for v in reversed(all_versions)) or "(none)"
    raise RegistryError(f"model {source.name!r} has no version {source.version}; versions: {listed}")


def load_model(source, tracking_uri: str | None = None):
    """(pyfunc model, ModelVersion) for a parsed ``models:/`` source, via ``mlflow.pyfunc.load_model``."""
    c = client(tracking_uri)
    version = resolve(c, source)
    mlflow.set_tracking_uri(c.tracking_uri)  # pyfunc.load_model resolves models:/ through the global registry URI
    try:
        model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    except MlflowException as e:
        raise TrackingError(f"cannot load models:/{version.name}/{version.version}: {str(e).splitlines()[0]}") from None
    if not isinstance(model.unwrap_python_model(), GeneratorModel):
        raise RegistryError(f"models:/{version.name}/{version.version} is not a ganforge generator model")
    return model, version


# -- registration ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Registered:
    name: str
    version: str
    run_id: str
    fid: float | None
    aliases: list[str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _download_checkpoint(c, run_id: str, directory: str) -> str:
    paths = []
    for name in (ckpt.META, ckpt.STATE):  # not the rank-<r>.pt files: only G_ema and the config are needed
        try:
            paths.append(Path(c.download_artifacts(run_id, f"checkpoint/{name}", directory)))
        except Exception as e:  # MLflow raises different types for a missing artifact per store
            raise RegistryError(
                f"run {run_id} has no checkpoint/{name} artifact ({type(e).__name__}); only runs finished by "
                "ganforge can be registered"
            ) from None
    assert paths[0].parent == paths[1].parent, paths
    return str(paths[0].parent)


def _free_artifact_path(c, run_id: str) -> str:
    taken = {Path(a.path).name for a in c.list_artifacts(run_id)}
    path, k = ARTIFACT_PATH, 1
    while path in taken:
        k += 1
        path = f"{ARTIFACT_PATH}-{k}"
    return path


@dataclasses.dataclass
class _Source:
    """What a registered version records about the run it comes from."""

    run_id: str
    run_name: str
    artifact_uri: str
    job: dict[str, Any]  # the resolved job config the checkpoint was trained with
    meta: ckpt.Meta
    manifest_hash: str
    fid: tuple[str, float] | None  # (metric name, value), see pick_fid

    @property
    def fid_text(self) -> str:
        return f"{self.fid[0]} {self.fid[1]:.3f}" if self.fid else "no FID"

    def metadata(self) -> dict[str, Any]:
        """The MLmodel ``metadata`` of the version, JSON-ready."""
        meta = {
            "model_name": self.job["model_name"],
            "config": self.job,
            "dataset_manifest_hash": self.manifest_hash,
            "fid": self.fid[1] if self.fid else None,
            "fid_metric": self.fid[0] if self.fid else None,
            "source_run_id": self.run_id,
            "source_run_name": self.run_name,
            "step": self.meta.step,
            "kimg": self.meta.kimg,
            "git_sha": self.meta.git_sha,
        }
        return json.loads(json.dumps({"ganforge": meta}, default=str))

    def tags(self) -> dict[str, str]:
        tags = {
            "model": self.job["model_name"],
            MANIFEST_TAG: self.manifest_hash,
            "source_run_name": self.run_name,
            "step": str(self.meta.step),
        }
        if self.fid:
            tags.update({FID_TAG: repr(self.fid[1]), FID_METRIC_TAG: self.fid[0]})
        return tags


def _save_model(gen: Generator, src: _Source, directory: Path) -> Path:
    """The pyfunc model folder of ``gen`` (weights, architecture, models-from-code entry point) in ``directory``."""
    probe_c = torch.zeros(1, dtype=torch.int64) if gen.c_dim else None
    probe = gen.sample(gen.latents(1, torch.Generator().manual_seed(0)), probe_c)
    files, model_dir = directory / "files", directory / "model"
    files.mkdir()
    torch.save(gen.G_ema.state_dict(), files / "weights.pt")
    (files / "model.json").write_text(json.dumps(gen.model_config(), indent=2, default=str))
    code = files / "generator_model.py"
    code.write_text(MODEL_CODE)
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=str(code),  # models from code: no pickled objects in the registry
        artifacts={"weights": str(files / "weights.pt"), "config": str(files / "model.json")},
        signature=signature(gen.c_dim, tuple(probe.shape[1:])),
        input_example=example(gen.c_dim),
        pip_requirements=_requirements(),
        metadata=src.metadata(),
    )
    return model_dir


def _create_version(c, name: str, src: _Source, artifact_path: str):
    try:
        c.create_registered_model(name, description="G_ema generators trained by ganforge")
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise TrackingError(f"cannot create registered model {name!r}: {str(e).splitlines()[0]}") from None
    description = (
        f"G_ema of run {src.run_name} ({src.run_id}) at step {src.meta.step}; {src.fid_text}; "
        f"dataset {src.manifest_hash[:12] or '?'}"
    )
    source = f"{src.artifact_uri.rstrip('/')}/{artifact_path}"
    return c.create_model_version(name, source=source, run_id=src.run_id, tags=src.tags(), description=description)


def register_run(
    run_ref: str,
    *,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    checkpoint_dir: str | None = None,
    log=print,
) -> Registered:
    """Register the G_ema of a finished run (id or name) as a new version of ``model_name`` (default: the run's
    ``tracking.model_name``, else its model kind), then move the aliases. ``checkpoint_dir`` skips downloading the
    run's ``checkpoint/`` artifacts when a local copy exists."""
    c = client(tracking_uri)
    run = find_run(c, run_ref)
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="gf-register-") as tmp:
        ckpt_dir = checkpoint_dir or _download_checkpoint(c, run_id, tmp)
        gen, job = Generator.with_job_from_checkpoint(ckpt_dir)
        meta = ckpt.load_meta(ckpt_dir)
        src = _Source(
            run_id=run_id,
            run_name=run.data.tags.get(RUN_NAME_TAG, run.info.run_name or ""),
            artifact_uri=run.info.artifact_uri,
            job=job,
            meta=meta,
            manifest_hash=run.data.tags.get(MANIFEST_TAG) or meta.manifest_hash or "",
            fid=pick_fid(run.data.metrics),
        )
        model_dir = _save_model(gen, src, Path(tmp))
        artifact_path = _free_artifact_path(c, run_id)
        c.log_artifacts(run_id, str(model_dir), artifact_path)

    name = model_name or job.get("tracking", {}).get("model_name") or job["model_name"]
    mv = _create_version(c, name, src, artifact_path)
    fid = src.fid[1] if src.fid else None
    aliases = promote(c, name, mv.version, fid)
    out = Registered(name, mv.version, run_id, fid, aliases)
    log(f"registered       {out.uri}  aliases: {', '.join(aliases) or '-'}  {src.fid_text if src.fid else '(no FID)'}")
    return out


def promote(c, name: str, version: str, fid: float | None) -> list[str]:
    """Move ``challenger`` to ``version`` and ``champion`` too when the champion rule says so; the aliases it got."""
    current = dict(c.get_registered_model(name).aliases or {})
    champion = c.get_model_version_by_alias(name, CHAMPION) if CHAMPION in current else None
    got = [CHALLENGER]
    c.set_registered_model_alias(name, CHALLENGER, version)
    if takes_champion(fid, _float(champion.tags.get(FID_TAG)) if champion else None, champion is not None):
        c.set_registered_model_alias(name, CHAMPION, version)
        got.insert(0, CHAMPION)
    return got


# -- listing ---------------------------------------------------------------------------------------------------------


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else ""


def _fid_text(v) -> str:
    fid = _float(v.tags.get(FID_TAG))
    if fid is None:
        return "-"
    metric = v.tags.get(FID_METRIC_TAG, "fid")
    return f"{fid:.3f}" if metric == "fid" else f"{fid:.3f} ({metric})"


def _console():
    return Console(width=None if sys.stdout.isatty() else 200)


def list_models(tracking_uri: str | None = None) -> int:
    """`ganforge models list`: every registered model with its version count, champion and challenger."""
    c = client(tracking_uri)
    names = registered_names(c)
    if not names:
        print("no registered models")
        return 0
    table = Table(title="registered models")
    for col in ("name", "versions", "latest", "champion", "champion FID", "challenger", "updated"):
        table.add_column(col)
    for name in names:
        rm = c.get_registered_model(name)
        vs = versions(c, name)
        aliases = dict(rm.aliases or {})
        champ = next((v for v in vs if v.version == aliases.get(CHAMPION)), None)
        table.add_row(
            name,
            str(len(vs)),
            vs[0].version if vs else "-",
            aliases.get(CHAMPION, "-"),
            _fid_text(champ) if champ else "-",
            aliases.get(CHALLENGER, "-"),
            _when(rm.last_updated_timestamp),
        )
    _console().print(table)
    return 0


def show_model(name: str, tracking_uri: str | None = None) -> int:
    """`ganforge models show NAME`: its versions with aliases, FID, dataset hash and source runs."""
    c = client(tracking_uri)
    rm = get_model(c, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    table = Table(title=f"{name}: versions (load with models:/{name}@champion or models:/{name}/<version>)")
    for col in ("version", "aliases", "FID", "dataset", "source run", "run id", "step", "created"):
        table.add_column(col)
    for v in versions(c, name):
        table.add_row(
            v.version,
            ", ".join(sorted(by_version.get(v.version, []))) or "-",
            _fid_text(v),
            v.tags.get(MANIFEST_TAG, "")[:12],
            v.tags.get("source_run_name", ""),
            v.run_id or "",
            v.tags.get("step", ""),
            _when(v.creation_timestamp),
        )
    _console().print(table)
    return 0
