"""Synthetic export on the real local stack: a registered generator (a tiny BigGAN checkpoint registered through the
real MLflow registry, no training needed) → shards in SeaweedFS that ShardLoader reads back pixel for pixel as the
model regenerates them from the recorded seeds; an interrupted export resumes shard by shard into the manifest an
uninterrupted one writes; prefixes holding other data are refused in one line."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
import uuid

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import gan_models
from orchestrator import cli
from orchestrator.config import DataConfig, build_config
from orchestrator.data import fashion_mnist
from orchestrator.data.images import encode
from orchestrator.data.loader import ShardLoader
from orchestrator.data.manifest import Manifest
from orchestrator.data.tar import iter_tar_samples
from orchestrator.data.writer import write_shards
from orchestrator.export import export_synthetic
from orchestrator.tracking import registry
from orchestrator.train import checkpoint as ckpt

pytestmark = pytest.mark.integration
BIGGAN = dict(resolution=32, ch=4, dim_z=20, shared_dim=8, attn="0", n_classes=10)
N, PER_SHARD, SEED, TRUNC = 50, 12, 7, 0.8  # shards of 12, 12, 12, 12, 2
QUIET = dict(progress=False, log=lambda *_: None)


def export_args(n: int = N, seed: int = SEED) -> list[str]:
    """`ganforge sample … --to` options of the export the tests make (and variations of it)."""
    return ["--n", str(n), "--seed", str(seed), "--truncation", str(TRUNC), "--shard-size", str(PER_SHARD)]


@pytest.fixture(scope="module")
def tag():
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def model(stack, tag, tmp_path_factory):
    """A registered tiny BigGAN whose config names a real (small) Fashion-MNIST dataset: (name, checkpoint dir)."""
    from mlflow import MlflowClient

    dataset = f"s3://ganforge/datasets/export-{tag}"
    write_shards("fashion-mnist", dataset, max_samples=20, samples_per_shard=20, progress=False, workers=1)
    job = build_config("biggan", overrides=[f"model.{k}={v}" for k, v in BIGGAN.items()] + [f"data.dataset={dataset}"])
    torch.manual_seed(3)
    mod = gan_models.module("biggan")
    recipe = mod.Recipe(mod.Config(**BIGGAN), mod.HParams())
    recipe.setup(torch.device("cpu"), lambda m: m)
    with torch.no_grad():  # fresh G's images are near-constant; spread them so nearest-image matching is meaningful
        for p in recipe.G_ema.parameters():
            p.add_(0.2 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    state = ckpt.TrainState(recipe.state_dict(), step=2, tick=1, config=job.to_dict())
    ckpt.save(directory, rank=0, rank_state=ckpt.RankState({}, {}), train=state)
    client = MlflowClient(stack.mlflow_url)
    name = f"export-{tag}"
    run = client.create_run(client.create_experiment(name))
    registry.register_run(run.info.run_id, model_name=name, checkpoint_dir=str(directory), log=lambda *_: None)
    return {"name": name, "checkpoint": str(directory), "run_id": run.info.run_id, "dataset": dataset}


def objects(s3, uri: str) -> dict[str, dict]:
    bucket, prefix = uri[5:].split("/", 1)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o for p in pages for o in p.get("Contents", [])}


def get(s3, uri: str, name: str) -> bytes:
    bucket, prefix = uri[5:].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


@pytest.fixture(scope="module")
def full(stack, model, tag):
    """An uninterrupted export from models:/NAME@champion."""
    uri = f"s3://ganforge/synthetic/{tag}/full"
    result = export_synthetic(
        f"models:/{model['name']}@champion", uri, n=N, seed=SEED, truncation=TRUNC, samples_per_shard=PER_SHARD, **QUIET
    )
    return uri, result


def test_manifest_shards_and_sample_metadata(s3, model, full):
    uri, result = full
    manifest = result.manifest
    names = [f"train-{k:06d}.tar" for k in range(5)]
    assert result.written == names and result.reused == [] and result.deleted == []
    assert json.loads(get(s3, uri, "manifest.json")) == manifest.to_json()
    fields = manifest.to_json()
    assert {
        k: fields[k]
        for k in ("format", "name", "resolution", "channels", "num_classes", "classes", "num_samples", "image_ext")
    } == {
        "format": 1,
        "name": f"{model['name']}-synthetic",
        "resolution": 32,
        "channels": 3,
        "num_classes": 10,
        "classes": fashion_mnist.CLASSES,
        "num_samples": N,
        "image_ext": "png",
    }
    syn = manifest.synthetic
    assert {
        k: syn[k]
        for k in (
            "model",
            "resolved",
            "version",
            "run_id",
            "seed",
            "truncation",
            "class",
            "labels",
            "n",
            "samples_per_shard",
            "training_dataset",
        )
    } == {
        "model": f"models:/{model['name']}@champion",
        "resolved": f"models:/{model['name']}/1",
        "version": "1",
        "run_id": model["run_id"],
        "seed": SEED,
        "truncation": TRUNC,
        "class": None,
        "labels": "balanced",
        "n": N,
        "samples_per_shard": PER_SHARD,
        "training_dataset": model["dataset"],
    }
    assert [s.count for s in manifest.shards] == [12, 12, 12, 12, 2]
    assert set(objects(s3, uri)) == {"manifest.json", *names, *(n.replace(".tar", ".idx") for n in names)}

    samples = []
    for entry in manifest.shards:
        data = get(s3, uri, entry.name)
        assert len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256
        assert get(s3, uri, entry.index).startswith(b"v1.2 ")  # DALI's own index format
        samples += [(key, parts) for key, parts, _ in iter_tar_samples(io.BytesIO(data))]
    assert [k for k, _ in samples] == [f"{i:08d}" for i in range(N)]
    metas = [json.loads(parts["json"]) for _, parts in samples]
    assert metas[13] == {
        "label": 3,
        "class": fashion_mnist.CLASSES[3],
        "seed": SEED + 13,
        "truncation": TRUNC,
        "source": f"models:/{model['name']}/1",
        "version": "1",
    }
    assert [m["seed"] for m in metas] == list(range(SEED, SEED + N))
    assert [int(parts["cls"]) for _, parts in samples] == [m["label"] for m in metas] == [i % 10 for i in range(N)]
    assert np.bincount([m["label"] for m in metas]).tolist() == [5] * 10  # balanced
    assert all(Image.open(io.BytesIO(p["png"])).size == (32, 32) for _, p in samples)


def regenerate(model_name: str, seeds, labels, truncation) -> np.ndarray:
    """What the registered model's predict gives for one row per sample, as uint8 N×3×H×W."""
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_name}/1")
    rows = pd.DataFrame(
        {
            "seed": np.asarray(seeds, dtype=np.int64),
            "class": np.asarray(labels, dtype=np.int64),
            "truncation": np.full(len(seeds), truncation),
        }
    )
    return np.rint((np.clip(pyfunc.predict(rows), -1, 1) + 1) * 127.5)


