"""The divergence guard's rule engine: ``HealthMonitor`` checks one tick's averaged signals and answers a ``Verdict``.

The loop owns one monitor and feeds it every tick::

    verdict = monitor.update(metrics, step=step, tick=tick)
    # rollback: restore the last healthy checkpoint (not the monitor's state: the live monitor keeps the rollback
    #           count), set every lr to base lr × verdict.lr_scale, continue
    # stop:     write the health report, end the run as failed with verdict.reason
    # warn:     log verdict.reason (verdict.event is set on the first tick a warning fires, None while it persists)

Every rollback multiplies the lr scale by ``lr_factor`` (cumulative) and clears the rules' running state except each
metric's best value; after ``max_rollbacks`` rollbacks the next rollback-worthy verdict is ``stop``, and so is every
later one. ``state_dict()`` is plain Python (floats may be NaN): save it with every checkpoint and load it when
resuming, never when rolling back. Under DDP every rank's monitor gets the same all-reduced signals, so all agree.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from orchestrator.train.health.drills import FireDrill, parse_fire_drill

OK, WARN, ROLLBACK, STOP = "ok", "warn", "rollback", "stop"
ACTIONS = (OK, WARN, ROLLBACK, STOP)
RULES = ("nonfinite", "grad_explosion", "d_overpowered", "metric_regression", "collapse")  # most severe first
NONFINITE_FLAG_PREFIX = "health/nonfinite"
# keys of the last metrics report of a run the guard stopped: the loop writes them, the driver raises on them
STOPPED, STOP_REASON = "health/stopped", "health/stop_reason"
_STATE_VERSION = 1


class TrainingStopped(RuntimeError):
    """The divergence guard stopped a run (rollbacks used up); the message is one line with the rule that fired."""


def fmt_value(v: float) -> str:
    """How the guard writes a number in reasons, notes and reports."""
    return f"{v:.4g}"


def _parse_threshold(spec: str) -> tuple[str, float]:
    key, sep, value = spec.partition("<")
    try:
        if not sep or not key.strip():
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise ValueError(f"health.collapse_thresholds item {spec!r} is invalid; expected 'signal<value'") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class HealthConfig:
    """Thresholds of the health rules (see the ``HealthMonitor`` rule methods) and the rollback policy."""

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
        "loss/*",
        "D/*",
        "health/*",
        "aug/p",
        "fid",
        "fd_*",
        "precision",
        "recall",
        "coverage",
        "diversity",
        "accuracy",
    )
    history_limit: int = 20_000  # ticks kept (oldest dropped)
    # fault injection ("lr_spike@STEPxFACTOR", "nan@STEP"; "" = none): see orchestrator.train.health.drills
    fire_drill: str = ""

    def __post_init__(self) -> None:
        for name in ("nonfinite_keys", "grad_keys", "metric_keys", "collapse_thresholds", "history_keys"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        self.collapse_limits  # noqa: B018 -- parses and validates every item
        check = self._check
        check(_is_int(self.warmup_ticks) and self.warmup_ticks >= 0, "warmup_ticks", "an integer ≥ 0")
        check(_is_int(self.grad_window) and self.grad_window >= 1, "grad_window", "an integer ≥ 1")
        check(
            _is_int(self.grad_min_history) and 1 <= self.grad_min_history <= self.grad_window,
            "grad_min_history",
            f"an integer with 1 ≤ grad_min_history ≤ grad_window ({self.grad_window})",
        )
        check(self.grad_factor > 1, "grad_factor", "a number > 1")
        check(self.grad_floor >= 0, "grad_floor", "a number ≥ 0")
        check(0 < self.d_acc_threshold <= 1, "d_acc_threshold", "a number in (0, 1]")
        check(_is_int(self.d_acc_ticks) and self.d_acc_ticks >= 1, "d_acc_ticks", "an integer ≥ 1")
        check(self.metric_regress_ratio >= 0, "metric_regress_ratio", "a number ≥ 0")
        check(_is_int(self.metric_patience) and self.metric_patience >= 1, "metric_patience", "an integer ≥ 1")
        check(_is_int(self.collapse_patience) and self.collapse_patience >= 1, "collapse_patience", "an integer ≥ 1")
        check(self.collapse_action in (WARN, ROLLBACK), "collapse_action", "'warn' or 'rollback'")
        check(0 < self.lr_factor <= 1, "lr_factor", "a number in (0, 1]")
        check(_is_int(self.max_rollbacks) and self.max_rollbacks >= 0, "max_rollbacks", "an integer ≥ 0")
        check(_is_int(self.history_limit) and self.history_limit >= 1, "history_limit", "an integer ≥ 1")
        self.drill  # noqa: B018 -- parses and validates fire_drill

    def _check(self, ok: bool, name: str, valid: str) -> None:
        if not ok:
            raise ValueError(f"health.{name}={getattr(self, name)!r} is invalid; expected {valid}")

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


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float | np.number):
        return True
    return isinstance(v, torch.Tensor) and v.numel() == 1


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
        """Resume from ``state_dict()``. A stopped monitor loaded under a config that allows more rollbacks than it
        used (or disables the guard) is no longer stopped: resubmitting a stopped run that way continues it."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"health monitor state version {state.get('version')!r} != {_STATE_VERSION}")
        self.tick = int(state["tick"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
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

    # ------------------------------------------------------------------------------------------------- rules
    def _check(self, v: dict[str, float]) -> list[_Finding]:
        """Every rule's findings for this tick. Each rule updates its running state even while not armed (during
        warmup), so it fires as soon as warmup ends."""
        armed = self.tick > self.cfg.warmup_ticks
        return [
            *self._nonfinite(v),
            *self._grad_explosion(v, armed),
            *self._d_overpowered(v, armed),
            *self._metric_regression(v, armed),
            *self._collapse(v, armed),
        ]

    def _nonfinite(self, v: dict[str, float]) -> list[_Finding]:
        """A NaN/inf among ``nonfinite_keys`` or a raised ``health/nonfinite*`` flag (e.g. a step the AMP scaler
        skipped) → rollback now, even during warmup."""
        bad = {k: x for k, x in v.items() if _matches(k, self.cfg.nonfinite_keys) and not math.isfinite(x)}
        bad.update({k: x for k, x in v.items() if k.startswith(NONFINITE_FLAG_PREFIX) and not x <= 0})
        if not bad:
            return []
        what = ", ".join(f"{k}={fmt_value(x)}" for k, x in sorted(bad.items()))
        return [_Finding("nonfinite", bad, f"non-finite values or flags: {what}", True)]

    def _grad_explosion(self, v: dict[str, float], armed: bool) -> list[_Finding]:
        """A grad norm > ``grad_factor`` × its median over the previous ``grad_window`` ticks (once at least
        ``grad_min_history`` are known) and > ``grad_floor`` → rollback."""
        cfg, out = self.cfg, []
        for key in cfg.grad_keys:
            x = v.get(key)
            if x is None or not math.isfinite(x):
                continue
            window = self._grad.setdefault(key, [])
            if armed and len(window) >= cfg.grad_min_history:
                med = statistics.median(window)
                if x > cfg.grad_factor * med and x > cfg.grad_floor:
                    why = (
                        f"{key} {fmt_value(x)} > {fmt_value(cfg.grad_factor)}× its median {fmt_value(med)} over the "
                        f"last {len(window)} ticks (floor {fmt_value(cfg.grad_floor)}): gradient explosion"
                    )
                    out.append(_Finding("grad_explosion", {key: x}, why, True))
            window.append(x)
            del window[: max(0, len(window) - cfg.grad_window)]
        return out

    def _d_overpowered(self, v: dict[str, float], armed: bool) -> list[_Finding]:
        """D's sign accuracy ≥ ``d_acc_threshold`` for ``d_acc_ticks`` consecutive ticks (D separates real from fake
        perfectly: G gets no useful gradient) → rollback."""
        cfg = self.cfg
        x = v.get(cfg.d_acc_key)
        if x is None or not math.isfinite(x):
            return []
        self._d_acc_streak = self._d_acc_streak + 1 if x >= cfg.d_acc_threshold else 0
        if not armed or self._d_acc_streak < cfg.d_acc_ticks:
            return []
        why = (
            f"{cfg.d_acc_key} ≥ {fmt_value(cfg.d_acc_threshold)} for {self._d_acc_streak} consecutive ticks "
            f"(now {fmt_value(x)}): D separates real from fake perfectly, G gets no useful gradient"
        )
        return [_Finding("d_overpowered", {cfg.d_acc_key: x}, why, True)]

    def _metric_regression(self, v: dict[str, float], armed: bool) -> list[_Finding]:
        """A ``metric_keys`` value (lower is better) > best-so-far × (1 + ``metric_regress_ratio``) for
        ``metric_patience`` consecutive evaluations of that metric → rollback."""
        cfg, out = self.cfg, []
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
                    f"{key} {fmt_value(x)} > best {fmt_value(best)} × {fmt_value(1 + cfg.metric_regress_ratio)} for "
                    f"{self._metric_streak[key]} consecutive evaluations: sample quality regressed"
                )
                out.append(_Finding("metric_regression", {key: x}, why, True))
        return out

    def _collapse(self, v: dict[str, float], armed: bool) -> list[_Finding]:
        """A ``collapse_thresholds`` signal (higher is better, e.g. ``recall<0.1``) below its threshold for
        ``collapse_patience`` consecutive evaluations → ``collapse_action``; a warning is reported once per alarm."""
        cfg = self.cfg
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
        if not low:
            return []
        what = ", ".join(f"{k} {fmt_value(x)} < {fmt_value(self._collapse_limits[k])}" for k, x in low.items())
        why = f"{what} for ≥ {cfg.collapse_patience} consecutive evaluations: mode collapse"
        return [_Finding("collapse", low, why, cfg.collapse_action == ROLLBACK, new)]

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
                    f"{fmt_value(self.cfg.lr_factor)} (now {fmt_value(self.lr_scale)} × base)"
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
