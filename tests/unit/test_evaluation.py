"""Pure parts of the in-training metric: when it is due, how work is split across ranks, metric names, config, and
the mode-collapse signals computed with it (sets, bytes, values, gathering across ranks)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, build_config
from orchestrator.metrics.features import STANDARD_NETWORK
from orchestrator.train import evaluation as ev


def test_due_when_kimg_crosses_a_multiple_or_at_the_end():
    assert not ev.due(0.0, 0.9, 1.0, last=False)
    assert ev.due(0.9, 1.0, 1.0, last=False)  # exactly on the multiple
    assert ev.due(0.9, 1.3, 1.0, last=False)
    assert not ev.due(1.0, 1.9, 1.0, last=False)  # already evaluated at 1.0
    assert ev.due(1.9, 2.2, 1.0, last=False)
    assert ev.due(1.2, 1.5, 1.0, last=True)  # the end always evaluates when on
    assert not ev.due(0.0, 5.0, 0.0, last=True)  # off
    ticks = [0.064 * i for i in range(1, 11)]  # float steps of 0.064 kimg, every 0.32: exactly 2 of 10 ticks
    prev, hits = 0.0, []
    for k in ticks:
        if ev.due(prev, k, 0.32, last=False):
            hits.append(round(k, 3))
        prev = k
    assert hits == [0.32, 0.64]


def test_work_splits():
    assert [ev.split(10, 3, r) for r in range(3)] == [4, 3, 3]
    assert sum(ev.split(2001, 4, r) for r in range(4)) == 2001
    shares = ev.proportional_shares(1000, [600, 600, 600, 600])
    assert shares == [250, 250, 250, 250]
    shares = ev.proportional_shares(1001, [100, 700, 1200])
    assert sum(shares) == 1001 and all(s <= n for s, n in zip(shares, [100, 700, 1200]))
    assert ev.proportional_shares(10**6, [3, 5]) == [3, 5]  # capped at the data


def test_metric_names_map_to_extractors():
    assert ev.extractor_name("fid") == STANDARD_NETWORK
    assert ev.extractor_name("fd_classifier") == "classifier"
    with pytest.raises(ValueError):
        ev.extractor_name("kid")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.metric=fd_nope", "train.metric='fd_nope' is invalid; expected fd_classifier or fid"),
        ("train.metric_kimg=-1", "train.metric_kimg=-1.0 is invalid"),
        ("train.metric_n=1", "train.metric_n=1 is invalid"),
    ],
)
def test_metric_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        build_config("biggan", overrides=[override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_metric_config_defaults():
    cfg = build_config("biggan", overrides=["train.metric=fd_classifier", "train.metric_kimg=2.5"])
    assert (cfg.train.metric, cfg.train.metric_kimg, cfg.train.metric_n, cfg.train.metric_ref_n) == (
        "fd_classifier",
        2.5,
        2000,
        10000,
    )
    assert build_config("biggan").train.metric_kimg == 0  # off unless asked for


# ------------------------------------------------------------------------------------- mode-collapse signals
def test_spread_positions_pick_evenly_and_distinctly():
    assert ev.spread_positions(3, 10).tolist() == [0, 3, 6]
    assert ev.spread_positions(4, 4).tolist() == [0, 1, 2, 3]
    assert ev.spread_positions(0, 7).tolist() == []
    picked = ev.spread_positions(700, 1000)
    assert len(set(picked.tolist())) == 700 and picked.max() < 1000
    with pytest.raises(ValueError, match="cannot pick 5 of 4"):
        ev.spread_positions(5, 4)


def test_signal_sets_are_capped_by_both_sample_counts():
    assert ev.signal_set_size(2000, 2000, 10000) == 2000
    assert ev.signal_set_size(2000, 500, 10000) == 500  # not more generated features than generated samples
    assert ev.signal_set_size(2000, 2000, 300) == 300  # nor more real ones than the (capped) reference count


def test_feature_set_bytes_round_trip_and_reject_other_formats():
    feats = torch.randn(7, 5)
    back = ev.features_from_bytes(ev.features_to_bytes(feats))
    assert back.dtype == torch.float32 and torch.equal(back, feats)
    buf = io.BytesIO()
    np.savez(buf, format=np.int64(99), features=feats.numpy())
    with pytest.raises(ValueError, match="feature set format 99"):
        ev.features_from_bytes(buf.getvalue())


def _clusters(n_per: int, centres: list[int], seed: int) -> torch.Tensor:
    """Points around well-separated centres (10 apart on the axes of a 8-d space, unit noise × 0.3)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n_per, 8, generator=g) * 0.3 + 10 * torch.eye(8)[c] for c in centres]
    return torch.cat(parts)