def read_back(uri: str, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of the dataset through ShardLoader (DALI decode), as 0..255 floats and labels."""
    cfg = DataConfig(dataset=uri, batch_size=batch, shuffle_buffer=1, hflip=False, num_threads=1, seed=0)
    with ShardLoader(cfg) as loader:
        assert loader.epoch_size == n
        batches = list(itertools.islice(loader, n // batch))
        assert loader.skipped == 0
    images = torch.cat([b[0] for b in batches]).numpy() * 127.5 + 127.5
    return images, torch.cat([b[1] for b in batches]).numpy()


def match(loaded: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each loaded image: the index of the nearest expected one, and the largest pixel difference to it."""
    a, b = loaded.reshape(len(loaded), -1), expected.reshape(len(expected), -1)
    nearest = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).argmin(1)
    return nearest, np.abs(a - b[nearest]).max(1)


def test_shard_loader_reads_what_the_model_regenerates(model, full):
    uri = full[0]
    images, labels = read_back(uri, N, batch=10)
    expected = regenerate(model["name"], range(SEED, SEED + N), [i % 10 for i in range(N)], TRUNC)
    nearest, err = match(images, expected)
    assert sorted(nearest.tolist()) == list(range(N))  # every sample once: a bijection
    assert (labels == nearest % 10).all()
    # PNG is lossless: only float rounding of another batch composition may move a pixel by one level
    assert err.max() <= 1.0 + 1e-3, err.max()
    assert np.std(expected.reshape(N, -1).mean(1)) > 1  # the images differ (the matching means something)


def test_interrupted_export_resumes_shard_by_shard(s3, model, full, tag):
    full_result = full[1]
    uri = f"s3://ganforge/synthetic/{tag}/resumed"
    args = dict(n=N, seed=SEED, truncation=TRUNC, samples_per_shard=PER_SHARD, **QUIET)
    source = f"models:/{model['name']}@champion"
    first = export_synthetic(source, uri, max_new_shards=2, **args)
    assert first.manifest is None and first.written == ["train-000000.tar", "train-000001.tar"]
    before = objects(s3, uri)
    assert set(before) == {"train-000000.tar", "train-000000.idx", "train-000001.tar", "train-000001.idx"}
    time.sleep(1.1)  # LastModified has one-second resolution

    second = export_synthetic(source, uri, **args)
    assert second.reused == first.written and second.written == [f"train-{k:06d}.tar" for k in (2, 3, 4)]
    after = objects(s3, uri)
    assert all(after[k]["LastModified"] == before[k]["LastModified"] for k in before)  # not uploaded again
    assert second.manifest.hash == full_result.manifest.hash  # = the uninterrupted export
    assert second.manifest.shards == full_result.manifest.shards

    # a shard lost later (manifest still there): the CLI re-run regenerates exactly that one
    bucket, prefix = uri[5:].split("/", 1)
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/train-000003.tar")
    time.sleep(1.1)
    assert cli.main(["sample", source, *export_args(), "--to", uri]) == 0
    third = objects(s3, uri)
    assert set(third) == set(after)
    changed = sorted(k for k in third if third[k]["LastModified"] != after[k]["LastModified"])
    assert changed == ["manifest.json", "train-000003.tar"]
    final = Manifest.from_json(get(s3, uri, "manifest.json"), uri)
    assert final.hash == full_result.manifest.hash

    # nothing missing: a re-run writes nothing, not even the manifest
    again = export_synthetic(source, uri, **args)
    assert again.written == [] and len(again.reused) == 5 and objects(s3, uri) == third


