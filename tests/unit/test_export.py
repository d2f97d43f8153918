"""Synthetic export rules without services: seed ranges per shard, labels, resume planning, refusals, and that a
sample regenerates from its recorded seed alone."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import gan_models
from orchestrator import cli
from orchestrator.data.manifest import Manifest, ShardEntry
from orchestrator.export import (
    ExportError,
    Remote,
    ShardPlan,
    check_target,
    export_synthetic,
    fingerprint,
    foreign_shards,
    generate,
    labels_for,
    shard_metadata,
    shard_plan,
    split_done,
    weights_sha256,
)
from orchestrator.generator import Generator, predict_rows

BIGGAN = dict(resolution=32, ch=4, dim_z=20, shared_dim=8, attn="0", n_classes=10)
FP = "f" * 64


def test_shard_plan_gives_each_shard_a_fixed_seed_range():
    plan = shard_plan(23, 10)
    assert [(s.index, s.start, s.stop, s.count) for s in plan] == [(0, 0, 10, 10), (1, 10, 20, 10), (2, 20, 23, 3)]
    assert [(s.name, s.index_name) for s in plan][2] == ("train-000002.tar", "train-000002.idx")
    # a larger n keeps every full shard's range: an export extends, it does not reshuffle
    assert shard_plan(40, 10)[:2] == plan[:2] and shard_plan(40, 10)[2] == ShardPlan(2, 20, 30)
    assert shard_plan(1, 5000) == [ShardPlan(0, 0, 1)]
    with pytest.raises(ValueError, match="≥ 1"):
        shard_plan(0, 10)


def test_labels_are_balanced_fixed_or_zero():
    assert labels_for(0, 7, 3, None) == [0, 1, 2, 0, 1, 2, 0]
    assert labels_for(10, 13, 3, None) == [1, 2, 0]  # i mod c, whatever shard the sample lands in
    counts = pd.Series(labels_for(0, 1000, 10, None)).value_counts()
    assert set(counts) == {100}
    assert labels_for(5, 8, 10, 4) == [4, 4, 4]
    assert labels_for(0, 3, 0, None) == [0, 0, 0]


def remote_for(shard: ShardPlan, fp: str = FP, count: int | None = None, idx_sha: str = "1" * 64) -> dict:
    meta = {**shard_metadata(fp, shard.count if count is None else count), "sha256": "a" * 64, "index-sha256": idx_sha}
    return {shard.name: Remote(1234, meta), shard.index_name: Remote(56, {"sha256": "1" * 64})}


def test_split_done_keeps_only_complete_shards_of_this_export():
    plan = shard_plan(50, 12)  # 12, 12, 12, 12, 2
    remote = {
        **remote_for(plan[0]),
        **remote_for(plan[1], fp="0" * 64),
        **remote_for(plan[2], idx_sha="2" * 64),
        **remote_for(plan[4], count=12),
    }
    remote.update(remote_for(plan[3]))
    del remote[plan[3].index_name]  # tar without its index
    todo, done = split_done(plan, FP, remote)
    assert done == [ShardEntry("train-000000.tar", "train-000000.idx", 12, 1234, "a" * 64)]
    # another fingerprint, an index the tar did not record, no index, and a count from an export of another n
    assert [s.index for s in todo] == [1, 2, 3, 4]
    assert foreign_shards(remote, FP) == ["train-000001.tar"]
    assert split_done(plan, FP, {}) == (plan, [])


def synthetic(**over) -> dict:
    block = {
        "resolved": "models:/g/1",
        "weights_sha256": "b" * 64,
        "seed": 0,
        "truncation": 0.7,
        "class": None,
        "image_ext": "png",
        "samples_per_shard": 10,
        "n": 100,
        "fingerprint": FP,
    }
    return {**block, **over}


def held(block: dict | None, name: str = "g-synthetic", num_samples: int = 100) -> Manifest:
    """The manifest already under the target prefix: a synthetic export's (``block``) or another dataset's."""
    return Manifest(name, 32, 3, tuple("0123456789"), num_samples, "png", (), block)


def test_check_target_refuses_other_datasets_in_one_line():
    uri = "s3://b/synthetic/g"
    check_target(None, synthetic(), uri, overwrite=False)
    check_target(held(synthetic()), synthetic(), uri, overwrite=False)  # the same export: resume
    check_target(held(synthetic(n=50)), synthetic(), uri, overwrite=False)  # a larger n extends it
    other = synthetic(resolved="models:/g/2", weights_sha256="c" * 64, fingerprint="0" * 64)
    cases = [
        (held(None, "fashion-mnist", 60000), "holds dataset 'fashion-mnist' (60000 samples), not a synthetic export"),
        (held(synthetic(seed=3, fingerprint="0" * 64)), "(seed 3 there, 0 asked)"),
        (
            held(other),
            "resolved 'models:/g/2' there, 'models:/g/1' asked; weights_sha256 cccccccccccc… there, "
            "bbbbbbbbbbbb… asked",
        ),
        (held(synthetic(n=200)), "already holds 200 samples of this export; --n 100 would drop some"),
    ]
    for old, text in cases:
        with pytest.raises(ExportError) as e:
            check_target(old, synthetic(), uri, overwrite=False)
        msg = str(e.value)
        assert text in msg and "\n" not in msg and msg.startswith(uri) and "--overwrite" in msg, msg
        check_target(old, synthetic(), uri, overwrite=True)


def test_fingerprint_and_weights_hash_are_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    torch.manual_seed(0)
    m, copy = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    copy.load_state_dict(m.state_dict())
    assert weights_sha256(copy) == weights_sha256(m)  # the weights, not the object
    assert weights_sha256(torch.nn.Linear(3, 2).to(torch.bfloat16)) != weights_sha256(m)  # bf16 hashes too
    with torch.no_grad():
        copy.weight[0, 0] += 1e-3
    assert weights_sha256(copy) != weights_sha256(m)


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(1)
    G, _ = gan_models.module("biggan").build(gan_models.config("biggan", **BIGGAN))
    return Generator("biggan", BIGGAN, G.state_dict())


def test_a_sample_regenerates_from_its_seed_alone(gen):
    images, labels = generate(gen, 20, 28, seed=100, truncation=0.7, class_=None)
    assert images.shape == (8, 3, 32, 32) and labels == [0, 1, 2, 3, 4, 5, 6, 7]
    # one predict row per sample, in any order and batch: the registered model regenerates it
    rows = pd.DataFrame({"seed": [127, 120], "class": [7, 0], "truncation": [0.7, 0.7]})
    again = torch.from_numpy(predict_rows(gen, rows))
    assert torch.allclose(again[0], images[7], atol=1e-5) and torch.allclose(again[1], images[0], atol=1e-5)
    # a shard regenerated alone (batches counted from its start) is bit-identical
    assert torch.equal(generate(gen, 20, 28, seed=100, truncation=0.7, class_=None)[0], images)
    fixed, labels = generate(gen, 0, 3, seed=0, truncation=None, class_=9)
    assert labels == [9, 9, 9] and not torch.allclose(fixed[0], fixed[1])


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"to": "ganforge/synthetic/x"}, "--to 'ganforge/synthetic/x' is not an S3 prefix; expected s3://"),
        ({"to": "/tmp/out"}, "--to '/tmp/out' is not an S3 prefix"),
        ({"n": 0}, "--n 0 not supported; valid: ≥ 1"),
        ({"samples_per_shard": 0}, "--shard-size 0 not supported"),
        ({"seed": -1}, "--seed -1 not supported; valid: ≥ 0"),
        ({"image_format": "webp"}, "--format 'webp' not supported; valid: png, jpg"),
        ({"truncation": float("nan")}, "--truncation nan not supported"),
        ({"device": "gpu0"}, "--device 'gpu0' is not a torch device; valid: cpu, cuda, cuda:N"),
    ],
)
def test_bad_arguments_fail_before_any_model_or_s3_work(kwargs, text):
    args = {"to": "s3://ganforge/synthetic/x", "n": 10, **kwargs}
    with pytest.raises(ValueError) as e:  # the source does not exist: nothing may have tried to load it
        export_synthetic("models:/no-such-model@champion", args.pop("to"), **args)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_grid_and_a_dataset_at_once(capsys):
    argv = ["sample", "models:/g@champion", "--to", "s3://b/x", "--out", "grid.png"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out 'grid.png' writes a grid and --to 's3://b/x' a dataset" in err
    assert cli.main(["sample", "models:/g@champion", "--to", "b/x"]) == 2
    assert "--to 'b/x' is not an S3 prefix" in capsys.readouterr().err
