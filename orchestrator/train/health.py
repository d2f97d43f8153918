"""Training health: watch the per-tick signals of a GAN run, say what is wrong, and decide what to do.

Pure logic (no Ray, MLflow or file I/O besides ``health_plot``). The training loop owns one ``HealthMonitor`` and
feeds it every tick::

    monitor = HealthMonitor(HealthConfig(), base_lrs={"G": 1e-4, "D": 4e-4})
    ...
    verdict = monitor.update(metrics, step=step, tick=tick)     # metrics: the tick's averaged scalars
    if verdict.action == "rollback":
        restore the last good checkpoint (NOT the monitor's state: the live monitor keeps the rollback count),
        then set every optimiser's lr to base_lr × verdict.lr_scale (= verdict.lrs), and continue
    elif verdict.action == "stop":
        write the report (health_report_markdown / health_plot) and end the run as failed with verdict.reason
    elif verdict.action == "warn":
        log verdict.reason (verdict.event is set on the first tick a warning fires, None while it persists)

Signals (keys of the dict given to ``update``; any subset, any extra keys are ignored except for the history):

=========================  ==============================================================================
``loss/G``, ``loss/D``     tick-averaged losses (checked for NaN/inf)
``D/real``, ``D/fake``     mean D logits on real / generated images (checked for NaN/inf; plotted)
``health/grad_norm_G|D``   total L2 norm of G's / D's gradients (``grad_norm``), tick-averaged
``health/nonfinite*``      flags: any value > 0 (e.g. a step skipped by the AMP scaler, NaN grads) fires
``health/D_sign_acc``      D's sign accuracy (``sign_accuracy``), tick-averaged
``fid``, ``fd_<name>``     occasional evaluations, lower is better
``recall``, ``coverage``   occasional evaluations (``precision_recall``, ``class_report``), higher is better
``health/loss_ratio``      ``loss_ratio``: loss/G ÷ loss/D (recorded and plotted, no rule)
``health/ema_drift``       ``ema_drift``: relative L2 distance of G_ema from G (recorded and plotted, no rule)
=========================  ==============================================================================

Rules (thresholds in ``HealthConfig``); all but ``nonfinite`` stay silent while ``tick ≤ warmup_ticks``:

- ``nonfinite``: a NaN/inf among ``nonfinite_keys`` or a raised ``health/nonfinite*`` flag → rollback now.
- ``grad_explosion``: a grad norm > ``grad_factor`` × its median over the previous ``grad_window`` ticks (once at
  least ``grad_min_history`` are known) *and* > ``grad_floor`` → rollback.
- ``d_overpowered``: ``health/D_sign_acc`` ≥ ``d_acc_threshold`` for ``d_acc_ticks`` consecutive ticks (D separates
  real from fake perfectly: G gets no useful gradient) → rollback.
- ``metric_regression``: a ``metric_keys`` value > best-so-far × (1 + ``metric_regress_ratio``) for
  ``metric_patience`` consecutive evaluations of that metric → rollback.
- ``collapse``: a ``collapse_thresholds`` signal (``"recall<0.1"``) below its threshold for ``collapse_patience``
  consecutive evaluations → ``collapse_action`` ("warn" or "rollback").

Policy: every rollback multiplies the learning-rate scale by ``lr_factor`` (cumulative: 0.5, 0.25, …, relative to
the base learning rates); after ``max_rollbacks`` rollbacks the next rollback-worthy verdict is ``stop``, and every
later ``update`` answers ``stop`` too. A rollback clears the rules' running state (streaks, grad-norm windows) but
keeps each metric's best value.

Fire drills: ``HealthConfig.fire_drill`` injects a fault on purpose, so a team can watch the guard act on a real
cluster before it matters (``parse_fire_drill``): ``lr_spike@STEPxFACTOR`` multiplies every learning rate by
FACTOR once STEP steps are done (until the guard's rollback resets them), ``nan@STEP`` writes NaN into one of G's
weights. A drill fires once per run; a rollback to a checkpoint before STEP does not fire it again.

Checkpointing: ``state_dict()`` is plain Python (dict/list/str/int/float/bool/None; floats may be NaN). Save it with
every checkpoint and ``load_state_dict`` it when *resuming* a run (restart after a crash); do not load it when
rolling back. Distributed runs must reach the same verdict on every rank: feed identical (all-reduced) signals to
every rank's monitor, or run the monitor on rank 0 and broadcast the verdict. A stopped monitor's state loaded under
a config that allows more rollbacks than it used (or disables the guard) is no longer stopped: resuming a stopped
run with a larger ``max_rollbacks`` continues it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gan_models.steps import grad_norm, sign_accuracy  # measured by the recipes, re-exported as health signals

__all__ = [
    "ACTIONS",
    "FIRE_DRILLS",
    "RULES",
    "FireDrill",
    "HealthConfig",
    "HealthEvent",
    "HealthMonitor",
    "TrainingStopped",
    "Verdict",
    "ema_drift",
    "events_note",
    "grad_norm",
    "health_plot",
    "health_report_markdown",
    "loss_ratio",
    "parse_fire_drill",
    "sign_accuracy",
]

OK, WARN, ROLLBACK, STOP = "ok", "warn", "rollback", "stop"
ACTIONS = (OK, WARN, ROLLBACK, STOP)
RULES = ("nonfinite", "grad_explosion", "d_overpowered", "metric_regression", "collapse")  # most severe first
NONFINITE_FLAG_PREFIX = "health/nonfinite"
FIRE_DRILLS = ("lr_spike", "nan")
_STATE_VERSION = 1


class TrainingStopped(RuntimeError):
    """The divergence guard stopped a run (rollbacks used up); the message is one line with the rule that fired."""


def ema_drift(G: torch.nn.Module, G_ema: torch.nn.Module) -> float:
    """Relative L2 distance of G_ema's parameters from G's: ‖θ_G − θ_ema‖ / ‖θ_G‖ over every parameter (buffers
    excluded), in float64. 0 while the EMA only copies G; a steady small value while both learn; a jump when G moves
    away faster than the average follows (a divergence, or an lr too high for the EMA's half-life)."""
    with torch.no_grad():
        p64 = [p.detach().double() for p in G.parameters()]
        q64 = [q.detach().double() for q in G_ema.parameters()]
        if len(p64) != len(q64):
            raise ValueError(f"G has {len(p64)} parameters, G_ema {len(q64)}")
        # foreach norms, one read from the device for both sums (not two per parameter)
        diff = torch.stack(torch._foreach_norm(torch._foreach_sub(p64, q64))).square().sum()
        total = torch.stack(torch._foreach_norm(p64)).square().sum()
        diff, total = torch.stack([diff, total]).tolist()
    return math.sqrt(diff) / math.sqrt(total) if total > 0 else 0.0


def loss_ratio(signals: Mapping[str, float]) -> float | None:
    """``loss/G`` ÷ ``loss/D`` (``health/loss_ratio``): how much harder G's objective is than D's. It grows while D
    wins (for hinge and logistic losses loss/D ≥ 0 and heads to 0 when D separates everything); its sign is G's
    loss's (a hinge G loss is −D(G(z)), negative once G fools D). None when either loss is missing or loss/D is 0."""
    g, d = signals.get("loss/G"), signals.get("loss/D")
    if g is None or d is None or d == 0 or not (math.isfinite(g) and math.isfinite(d)):
        return None
    return float(g) / float(d)


@dataclass(frozen=True)
class FireDrill:
    """A fault injected on purpose (``HealthConfig.fire_drill``): ``kind`` in ``FIRE_DRILLS``, applied once ``step``
    steps are done; ``factor`` is the lr multiplier of an ``lr_spike``."""

    kind: str
    step: int
    factor: float = 1.0

    def describe(self) -> str:
        if self.kind == "lr_spike":
            return f"learning rates × {_fmt(self.factor)} after step {self.step}"
        return f"NaN written into a G weight after step {self.step}"


def parse_fire_drill(spec: str) -> FireDrill | None:
    """``"lr_spike@200x1e4"`` → FireDrill("lr_spike", 200, 1e4); ``"nan@200"`` → FireDrill("nan", 200); ``""`` →
    None. ValueError (one line, naming the valid forms) on anything else."""
    spec = (spec or "").strip()
    if not spec:
        return None
    valid = "'lr_spike@STEPxFACTOR' (e.g. lr_spike@200x1e4, FACTOR > 1) or 'nan@STEP' (STEP ≥ 1), or '' for none"
    kind, _, rest = spec.partition("@")
    step_text, _, factor_text = rest.partition("x")
    try:
        step = int(step_text)
        if kind == "lr_spike":
            factor = float(factor_text)
            ok = factor > 1 and math.isfinite(factor)
        else:
            factor, ok = 1.0, kind == "nan" and not factor_text
    except ValueError:
        ok = False
    if not ok or step < 1:
        raise ValueError(f"health.fire_drill={spec!r} is invalid; expected {valid}")
    return FireDrill(kind, step, factor)


def _parse_threshold(spec: str) -> tuple[str, float]:
    key, sep, value = spec.partition("<")
    try:
        if not sep or not key.strip():
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise ValueError(f"health.collapse_thresholds item {spec!r} is invalid; expected 'signal<value'") from None


@dataclass
class HealthConfig:
    """Thresholds of the health rules and the rollback policy (see the module docstring for the rules)."""

    enabled: bool = True  # False: every verdict is "ok" (history is still recorded)
    warmup_ticks: int = 10  # rules other than nonfinite are silent while tick ≤ warmup_ticks
    # nonfinite: fnmatch patterns of signals that must be finite (flags health/nonfinite* are always checked)
    nonfinite_keys: tuple[str, ...] = ("loss/*", "D/real", "D/fake", "health/grad_norm_*")
    # grad_explosion
    grad_keys: tuple[str, ...] = ("health/grad_norm_G", "health/grad_norm_D")
    grad_window: int = 50  # W: ticks in the running median
    grad_min_history: int = 10  # ticks of history before the rule may fire
    grad_factor: float = 10.0  # k: fire above k × running median ...
    grad_floor: float = 1.0  # ... and above this absolute norm
    # d_overpowered
    d_acc_key: str = "health/D_sign_acc"
    d_acc_threshold: float = 0.99
    d_acc_ticks: int = 20  # N consecutive ticks
    # metric_regression (lower is better; fnmatch patterns)
    metric_keys: tuple[str, ...] = ("fid", "fd_*")
    metric_regress_ratio: float = 0.25  # r: regressed when value > best × (1 + r)
    metric_patience: int = 3  # M consecutive evaluations
    # collapse ("signal<threshold", higher is better)
    collapse_thresholds: tuple[str, ...] = ("recall<0.1", "coverage<0.5")
    collapse_patience: int = 2  # consecutive evaluations below threshold
    collapse_action: str = WARN  # "warn" or "rollback"
    # policy
    lr_factor: float = 0.5  # each rollback multiplies the learning rates by this (cumulative)
    max_rollbacks: int = 3  # K: the next rollback-worthy verdict after K rollbacks is "stop"
    # history (for the report and plot; part of the state, so kept small)
    history_keys: tuple[str, ...] = (
        "loss/*", "D/*", "health/*", "aug/p", "fid", "fd_*", "precision", "recall", "coverage", "diversity",
        "accuracy",
    )  # fmt: skip
    history_limit: int = 20_000  # ticks kept (oldest dropped)
    # fault injection for fire drills ("lr_spike@STEPxFACTOR", "nan@STEP"; "" = none): see the module docstring
    fire_drill: str = ""

    def __post_init__(self) -> None:
        for name in ("nonfinite_keys", "grad_keys", "metric_keys", "collapse_thresholds", "history_keys"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        self.collapse_limits  # noqa: B018 -- parses and validates every item

        def check(ok: bool, name: str, valid: str) -> None:
            if not ok:
                raise ValueError(f"health.{name}={getattr(self, name)!r} is invalid; expected {valid}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check(is_int(self.warmup_ticks) and self.warmup_ticks >= 0, "warmup_ticks", "an integer ≥ 0")
        check(is_int(self.grad_window) and self.grad_window >= 1, "grad_window", "an integer ≥ 1")
        check(
            is_int(self.grad_min_history) and 1 <= self.grad_min_history <= self.grad_window,
            "grad_min_history",
            f"an integer with 1 ≤ grad_min_history ≤ grad_window ({self.grad_window})",
        )
        check(self.grad_factor > 1, "grad_factor", "a number > 1")
        check(self.grad_floor >= 0, "grad_floor", "a number ≥ 0")
        check(0 < self.d_acc_threshold <= 1, "d_acc_threshold", "a number in (0, 1]")
        check(is_int(self.d_acc_ticks) and self.d_acc_ticks >= 1, "d_acc_ticks", "an integer ≥ 1")
        check(self.metric_regress_ratio >= 0, "metric_regress_ratio", "a number ≥ 0")
        check(is_int(self.metric_patience) and self.metric_patience >= 1, "metric_patience", "an integer ≥ 1")
        check(is_int(self.collapse_patience) and self.collapse_patience >= 1, "collapse_patience", "an integer ≥ 1")
        check(self.collapse_action in (WARN, ROLLBACK), "collapse_action", "'warn' or 'rollback'")
        check(0 < self.lr_factor <= 1, "lr_factor", "a number in (0, 1]")
        check(is_int(self.max_rollbacks) and self.max_rollbacks >= 0, "max_rollbacks", "an integer ≥ 0")
        check(is_int(self.history_limit) and self.history_limit >= 1, "history_limit", "an integer ≥ 1")
        self.drill  # noqa: B018 -- parses and validates fire_drill

    @property
    def drill(self) -> FireDrill | None:
        """``fire_drill`` parsed (None when off)."""
        return parse_fire_drill(self.fire_drill)

    @property
    def collapse_limits(self) -> dict[str, float]:
        """``collapse_thresholds`` parsed: {signal: threshold}."""
        return dict(_parse_threshold(s) for s in self.collapse_thresholds)


@dataclass
class HealthEvent:
    """One non-ok verdict, for logs and the run report. ``kind`` is the most severe rule in ``rules``; ``signals``
    holds the values that fired; ``lr_scale`` / ``lrs`` are the learning-rate scale and (with base lrs) the learning
    rates in force *after* the action."""

    tick: int
    step: int
    kind: str
    rules: list[str]
    signals: dict[str, float]
    reason: str
    action: str
    lr_scale: float
    lrs: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HealthEvent:
        return cls(**d)


@dataclass
class Verdict:
    """The monitor's answer for one tick. ``action``: ok | warn | rollback | stop; ``rules``: the rules that fired
    (most severe first); ``signals``: their values; ``reason``: one human-readable line; ``lr_scale``/``lrs``: what
    the learning rates must be from now on (relative to / given the base lrs); ``event``: the recorded
    ``HealthEvent`` (None for ok, and for a warning that was already reported)."""

    action: str
    rules: list[str] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    lr_scale: float = 1.0
    lrs: dict[str, float] | None = None
    event: HealthEvent | None = None

    @property
    def ok(self) -> bool:
        return self.action == OK


@dataclass
class _Finding:
    rule: str
    signals: dict[str, float]
    reason: str
    rollback: bool
    new: bool = True  # for warnings: False while the same alarm persists (reported once)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


class HealthMonitor:
    """Feed ``update`` once per tick; see the module docstring for the contract. ``base_lrs`` (e.g.
    ``{"G": 1e-4, "D": 4e-4}``) only serves to report absolute learning rates in verdicts and events."""

    def __init__(self, cfg: HealthConfig | None = None, base_lrs: Mapping[str, float] | None = None) -> None:
        self.cfg = cfg or HealthConfig()
        self.base_lrs = dict(base_lrs) if base_lrs is not None else None
        self._collapse_limits = self.cfg.collapse_limits
        self.tick = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.stopped = False
        self.events: list[HealthEvent] = []
        self.history: list[dict[str, Any]] = []
        self._grad: dict[str, list[float]] = {}
        self._d_acc_streak = 0
        self._best: dict[str, float] = {}
        self._metric_streak: dict[str, int] = {}
        self._collapse_streak: dict[str, int] = {}
        self._alarm: set[str] = set()  # collapse signals in alarm at their last evaluation

    # ---------------------------------------------------------------------------------------------- public API
    @property
    def lrs(self) -> dict[str, float] | None:
        """Base learning rates × the current scale (None without ``base_lrs``)."""
        return None if self.base_lrs is None else {k: v * self.lr_scale for k, v in self.base_lrs.items()}

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging every tick: ``health/rollbacks``, ``health/lr_scale``."""
        return {"health/rollbacks": float(self.rollbacks), "health/lr_scale": self.lr_scale}

    def update(self, signals: Mapping[str, Any], *, step: int, tick: int | None = None) -> Verdict:
        """Check one tick's ``signals`` (name → number; non-numbers are ignored) at training ``step``.

        ``tick`` is the loop's tick counter (restored on rollback/resume); omitted, it is the previous tick + 1.
        Returns the ``Verdict``; a non-ok one (except a repeated warning) is also appended to ``self.events``. The
        tick's ``history_keys`` signals (plus ``tick``, ``step`` and a non-ok ``action``) go to ``self.history``.
        """
        self.tick = int(tick) if tick is not None else self.tick + 1
        values = {k: float(v) for k, v in signals.items() if _is_number(v)}
        findings = self._check(values) if self.cfg.enabled and not self.stopped else []
        verdict = self._decide(findings, step)
        entry: dict[str, Any] = {"tick": self.tick, "step": int(step)}
        entry.update({k: x for k, x in values.items() if _matches(k, self.cfg.history_keys)})
        if verdict.action != OK:
            entry["action"] = verdict.action
        self.history.append(entry)
        del self.history[: max(0, len(self.history) - self.cfg.history_limit)]
        return verdict

    def state_dict(self) -> dict[str, Any]:
        """Everything ``update`` depends on, as plain Python types."""
        return {
            "version": _STATE_VERSION,
            "tick": self.tick,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "stopped": self.stopped,
            "base_lrs": None if self.base_lrs is None else dict(self.base_lrs),
            "grad": {k: list(v) for k, v in self._grad.items()},
            "d_acc_streak": self._d_acc_streak,
            "best": dict(self._best),
            "metric_streak": dict(self._metric_streak),
            "collapse_streak": dict(self._collapse_streak),
            "alarm": sorted(self._alarm),
            "events": [e.to_dict() for e in self.events],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"health monitor state version {state.get('version')!r} != {_STATE_VERSION}")
        self.tick = int(state["tick"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
        # the stop stands only while the rollback budget is still used up under the config in force now
        self.stopped = bool(state["stopped"]) and self.cfg.enabled and self.rollbacks >= self.cfg.max_rollbacks
        self.base_lrs = None if state["base_lrs"] is None else dict(state["base_lrs"])
        self._grad = {k: [float(x) for x in v] for k, v in state["grad"].items()}
        self._d_acc_streak = int(state["d_acc_streak"])
        self._best = dict(state["best"])
        self._metric_streak = dict(state["metric_streak"])
        self._collapse_streak = dict(state["collapse_streak"])
        self._alarm = set(state["alarm"])
        self.events = [HealthEvent.from_dict(e) for e in state["events"]]
        self.history = [dict(h) for h in state["history"]]

    def report_markdown(self, plot_path: str | os.PathLike | None = None) -> str:
        return health_report_markdown(self.events, self.history, plot_path=plot_path)

    # ------------------------------------------------------------------------------------------------- rules
    def _check(self, v: dict[str, float]) -> list[_Finding]:
        cfg = self.cfg
        armed = self.tick > cfg.warmup_ticks
        out: list[_Finding] = []

        bad = {k: x for k, x in v.items() if _matches(k, cfg.nonfinite_keys) and not math.isfinite(x)}
        bad.update({k: x for k, x in v.items() if k.startswith(NONFINITE_FLAG_PREFIX) and not x <= 0})
        if bad:
            what = ", ".join(f"{k}={_fmt(x)}" for k, x in sorted(bad.items()))
            out.append(_Finding("nonfinite", bad, f"non-finite values or flags: {what}", True))

        for key in cfg.grad_keys:
            x = v.get(key)
            if x is None or not math.isfinite(x):
                continue
            window = self._grad.setdefault(key, [])
            if armed and len(window) >= cfg.grad_min_history:
                med = statistics.median(window)
                if x > cfg.grad_factor * med and x > cfg.grad_floor:
                    why = (
                        f"{key} {_fmt(x)} > {_fmt(cfg.grad_factor)}× its median {_fmt(med)} over the last "
                        f"{len(window)} ticks (floor {_fmt(cfg.grad_floor)}): gradient explosion"
                    )
                    out.append(_Finding("grad_explosion", {key: x}, why, True))
            window.append(x)
            del window[: max(0, len(window) - cfg.grad_window)]

        x = v.get(cfg.d_acc_key)
        if x is not None and math.isfinite(x):
            self._d_acc_streak = self._d_acc_streak + 1 if x >= cfg.d_acc_threshold else 0
            if armed and self._d_acc_streak >= cfg.d_acc_ticks:
                why = (
                    f"{cfg.d_acc_key} ≥ {_fmt(cfg.d_acc_threshold)} for {self._d_acc_streak} consecutive ticks "
                    f"(now {_fmt(x)}): D separates real from fake perfectly, G gets no useful gradient"
                )
                out.append(_Finding("d_overpowered", {cfg.d_acc_key: x}, why, True))

        for key, x in v.items():
            if not _matches(key, cfg.metric_keys) or not math.isfinite(x):
                continue
            best = self._best.get(key)
            if best is None or x < best:
                self._best[key], self._metric_streak[key] = x, 0
                continue
            worse = x > best * (1 + cfg.metric_regress_ratio)
            self._metric_streak[key] = self._metric_streak.get(key, 0) + 1 if worse else 0
            if armed and self._metric_streak[key] >= cfg.metric_patience:
                why = (
                    f"{key} {_fmt(x)} > best {_fmt(best)} × {_fmt(1 + cfg.metric_regress_ratio)} for "
                    f"{self._metric_streak[key]} consecutive evaluations: sample quality regressed"
                )
                out.append(_Finding("metric_regression", {key: x}, why, True))

        low, new = {}, False
        for key, limit in self._collapse_limits.items():
            x = v.get(key)
            if x is None or math.isnan(x):
                continue
            self._collapse_streak[key] = self._collapse_streak.get(key, 0) + 1 if x < limit else 0
            if armed and self._collapse_streak[key] >= cfg.collapse_patience:
                low[key] = x
                new |= key not in self._alarm
                self._alarm.add(key)
            else:
                self._alarm.discard(key)
        if low:
            what = ", ".join(f"{k} {_fmt(x)} < {_fmt(self._collapse_limits[k])}" for k, x in low.items())
            why = f"{what} for ≥ {cfg.collapse_patience} consecutive evaluations: mode collapse"
            out.append(_Finding("collapse", low, why, cfg.collapse_action == ROLLBACK, new))
        return out

    # ------------------------------------------------------------------------------------------------ policy
    def _decide(self, findings: list[_Finding], step: int) -> Verdict:
        if self.stopped:
            last = self.events[-1].reason if self.events else "stopped"
            return Verdict(STOP, reason=f"stopped earlier: {last}", lr_scale=self.lr_scale, lrs=self.lrs)
        if not findings:
            return Verdict(OK, lr_scale=self.lr_scale, lrs=self.lrs)
        findings.sort(key=lambda f: RULES.index(f.rule))
        rules = [f.rule for f in findings]
        signals = {k: x for f in findings for k, x in f.signals.items()}
        reason = "; ".join(f.reason for f in findings)
        new_warning = True
        if any(f.rollback for f in findings):
            if self.rollbacks < self.cfg.max_rollbacks:
                action = ROLLBACK
                self.rollbacks += 1
                self.lr_scale *= self.cfg.lr_factor
                reason += (
                    f" → rollback {self.rollbacks}/{self.cfg.max_rollbacks}, learning rates × "
                    f"{_fmt(self.cfg.lr_factor)} (now {_fmt(self.lr_scale)} × base)"
                )
                self._reset_after_rollback()
            else:
                action = STOP
                self.stopped = True
                reason += f" → stop: the {self.cfg.max_rollbacks} allowed rollbacks (max_rollbacks) are used up"
        else:
            action = WARN
            new_warning = any(f.new for f in findings)
        event = None
        if new_warning:
            event = HealthEvent(self.tick, int(step), rules[0], rules, signals, reason, action, self.lr_scale, self.lrs)
            self.events.append(event)
        return Verdict(action, rules, signals, reason, self.lr_scale, self.lrs, event)

    def _reset_after_rollback(self) -> None:
        self._grad.clear()
        self._d_acc_streak = 0
        self._metric_streak.clear()
        self._collapse_streak.clear()
        self._alarm.clear()


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float | np.number):
        return True
    return isinstance(v, torch.Tensor) and v.numel() == 1


# --------------------------------------------------------------------------------------------------- reporting
def _superseded(history: Sequence[Mapping[str, Any]]) -> list[bool]:
    """True for ticks a later rollback/resume went back over (a later tick has a step ≤ theirs)."""
    out, later_min = [False] * len(history), math.inf
    for i in range(len(history) - 1, -1, -1):
        step = float(history[i]["step"])
        out[i] = later_min <= step
        later_min = min(later_min, step)
    return out


def _series(history: Sequence[Mapping[str, Any]], key: str, keep: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the ticks where ``keep``, with a NaN break wherever the step goes back."""
    xs: list[float] = []
    ys: list[float] = []
    last = -math.inf
    for h, k in zip(history, keep):
        if key not in h or not k:
            continue
        s = float(h["step"])
        if s <= last and xs:
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append(s)
        ys.append(float(h[key]))
        last = s
    return xs, ys


def _keys(history: Sequence[Mapping[str, Any]], match) -> list[str]:
    seen: dict[str, None] = {}
    for h in history:
        for k in h:
            if k not in ("tick", "step", "action") and match(k):
                seen[k] = None
    return sorted(seen)


def _fit_to_live(
    ax, history: Sequence[Mapping[str, Any]], keys: Sequence[str], live: Sequence[bool], log: bool
) -> None:
    """Scale ``ax`` to the ticks that count: a diverged tick a rollback went back over can be 1000× the rest and
    would flatten every live curve (it stays in the report's table; its marker is clipped)."""
    ys = [y for key in keys for y in _series(history, key, live)[1] if math.isfinite(y) and (y > 0 or not log)]
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    if log:
        ax.set_ylim(lo / 1.5, hi * 1.5)
    else:
        pad = 0.08 * (hi - lo) or 0.5 * abs(hi) or 1.0
        ax.set_ylim(lo - pad, hi + pad)


def health_plot(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    events: Sequence[HealthEvent] = (),
) -> Path:
    """PNG of the run's health at ``path``: losses, D outputs (+ sign accuracy), gradient norms (log scale) and
    evaluation metrics (precision/recall/coverage/diversity on [0, 1], FID-like distances on a second axis), against
    the training step. Vertical lines mark rollbacks/stops (red) and warnings (orange), from the history's
    ``action`` entries and ``events``; ticks a rollback went back over are drawn faint. Panels without data are left
    out. Uses matplotlib's Agg canvas directly (no
    pyplot, no global backend change). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    losses = _keys(history, lambda k: k.startswith("loss/"))
    if losses:
        panels.append(("losses", losses, [], False))
    d_out = _keys(history, lambda k: k in ("D/real", "D/fake"))
    d_acc = _keys(history, lambda k: k == "health/D_sign_acc")
    if d_out or d_acc:
        panels.append(("D outputs (mean logits)", d_out, d_acc, False))
    grads = _keys(history, lambda k: k.startswith("health/grad_norm"))
    if grads:
        panels.append(("gradient norms", grads, [], True))
    unit = _keys(history, lambda k: k in ("precision", "recall", "coverage", "diversity", "accuracy"))
    dist = _keys(history, lambda k: k == "fid" or k.startswith("fd_"))
    if unit or dist:
        panels.append(("evaluations", unit, dist, False))

    evaluated = set(unit) | set(dist)
    dead = _superseded(history)
    live = [not d for d in dead]
    markers: dict[float, str] = {}
    for h in history:
        if h.get("action") in (ROLLBACK, STOP, WARN):
            markers[float(h["step"])] = h["action"]
    for e in events:
        markers.setdefault(float(e.step), e.action)

    fig = Figure(figsize=(10, 2.6 * max(1, len(panels))), dpi=100)
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no health signals recorded", ha="center", va="center")
        ax.set_axis_off()
    for i, (title, left, right, log) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for j, key in enumerate(left):
            style = {"lw": 1.2, "color": f"C{j}", "marker": "o" if key in evaluated else None, "ms": 3}
            ax.plot(*_series(history, key, live), label=key, **style)
            ax.plot(*_series(history, key, dead), alpha=0.3, **{**style, "marker": "x", "ms": 5})
        if log:
            ax.set_yscale("log")
        _fit_to_live(ax, history, left, live, log)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if right:
            ax2 = ax.twinx()
            for j, key in enumerate(right):
                style = {"lw": 1.2, "ls": "--", "color": f"C{len(left) + j}", "ms": 3}
                style["marker"] = "s" if key in evaluated else None
                ax2.plot(*_series(history, key, live), label=key, **style)
                ax2.plot(*_series(history, key, dead), alpha=0.3, **{**style, "marker": "x", "ms": 5})
            _fit_to_live(ax2, history, right, live, False)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        for step, action in markers.items():
            ax.axvline(step, color="tab:orange" if action == WARN else "tab:red", ls=":", lw=1.5)
        if handles:
            ax.legend(handles, labels, fontsize=8, loc="upper right", ncol=min(4, len(labels)))
        if i == len(panels) - 1:
            ax.set_xlabel("step")
    inch = 1 / fig.get_figheight()  # fixed margins: tight_layout costs seconds on a busy CPU
    fig.subplots_adjust(left=0.07, right=0.93, top=1 - 0.3 * inch, bottom=0.5 * inch, hspace=0.45)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.write_bytes(buf.getvalue())
    return path


def events_note(events: Sequence[HealthEvent], limit: int = 7000) -> str:
    """The run's health events as a markdown list (newest last), at most ``limit`` characters: the oldest lines are
    dropped first (MLflow caps a tag, and so a run's note, at 8000 characters)."""
    lines = []
    for e in events:
        sig = ", ".join(f"{k}={_fmt(v)}" for k, v in e.signals.items())
        lrs = ", ".join(f"{k} {_fmt(v)}" for k, v in e.lrs.items()) if e.lrs else f"× {_fmt(e.lr_scale)} of base"
        lines.append(f"- **{e.action}** at step {e.step} (tick {e.tick}), {', '.join(e.rules)}: {sig}; "
                     f"learning rates now {lrs}. {e.reason}")  # fmt: skip
    head = "### Training health events\n\n"
    kept: list[str] = []
    size = len(head)
    for line in reversed(lines):
        if size + len(line) + 1 > limit - 80 and kept:
            break
        kept.insert(0, line[: limit - 80 - len(head)])
        size += len(line) + 1
    dropped = len(lines) - len(kept)
    if dropped:
        kept.insert(0, f"- … {dropped} earlier event(s): see the health/events.json artifact")
    return head + ("\n".join(kept) if kept else "None.") + "\n"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def health_report_markdown(
    events: Sequence[HealthEvent],
    history: Sequence[Mapping[str, Any]],
    plot_path: str | os.PathLike | None = None,
    stopped: bool | None = None,
) -> str:
    """The "Training health" section of a run report: a one-line status, a table of the key signals (last value,
    and min/max or best), every event (tick, step, action, rule, signals, reason, learning rates), and an image link
    to ``plot_path`` when given. ``stopped``: whether the run ended stopped, as the loop knows it (a stopped run
    resubmitted with a larger rollback budget keeps its stop event, yet finished); None infers it from the events."""
    rollbacks = sum(e.action == ROLLBACK for e in events)
    stops = [e for e in events if e.action == STOP]
    warns = sum(e.action == WARN for e in events)
    if stopped is None:
        stopped = bool(stops)
    if stopped and stops:
        status = f"**stopped** at step {stops[-1].step} after {rollbacks} rollback(s): {stops[-1].kind}"
    elif stops:
        status = f"resumed after a stop at step {stops[-1].step} ({stops[-1].kind}) and finished; {rollbacks} " \
            f"rollback(s), learning-rate scale now {_fmt(events[-1].lr_scale)}"  # fmt: skip
    elif rollbacks:
        status = f"recovered: {rollbacks} rollback(s), learning-rate scale now {_fmt(events[-1].lr_scale)}"
        status = status if not warns else f"{status}; {warns} warning(s)"
    elif warns:
        status = f"{warns} warning(s), no rollback"
    else:
        status = "healthy: no rule fired"
    lines = ["## Training health", "", f"Status: {status}.", ""]
    if history:
        lines += [f"Watched {len(history)} ticks, last step {history[-1]['step']}.", ""]
        keys = _keys(history, lambda k: True)
        if keys:
            lines += ["| signal | last | min | max |", "|---|---|---|---|"]
            for k in keys:
                vals = [float(h[k]) for h in history if k in h]
                finite = [x for x in vals if math.isfinite(x)]
                lo, hi = (_fmt(min(finite)), _fmt(max(finite))) if finite else ("–", "–")
                lines.append(f"| `{k}` | {_fmt(vals[-1])} | {lo} | {hi} |")
            lines.append("")
    lines += ["### Events", ""]
    if events:
        lines += [
            "| tick | step | action | rule | signals | reason | learning rates |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in events:
            sig = ", ".join(f"`{k}`={_fmt(v)}" for k, v in e.signals.items())
            lrs = ", ".join(f"{k} {_fmt(v)}" for k, v in e.lrs.items()) if e.lrs else f"× {_fmt(e.lr_scale)}"
            cells = [e.tick, e.step, e.action, _md(", ".join(e.rules)), _md(sig), _md(e.reason), _md(lrs)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    else:
        lines.append("None.")
    if plot_path is not None:
        lines += ["", f"![training health]({Path(plot_path).as_posix()})"]
    return "\n".join(lines) + "\n"
