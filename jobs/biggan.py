"""Train BigGAN with Ray Train, data streamed from S3, tracked in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/biggan.py [key=value ...]
    python jobs/biggan.py train.steps=200 train.num_workers=2      # direct run: a private local Ray

Config: jobs/configs/biggan.yaml, overridden by section.key=value (see `--print-config`).
"""

import sys

from orchestrator.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("biggan", sys.argv[1:]))
