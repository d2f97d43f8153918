"""The training-health report of a run: the plot (``health_plot``), the markdown (``health_report_markdown``), the
run note (``events_note``) and the three artifacts under ``health/`` that hold them (``write_report``): ``report.md``,
``health.png`` and ``events.json``. A run that logged no report gets one rebuilt from its MLflow metric points
(``history_from_points``, ``events_from_history``)."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.train.health.monitor import ROLLBACK, STOP, WARN, HealthEvent, fmt_value

ARTIFACT_DIR = "health"
REPORT_MD, PLOT_PNG, EVENTS_JSON = "report.md", "health.png", "events.json"
UNIT_METRICS = ("precision", "recall", "coverage", "diversity", "accuracy")  # on [0, 1], higher is better


def _keys(history: Sequence[Mapping[str, Any]], match: Callable[[str], bool]) -> list[str]:
    seen: dict[str, None] = {}
    for h in history:
        for k in h:
            if k not in ("tick", "step", "action") and match(k):
                seen[k] = None
    return sorted(seen)


# ------------------------------------------------------------------------------------------------------- plot
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


@dataclass
class _Panel:
    title: str
    left: list[str]
    right: list[str]  # on a second y axis, dashed
    log: bool = False


def _panels(history: Sequence[Mapping[str, Any]]) -> list[_Panel]:
    """The panels that have data: losses, D outputs (+ sign accuracy), gradient norms, evaluations."""
    panels = []
    losses = _keys(history, lambda k: k.startswith("loss/"))
    if losses:
        panels.append(_Panel("losses", losses, []))
    d_out = _keys(history, lambda k: k in ("D/real", "D/fake"))
    d_acc = _keys(history, lambda k: k == "health/D_sign_acc")
    if d_out or d_acc:
        panels.append(_Panel("D outputs (mean logits)", d_out, d_acc))
    grads = _keys(history, lambda k: k.startswith("health/grad_norm"))
    if grads:
        panels.append(_Panel("gradient norms", grads, [], log=True))
    unit = _keys(history, lambda k: k in UNIT_METRICS)
    dist = _keys(history, lambda k: k == "fid" or k.startswith("fd_"))
    if unit or dist:
        panels.append(_Panel("evaluations", unit, dist))
    return panels


def _markers(history: Sequence[Mapping[str, Any]], events: Sequence[HealthEvent]) -> dict[float, str]:
    """step → action of every rollback, stop and warning, from the history's ``action`` entries and ``events``."""
    markers: dict[float, str] = {}
    for h in history:
        if h.get("action") in (ROLLBACK, STOP, WARN):
            markers[float(h["step"])] = h["action"]
    for e in events:
        markers.setdefault(float(e.step), e.action)
    return markers


@dataclass
class _Curves:
    """The history's series, solid over the ticks that count and faint over those a rollback went back over."""

    history: Sequence[Mapping[str, Any]]
    evaluated: set[str]  # keys drawn with a marker on every point: evaluations are sparse
    dead: list[bool] = field(init=False)
    live: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.dead = _superseded(self.history)
        self.live = [not d for d in self.dead]

    def plot(self, ax, keys: Sequence[str], *, first_color: int = 0, dashed: bool = False) -> None:
        for j, key in enumerate(keys):
            style = {"lw": 1.2, "color": f"C{first_color + j}", "ms": 3, "ls": "--" if dashed else "-"}
            style["marker"] = ("s" if dashed else "o") if key in self.evaluated else None
            ax.plot(*_series(self.history, key, self.live), label=key, **style)
            ax.plot(*_series(self.history, key, self.dead), alpha=0.3, **{**style, "marker": "x", "ms": 5})

    def fit(self, ax, keys: Sequence[str], log: bool) -> None:
        """Scale ``ax`` to the ticks that count: a diverged tick a rollback went back over can be 1000× the rest and
        would flatten every live curve (it stays in the report's table; its marker is clipped)."""
        ys = [y for key in keys for y in _series(self.history, key, self.live)[1]]
        ys = [y for y in ys if math.isfinite(y) and (y > 0 or not log)]
        if not ys:
            return
        lo, hi = min(ys), max(ys)
        if log:
            ax.set_ylim(lo / 1.5, hi * 1.5)
        else:
            pad = 0.08 * (hi - lo) or 0.5 * abs(hi) or 1.0
            ax.set_ylim(lo - pad, hi + pad)


