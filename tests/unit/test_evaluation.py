"""Pure parts of the in-training metric: when it is due, how work is split across ranks, metric names, config."""

from __future__ import annotations

import pytest

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
    [("train.metric=fd_nope", "train.metric='fd_nope' is invalid; expected fd_classifier or fid"),
     ("train.metric_kimg=-1", "train.metric_kimg=-1.0 is invalid"),
     ("train.metric_n=1", "train.metric_n=1 is invalid")],
)  # fmt: skip
def test_metric_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        build_config("biggan", overrides=[override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_metric_config_defaults():
    cfg = build_config("biggan", overrides=["train.metric=fd_classifier", "train.metric_kimg=2.5"])
    assert (cfg.train.metric, cfg.train.metric_kimg, cfg.train.metric_n, cfg.train.metric_ref_n) == (
        "fd_classifier", 2.5, 2000, 10000)  # fmt: skip
    assert build_config("biggan").train.metric_kimg == 0  # off unless asked for
