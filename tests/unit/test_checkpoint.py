"""Checkpoint files: atomic, checksummed, per-rank RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from orchestrator.train import checkpoint as ckpt


def test_save_load_round_trip_and_rng(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    rng = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    quality = ckpt.Quality(last=3.5, best=2.0, best_checkpoint="s3://b/run/checkpoint_x")
    state = ckpt.TrainState(
        recipe={"w": torch.ones(4)},
        step=10,
        tick=5,
        config={"model": {"ch": 8}},
        quality=quality,
        health={"rollbacks": 1},
        fire_drill_done=True,
    )
    ckpt.save(
        tmp_path,
        rank=0,
        rank_state=ckpt.RankState(rng=rng, loader={"epoch": 2}),
        train=state,
        meta=ckpt.Meta(step=10, tick=5, kimg=0.16, world_size=2),
    )
    ckpt.save(tmp_path, rank=1, rank_state=ckpt.RankState(rng=rng, loader={"epoch": 5}, shards=["a.tar"]))
    back = ckpt.load_train_state(tmp_path)
    assert torch.equal(back.recipe["w"], torch.ones(4)) and (back.step, back.tick) == (10, 5)
    assert back.quality == quality and back.health == {"rollbacks": 1} and back.fire_drill_done
    assert back.config == {"model": {"ch": 8}}
    meta = ckpt.load_meta(tmp_path)
    assert (meta.step, meta.tick, meta.kimg, meta.world_size) == (10, 5, 0.16, 2) and ckpt.STATE in meta.files
    assert ckpt.load_rank(tmp_path, 1).loader == {"epoch": 5} and ckpt.load_rank(tmp_path, 1).shards == ["a.tar"]
    assert ckpt.load_rank(tmp_path, 2) is None
    # the files are plain dicts: a checkpoint opens with torch.load alone
    raw = torch.load(tmp_path / ckpt.STATE, weights_only=False)
    assert raw["quality"] == {"last": 3.5, "best": 2.0, "best_checkpoint": "s3://b/run/checkpoint_x"}
    assert raw["step"] == 10 and torch.equal(raw["recipe"]["w"], torch.ones(4))
    ckpt.set_rng_state(ckpt.load_rank(tmp_path, 0).rng)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_corrupt_or_incomplete_checkpoint_is_refused(tmp_path):
    ckpt.save(tmp_path, rank=0, rank_state=ckpt.RankState({}, {}), train=ckpt.TrainState({"w": torch.zeros(2)}, 1, 1))
    data = bytearray((tmp_path / ckpt.STATE).read_bytes())
    data[-20] ^= 0xFF
    (tmp_path / ckpt.STATE).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_train_state(tmp_path)
    (tmp_path / ckpt.META).unlink()
    with pytest.raises(ckpt.CheckpointError, match="not completely written"):
        ckpt.load_train_state(tmp_path)


def test_meta_records_checksum(tmp_path):
    state = ckpt.TrainState({"a": 1}, step=1, tick=1)
    ckpt.save(tmp_path, rank=0, rank_state=ckpt.RankState({}, {}), train=state, meta=ckpt.Meta(step=1, git_sha="abc"))
    meta = json.loads((tmp_path / ckpt.META).read_text())
    assert meta["files"][ckpt.STATE] == ckpt.sha256_file(tmp_path / ckpt.STATE) and meta["git_sha"] == "abc"


def test_ranks_restore_from_a_remote_checkpoint_into_private_directories(tmp_path):
    """Ray's shared ``as_directory`` download let one rank rewrite files another was reading; ``restore`` gives each
    rank its own copy, so ranks restoring at overlapping times all read whole files."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs
    from ray.train import Checkpoint

    remote = pyarrow.fs._MockFileSystem()  # an in-memory filesystem that Ray treats as remote
    local = tmp_path / "ckpt"
    big = torch.randn(256, 1024)  # 1 MiB: long enough to read that overlapping restores really overlap
    ckpt.save(local, rank=0, rank_state=ckpt.RankState({}, {"pos": 0}), train=ckpt.TrainState({"w": big}, 7, 7))
    ckpt.save(local, rank=1, rank_state=ckpt.RankState({}, {"pos": 1}))
    remote.create_dir("ckpt")
    pyarrow.fs.copy_files(
        str(local), "ckpt", source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=remote
    )
    checkpoint = Checkpoint("ckpt", filesystem=remote)

    def restore(rank: int) -> tuple[bool, int]:
        state, mine = ckpt.restore(checkpoint, rank)
        return torch.equal(state.recipe["w"], big), mine.loader["pos"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(restore, [0, 1] * 6))
    assert results == [(True, 0), (True, 1)] * 6
