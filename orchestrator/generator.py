"""A trained generator outside training: G_ema rebuilt from its architecture config, loaded from a training checkpoint
(local or S3) or a registered model's files, and drawn deterministically.

:class:`Generator` is what ``ganforge sample``, the model registry's MLflow model and synthetic-dataset export share:
it rebuilds G from ``gan_models`` and its config and loads the G_ema weights (no D, no optimisers, no Ray). Latents
come from ``torch.Generator().manual_seed(seed)`` through the model's own ``Recipe.latents``, so the same weights,
seed, count and truncation give bit-identical images. Grid row r holds class r (mod the class count) for conditional
models unless one class is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from botocore.exceptions import BotoCoreError, ClientError

import gan_models
from orchestrator.data import s3
from orchestrator.env import Env
from orchestrator.tracking.images import grid_columns, grid_labels
from orchestrator.train import checkpoint as ckpt


class Generator:
    """G_ema and its architecture config: just what sampling needs (no D, no optimisers, no training state).

    ``latents`` and ``sample`` are the model's own ``Recipe`` methods applied to this object (it carries the
    attributes they read: ``G_ema``, ``z_dim``, ``device``, ``amp``), so images are the training grids' (up to float
    rounding where training keeps another memory format).
    """

    amp = False  # bf16 autocast is a training speed-up; sampling runs in fp32

    def __init__(self, model_name: str, config: Any, weights: dict[str, torch.Tensor], device: str = "cpu"):
        module = gan_models.module(model_name)
        if not dataclasses.is_dataclass(config):
            config = gan_models.config(model_name, **config)
        G, _ = module.build(config)
        G.load_state_dict(weights)
        G.requires_grad_(False)
        self.model_name, self.cfg, self._recipe = model_name, config, module.Recipe
        self.device = torch.device(device)
        self.G_ema = G.to(self.device).eval()
        self.z_dim, self.c_dim = int(G.z_dim), int(G.c_dim or 0)

    def _autocast(self):
        return contextlib.nullcontext()

    def latents(self, n: int, generator: torch.Generator, truncation: float | None = None) -> torch.Tensor:
        return self._recipe.latents(self, n, generator, truncation)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, c: torch.Tensor | None, truncation: float | None = None) -> torch.Tensor:
        return self._recipe.sample(self, z, c, truncation).float().cpu()

    def to(self, device: str | torch.device) -> Generator:
        self.device = torch.device(device)
        self.G_ema = self.G_ema.to(self.device)
        return self

    def model_config(self) -> dict[str, Any]:
        """The resolved architecture config, JSON-ready (what ``gan_models.config(name, **cfg)`` rebuilds)."""
        return {"model_name": self.model_name, "config": dataclasses.asdict(self.cfg)}

    # -- loading -----------------------------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, weights_path: str, config_path: str, device: str = "cpu") -> Generator:
        """From the registered model's artifacts: ``weights.pt`` (G_ema state dict) + ``model.json``."""
        spec = json.loads(Path(config_path).read_text())
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
        return cls(spec["model_name"], spec["config"], weights, device)

    @classmethod
    def from_checkpoint(cls, directory: str, device: str = "cpu") -> Generator:
        """From a training checkpoint directory (state.pt + meta.json, checksum verified)."""
        return cls.with_job_from_checkpoint(directory, device)[0]

    @classmethod
    def with_job_from_checkpoint(cls, directory: str, device: str = "cpu") -> tuple[Generator, dict[str, Any]]:
        """The generator and the job config (a dict) the checkpoint was trained with."""
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory!r} not found")
        state = ckpt.load_train_state(directory)
        job = state.config
        return cls(job["model_name"], job["model"], state.recipe["G_ema"], device), job

    @classmethod
    def from_s3(cls, uri: str, device: str = "cpu") -> Generator:
        """From a checkpoint directory in S3 (``s3://…/checkpoint_…``); needs the usual AWS_* variables."""
        return cls.with_job_from_s3(uri, device)[0]

    @classmethod
    def with_job_from_s3(cls, uri: str, device: str = "cpu") -> tuple[Generator, dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="gf-ckpt-") as d:
            download_checkpoint(uri, d, files=(ckpt.META, ckpt.STATE))
            return cls.with_job_from_checkpoint(d, device)


