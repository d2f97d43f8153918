"""Training health: watch the per-tick signals of a GAN run, say what is wrong, decide what to do, and report it.

- ``monitor``: ``HealthMonitor`` (the rule engine), ``HealthConfig``, ``Verdict``, ``HealthEvent``, the stop keys.
- ``drills``: ``FireDrill``, faults injected on purpose to watch the guard act (``health.fire_drill``).
- ``signals``: ``ema_drift`` and ``loss_ratio``, signals the loop computes for the plot and history.
- ``render``: the report (plot, markdown, run note, artifacts), also rebuilt from MLflow metric points.

Pure logic: no Ray or MLflow; only ``render`` writes files.
"""

from orchestrator.train.health.drills import FIRE_DRILLS, FireDrill, parse_fire_drill
from orchestrator.train.health.monitor import (
    ACTIONS,
    OK,
    ROLLBACK,
    RULES,
    STOP,
    STOP_REASON,
    STOPPED,
    WARN,
    HealthConfig,
    HealthEvent,
    HealthMonitor,
    TrainingStopped,
    Verdict,
)
from orchestrator.train.health.render import (
    events_from_history,
    events_note,
    health_plot,
    health_report_markdown,
    history_from_points,
    write_report,
)
from orchestrator.train.health.signals import ema_drift, loss_ratio

__all__ = [
    "ACTIONS",
    "FIRE_DRILLS",
    "OK",
    "ROLLBACK",
    "RULES",
    "STOP",
    "STOPPED",
    "STOP_REASON",
    "WARN",
    "FireDrill",
    "HealthConfig",
    "HealthEvent",
    "HealthMonitor",
    "TrainingStopped",
    "Verdict",
    "ema_drift",
    "events_from_history",
    "events_note",
    "health_plot",
    "health_report_markdown",
    "history_from_points",
    "loss_ratio",
    "parse_fire_drill",
    "write_report",
]