def test_signals_of_identical_half_covering_and_collapsed_generators():
    real = _clusters(100, [0, 1, 2, 3], seed=0)

    same, report = ev.quality_signals(real, real.clone())
    assert report is None and set(same) == {"precision", "recall", "diversity"}
    assert same["precision"] == same["recall"] == 1.0 and same["diversity"] == pytest.approx(1.0)

    # fresh samples of the same four modes: finite k-NN balls in 8-d miss some new points, so not exactly 1
    fresh, _ = ev.quality_signals(real, _clusters(100, [0, 1, 2, 3], seed=1))
    assert fresh["precision"] > 0.75 and fresh["recall"] > 0.8 and fresh["diversity"] == pytest.approx(1, abs=0.02)
    half, _ = ev.quality_signals(real, _clusters(200, [0, 1], seed=1))  # two of the four modes, densely
    assert half["precision"] > 0.75  # what it makes is as realistic ...
    assert half["recall"] == pytest.approx(fresh["recall"] / 2, abs=0.05)  # ... but half the data is never made
    assert half["diversity"] < 0.75  # two modes are less spread than four

    collapsed, _ = ev.quality_signals(real, real[:1].repeat(50, 1))  # one output for every latent
    assert collapsed["recall"] == pytest.approx(1 / len(real))  # a zero-radius manifold: only the copied point
    assert collapsed["diversity"] == 0.0


def test_signals_skip_what_the_inputs_do_not_allow():
    real = _clusters(10, [0], seed=0)
    assert set(ev.quality_signals(real, real[:3])[0]) == {"diversity"}  # 3 points: no k=3 manifold
    assert ev.quality_signals(None, None) == ({}, None)


def test_class_signals_under_the_classifier():
    labels = torch.arange(10).repeat(20)  # 200 samples, 20 generated for each class
    perfect = torch.nn.functional.one_hot(labels, 10).float() * 5
    sig, report = ev.quality_signals(None, None, logits=perfect, labels=labels)
    assert sig["coverage"] == 1.0 and sig["accuracy"] == 1.0
    assert [sig[f"accuracy/class_{c}"] for c in range(10)] == [1.0] * 10
    assert report["per_class"][3] == {"intended": 20, "predicted": 20, "accuracy": 1.0, "covered": True}

    # every sample looks like class 2: one class of ten covered, right only for the samples meant as class 2
    one = torch.zeros(200, 10)
    one[:, 2] = 1.0
    sig, _ = ev.quality_signals(None, None, logits=one, labels=labels)
    assert sig["coverage"] == 0.1 and sig["accuracy"] == 0.1
    assert sig["accuracy/class_2"] == 1.0 and sig["accuracy/class_0"] == 0.0

    sig, _ = ev.quality_signals(None, None, logits=perfect, labels=None)  # unconditional: coverage only
    assert sig == {"coverage": 1.0}


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        rows = torch.full((rank + 1, 3), float(rank))  # 1 row on rank 0, 2 on rank 1, 3 on rank 2
        if rank == 1:
            rows = rows[:0]  # a rank with nothing to contribute still takes part
        torch.save(ev.gather_rows(rows), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_rows_concatenates_uneven_shares_in_rank_order_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    world = 3
    mp.spawn(_gather_worker, args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=world)
    expected = torch.tensor([[0.0] * 3, [2.0] * 3, [2.0] * 3, [2.0] * 3])
    for r in range(world):
        assert torch.equal(torch.load(tmp_path / f"{r}.pt"), expected)
    x = torch.randn(4, 2)
    assert ev.gather_rows(x) is x  # not distributed: the rows themselves


def test_quality_signal_config():
    cfg = build_config("biggan")
    assert (cfg.train.quality_signals, cfg.train.pr_n) == (True, 2000)
    assert build_config("biggan", overrides=["train.quality_signals=false"]).train.quality_signals is False
    with pytest.raises(ConfigError) as e:
        build_config("biggan", overrides=["train.pr_n=3"])
    assert str(e.value).startswith("train.pr_n=3 is invalid; expected an integer ≥ 4")
