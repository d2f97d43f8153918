"""ganforge orchestrator: configs, local stack, data plane, Ray Train loop, metrics, sweeps, tracking."""

__version__ = "0.1.0"
