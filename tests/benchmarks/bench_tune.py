"""ASHA vs the full grid: the same lr × batch-size sweep of a tiny BigGAN on Fashion-MNIST, run twice on CPU.

    make bench-tune        (or: .venv/bin/python tests/benchmarks/bench_tune.py [--max-kimg 8 ...])

Starts its own local stack (SeaweedFS, MLflow, a 4-CPU Ray head on free ports), writes Fashion-MNIST shards, and runs
``orchestrator.tune.sweep.run_sweep`` twice over 9 trials (3 lrs × 3 batch sizes, 2 Ray Train workers per trial,
one trial at a time — its 2 workers fill a 2-core machine — metric fd_classifier every ``metric_kimg``): once with
ASHA (time_attr progress/kimg), once with no scheduler (every trial to max_kimg). Acceptance: ASHA trains on ≥ 3×
fewer images (kimg) and recommends the same configuration as the full grid. Wall and CPU-seconds are reported too:
on 2 cores the ~30 s start-up of every trial's worker group is a large fixed cost that early stopping cannot remove.
Results: tests/benchmarks/results/tune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.data.writer import write_shards
from orchestrator.env import Env
from orchestrator.stack import LocalStack, Ports
from orchestrator.tune.sweep import SweepConfig, run_sweep

RESULTS = Path(__file__).resolve().parent / "results" / "tune.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="2e-4,1e-3,5e-3")
    ap.add_argument("--batch-sizes", default="16,32,64")
    # ASHA's rungs at 0.5, 2 and 8 kimg; the grid runs every trial to 12. With one trial at a time the first trial
    # has nothing to lose to and always runs to the end, so ≥ 9 trials are needed for early stopping to pay ≥ 3×.
    ap.add_argument("--max-kimg", type=float, default=12.0)
    ap.add_argument("--metric-kimg", type=float, default=0.5)
    ap.add_argument("--grace-kimg", type=float, default=0.5)
    ap.add_argument("--reduction-factor", type=float, default=4.0)
    ap.add_argument("--metric-n", type=int, default=500)
    ap.add_argument("--max-concurrent", type=int, default=1, help="trials at a time (1: 2 workers fill 2 cores)")
    ap.add_argument("--samples", type=int, default=20000, help="Fashion-MNIST images written as shards")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    console = Console()

    root = Path(tempfile.mkdtemp(prefix="gf-bench-tune-"))
    env = Env.from_environ(
        {
            "AWS_ACCESS_KEY_ID": "ganforge-bench",
            "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex,
            "GANFORGE_BUCKET": "ganforge",
        }
    )
    stack = LocalStack(root=root, env=env, ports=Ports.free(), num_cpus=4)
    saved = dict(os.environ)
    t_all = time.monotonic()
    try:
        stack.up(log=lambda *_: None)
        os.environ.update(stack.client_environ())
        os.environ["RAY_ADDRESS"] = stack.ray_gcs_address
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        dataset = "s3://ganforge/datasets/fmnist-bench-tune"
        t0 = time.monotonic()
        write_shards("fashion-mnist", dataset, max_samples=args.samples, samples_per_shard=2500, progress=False)
        console.print(f"shards: {args.samples} images in {time.monotonic() - t0:.0f} s")
        common = dict(
            model="biggan",
            lrs=[float(v) for v in args.lrs.split(",")],
            batch_sizes=[int(v) for v in args.batch_sizes.split(",")],
            max_kimg=args.max_kimg,
            metric="fd_classifier",
            metric_kimg=args.metric_kimg,
            metric_n=args.metric_n,
            metric_ref_n=5000,
            grace_kimg=args.grace_kimg,
            reduction_factor=args.reduction_factor,
            num_workers=2,
            cpus_per_worker=1.0,
            max_concurrent_trials=args.max_concurrent,
            output_dir=str(root / "outputs"),
            overrides=[
                f"data.dataset={dataset}",
                "train.storage_path=s3://ganforge/runs-bench",
                "train.tick_steps=10",
                "train.sample_ticks=1000",
                "train.grid_size=4",
            ],
        )
        runs = {}
        for scheduler in ("asha", "none"):
            t0 = time.monotonic()
            name = f"bench-{scheduler}-{uuid.uuid4().hex[:4]}"
            outcome = run_sweep(SweepConfig(**common, scheduler=scheduler, name=name), log=console.print)
            runs[scheduler] = {"wall_s": round(time.monotonic() - t0, 1), **outcome.summary}
            runs[scheduler]["report_dir"] = None  # a temporary folder
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.down(log=lambda *_: None)
        shutil.rmtree(root, ignore_errors=True)

    asha, full = runs["asha"], runs["none"]
    same = asha["recommended"]["config"] == full["recommended"]["config"]
    kimg_x = full["compute"]["kimg"] / asha["compute"]["kimg"]
    cpu_x = full["compute"]["cpu_s"] / asha["compute"]["cpu_s"]
    table = Table(title=f"ASHA vs full grid: {asha['compute']['trials']} trials × 2 workers, to {args.max_kimg} kimg")
    for col in ("", "trained kimg", "CPU-s (trials)", "sweep wall s", "stopped early", "recommended", "best fd"):
        table.add_column(col)
    for label, r in (("ASHA", asha), ("full grid", full)):
        rec = r["recommended"]
        c = r["compute"]
        config = f"lr {rec['config']['lr']:g} bs {rec['config']['batch_size']}"
        table.add_row(
            label,
            f"{c['kimg']:.1f}",
            f"{c['cpu_s']:.0f}",
            f"{r['wall_s']:.0f}",
            str(c["early_stopped"]),
            config,
            f"{rec['best_metric']:.3f}",
        )
    console.print(table)
    console.print(
        f"ASHA: {kimg_x:.2f}× less training (kimg), {cpu_x:.2f}× fewer CPU-seconds; same recommendation: {same}"
    )
    result = {
        "benchmark": "tune",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "trials_per_sweep": asha["compute"]["trials"],
        "kimg_saving_x": round(kimg_x, 3),
        "cpu_s_saving_x": round(cpu_x, 3),
        "wall_saving_x": round(full["wall_s"] / asha["wall_s"], 3),
        "same_recommendation": same,
        "acceptance": {"kimg_saving_ge_3x": kimg_x >= 3, "same_best_config": same},
        "total_wall_s": round(time.monotonic() - t_all, 1),
        "asha": asha,
        "full_grid": full,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
