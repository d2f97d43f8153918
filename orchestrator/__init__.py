"""ganforge orchestrator: configs, local stack, data plane, Ray Train loop, metrics, sweeps, tracking."""

import os

# Same seed, same bits across processes: 1 in ~24 `ganforge sample` runs wrote a different PNG for the same seed.
# MKL (torch's CPU BLAS) choosing kernels by buffer alignment is the documented cause of such run-to-run differences;
# its conditional-numerical-reproducibility mode fixes the code path per machine. Set before MKL first runs.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
