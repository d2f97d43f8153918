"""What the job tests share: the tiny BigGAN they train and `ray job submit` as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A BigGAN small enough to train a few steps in seconds on a CPU worker; each test adds its own train.* keys.
TINY_BIGGAN = ["model.ch=8", "model.dim_z=32", "model.shared_dim=16", "data.batch_size=8", "train.grid_size=4"]


def ray_job_submit(ray_url: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir <repo> -- python jobs/biggan.py <args>`` against the cluster at ``ray_url``."""
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run(
        [
            ray,
            "job",
            "submit",
            "--address",
            ray_url,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/biggan.py",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
