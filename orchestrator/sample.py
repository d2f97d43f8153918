"""Images from a trained generator: a registered model, a local checkpoint or one in S3 → a PNG grid.

    ganforge sample models:/biggan@champion --n 64 --seed 0 --truncation 0.7 --out grid.png
    ganforge sample models:/biggan/3 ...    |    outputs/<run>/checkpoint    |    s3://ganforge/runs/<run>/checkpoint_…

With ``--to s3://…`` the images become a synthetic dataset instead (:mod:`orchestrator.export`).

Sampling is deterministic: the latents come from ``torch.Generator().manual_seed(seed)`` through the model's own
``Recipe.latents``, so the same source, seed, count and truncation give a bit-identical PNG. Grid row r holds class
r (mod the class count) for conditional models unless one class is asked for.

Loading and drawing live in :mod:`orchestrator.generator`; this module resolves a source (``models:/`` through the
registry, a checkpoint directory, S3) and writes the grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orchestrator.env import split_s3_uri
from orchestrator.generator import Generator, draw
from orchestrator.tracking.images import grid_columns, grid_labels, image_grid

MODELS_SCHEME = "models:/"


@dataclass(frozen=True)
class Source:
    """Where a generator comes from: ``registry`` (name + version or alias), ``checkpoint`` (a local directory) or
    ``s3`` (a checkpoint directory in S3)."""

    kind: str
    uri: str
    name: str = ""
    version: str = ""  # a number or "latest"
    alias: str = ""


def parse_source(uri: str) -> Source:
    """``models:/name@alias``, ``models:/name/3``, ``models:/name/latest``, ``s3://…`` or a local path; ValueError
    (one line) for anything else."""
    expected = "expected models:/<name>@<alias>, models:/<name>/<version>, a checkpoint directory or s3://…"
    if uri.startswith(MODELS_SCHEME):
        rest = uri[len(MODELS_SCHEME) :].strip("/")
        if "@" in rest:
            name, _, alias = rest.partition("@")
            if name and alias and "/" not in name + alias and "@" not in alias:
                return Source("registry", uri, name=name, alias=alias)
        else:
            name, _, version = rest.partition("/")
            if name and (version.isdigit() or version == "latest"):
                return Source("registry", uri, name=name, version=version)
        raise ValueError(f"bad model URI {uri!r}; {expected}")
    if uri.startswith("s3://"):
        _, key = split_s3_uri(uri)
        if not key.strip("/"):
            raise ValueError(f"bad checkpoint URI {uri!r}; {expected}")
        return Source("s3", uri.rstrip("/"))
    if not uri or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", uri):  # another scheme (runs:/, gs://, …)
        raise ValueError(f"bad model URI {uri!r}; {expected}")
    return Source("checkpoint", uri)


@dataclass
class Loaded:
    """A generator and where it came from: what a synthetic dataset records about its model."""

    generator: Generator
    uri: str  # as given (an alias may move later)
    resolved: str  # models:/NAME/VERSION for registered models, else the checkpoint location
    name: str  # registered model name, else the architecture (biggan, stylegan2)
    version: str = ""
    run_id: str = ""
    dataset: str = ""  # the training dataset's s3:// prefix, when the model's config names one


def load_generator(uri: str, device: str = "cpu") -> Loaded:
    """The generator behind any source ``ganforge sample`` accepts, with its resolved version and source run."""
    src = parse_source(uri)
    if src.kind == "registry":
        from orchestrator.tracking.registry import load_model  # MLflow loads only for models:/ sources

        model, version = load_model(src)
        gen = model.unwrap_python_model().generator.to(device)
        job = ((model.metadata.metadata or {}).get("ganforge") or {}).get("config") or {}
        resolved = f"models:/{version.name}/{version.version}"
        dataset = job.get("data", {}).get("dataset", "")
        return Loaded(gen, uri, resolved, version.name, str(version.version), version.run_id or "", dataset)
    gen, job = (
        Generator.with_job_from_s3(src.uri, device)
        if src.kind == "s3"
        else Generator.with_job_from_checkpoint(src.uri, device)
    )
    return Loaded(gen, uri, src.uri, gen.model_name, dataset=job.get("data", {}).get("dataset", ""))


# -- the `ganforge sample` command ------------------------------------------------------------------------------------


def sample_grid(
    uri: str,
    out: str,
    *,
    n: int = 64,
    seed: int = 0,
    truncation: float | None = None,
    class_: int | None = None,
    scale: int = 1,
    log=print,
) -> str:
    """Write an n-image grid from ``uri`` to ``out``; returns a description of the source."""
    src = parse_source(uri)
    if n < 1:
        raise ValueError(f"--n {n} not supported; valid: ≥ 1")
    if src.kind == "registry":
        import pandas as pd

        from orchestrator.tracking.registry import load_model

        model, version = load_model(src)
        c_dim = model.unwrap_python_model().generator.c_dim
        labels = grid_labels(n, c_dim, grid_columns(n), class_)
        truncations = np.full(n, np.nan if truncation is None else truncation)
        rows = pd.DataFrame({"seed": np.full(n, seed, dtype=np.int64), "truncation": truncations})
        if labels is not None:
            rows["class"] = labels.numpy()
        images = torch.from_numpy(model.predict(rows))
        what = f"models:/{version.name}/{version.version}"
    else:
        gen = Generator.from_s3(src.uri) if src.kind == "s3" else Generator.from_checkpoint(src.uri)
        images = draw(gen, n, seed, truncation, class_)
        what = src.uri
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=grid_columns(n), scale=scale).save(out, format="PNG")
    log(f"{out}: {n} images from {what}, seed {seed}, truncation {truncation}")
    return what
