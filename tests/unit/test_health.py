"""Health monitor: every rule fires on its failure and stays quiet on a realistic noisy healthy run."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gan_models.steps import grad_norm, sign_accuracy
from orchestrator.train.health import (
    HealthConfig,
    HealthEvent,
    HealthMonitor,
    health_plot,
    health_report_markdown,
)

BASE_LRS = {"G": 1e-4, "D": 4e-4}


def healthy_stream(n_ticks: int = 400, seed: int = 0, eval_every: int = 20):
    """Signals of a run that learns: noisy losses, D ahead but not perfect, log-normal grad norms with occasional
    3–4× spikes, FID falling (with noise and a small bump), recall rising, coverage high."""
    rng = np.random.default_rng(seed)
    for t in range(1, n_ticks + 1):
        progress = t / n_ticks
        s = {
            "loss/D": 1.2 + 0.15 * rng.standard_normal(),
            "loss/G": 0.9 + 0.3 * rng.standard_normal(),
            "D/real": 0.6 + 0.3 * rng.standard_normal(),
            "D/fake": -0.6 + 0.3 * rng.standard_normal(),
            "health/D_sign_acc": float(np.clip(0.85 + 0.08 * rng.standard_normal(), 0, 1)),
            "health/grad_norm_G": 3.0 * (1 - 0.5 * progress) * math.exp(0.35 * rng.standard_normal()),
            "health/grad_norm_D": 8.0 * math.exp(0.35 * rng.standard_normal()) * (3.5 if rng.random() < 0.02 else 1),
            "perf/img_per_s": 900.0 + rng.standard_normal(),
            "data/skipped": 0.0,
        }
        if t % eval_every == 0:
            fid = 150 * math.exp(-3 * progress) + 20
            s["fid"] = fid * (1 + 0.05 * rng.standard_normal()) * (1.1 if t == 10 * eval_every else 1)
            s["recall"] = 0.15 + 0.4 * progress + 0.02 * rng.standard_normal()
            s["coverage"] = 0.9 + 0.1 * rng.random()
        yield t, s


def feed(monitor, stream, step_per_tick: int = 20):
    return [monitor.update(s, step=t * step_per_tick, tick=t) for t, s in stream]


def test_healthy_runs_never_fire():
    for seed in range(3):
        m = HealthMonitor(HealthConfig(), base_lrs=BASE_LRS)
        verdicts = feed(m, healthy_stream(seed=seed))
        assert [v.reason for v in verdicts if not v.ok] == []
        assert m.events == [] and m.rollbacks == 0 and m.lr_scale == 1.0
        assert verdicts[-1].lrs == BASE_LRS


def test_nonfinite_rolls_back_at_once_even_during_warmup():
    m = HealthMonitor(HealthConfig(warmup_ticks=10))
    v = m.update({"loss/G": 0.5, "loss/D": float("nan")}, step=20, tick=1)
    assert v.action == "rollback" and v.rules == ["nonfinite"]
    assert math.isnan(v.signals["loss/D"]) and "loss/D=nan" in v.reason
    # an inf gradient norm, and a raised flag
    assert m.update({"health/grad_norm_D": float("inf")}, step=40, tick=2).rules == ["nonfinite"]
    v = m.update({"loss/D": 1.0, "health/nonfinite_G": 1.0}, step=60, tick=3)
    assert v.action == "rollback" and v.signals == {"health/nonfinite_G": 1.0}
    assert m.update({"loss/D": 1.0, "health/nonfinite_G": 0.0}, step=80, tick=4).ok
    # signals outside nonfinite_keys may be NaN (e.g. loss/G before the first G step is reported as such only there)
    assert m.update({"perf/img_per_s": float("nan")}, step=100, tick=5).ok


def test_grad_explosion():
    m = HealthMonitor(HealthConfig())
    stream = list(healthy_stream(100))
    feed(m, stream[:60])
    t, s = stream[60]
    s = dict(s, **{"health/grad_norm_D": 8.0 * 50})
    v = m.update(s, step=t * 20, tick=t)
    assert v.action == "rollback" and v.rules == ["grad_explosion"]
    assert "health/grad_norm_D" in v.reason and "median" in v.reason
    assert v.event.kind == "grad_explosion" and v.event.signals == {"health/grad_norm_D": 400.0}


def test_grad_explosion_needs_the_absolute_floor_and_history():
    cfg = HealthConfig(warmup_ticks=0, grad_floor=1.0, grad_min_history=10)
    m = HealthMonitor(cfg)
    for t in range(1, 31):
        assert m.update({"health/grad_norm_G": 1e-3}, step=t, tick=t).ok
    assert m.update({"health/grad_norm_G": 0.5}, step=31, tick=31).ok  # 500× the median but below the floor
    assert m.update({"health/grad_norm_G": 5.0}, step=32, tick=32).action == "rollback"
    fresh = HealthMonitor(cfg)  # a spike before grad_min_history ticks are known is not judged
    for t in range(1, 6):
        fresh.update({"health/grad_norm_G": 1.0}, step=t, tick=t)
    assert fresh.update({"health/grad_norm_G": 100.0}, step=6, tick=6).ok


def test_d_overpowered_after_n_consecutive_ticks():
    cfg = HealthConfig(warmup_ticks=0, d_acc_ticks=5)
    m = HealthMonitor(cfg)
    acc = [1.0, 1.0, 1.0, 1.0, 0.97] + [0.995] * 4  # a break resets the streak
    assert all(m.update({"health/D_sign_acc": a}, step=i, tick=i + 1).ok for i, a in enumerate(acc))
    v = m.update({"health/D_sign_acc": 1.0}, step=9, tick=10)  # 5th consecutive tick ≥ 0.99
    assert v.action == "rollback" and v.rules == ["d_overpowered"] and "5 consecutive" in v.reason
    # ticks without the signal neither extend nor break the streak; rollback reset it
    for t in range(11, 15):
        assert m.update({"health/D_sign_acc": 1.0}, step=t, tick=t).ok
        assert m.update({"loss/D": 0.1}, step=t, tick=t).ok
    assert m.update({"health/D_sign_acc": 1.0}, step=15, tick=15).action == "rollback"


def test_d_overpowered_is_silent_during_warmup():
    m = HealthMonitor(HealthConfig(warmup_ticks=30, d_acc_ticks=5))
    assert all(m.update({"health/D_sign_acc": 1.0}, step=t, tick=t).ok for t in range(1, 31))
    assert m.update({"health/D_sign_acc": 1.0}, step=31, tick=31).action == "rollback"


def test_metric_regression_after_m_evaluations():
    cfg = HealthConfig(warmup_ticks=0, metric_regress_ratio=0.25, metric_patience=3)
    m = HealthMonitor(cfg)
    verdicts = [m.update({"fid": f}, step=t, tick=t) for t, f in enumerate([100, 80, 60, 80, 70, 80, 90], 1)]
    assert all(v.ok for v in verdicts)  # 70 ≤ 60 × 1.25 broke the streak of regressions
    for t in range(8, 20):  # ticks without an evaluation do not count
        assert m.update({"loss/D": 1.0}, step=t, tick=t).ok
    v = m.update({"fid": 76.0}, step=20, tick=20)
    assert v.action == "rollback" and v.rules == ["metric_regression"]
    assert "fid 76 > best 60" in v.reason
    # fd_* metrics are watched too, each against its own best
    m2 = HealthMonitor(cfg)
    for t, f in enumerate([5.0, 4.0, 9.0, 9.0], 1):
        assert m2.update({"fd_fmnist": f, "fid": 50.0}, step=t, tick=t).ok
    assert m2.update({"fd_fmnist": 9.0, "fid": 50.0}, step=5, tick=5).signals == {"fd_fmnist": 9.0}


def test_collapse_warns_once_by_default_and_can_roll_back():
    cfg = HealthConfig(warmup_ticks=0, collapse_thresholds=("recall<0.1", "coverage<0.5"), collapse_patience=2)
    m = HealthMonitor(cfg)
    assert m.update({"recall": 0.05, "coverage": 0.9}, step=1, tick=1).ok
    v = m.update({"recall": 0.04, "coverage": 0.9}, step=2, tick=2)
    assert v.action == "warn" and v.rules == ["collapse"] and v.signals == {"recall": 0.04}
    assert "mode collapse" in v.reason and v.event is not None
    m.update({"loss/D": 1.0}, step=3, tick=3)  # no evaluation this tick
    again = m.update({"recall": 0.03, "coverage": 0.9}, step=4, tick=4)
    assert again.action == "warn" and again.event is None  # same alarm: reported once
    assert len(m.events) == 1 and m.rollbacks == 0
    assert m.update({"recall": 0.3, "coverage": 0.9}, step=5, tick=5).ok

    strict = HealthMonitor(HealthConfig(warmup_ticks=0, collapse_action="rollback", collapse_patience=1))
    v = strict.update({"coverage": 0.2}, step=1, tick=1)
    assert v.action == "rollback" and v.rules == ["collapse"] and strict.lr_scale == 0.5


def test_rollback_policy_lr_cumulative_and_stop_after_k():
    m = HealthMonitor(HealthConfig(max_rollbacks=2, lr_factor=0.5), base_lrs=BASE_LRS)
    nan = {"loss/D": float("nan")}
    v1, v2, v3 = (m.update(nan, step=100 * i, tick=i) for i in (1, 2, 3))
    assert [v.action for v in (v1, v2, v3)] == ["rollback", "rollback", "stop"]
    assert [v.lr_scale for v in (v1, v2, v3)] == [0.5, 0.25, 0.25]
    assert v2.lrs == pytest.approx({"G": 2.5e-5, "D": 1e-4})
    assert "rollback 2/2" in v2.reason and "max_rollbacks" in v3.reason
    assert [e.action for e in m.events] == ["rollback", "rollback", "stop"]
    assert m.events[1].lrs == pytest.approx({"G": 2.5e-5, "D": 1e-4})
    later = m.update({"loss/D": 1.0}, step=400, tick=4)  # stays stopped
    assert later.action == "stop" and len(m.events) == 3
    assert m.metrics() == {"health/rollbacks": 2.0, "health/lr_scale": 0.25}
    assert HealthMonitor(HealthConfig(max_rollbacks=0)).update(nan, step=1).action == "stop"


def test_several_rules_in_one_verdict_most_severe_first():
    m = HealthMonitor(HealthConfig(warmup_ticks=0, d_acc_ticks=1))
    v = m.update({"health/D_sign_acc": 1.0, "loss/G": float("inf")}, step=1, tick=1)
    assert v.rules == ["nonfinite", "d_overpowered"] and v.event.kind == "nonfinite"
    assert set(v.signals) == {"loss/G", "health/D_sign_acc"}


def test_disabled_monitor_only_records():
    m = HealthMonitor(HealthConfig(enabled=False))
    assert m.update({"loss/D": float("nan")}, step=1).ok
    assert m.history[0]["tick"] == 1 and math.isnan(m.history[0]["loss/D"])


def plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(plain(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


def test_state_round_trip_continues_identically():
    cfg = HealthConfig(max_rollbacks=5)
    stream = list(healthy_stream(200, seed=1))
    stream[150][1]["loss/D"] = float("nan")  # a rollback in the first part
    a = HealthMonitor(cfg, base_lrs=BASE_LRS)
    feed(a, stream[:160])
    state = a.state_dict()
    assert plain(state)
    b = HealthMonitor(cfg)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives JSON, NaN included
    assert b.rollbacks == 1 and b.lr_scale == 0.5 and b.lrs == a.lrs and len(b.events) == 1
    rest = stream[160:]
    rest[30][1]["health/grad_norm_G"] = 1e4
    va, vb = feed(a, rest), feed(b, rest)
    assert [(v.action, v.rules, v.reason) for v in va] == [(v.action, v.rules, v.reason) for v in vb]
    assert any(v.action == "rollback" for v in va)
    assert json.dumps(a.state_dict()) == json.dumps(b.state_dict())
    with pytest.raises(ValueError, match="version"):
        b.load_state_dict({**state, "version": 99})


def test_history_is_filtered_and_bounded():
    m = HealthMonitor(HealthConfig(history_limit=50))
    feed(m, healthy_stream(120))
    assert len(m.history) == 50 and m.history[0]["tick"] == 71
    assert "perf/img_per_s" not in m.history[0] and "loss/D" in m.history[0]


def test_config_validation():
    for bad in (
        {"lr_factor": 0.0},
        {"lr_factor": 1.5},
        {"max_rollbacks": -1},
        {"grad_factor": 1.0},
        {"grad_window": 5, "grad_min_history": 6},
        {"d_acc_threshold": 1.2},
        {"metric_patience": 0},
        {"collapse_action": "panic"},
        {"warmup_ticks": 2.5},
    ):
        with pytest.raises(ValueError, match="health\\."):
            HealthConfig(**bad)
    with pytest.raises(ValueError, match="signal<value"):
        HealthConfig(collapse_thresholds=("recall>0.1",))
    cfg = HealthConfig(collapse_thresholds=["recall<0.2", "diversity < 0.3"], metric_keys="fid")
    assert cfg.collapse_limits == {"recall": 0.2, "diversity": 0.3} and cfg.metric_keys == ("fid",)


def test_sign_accuracy_and_grad_norm():
    assert sign_accuracy(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.1, 0.0, -0.2])) == pytest.approx(4 / 7)
    assert sign_accuracy([1.0, 2.0], np.array([-1.0])) == 1.0
    with pytest.raises(ValueError):
        sign_accuracy([], [])
    w1, w2, unused = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    w1.grad, w2.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert grad_norm([w1, w2, unused]) == pytest.approx(5.0)
    w2.grad[0] = float("nan")
    assert math.isnan(grad_norm([w1, w2]))
    assert grad_norm([unused]) == 0.0


def run_with_trouble() -> HealthMonitor:
    m = HealthMonitor(HealthConfig(), base_lrs=BASE_LRS)
    stream = list(healthy_stream(300))
    for t, s in stream[:120]:
        m.update(dict(s, **{"health/grad_norm_D": 5e3}) if t == 120 else s, step=t * 20, tick=t)
    for t, s in stream[100:300]:  # rolled back to the tick-100 checkpoint and resumed
        m.update(dict(s, precision=0.7) if "fid" in s else s, step=t * 20, tick=t)
    return m


def test_report_markdown_lists_events():
    m = run_with_trouble()
    md = health_report_markdown(m.events, m.history, plot_path="health.png")
    assert m.events and m.events[0].kind == "grad_explosion"
    assert md.startswith("## Training health")
    assert "recovered: 1 rollback(s)" in md
    assert "| 120 | 2400 | rollback | grad_explosion |" in md
    assert "`health/grad_norm_D`=5000" in md and "G 5e-05, D 0.0002" in md
    assert "![training health](health.png)" in md and "`loss/D`" in md
    assert "Status: healthy: no rule fired." in health_report_markdown([], [])
    stop = HealthEvent(3, 60, "nonfinite", ["nonfinite"], {"loss/D": math.nan}, "a | b", "stop", 0.25)
    md = health_report_markdown([stop], [{"tick": 3, "step": 60, "loss/D": math.nan}])
    assert "**stopped** at step 60" in md and "a \\| b" in md
    # resubmitted with a larger rollback budget, the run finished: its stop event stays, the status says so
    md = health_report_markdown([stop], [{"tick": 3, "step": 60}], stopped=False)
    assert "**stopped**" not in md and "resumed after a stop at step 60 (nonfinite) and finished" in md


def test_plot_is_a_png_with_content(tmp_path):
    m = run_with_trouble()
    path = health_plot(m.history, tmp_path / "sub" / "health.png", m.events)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.shape[0] > 600 and img.shape[1] >= 900
    assert img.std() > 10 and (img < 128).mean() > 0.01  # lines and text, not a blank canvas
    # red rollback marker present somewhere
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 50
    empty = health_plot([], tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
