"""tests/benchmarks/gpu_smoke.py without a stack: the no-CUDA path, and its host-sync counter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "tests" / "benchmarks" / "gpu_smoke.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_smoke = _load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run its stages")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("gpu-smoke: no CUDA device (torch ") and lines[0].endswith("nothing to check")
    assert ("built for CPU" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}") in lines[0]
    assert not out.exists()  # nothing was checked, so nothing is written


def test_count_host_syncs_counts_item_float_bool_and_restores_them():
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}
    t = torch.tensor(1.5)
    with gpu_smoke.count_host_syncs("cpu") as syncs:
        float(t)
        float(t)
        t.item()
        bool(t)
        int(t)
        t.tolist()
        t + 1  # no host sync
    assert syncs.count == 6
    assert sum(syncs.sites.values()) == 6 and all(s.startswith("tests/unit/test_gpu_smoke.py:") for s in syncs.sites)
    for name, original in originals.items():
        assert getattr(torch.Tensor, name) is original
        assert name not in torch.Tensor.__dict__  # inherited from TensorBase again, as before
    assert float(t) == 1.5 and t.item() == 1.5 and bool(t)  # and they still work


def test_count_host_syncs_restores_after_an_error_and_leaves_out_adams_cpu_step_counters():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w])
    w.grad = torch.ones(3)
    with pytest.raises(ValueError), gpu_smoke.count_host_syncs("cpu", opt) as syncs:
        w.sum().item()
        opt.step()  # reads its step counter (.item()) per parameter: on the CPU, where that never syncs
        raise ValueError
    assert syncs.count == 1
    assert "item" not in torch.Tensor.__dict__