def test_other_datasets_are_refused_in_one_line(s3, model, full, tag, capsys):
    full_uri, _ = full
    source = f"models:/{model['name']}@champion"
    before = objects(s3, full_uri)

    def refused(argv: list[str]) -> str:
        assert cli.main(["sample", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err

    base = ["--n", str(N), "--truncation", str(TRUNC), "--shard-size", str(PER_SHARD)]
    err = refused([source, *base, "--seed", "8", "--to", full_uri])
    assert f"{full_uri} already holds another synthetic export (seed 7 there, 8 asked)" in err and "--overwrite" in err
    err = refused([source, *export_args(n=20), "--to", full_uri])
    assert "already holds 50 samples of this export; --n 20 would drop some" in err
    err = refused([source, *base, "--to", model["dataset"]])
    assert f"{model['dataset']} already holds dataset 'fashion-mnist' (20 samples), not a synthetic export" in err
    assert "class 10 out of range; valid: 0..9" in refused([source, "--class", "10", "--to", full_uri])
    assert "--n 0 not supported; valid: ≥ 1" in refused([source, "--n", "0", "--to", full_uri])
    assert "--to 'ganforge/x' is not an S3 prefix" in refused([source, "--to", "ganforge/x"])
    assert objects(s3, full_uri) == before  # nothing touched

    # an interrupted export of another config, no manifest: refused too, then replaced with --overwrite
    uri = f"s3://ganforge/synthetic/{tag}/other"
    export_synthetic(source, uri, n=N, seed=1, samples_per_shard=PER_SHARD, max_new_shards=3, **QUIET)
    err = refused([source, "--n", "20", "--seed", "2", "--shard-size", str(PER_SHARD), "--to", uri])
    assert f"{uri} holds 3 shard(s) another export or dataset wrote (e.g. train-000000.tar)" in err
    result = export_synthetic(source, uri, n=20, seed=2, samples_per_shard=PER_SHARD, overwrite=True, **QUIET)
    assert result.written == ["train-000000.tar", "train-000001.tar"]
    assert result.deleted == ["train-000002.idx", "train-000002.tar"]  # the old export's leftover
    assert set(objects(s3, uri)) == {
        "manifest.json",
        "train-000000.tar",
        "train-000000.idx",
        "train-000001.tar",
        "train-000001.idx",
    }
    assert result.manifest.synthetic["seed"] == 2 and result.manifest.num_samples == 20


def test_checkpoint_source_fixed_class_jpeg(s3, model, full, tag):
    """A training checkpoint (no registry), one class, JPEG: DALI decodes the model's images as JPEG keeps them."""
    uri = f"s3://ganforge/synthetic/{tag}/jpeg"
    result = export_synthetic(
        model["checkpoint"], uri, n=8, seed=0, class_=4, image_format="jpg", samples_per_shard=8, **QUIET
    )
    m = result.manifest
    assert m.image_ext == "jpg" and m.synthetic["resolved"] == model["checkpoint"]
    assert m.synthetic["labels"] == "fixed" and m.synthetic["version"] == ""
    # the registered version was made from this checkpoint: the same weights, whichever way they were loaded
    assert m.synthetic["weights_sha256"] == full[1].manifest.synthetic["weights_sha256"]
    assert set(objects(s3, uri)) == {"manifest.json", "train-000000.tar", "train-000000.idx"}
    images, labels = read_back(uri, 8, batch=4)
    assert (labels == 4).all()
    regenerated = regenerate(model["name"], range(8), [4] * 8, None)  # v1 holds the checkpoint's G_ema
    expected = np.stack([jpeg_round_trip(im) for im in regenerated])
    nearest, _ = match(images, expected)
    assert sorted(nearest.tolist()) == list(range(8))
    # DALI decodes what JPEG q95 keeps of the regenerated images (JPEG's own loss on these noisy images is large)
    diff = np.abs(images - expected[nearest])
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    """A 0..255 C×H×W image encoded as `ganforge shards` encodes JPEG, decoded by PIL."""
    data = encode(Image.fromarray(image.transpose(1, 2, 0).astype(np.uint8)), "jpg")
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32).transpose(2, 0, 1)
