"""ganforge orchestrator: configs, local stack, data plane, Ray Train loop, metrics, sweeps, tracking."""

import os

# MKL (torch's CPU BLAS) may pick kernels by buffer alignment, so the same matmul could round differently from one
# process to the next: seen as 1 in ~24 `ganforge sample` runs giving a different PNG for the same seed. Its
# conditional-numerical-reproducibility mode fixes the code path per machine; it must be set before MKL first runs.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