def _draw_panel(ax, panel: _Panel, curves: _Curves, markers: Mapping[float, str]) -> None:
    curves.plot(ax, panel.left)
    if panel.log:
        ax.set_yscale("log")
    curves.fit(ax, panel.left, panel.log)
    ax.set_title(panel.title, fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if panel.right:
        ax2 = ax.twinx()
        curves.plot(ax2, panel.right, first_color=len(panel.left), dashed=True)
        curves.fit(ax2, panel.right, False)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    for step, action in markers.items():
        ax.axvline(step, color="tab:orange" if action == WARN else "tab:red", ls=":", lw=1.5)
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right", ncol=min(4, len(labels)))


def health_plot(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    events: Sequence[HealthEvent] = (),
) -> Path:
    """PNG of the run's health at ``path``: losses, D outputs (+ sign accuracy), gradient norms (log scale) and
    evaluation metrics (precision/recall/coverage/diversity on [0, 1], FID-like distances on a second axis), against
    the training step. Vertical lines mark rollbacks/stops (red) and warnings (orange); ticks a rollback went back
    over are drawn faint. Panels without data are left out. Draws on matplotlib's Agg canvas directly (no pyplot, no
    global backend change). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(history)
    evaluated = {k for p in panels if p.title == "evaluations" for k in p.left + p.right}
    curves = _Curves(history, evaluated)
    markers = _markers(history, events)
    fig = Figure(figsize=(10, 2.6 * max(1, len(panels))), dpi=100)
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no health signals recorded", ha="center", va="center")
        ax.set_axis_off()
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        _draw_panel(ax, panel, curves, markers)
    if panels:
        ax.set_xlabel("step")
    inch = 1 / fig.get_figheight()  # fixed margins: tight_layout costs seconds on a busy CPU
    fig.subplots_adjust(left=0.07, right=0.93, top=1 - 0.3 * inch, bottom=0.5 * inch, hspace=0.45)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.write_bytes(buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------------- markdown
def _lrs_text(e: HealthEvent, base_suffix: str) -> str:
    if e.lrs:
        return ", ".join(f"{k} {fmt_value(v)}" for k, v in e.lrs.items())
    return f"× {fmt_value(e.lr_scale)}{base_suffix}"


def events_note(events: Sequence[HealthEvent], limit: int = 7000) -> str:
    """The run's health events as a markdown list (newest last), at most ``limit`` characters: the oldest lines are
    dropped first (MLflow caps a tag, and so a run's note, at 8000 characters)."""
    lines = []
    for e in events:
        sig = ", ".join(f"{k}={fmt_value(v)}" for k, v in e.signals.items())
        lines.append(
            f"- **{e.action}** at step {e.step} (tick {e.tick}), {', '.join(e.rules)}: {sig}; "
            f"learning rates now {_lrs_text(e, ' of base')}. {e.reason}"
        )
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


def _status(events: Sequence[HealthEvent], stopped: bool | None) -> str:
    rollbacks = sum(e.action == ROLLBACK for e in events)
    stops = [e for e in events if e.action == STOP]
    warns = sum(e.action == WARN for e in events)
    if stopped is None:
        stopped = bool(stops)
    if stopped and stops:
        return f"**stopped** at step {stops[-1].step} after {rollbacks} rollback(s): {stops[-1].kind}"
    if stops:
        return (
            f"resumed after a stop at step {stops[-1].step} ({stops[-1].kind}) and finished; {rollbacks} "
            f"rollback(s), learning-rate scale now {fmt_value(events[-1].lr_scale)}"
        )
    if rollbacks:
        status = f"recovered: {rollbacks} rollback(s), learning-rate scale now {fmt_value(events[-1].lr_scale)}"
        return status if not warns else f"{status}; {warns} warning(s)"
    if warns:
        return f"{warns} warning(s), no rollback"
    return "healthy: no rule fired"


def _signal_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every recorded signal's last value and its min/max over the finite ones."""
    keys = _keys(history, lambda k: True)
    if not keys:
        return []
    lines = ["| signal | last | min | max |", "|---|---|---|---|"]
    for k in keys:
        vals = [float(h[k]) for h in history if k in h]
        finite = [x for x in vals if math.isfinite(x)]
        lo, hi = (fmt_value(min(finite)), fmt_value(max(finite))) if finite else ("–", "–")
        lines.append(f"| `{k}` | {fmt_value(vals[-1])} | {lo} | {hi} |")
    return [*lines, ""]


def _events_table(events: Sequence[HealthEvent]) -> list[str]:
    if not events:
        return ["None."]
    lines = [
        "| tick | step | action | rule | signals | reason | learning rates |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in events:
        sig = ", ".join(f"`{k}`={fmt_value(v)}" for k, v in e.signals.items())
        cells = [e.tick, e.step, e.action, _md(", ".join(e.rules)), _md(sig), _md(e.reason), _md(_lrs_text(e, ""))]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


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
    lines = ["## Training health", "", f"Status: {_status(events, stopped)}.", ""]
    if history:
        lines += [f"Watched {len(history)} ticks, last step {history[-1]['step']}.", ""]
        lines += _signal_table(history)
    lines += ["### Events", "", *_events_table(events)]
    if plot_path is not None:
        lines += ["", f"![training health]({Path(plot_path).as_posix()})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- artifacts
def write_report(
    events: Sequence[HealthEvent],
    history: Sequence[Mapping[str, Any]],
    directory: str | os.PathLike,
    *,
    note: str = "",
    stopped: bool | None = None,
) -> Path:
    """``report.md`` + ``health.png`` + ``events.json`` in ``directory``; returns the markdown's path. ``note`` (one
    line) goes under the report's heading, e.g. where a rebuilt report came from; ``stopped`` as in
    :func:`health_report_markdown`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    health_plot(history, d / PLOT_PNG, events)
    markdown = health_report_markdown(events, history, plot_path=PLOT_PNG, stopped=stopped)
    if note:
        head, _, rest = markdown.partition("\n\n")
        markdown = f"{head}\n\n_{note}_\n\n{rest}"
    (d / REPORT_MD).write_text(markdown)
    (d / EVENTS_JSON).write_text(json.dumps([e.to_dict() for e in events], indent=1) + "\n")
    return d / REPORT_MD


def history_from_points(points: Iterable[tuple[int, int, str, float]]) -> list[dict[str, Any]]:
    """Per-tick history entries (as ``HealthMonitor.history`` holds them) from MLflow metric points
    ``(timestamp_ms, step, key, value)``.

    A rollback or resume logs a step again, so points are taken in time order and a key seen twice at the same
    step starts a new entry for that step; evaluation metrics logged moments after their tick join its entry. Where
    ``health/rollbacks`` goes up, the entry is marked ``action: rollback`` (the plot's red line).
    """
    entries: list[dict[str, Any]] = []
    current: dict[int, dict[str, Any]] = {}
    for _, step, key, value in sorted(points, key=lambda p: (p[0], p[1])):
        entry = current.get(step)
        if entry is None or key in entry:
            entry = {"step": int(step)}
            entries.append(entry)
            current[step] = entry
        entry[key] = float(value)
    rollbacks = 0.0
    for i, entry in enumerate(entries, start=1):
        entry["tick"] = i
        n = entry.get("health/rollbacks")
        if n is not None and math.isfinite(n):
            if n > rollbacks:
                entry["action"] = ROLLBACK
            rollbacks = n
    return [{"tick": e.pop("tick"), **e} for e in entries]


def events_from_history(history: Sequence[Mapping[str, Any]]) -> list[HealthEvent]:
    """Stand-in events for a rebuilt report: one per rollback marked in ``history`` (the rule and its signals were
    not stored as metrics, so the event says so)."""
    out = []
    for h in history:
        if h.get("action") == ROLLBACK:
            scale = float(h.get("health/lr_scale", math.nan))
            reason = "rollback recorded in the health/rollbacks metric (rule and signals not stored for this run)"
            out.append(HealthEvent(int(h["tick"]), int(h["step"]), "unknown", [], {}, reason, ROLLBACK, scale))
    return out
