"""Learning-rate × batch-size sweep: Ray Tune trials, each a multi-worker Ray Train run; ASHA on the quality metric.

    python jobs/tune_sweep.py                                   # jobs/configs/tune_sweep.yaml
    python jobs/tune_sweep.py sweep.lrs=1e-4,1e-3 sweep.batch_sizes=16,32 sweep.max_kimg=20 train.tick_steps=10
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune_sweep.py
    ganforge sweep [--config FILE] [sweep.key=value | section.key=value ...]     # the same through the CLI

``sweep.*`` keys configure the sweep (orchestrator/tune/sweep.py: SweepConfig); any other ``section.key=value``
overrides the base job config (the model's jobs/configs/<model>.yaml). Writes outputs/<sweep>/ (heatmap, curves,
trials.csv, summary.json, report.md) and logs the same to the sweep's parent MLflow run.
"""

import sys

from orchestrator.cli import run_sweep_cli

if __name__ == "__main__":
    sys.exit(run_sweep_cli(sys.argv[1:]))
