"""Data-loading throughput: the same S3 shards through (a) PIL + torch DataLoader, (b) our DALI CPU loader,
(c) DALI on the GPU when CUDA is present. Run with ``make bench-data`` (not collected by pytest).

A private SeaweedFS (free ports, temp dir) serves upscaled Fashion-MNIST as grey JPEG q95 shards at 64² and 256²;
every pipeline streams the same tars with the same boto3 reader, so only decoding/augmenting differs. Results go to
``tests/benchmarks/results/data.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from orchestrator.config import DataConfig
from orchestrator.data.loader import ShardLoader
from orchestrator.data.s3 import ObjectStream
from orchestrator.data.shards import iter_tar_samples, write_shards
from orchestrator.env import Env, split_s3_uri
from orchestrator.stack import LocalStack, Ports

RESULTS = Path(__file__).parent / "results" / "data.json"
BATCH = 64


class PilShards(torch.utils.data.IterableDataset):
    """The usual baseline: DataLoader workers each stream their share of the shards and decode with PIL."""

    def __init__(self, uri: str, manifest: dict, env: Env):
        self.bucket, prefix = split_s3_uri(uri)
        self.keys = [f"{prefix}/{s['name']}" for s in manifest["shards"]]
        self.env = env

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        keys = self.keys[info.id :: info.num_workers] if info else self.keys
        rng = np.random.default_rng(info.id if info else 0)
        for key in keys:
            for _, parts, _ in iter_tar_samples(ObjectStream(self.bucket, key, env=self.env)):
                img = np.array(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
                if rng.random() < 0.5:
                    img = img[:, ::-1]
                # uint8 across the worker boundary (4× less shared memory than float); normalised in the main process
                yield torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), int(parts["cls"])


def bench_pil(uri: str, manifest: dict, env: Env, workers: int) -> float:
    dl = torch.utils.data.DataLoader(PilShards(uri, manifest, env), batch_size=BATCH, num_workers=workers,
                                     persistent_workers=False, prefetch_factor=4)  # fmt: skip
    it = iter(dl)
    next(it)  # workers started, first shard open
    t0, n = time.perf_counter(), 0
    for x, _ in it:
        x = x.float().div_(127.5).sub_(1)
        n += len(x)
    return n / (time.perf_counter() - t0)


def bench_dali(uri: str, manifest: dict, threads: int, device: str, epochs: int = 2) -> float:
    cfg = DataConfig(dataset=uri, batch_size=BATCH, num_threads=threads, prefetch=2, shuffle_buffer=512)
    with ShardLoader(cfg, device=torch.device(device)) as loader:
        it = iter(loader)
        next(it)
        total = epochs * manifest["num_samples"] - BATCH
        t0, n = time.perf_counter(), 0
        while n < total:
            x, _ = next(it)
            n += len(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6000, help="samples per resolution (64² gets this, 256² a third)")
    ap.add_argument("--resolutions", default="64,256")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="gf-bench-data-"))
    env = Env.from_environ({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-" + os.urandom(6).hex(),
                            "GANFORGE_BUCKET": "ganforge"})  # fmt: skip
    stack = LocalStack(root=root, env=env, ports=Ports.free())
    results: dict[str, dict[str, float]] = {"pil": {}, "dali_cpu": {}}
    if torch.cuda.is_available():
        results["dali_gpu"] = {}
    try:
        stack._save_state()
        stack._start_s3()  # S3 only: the benchmark needs neither MLflow nor Ray
        stack._wait("s3", stack._s3_healthy, 60)
        stack._ensure_bucket()
        os.environ.update({k: v for k, v in stack.client_environ().items() if k.startswith(("AWS_", "GANFORGE_"))})
        env = Env.from_environ()
        for res in map(int, args.resolutions.split(",")):
            n = args.samples if res <= 64 else max(BATCH * 4, args.samples // 3)
            uri = f"s3://ganforge/bench/fmnist-{res}"
            t0 = time.perf_counter()
            manifest = write_shards("fashion-mnist", uri, resolution=res, image_format="jpg", max_samples=n,
                                    samples_per_shard=max(1, n // 8), progress=False, env=env)  # fmt: skip
            size = sum(s["bytes"] for s in manifest["shards"]) / 2**20
            console.print(f"{res}²: {n} JPEG samples, {size:.1f} MiB in {len(manifest['shards'])} shards, "
                          f"written in {time.perf_counter() - t0:.1f} s")  # fmt: skip
            results["pil"][str(res)] = bench_pil(uri, manifest, env, workers=cores)
            results["dali_cpu"][str(res)] = bench_dali(uri, manifest, threads=cores, device="cpu")
            if "dali_gpu" in results:
                results["dali_gpu"][str(res)] = bench_dali(uri, manifest, threads=cores, device="cuda")
            console.print({k: round(v[str(res)]) for k, v in results.items()})
    finally:
        stack.down(log=lambda *_: None)
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title=f"data loading, img/s (batch {BATCH}, {cores} cores, JPEG q95 shards streamed from S3)")
    table.add_column("pipeline")
    resolutions = list(results["pil"])
    for r in resolutions:
        table.add_column(f"{r}²", justify="right")
    for name, row in results.items():
        table.add_row(name, *(f"{row[r]:,.0f}" for r in resolutions))
    table.add_row("dali_cpu / pil", *(f"{results['dali_cpu'][r] / results['pil'][r]:.1f}×" for r in resolutions))
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({k: {r: round(v, 1) for r, v in row.items()} for k, row in results.items()},
                                  indent=2) + "\n")  # fmt: skip
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
