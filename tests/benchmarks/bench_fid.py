"""FID-n wall time: ganforge's extractor vs a straightforward single-process implementation, same images & network.

Reference = the first n Fashion-MNIST train images, "generated" = the first n test images (32×32 padded, grey→RGB).
- baseline: the shipped TorchScript network image by image (NVIDIA's grid_sample resize), np.cov, scipy sqrtm.
- ours cold: batched BN-fused extractor, float64 running stats, eigh/SVD distance; reference stats computed and
  kept as the evaluator keeps them in S3 (``FeatureStats.to_bytes`` under ``reference_key``; here in memory).
- ours warm: the per-evaluation cost in training: reference stats from the cache, only the n generated images
  go through the network.
Both FIDs must agree to 1e-3 relative. Results: a rich table and tests/benchmarks/results/fid.json.

Run: make bench-fid, or .venv/bin/python tests/benchmarks/bench_fid.py [--n 500] [--device auto|cpu|cuda]
GPU: the same code runs on CUDA when present (``--device auto``, the default, picks it); both implementations then
run there (ours in channels_last with TF32 off), and the threads setting only affects the CPU side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.data import fashion_mnist
from orchestrator.metrics import inception
from orchestrator.metrics.features import FeatureExtractor, resolve_device
from orchestrator.metrics.fid import FeatureStats, fid_from_stats, reference_key, stats_for_images

RESULTS = Path(__file__).resolve().parent / "results" / "fid.json"


def baseline_features(ts: torch.jit.ScriptModule, images: np.ndarray, device: torch.device) -> np.ndarray:
    """One image at a time: grey→RGB, NVIDIA's TF-compatible grid_sample resize, (x−128)/128, TorchScript."""
    theta = torch.eye(2, 3, device=device)
    theta[0, 2] += 1 / images.shape[2] - 1 / 299
    theta[1, 2] += 1 / images.shape[1] - 1 / 299
    grid = F.affine_grid(theta[None], [1, 3, 299, 299], align_corners=False)
    out = []
    with torch.no_grad():
        for img in images:
            x = torch.from_numpy(img).to(device).float()[None, None].repeat(1, 3, 1, 1)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            out.append(ts((x - 128) / 128).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def baseline_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The pytorch-fid / TTUR formula."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=500, help="images per side (500: the whole CPU benchmark in ~10 min on 2 cores)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    console = Console()

    ref_imgs = fashion_mnist.pad_to_32(fashion_mnist.load("train")[0][: args.n])
    gen_imgs = fashion_mnist.pad_to_32(fashion_mnist.load("test")[0][: args.n])
    n = args.n
    rows: dict[str, dict[str, float]] = {}

    console.print(f"[bold]baseline[/]: TorchScript, batch 1, scipy sqrtm — {2 * n} images on {device}")
    ts = torch.jit.load(str(inception.default_weights_path()), map_location=device).eval()
    t0 = time.perf_counter()
    fa, fb = baseline_features(ts, ref_imgs, device), baseline_features(ts, gen_imgs, device)
    t1 = time.perf_counter()
    fid_base = baseline_fid(fa, fb)
    t2 = time.perf_counter()
    rows["baseline"] = {"images": 2 * n, "features_s": t1 - t0, "distance_s": t2 - t1, "fid": fid_base}
    del ts

    console.print(f"[bold]ours[/]: batched BN-fused extractor (batch {args.batch_size}) + cached reference stats")
    t0 = time.perf_counter()
    extractor = FeatureExtractor(device=device, batch_size=args.batch_size)
    setup_s = time.perf_counter() - t0
    key = reference_key({"manifest": f"fashion-mnist/train[:{n}]", "network": extractor.name, "resolution": 32, "n": n})
    cache: dict[str, bytes] = {}
    for label in ("ours_cold", "ours_warm"):
        sync(device)
        t0 = time.perf_counter()
        if key in cache:
            ref = FeatureStats.from_bytes(cache[key])
        else:
            ref = stats_for_images(extractor.batches(ref_imgs), extractor)
            cache[key] = ref.to_bytes()
        gen = stats_for_images(extractor.batches(gen_imgs), extractor)
        sync(device)
        t1 = time.perf_counter()
        value = fid_from_stats(ref, gen)
        t2 = time.perf_counter()
        images = 2 * n if label == "ours_cold" else n
        rows[label] = {"images": images, "features_s": t1 - t0, "distance_s": t2 - t1, "fid": value}

    for row in rows.values():
        row["total_s"] = row["features_s"] + row["distance_s"]
        row["img_per_s"] = row["images"] / row["features_s"]
        row["speedup_vs_baseline"] = rows["baseline"]["features_s"] + rows["baseline"]["distance_s"]
    for row in rows.values():
        row["speedup_vs_baseline"] /= row["total_s"]
    rel_diff = abs(rows["ours_warm"]["fid"] - fid_base) / fid_base

    table = Table(title=f"FID-{n}: Fashion-MNIST train vs test, {device}, {args.threads} threads")
    for col in ("run", "images", "features s", "img/s", "distance s", "total s", "speedup", "FID"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in rows.items():
        table.add_row(
            name,
            str(r["images"]),
            f"{r['features_s']:.1f}",
            f"{r['img_per_s']:.1f}",
            f"{r['distance_s']:.2f}",
            f"{r['total_s']:.1f}",
            f"{r['speedup_vs_baseline']:.2f}×",
            f"{r['fid']:.4f}",
        )
    console.print(table)
    console.print(f"relative FID difference ours vs baseline: {rel_diff:.2e}; extractor setup {setup_s:.1f} s")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "n": n,
        "device": str(device),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "extractor_setup_s": setup_s,
        "runs": rows,
        "fid_rel_diff": rel_diff,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")
    if rel_diff > 1e-3:
        raise SystemExit(f"FID mismatch: ours {rows['ours_warm']['fid']} vs baseline {fid_base}")


if __name__ == "__main__":
    main()
