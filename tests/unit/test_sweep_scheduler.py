"""The sweep's ASHA never stops a trial that has trained to max_kimg (Ray's own scheduler logic, fake trials).

With max_kimg / grace = 2 = the reduction factor, Ray's ASHA has a rung at max_kimg that stops the worse half of the
trials that reach it: trials that trained to the end, killed in their final bookkeeping."""

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from orchestrator.tune.sweep import SweepConfig, make_scheduler


def _asha(**kw):
    sweep = SweepConfig(
        max_kimg=0.64, grace_kimg=0.32, reduction_factor=2, metric_kimg=0.32, metric="fd_classifier", **kw
    )
    scheduler = make_scheduler(sweep)
    scheduler.set_search_properties("fd_classifier", "min")
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(4)]
    for t in trials:
        scheduler.on_trial_add(None, t)
    return scheduler, trials


def _report(scheduler, trial, kimg, value):
    return scheduler.on_trial_result(None, trial, {"progress/kimg": kimg, "fd_classifier": value})


def test_a_trial_that_reached_max_kimg_is_never_stopped_but_a_worse_one_at_the_rung_is():
    scheduler, (a, b, c, d) = _asha()
    for t, v in ((a, 2.0), (b, 1.0)):  # a and b pass the 0.32 rung (b is better than the first, a)
        assert _report(scheduler, t, 0.32, v) == TrialScheduler.CONTINUE
    assert _report(scheduler, c, 0.32, 9.0) == TrialScheduler.STOP  # worse than the rung's median: stopped early
    # a better trial finishes first; a worse one that trained to the end must be let finish too
    assert _report(scheduler, a, 0.64, 0.5) == TrialScheduler.CONTINUE
    assert _report(scheduler, b, 0.64, 5.0) == TrialScheduler.CONTINUE
    assert _report(scheduler, d, 0.64, 7.0) == TrialScheduler.CONTINUE  # first seen at the end: nothing to cut


def test_no_scheduler_is_fifo():
    scheduler = make_scheduler(SweepConfig(scheduler="none"))
    assert type(scheduler).__name__ == "FIFOScheduler"
