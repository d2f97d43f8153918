"""The divergence guard's wiring, piece by piece: fire-drill parsing, the extra signals, the tick reduction over real
gloo ranks, rollback snapshots, the MLflow note and the report rebuilt from metric points."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.config import ConfigError, build_config
from orchestrator.train.checkpoint import copy_state
from orchestrator.train.ddp import reduce_tick
from orchestrator.train.health import (
    FireDrill,
    HealthConfig,
    HealthEvent,
    HealthMonitor,
    ema_drift,
    events_from_history,
    events_note,
    history_from_points,
    loss_ratio,
    parse_fire_drill,
    write_report,
)


# ------------------------------------------------------------------------------------------------- fire drills
@pytest.mark.parametrize(
    ("spec", "drill"),
    [
        ("", None),
        ("lr_spike@200x1e4", FireDrill("lr_spike", 200, 1e4)),
        (" lr_spike@1x2.5 ", FireDrill("lr_spike", 1, 2.5)),
        ("nan@30", FireDrill("nan", 30)),
    ],
)
def test_fire_drill_parsing(spec, drill):
    assert parse_fire_drill(spec) == drill
    assert HealthConfig(fire_drill=spec).drill == drill


BAD_DRILLS = ["lr_spike@200", "lr_spike@200x1", "lr_spike@200x0.5", "lr_spike@200xinf", "lr_spike@0x10"]
BAD_DRILLS += ["lr_spike@-5x10", "lr_spike@ax10", "nan@30x2", "nan@", "nan", "explode@10", "@10"]


@pytest.mark.parametrize("spec", BAD_DRILLS)
def test_fire_drill_rejects_bad_specs_in_one_line(spec):
    with pytest.raises(ValueError) as e:
        parse_fire_drill(spec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"health.fire_drill={spec!r} is invalid; expected 'lr_spike@STEPxFACTOR'")


def test_fire_drill_is_a_config_override():
    cfg = build_config("biggan", overrides=["health.fire_drill=lr_spike@200x1e4", "health.max_rollbacks=2"])
    assert cfg.health.drill == FireDrill("lr_spike", 200, 1e4) and cfg.health.max_rollbacks == 2
    assert FireDrill("lr_spike", 200, 1e4).describe() == "learning rates × 1e+04 after step 200"
    with pytest.raises(ConfigError, match=r"^health.fire_drill='lr_spike@200' is invalid; expected"):
        build_config("biggan", overrides=["health.fire_drill=lr_spike@200"])


class _DrillRecipe:
    def __init__(self) -> None:
        self.G = nn.Linear(2, 2)
        self.lr_scale = 1.0

    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale = scale


def test_fire_drill_spikes_the_lr_scale_or_poisons_a_g_weight():
    recipe = _DrillRecipe()
    FireDrill("lr_spike", 10, 1e4).apply(recipe, lr_scale=0.5)  # on top of the scale in force (one rollback)
    assert recipe.lr_scale == 5e3 and torch.isfinite(recipe.G.weight).all()
    FireDrill("nan", 10).apply(recipe, lr_scale=0.5)
    assert torch.isnan(recipe.G.weight).all() and torch.isfinite(recipe.G.bias).all()


# ------------------------------------------------------------------------------------------------- extra signals
def test_ema_drift_is_the_relative_distance_of_the_parameters():
    G = nn.Linear(3, 2)
    with torch.no_grad():
        G.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        G.bias.copy_(torch.tensor([0.0, 4.0]))
    ema = nn.Linear(3, 2)
    ema.load_state_dict(G.state_dict())
    assert ema_drift(G, ema) == 0.0
    with torch.no_grad():
        ema.bias.copy_(torch.tensor([0.0, 1.5]))  # ‖θ‖ = 5, ‖Δθ‖ = 2.5
    assert ema_drift(G, ema) == pytest.approx(0.5, abs=1e-15)
    zero = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(zero.weight)
    assert ema_drift(zero, nn.Linear(2, 2, bias=False)) == 0.0  # an all-zero G: no scale to be relative to


def test_loss_ratio_is_g_over_d_when_defined():
    assert loss_ratio({"loss/G": 1.5, "loss/D": 0.5}) == 3.0
    assert loss_ratio({"loss/G": -0.2, "loss/D": 2.0}) == pytest.approx(-0.1)
    for signals in (
        {"loss/G": 1.0},
        {"loss/D": 1.0},
        {"loss/G": 1.0, "loss/D": 0.0},
        {"loss/G": math.nan, "loss/D": 1},
    ):
        assert loss_ratio(signals) is None


# ------------------------------------------------------------------------------------------------- tick reduction
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank: int, port: int, world: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if rank == 0:  # 2 steps, a G step on each
            sums = {"loss/D": 1.0 + 2.0, "loss/G": 4.0 + 6.0, "D/real": 1.0, "health/nonfinite": 0.0}
            counts = {"loss/D": 2, "loss/G": 2, "D/real": 2, "health/nonfinite": 2}
        else:  # 2 steps, one G step, a NaN D logit and a skipped step
            sums = {"loss/D": 3.0 + 5.0, "loss/G": 8.0, "D/real": math.nan, "health/nonfinite": 1.0, "only/rank1": 7.0}
            counts = {"loss/D": 2, "loss/G": 1, "D/real": 2, "health/nonfinite": 2, "only/rank1": 1}
        out.put((rank, reduce_tick(sums, counts)))
    finally:
        dist.destroy_process_group()


def test_reduce_tick_averages_every_step_of_every_rank_identically():
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_reduce_worker, args=(_free_port(), 2, out), nprocs=2, join=True, start_method="spawn")
    results = dict(out.get() for _ in range(2))
    a, b = results[0], results[1]
    assert a.keys() == b.keys() == {"loss/D", "loss/G", "D/real", "health/nonfinite", "only/rank1"}
    assert a["loss/D"] == 11.0 / 4 and a["loss/G"] == 18.0 / 3  # per step, not a mean of rank means (5, 8)
    assert a["health/nonfinite"] == 0.25 and a["only/rank1"] == 7.0
    assert math.isnan(a["D/real"]) and math.isnan(b["D/real"])  # one rank's NaN fires the guard on every rank
    assert {k: v for k, v in a.items() if k != "D/real"} == {k: v for k, v in b.items() if k != "D/real"}


def test_reduce_tick_on_one_worker_is_the_plain_mean():
    assert reduce_tick({"loss/D": 3.0, "loss/G": 1.0}, {"loss/D": 2, "loss/G": 1}) == {"loss/D": 1.5, "loss/G": 1.0}


# ------------------------------------------------------------------------------------------------- snapshots
def test_snapshot_survives_training_and_restores_twice_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()

    train(3)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "steps": 3}
    snap = copy_state(state)
    assert snap["model"]._metadata == state["model"]._metadata  # BN's version info survives the copy
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    for _ in range(2):  # a second rollback must find the snapshot unchanged by training after the first
        train(5)
        assert not torch.equal(model.state_dict()["0.weight"], expected["0.weight"])
        restored = copy_state(snap)
        model.load_state_dict(restored["model"])
        opt.load_state_dict(restored["opt"])
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], moments)
    assert snap["steps"] == 3 and snap["opt"]["param_groups"][0]["lr"] == 1e-2


# ------------------------------------------------------------------------------------------------- MLflow note
def _event(step: int, action: str = "rollback") -> HealthEvent:
    return HealthEvent(
        step // 10,
        step,
        "grad_explosion",
        ["grad_explosion"],
        {"health/grad_norm_G": 670.0},
        f"health/grad_norm_G 670 > 10× its median → rollback at {step}",
        action,
        0.5,
        {"G": 5e-4, "D": 5e-4},
    )


def test_events_note_lists_events_and_keeps_the_newest_within_the_limit():
    note = events_note([_event(70)])
    assert note.startswith("### Training health events\n\n- **rollback** at step 70 (tick 7), grad_explosion: ")
    assert "health/grad_norm_G=670; learning rates now G 0.0005, D 0.0005." in note
    assert events_note([]).endswith("None.\n")
    long = events_note([_event(10 * i) for i in range(1, 200)], limit=2000)
    assert len(long) <= 2000 and "at step 1990 " in long and "at step 10 " not in long
    assert "earlier event(s): see the health/events.json artifact" in long


# ------------------------------------------------------------------------------------------------- report
def test_history_from_points_splits_repeated_steps_and_marks_rollbacks():
    points = []
    for ts, (step, loss, n) in enumerate([(10, 1.0, 0), (20, 2.0, 0), (30, 90.0, 0), (20, 1.5, 1), (30, 1.2, 1)]):
        points += [(1000 * ts, step, "loss/D", loss), (1000 * ts, step, "health/rollbacks", float(n))]
    points.append((2000 + 5, 20, "fid", 40.0))  # an evaluation logged just after its tick joins that tick
    history = history_from_points(reversed(points))
    assert [(h["tick"], h["step"], h["loss/D"]) for h in history] == [
        (1, 10, 1.0),
        (2, 20, 2.0),
        (3, 30, 90.0),
        (4, 20, 1.5),
        (5, 30, 1.2),
    ]
    assert history[1]["fid"] == 40.0 and "fid" not in history[3]
    assert [h.get("action") for h in history] == [None, None, None, "rollback", None]
    events = events_from_history(history)
    assert [(e.tick, e.step, e.action) for e in events] == [(4, 20, "rollback")]


def test_write_report_from_a_monitor(tmp_path):
    m = HealthMonitor(HealthConfig(warmup_ticks=0, grad_min_history=2), base_lrs={"G": 1e-3, "D": 1e-3})
    for t in range(1, 6):
        grad = 1e4 if t == 5 else 10.0
        m.update({"loss/D": 1.0, "loss/G": 1.0, "health/grad_norm_G": grad}, step=10 * t, tick=t)
    md = write_report(m.events, m.history, tmp_path / "r", note="a note")
    text = md.read_text()
    assert text.startswith("## Training health\n\n_a note_\n\nStatus: recovered: 1 rollback(s)")
    assert "![training health](health.png)" in text
    assert (tmp_path / "r" / "health.png").read_bytes()[:4] == b"\x89PNG"
    events = json.loads((tmp_path / "r" / "events.json").read_text())
    assert [(e["step"], e["action"], e["lrs"]) for e in events] == [(50, "rollback", {"G": 5e-4, "D": 5e-4})]


def test_a_stop_stands_on_resume_only_while_the_rollback_budget_is_used_up():
    m = HealthMonitor(HealthConfig(max_rollbacks=0), base_lrs={"G": 1e-3, "D": 1e-3})
    assert m.update({"loss/D": math.nan}, step=40, tick=4).action == "stop"
    state = json.loads(json.dumps(m.state_dict()))  # as a checkpoint round trip would give it back

    same = HealthMonitor(HealthConfig(max_rollbacks=0))
    same.load_state_dict(state)
    assert same.stopped and same.update({"loss/D": 1.0}, step=50, tick=5).action == "stop"
    for cfg in (HealthConfig(max_rollbacks=1), HealthConfig(max_rollbacks=0, enabled=False)):
        more = HealthMonitor(cfg)
        more.load_state_dict(state)
        assert not more.stopped and more.update({"loss/D": 1.0}, step=50, tick=5).action == "ok"
        assert [e.action for e in more.events] == ["stop"]  # the record of the stop is kept
