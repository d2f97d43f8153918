"""Scaling model for data-parallel GAN training: `make bench-scaling`.

Measured here, per model config: parameters (→ gradient bytes all-reduced per step), FLOPs per image of one full
training step (G and D phases, forward + backward, counted from the dispatched convolutions and matmuls), and the
CPU step time of this machine. From those, the expected step time and DDP scaling efficiency at 1–64 GPUs:

    compute(B)    = FLOPs/img × B / (peak × MFU)                     per-GPU batch B, MFU assumed (--mfu)
    allreduce(N)  = 2(N−1)/N × bytes / bw  +  2(N−1) × α × buckets    ring all-reduce, NCCL-style (--alpha-us)
    exposed(N)    = max(allreduce − overlap × backward, allreduce / buckets)
                    DDP all-reduces 25 MB buckets while the rest of backward runs; only the tail is exposed
    step(N)       = compute + exposed;   efficiency = compute / step(N)

Bandwidth: NVLink inside an 8-GPU node; beyond 8 GPUs the ring crosses nodes at the per-GPU network bandwidth
(one NIC per GPU, as on H100 nodes). Accumulating k micro-batches per all-reduce divides the exposed share by k.
Writes tests/benchmarks/results/scaling.json and prints the table that docs/scaling.md quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import flops_of

import gan_models

RESULTS = Path(__file__).parent / "results" / "scaling.json"
GPUS = (1, 2, 4, 8, 16, 32, 64)
NETWORKS = {"NVLink + 400 Gb/s IB": 400, "NVLink + 100 Gb/s": 100, "NVLink + 25 Gb/s Ethernet": 25}
NVLINK_GBYTES = 300.0  # achieved all-reduce bus bandwidth inside an H100 node, GB/s
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
H100_BF16 = 989e12

# name → (model, config kwargs, per-GPU batch on GPU, batch for the CPU measurement)
CONFIGS = {
    "biggan 128² ch96": ("biggan", dict(resolution=128, ch=96), 32, 2),
    "biggan 32² ch64": ("biggan", dict(resolution=32, ch=64), 64, 4),
    "stylegan2 256² cbase16384 map2": ("stylegan2", dict(resolution=256, channel_base=16384, mapping_layers=2), 16, 2),
    "stylegan2 32² demo": (
        "stylegan2",
        dict(resolution=32, z_dim=64, w_dim=64, c_dim=10, channel_base=512, channel_max=32, mapping_layers=2),
        64,
        16,
    ),
}


def measure(model: str, kwargs: dict, batch: int) -> dict:
    """Parameters, FLOPs per image of one training step, and the CPU step time at ``batch``."""
    module = gan_models.module(model)
    cfg = module.Config(**kwargs)
    recipe = module.Recipe(cfg, module.HParams())
    recipe.setup(torch.device("cpu"), lambda m: m)
    res = cfg.resolution
    images = torch.rand(batch, 3, res, res) * 2 - 1
    labels = torch.randint(0, max(recipe.c_dim, 1), (batch,))
    recipe.train_step(images, labels)  # warm-up (and lazy regularisers' first step)
    flops = flops_of(lambda: recipe.train_step(images, labels))
    t0 = time.perf_counter()
    recipe.train_step(images, labels)
    step_s = time.perf_counter() - t0
    params = sum(p.numel() for m in (recipe.G, recipe.D) for p in m.parameters() if p.requires_grad)
    return {
        "params": params,
        "grad_bytes": 4 * params,
        "flops_per_img": flops / batch,
        "cpu_step_s": step_s,
        "cpu_batch": batch,
    }


def allreduce_s(n: int, nbytes: float, net_gbit: float, alpha_s: float) -> float:
    if n == 1:
        return 0.0
    bw = NVLINK_GBYTES * 1e9 if n <= 8 else net_gbit * 1e9 / 8
    buckets = math.ceil(nbytes / BUCKET_BYTES)
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha_s * buckets


def efficiency(m: dict, batch: int, n: int, net_gbit: float, args, accumulate: int = 1) -> tuple[float, float]:
    """(step seconds, efficiency) at n GPUs; accumulate micro-batches share one all-reduce."""
    compute = m["flops_per_img"] * batch / (H100_BF16 * args.mfu)
    backward = compute * 2 / 3
    comm = allreduce_s(n, m["grad_bytes"], net_gbit, args.alpha_us * 1e-6)
    buckets = math.ceil(m["grad_bytes"] / BUCKET_BYTES)
    exposed = max(comm - args.overlap * backward, comm / buckets) if comm else 0.0
    step = accumulate * compute + exposed
    return step / accumulate, accumulate * compute / step


def accumulation_for(m: dict, batch: int, n: int, net_gbit: float, args, target: float = 0.9) -> int:
    for k in range(1, 65):
        if efficiency(m, batch, n, net_gbit, args, k)[1] >= target:
            return k
    return 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation on the GPU")
    parser.add_argument("--alpha-us", type=float, default=8.0, help="per-hop latency of a ring step, µs")
    parser.add_argument("--overlap", type=float, default=1.0, help="fraction of backward that hides all-reduce")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=170)
    measured = {}
    for name, (model, kwargs, _, cpu_batch) in CONFIGS.items():
        console.print(f"measuring {name} …")
        measured[name] = measure(model, kwargs, cpu_batch)

    inputs = Table(title="Measured inputs (this machine, CPU fp32)")
    for col in ("config", "params G+D", "grad MB", "GFLOP/img (step)", "CPU s/step", "CPU batch"):
        inputs.add_column(col, justify="right")
    for name, m in measured.items():
        inputs.add_row(
            name,
            f"{m['params']:,}",
            f"{m['grad_bytes'] / 2**20:.1f}",
            f"{m['flops_per_img'] / 1e9:.2f}",
            f"{m['cpu_step_s']:.2f}",
            str(m["cpu_batch"]),
        )
    console.print(inputs)

    rows = []
    table = Table(title=f"Expected DDP efficiency on H100s (bf16, MFU {args.mfu:.0%}, overlap {args.overlap:.0%})")
    table.add_column("config / network")
    table.add_column("B/GPU", justify="right")
    table.add_column("step@1", justify="right")
    for n in GPUS[1:]:
        table.add_column(f"{n}", justify="right")
    table.add_column("accum for 90% @64", justify="right")
    for name, m in measured.items():
        batch = CONFIGS[name][2]
        for net, gbit in NETWORKS.items():
            effs = {n: efficiency(m, batch, n, gbit, args) for n in GPUS}
            k = accumulation_for(m, batch, 64, gbit, args)
            effic = {n: e for n, (_, e) in effs.items()}
            rows.append(
                {
                    "config": name,
                    "network": net,
                    "batch_per_gpu": batch,
                    "step_s_1": effs[1][0],
                    "efficiency": effic,
                    "accumulation_for_90pct_at_64": k,
                }
            )
            table.add_row(
                f"{name} / {net}",
                str(batch),
                f"{effs[1][0] * 1e3:.2f} ms",
                *[f"{effs[n][1]:.0%}" for n in GPUS[1:]],
                str(k),
            )
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "assumptions": vars(args)
                | {"nvlink_GBps": NVLINK_GBYTES, "bucket_bytes": BUCKET_BYTES, "peak_flops": H100_BF16},
                "measured": measured,
                "model": rows,
            },
            indent=2,
        )
    )
    lines = [
        "| config | network | B/GPU | step @1 GPU | "
        + " | ".join(f"{n} GPUs" for n in GPUS[1:])
        + " | accumulation for 90% @64 |",
        "|---" * (len(GPUS) + 4) + "|",
    ]
    for r in rows:
        effs = " | ".join(f"{r['efficiency'][n]:.0%}" for n in GPUS[1:])
        lines.append(
            f"| {r['config']} | {r['network']} | {r['batch_per_gpu']} | {r['step_s_1'] * 1e3:.2f} ms | "
            f"{effs} | {r['accumulation_for_90pct_at_64']} |"
        )
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    console.print(f"wrote {RESULTS} and {RESULTS.with_suffix('.md')}")


if __name__ == "__main__":
    main()
