"""Train StyleGAN2 with Ray Train, data streamed from S3, tracked in MLflow — the twin of jobs/biggan.py.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/stylegan2.py [key=value ...]
    python jobs/stylegan2.py model.resolution=256 model.channel_base=16384 model.mapping_layers=2

Config: jobs/configs/stylegan2.yaml, overridden by section.key=value (see `--print-config`).
"""

import sys

from orchestrator.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("stylegan2", sys.argv[1:]))
