"""Elastic world size: the config a smaller world trains with (pure logic; the resume test is in integration)."""

from __future__ import annotations

import math

import pytest

from orchestrator.config import ConfigError, build_config
from orchestrator.train import elastic


def cfg(model="biggan", *extra):
    return build_config(model, overrides=["train.num_workers=4", "data.batch_size=32", *extra])


def test_fixed_size_is_not_elastic():
    c = cfg()
    assert elastic.scaling_workers(c) == 4 and list(elastic.world_sizes(c)) == [4]
    assert elastic.adapt(c, 4) == (c, None)


def test_keep_batch_raises_per_worker_batch_and_accumulation():
    c = cfg("biggan", "train.min_workers=2", "data.batch_size=24", "train.accumulate=3")  # micro-batch 8
    assert elastic.scaling_workers(c) == (2, 4)
    elastic.check(c)  # 96 = 2 × 48 = 3 × 32 = 4 × 24: every world size keeps micro-batches of 8
    small, note = elastic.adapt(c, 3)
    assert (small.data.batch_size, small.train.accumulate) == (32, 4)
    small, note = elastic.adapt(c, 2)
    assert (small.data.batch_size, small.train.accumulate) == (48, 6)
    assert small.hparams == c.hparams and "global batch kept at 96" in note


def test_keep_batch_refuses_world_sizes_that_do_not_divide():
    c = cfg("biggan", "train.min_workers=3")
    with pytest.raises(ConfigError, match="not on 3 workers") as e:
        elastic.check(c)
    assert "\n" not in str(e.value)
    elastic.check(cfg("biggan", "train.min_workers=3", "train.elastic=rescale"))
    with pytest.raises(ConfigError, match=r"data\.batch_size=32 is not a multiple of train\.accumulate=3"):
        elastic.check(cfg("biggan", "train.accumulate=3"))


def test_rescale_moves_batch_dependent_hyperparameters():
    c = cfg("stylegan2", "train.min_workers=1", "train.elastic=rescale", "hparams.r1_gamma=2.0")
    small, note = elastic.adapt(c, 1)  # global batch 32 instead of 128: ratio 1/4
    hp, base = small.hparams, c.hparams
    assert hp.g_lr == pytest.approx(base.g_lr / 2) and hp.d_lr == pytest.approx(base.d_lr / 2)  # × √(1/4)
    assert hp.r1_gamma == pytest.approx(8.0) and hp.ema_kimg == pytest.approx(base.ema_kimg / 4)
    assert small.data.batch_size == 32 and "global batch 32 instead of 128" in note and "g_lr" in note
    auto = cfg("stylegan2", "train.min_workers=1", "train.elastic=rescale")
    assert elastic.adapt(auto, 1)[0].hparams.r1_gamma is None  # the auto γ follows the batch by itself
    b = cfg("biggan", "train.min_workers=1", "train.elastic=rescale")
    bhp = elastic.adapt(b, 2)[0].hparams
    assert bhp.g_lr == pytest.approx(b.hparams.g_lr * math.sqrt(0.5)) and bhp.ema_decay == b.hparams.ema_decay
