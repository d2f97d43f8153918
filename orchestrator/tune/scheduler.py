"""ASHA for GAN sweeps: early stopping on the quality metric, never at the end of a trial's training."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class FinishingASHA(ASHAScheduler):
    """Ray's ASHA, except that a result at or past ``max_t`` is recorded at its rung but never stops the trial.

    ASHA judges a result at the highest rung it has passed, and it has a rung at ``max_t`` whenever ``max_t / grace``
    is a power of the reduction factor. A trial stopped there has already trained to its end: stopping it only kills
    its final bookkeeping (final grid, MLflow artifacts, its run left RUNNING and then closed as KILLED although it
    ran to completion). Build it with ``stop_last_trials=False`` so such trials run to ``max_t`` and finish."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action
