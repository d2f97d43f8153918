"""Sampling and registry rules without services: URI parsing, seeded latents, class cycling, the champion rule, and
that the sampling-only Generator reproduces the training Recipe's images bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gan_models
from orchestrator.config import build_config
from orchestrator.generator import Generator, draw, predict_rows
from orchestrator.sample import Source, parse_source, sample_grid
from orchestrator.tracking.images import grid_labels
from orchestrator.tracking.registry import pick_fid, takes_champion
from orchestrator.train import checkpoint as ckpt

BIGGAN = dict(resolution=32, ch=4, dim_z=20, shared_dim=8, attn="0", n_classes=10)
STYLEGAN2 = dict(resolution=16, channel_base=128, channel_max=8, mapping_layers=2, z_dim=8, w_dim=8)


def recipe_for(name: str, **cfg):
    torch.manual_seed(1)
    mod = gan_models.module(name)
    recipe = mod.Recipe(mod.Config(**cfg), mod.HParams())
    recipe.setup(torch.device("cpu"), lambda m: m)
    with torch.no_grad():  # G_ema ≠ G, so loading the wrong weights would show
        for p in recipe.G_ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return recipe


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/biggan@champion", Source("registry", "models:/biggan@champion", name="biggan", alias="champion")),
        ("models:/biggan/3", Source("registry", "models:/biggan/3", name="biggan", version="3")),
        ("models:/my-gan/latest", Source("registry", "models:/my-gan/latest", name="my-gan", version="latest")),
        ("s3://ganforge/runs/a/checkpoint_000002/", Source("s3", "s3://ganforge/runs/a/checkpoint_000002")),
        ("outputs/run/checkpoint", Source("checkpoint", "outputs/run/checkpoint")),
    ],
)
def test_parse_source(uri, expected):
    assert parse_source(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "models:/biggan",
        "models:/biggan/three",
        "models:/@champion",
        "models:/biggan@",
        "models:/a/b/3",
        "models:/a@b/c",
        "s3://ganforge",
        "gs://bucket/ckpt",
        "",
        "runs:/abc/generator",
    ],
)
def test_parse_source_rejects_bad_uris_in_one_line(uri):
    with pytest.raises(ValueError) as e:
        parse_source(uri)
    assert "\n" not in str(e.value) and "models:/<name>@<alias>" in str(e.value)


def test_grid_labels_cycle_per_row_or_fix_one_class():
    assert grid_labels(9, 10, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert grid_labels(8, 3, 2).tolist() == [0, 0, 1, 1, 2, 2, 0, 0]  # wraps past the last class
    assert grid_labels(4, 10, 2, class_=7).tolist() == [7, 7, 7, 7]
    assert grid_labels(4, 0, 2) is None
    with pytest.raises(ValueError, match=r"0\.\.9"):
        grid_labels(4, 10, 2, class_=10)
    with pytest.raises(ValueError, match="unconditional"):
        grid_labels(4, 0, 2, class_=1)


@pytest.mark.parametrize(
    ("name", "cfg", "truncation"),
    [
        ("biggan", BIGGAN, 0.7),
        ("biggan", BIGGAN, None),
        ("stylegan2", STYLEGAN2, 0.5),
        ("stylegan2", {**STYLEGAN2, "c_dim": 3}, None),
    ],
)
def test_generator_reproduces_the_recipe(name, cfg, truncation):
    recipe = recipe_for(name, **cfg)
    gen = Generator(name, recipe.cfg, recipe.G_ema.state_dict())
    z = recipe.latents(9, torch.Generator().manual_seed(5), truncation)
    c = grid_labels(9, recipe.c_dim, 3)
    expected = recipe.sample(z, c, truncation).float()
    got = draw(gen, 9, seed=5, truncation=truncation)
    # the same model code; only float rounding may differ (the recipe may keep training's memory format)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(draw(gen, 9, 5, truncation), got)  # same seed → same images
    assert not torch.equal(draw(gen, 9, 6, truncation), got)  # other seed → other images


def test_biggan_truncation_bounds_the_latents():
    gen = Generator("biggan", BIGGAN, recipe_for("biggan", **BIGGAN).G_ema.state_dict())
    z = gen.latents(64, torch.Generator().manual_seed(0), 0.5)
    assert z.abs().max() <= 0.5 and z.shape == (64, gen.z_dim)


def test_files_round_trip_and_predict_rows_match_the_grid(tmp_path):
    recipe = recipe_for("biggan", **BIGGAN)
    gen = Generator("biggan", recipe.cfg, recipe.G_ema.state_dict())
    torch.save(gen.G_ema.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "model.json").write_text(json.dumps(gen.model_config()))
    loaded = Generator.from_files(str(tmp_path / "weights.pt"), str(tmp_path / "model.json"))
    assert loaded.cfg == gen.cfg

    # n rows of one seed = the n-image grid of that seed
    labels = grid_labels(16, 10, 4)
    rows = pd.DataFrame({"seed": [3] * 16, "class": labels.numpy(), "truncation": [0.7] * 16})
    out = predict_rows(loaded, rows)
    assert out.dtype == np.float32 and out.shape == (16, 3, 32, 32)
    assert np.array_equal(out, draw(gen, 16, 3, 0.7).numpy())

    # rows of seed s take that seed's latents in row order; NaN truncation = none
    rows = pd.DataFrame({"seed": [1, 2, 1], "class": [4, 4, 4], "truncation": [np.nan, np.nan, np.nan]})
    out = predict_rows(loaded, rows)
    seed1, seed2 = draw(gen, 2, 1, None, class_=4).numpy(), draw(gen, 1, 2, None, class_=4).numpy()
    # (a different batch composition may differ in float rounding only)
    assert np.allclose(out[[0, 2]], seed1, atol=1e-5) and np.allclose(out[1], seed2[0], atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-2)
    assert np.array_equal(out, predict_rows(loaded, rows))  # deterministic
    with pytest.raises(ValueError, match="'class' column"):
        predict_rows(loaded, pd.DataFrame({"seed": [1]}))


def test_sample_grid_from_a_local_checkpoint_is_bit_identical(tmp_path):
    job = build_config("biggan", overrides=[f"model.{k}={v}" for k, v in BIGGAN.items()])
    recipe = recipe_for("biggan", **BIGGAN)
    state = ckpt.TrainState(recipe.state_dict(), step=2, tick=1, config=job.to_dict())
    ckpt.save(tmp_path / "ckpt", rank=0, rank_state=ckpt.RankState({}, {}), train=state)
    a, b, c = (str(tmp_path / f"{x}.png") for x in "abc")
    sample_grid(str(tmp_path / "ckpt"), a, n=16, seed=0, truncation=0.7, log=lambda *_: None)
    sample_grid(str(tmp_path / "ckpt"), b, n=16, seed=0, truncation=0.7, log=lambda *_: None)
    sample_grid(str(tmp_path / "ckpt"), c, n=16, seed=1, truncation=0.7, log=lambda *_: None)
    data = [Path(p).read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2]
    from PIL import Image

    assert Image.open(a).size == (4 * 34 + 2, 4 * 34 + 2)
    with pytest.raises(FileNotFoundError, match="not found"):
        sample_grid(str(tmp_path / "nothing"), a)


def test_pick_fid_prefers_fid_then_the_best_fd():
    assert pick_fid({"fid": 12.5, "fd_dinov2": 3.0, "loss/G": 1.0}) == ("fid", 12.5)
    assert pick_fid({"fd_b": 9.0, "fd_a": 4.0}) == ("fd_a", 4.0)
    assert pick_fid({"fid": float("nan"), "fd_a": 4.0}) == ("fd_a", 4.0)
    assert pick_fid({"loss/G": 1.0}) is None


def test_champion_rule():
    assert takes_champion(None, None, has_champion=False)  # the first version
    assert takes_champion(50.0, None, has_champion=False)
    assert takes_champion(20.0, 50.0, has_champion=True)  # lower FID wins
    assert not takes_champion(80.0, 50.0, has_champion=True)
    assert not takes_champion(50.0, 50.0, has_champion=True)  # a tie keeps the champion
    assert not takes_champion(None, 50.0, has_champion=True)  # no FID never displaces one with FID
    assert not takes_champion(None, None, has_champion=True)
    assert takes_champion(30.0, None, has_champion=True)  # an FID beats a champion without one