def download_checkpoint(uri: str, directory: str, files: tuple[str, ...]) -> None:
    env = Env.from_environ()
    bucket, prefix = s3.split_prefix(uri)
    client = s3.client(env, fail_fast=True)
    for name in files:
        key = prefix + name
        try:
            client.download_file(bucket, key, str(Path(directory) / name))
        except ClientError as e:
            if s3.is_missing(e):
                raise FileNotFoundError(f"no checkpoint at {uri} ({name} missing)") from None
            raise s3.DataError(s3.describe_error(e, env, f"s3://{bucket}/{key}")) from None
        except (BotoCoreError, OSError) as e:
            raise s3.DataError(s3.describe_error(e, env, f"s3://{bucket}/{key}")) from None


def draw(gen, n: int, seed: int, truncation: float | None = None, class_: int | None = None) -> torch.Tensor:
    """n images (N×C×H×W, [-1, 1]) with latents from ``Generator().manual_seed(seed)`` and grid labels."""
    if n < 1:
        raise ValueError(f"n {n} not supported; valid: ≥ 1")
    z = gen.latents(n, torch.Generator().manual_seed(seed), truncation)
    return gen.sample(z, grid_labels(n, gen.c_dim, grid_columns(n), class_), truncation)


def fixed_latents(model, grid_size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training grid's latents and labels for ``model`` (a recipe or a Generator): the same every tick, so grids
    show training progress rather than sampling noise, and the same for the final grid of the finished run."""
    n = grid_size**2
    z = model.latents(n, torch.Generator().manual_seed(seed + 12345)).to(device)
    c = grid_labels(n, model.c_dim, grid_size)
    return z, None if c is None else c.to(device)


def _truncation(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def predict_rows(gen, rows) -> np.ndarray:
    """The registered model's ``predict``: one image per row of ``rows`` (a DataFrame with ``seed``, ``class`` for
    conditional models, optional ``truncation``) → float32 N×C×H×W in [-1, 1].

    Rows sharing a seed (and truncation) take consecutive latents from that seed's generator in row order, so n rows
    with seed s give exactly ``draw(gen, n, s, …)`` — the grid ``ganforge sample`` writes.
    """
    n = len(rows)
    if n == 0:
        raise ValueError("no rows to generate")
    if "seed" not in rows:
        raise ValueError("input needs a 'seed' column (one image per row)")
    seeds = [int(s) for s in rows["seed"]]
    truncs = [_truncation(t) for t in rows["truncation"]] if "truncation" in rows else [None] * n
    labels = None
    if gen.c_dim:
        if "class" not in rows:
            raise ValueError(f"the model is class-conditional ({gen.c_dim} classes); give a 'class' column")
        labels = torch.tensor([int(c) for c in rows["class"]], dtype=torch.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= gen.c_dim:
            raise ValueError(f"class values must be in 0..{gen.c_dim - 1}")
    groups: dict[tuple[int, float | None], list[int]] = {}
    for i, key in enumerate(zip(seeds, truncs, strict=True)):
        groups.setdefault(key, []).append(i)
    z = torch.empty(n, gen.z_dim)
    for (seed, t), idx in groups.items():
        z[idx] = gen.latents(len(idx), torch.Generator().manual_seed(seed), t).float().cpu()
    out: torch.Tensor | None = None
    for t in dict.fromkeys(truncs):  # StyleGAN2 truncates in W: one forward per truncation value
        idx = [i for i in range(n) if truncs[i] == t]
        images = gen.sample(z[idx], labels[idx] if labels is not None else None, t)
        if out is None:
            out = torch.empty(n, *images.shape[1:])
        out[idx] = images
    return out.numpy().astype(np.float32, copy=False)
