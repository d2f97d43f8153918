"""Data-loading throughput: the same S3 shards through (a) PIL + torch DataLoader, (b) our DALI CPU loader,
(c) DALI on the GPU when CUDA is present. Run with ``make bench-data`` (not collected by pytest).

A private SeaweedFS (free ports, temp dir) serves upscaled Fashion-MNIST as grey JPEG q95 shards at 64² and 256²;
every pipeline reads the same tars, so only reading/decoding/augmenting differs. Besides the three pipelines the
issue asks for, two alternatives are measured: ``dali_cpu_cached`` (our loader reading its local shard cache,
``data.cache_dir``, i.e. the steady state from the second epoch on) and ``dali_cpu_reader`` (DALI's own
``fn.readers.webdataset`` over the same cached tars + indexes, shuffle buffer, coin-flip mirror: no exact resume,
no bad-sample skipping, so an upper bound for what DALI's reader would give us).

Fashion-MNIST is grey: the PIL baseline decodes it the usual way (``convert("RGB")``), our loader decodes and
normalises one channel and hands out a broadcast RGB view (its manifest says ``"channels": 1``). ``pil_grey`` is the
stricter baseline that does the same with PIL (one channel, as NVlabs' dataset class keeps grey images). So that colour
data is measured too, the largest resolution is repeated on a colour-tinted copy (rows suffixed ``_rgb``; ``--no-rgb``
skips).

The machine may be shared, so the pipelines run interleaved, ``--rounds`` times in rotating order, and the median is
kept; besides img/s each run records the CPU time it cost per image (this process, its DataLoader workers and the S3
server), which competing load inflates far less than wall time. Results go to ``tests/benchmarks/results/data.json``
as ``{"<pipeline>": {"<resolution>": img_per_s}}``, and the CPU µs per image in the same layout to
``data_cpu_us.json``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import psutil
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image
from rich.console import Console
from rich.table import Table

from orchestrator.config import DataConfig
from orchestrator.data import fashion_mnist
from orchestrator.data.cache import ShardCache
from orchestrator.data.loader import ShardLoader
from orchestrator.data.manifest import Manifest
from orchestrator.data.s3 import ObjectStream, client
from orchestrator.data.tar import iter_tar_samples
from orchestrator.data.writer import write_shards
from orchestrator.env import Env, split_s3_uri
from orchestrator.stack import LocalStack, Ports

RESULTS = Path(__file__).parent / "results" / "data.json"
CPU_RESULTS = RESULTS.with_name("data_cpu_us.json")
BATCH = 64


class PilShards(torch.utils.data.IterableDataset):
    """The usual baseline: DataLoader workers each stream their share of the shards and decode with PIL (to RGB, or
    with ``grey`` to one channel as NVlabs' dataset class keeps grey images)."""

    def __init__(self, uri: str, manifest: Manifest, env: Env, grey: bool = False):
        self.bucket, prefix = split_s3_uri(uri)
        self.keys = [f"{prefix}/{s.name}" for s in manifest.shards]
        self.env, self.grey = env, grey

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        keys = self.keys[info.id :: info.num_workers] if info else self.keys
        rng = np.random.default_rng(info.id if info else 0)
        for key in keys:
            for _, parts, _ in iter_tar_samples(ObjectStream(self.bucket, key, env=self.env)):
                img = np.array(Image.open(io.BytesIO(parts["jpg"])).convert("L" if self.grey else "RGB"))
                if rng.random() < 0.5:
                    img = img[:, ::-1]
                # uint8 across the worker boundary (4× less shared memory than float); normalised in the main process
                chw = img[None] if self.grey else img.transpose(2, 0, 1)
                yield torch.from_numpy(np.ascontiguousarray(chw)), int(parts["cls"])


class CpuMeter:
    """CPU seconds spent by this process (all threads), the given worker processes and the S3 server."""

    def __init__(self, server: list[psutil.Process], workers: list[psutil.Process] = ()):
        self.procs = [*server, *workers]
        self.t0 = self._now()

    def _now(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        total = own.ru_utime + own.ru_stime
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def spent(self) -> float:
        return self._now() - self.t0


def bench_pil(uri: str, manifest: Manifest, env: Env, workers: int, server, grey: bool = False) -> tuple[float, float]:
    """img/s and CPU µs/img over the first 90% of an epoch (stopping early keeps the workers alive to be metered,
    and leaves out the tail where some workers have already run dry, which only favours the baseline)."""
    # Our loaders in this process froze its objects for the collector (ShardLoader._start); forked workers would
    # inherit that and run faster than a plain PIL DataLoader does.
    gc.unfreeze()
    dl = torch.utils.data.DataLoader(
        PilShards(uri, manifest, env, grey),
        batch_size=BATCH,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4,
    )
    it = iter(dl)
    next(it)  # workers started, first shard open
    meter = CpuMeter(server, psutil.Process().children(recursive=True))
    t0, n = time.perf_counter(), 0
    for x, _ in it:
        x = x.float().div_(127.5).sub_(1).expand(-1, 3, -1, -1)  # (a view unless grey)
        n += len(x)
        if n >= 0.9 * manifest.num_samples - BATCH:
            break
    wall, cpu = time.perf_counter() - t0, meter.spent()
    del it
    return n / wall, cpu / n * 1e6


def bench_dali(
    uri: str, manifest: Manifest, threads: int, device: str, server, cache_dir: str = "", epochs: int = 2
) -> tuple[float, float]:
    cfg = DataConfig(dataset=uri, batch_size=BATCH, num_threads=threads, shuffle_buffer=512, cache_dir=cache_dir)
    with ShardLoader(cfg, device=torch.device(device)) as loader:
        it = iter(loader)
        next(it)
        total = epochs * manifest.num_samples - BATCH
        meter = CpuMeter(server)
        t0, n = time.perf_counter(), 0
        while n < total:
            x, _ = next(it)
            n += len(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0), meter.spent() / n * 1e6


def colour_folder(root: Path, n: int) -> str:
    """``n`` Fashion-MNIST images tinted into colour (a hue per class, so the chroma planes carry real structure),
    as an image folder with class sub-folders: the colour counterpart of the grey sets, for the ``_rgb`` rows."""
    images, labels = fashion_mnist.load("train")
    tints = np.random.default_rng(0).uniform(0.3, 1.0, (len(fashion_mnist.CLASSES), 3))
    for i in range(n):
        folder = root / fashion_mnist.CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        rgb = (images[i][..., None] * tints[labels[i]] + (1 - tints[labels[i]]) * 40).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{i:05d}.png")
    return str(root)


def fill_cache(uri: str, manifest: Manifest, cache_dir: str) -> None:
    """One pass of the loader with a cache fills it (verified shards); the indexes go beside them for DALI's reader."""
    cfg = DataConfig(dataset=uri, batch_size=BATCH, shuffle_buffer=512, cache_dir=cache_dir)
    with ShardLoader(cfg) as loader:
        it = iter(loader)
        for _ in range(manifest.num_samples // BATCH + 1):
            next(it)
    bucket, prefix = split_s3_uri(uri)
    cache = ShardCache(cache_dir, 1 << 40)
    for e in manifest.shards:
        assert cache.path(e).exists(), f"{e.name} did not reach the cache"
        body = client().get_object(Bucket=bucket, Key=f"{prefix}/{e.index}")["Body"].read()
        cache.path(e).with_suffix(".idx").write_bytes(body)


def bench_dali_reader(
    manifest: Manifest, cache_dir: str, threads: int, device: str, server, epochs: int = 2
) -> tuple[float, float]:
    """DALI's own webdataset reader on the cached tars: shuffle buffer, decode, random mirror, normalise (one
    channel for a grey dataset, broadcast to RGB as our loader does)."""
    cache = ShardCache(cache_dir, 1 << 40)
    paths = [str(cache.path(e)) for e in manifest.shards]
    use_gpu = device == "cuda"
    ch = 1 if manifest.channels == 1 else 3

    @pipeline_def(
        batch_size=BATCH,
        num_threads=threads,
        device_id=0 if use_gpu else None,
        prefetch_queue_depth=DataConfig.prefetch,
        seed=0,
        exec_dynamic=not use_gpu,
    )
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=paths,
            index_paths=[p[:-4] + ".idx" for p in paths],
            ext=["jpg", "cls"],
            random_shuffle=True,
            initial_fill=512,
            name="wds",
        )
        images = fn.decoders.image(
            jpg, device="mixed" if use_gpu else "cpu", output_type=types.GRAY if ch == 1 else types.RGB
        )
        images = fn.crop_mirror_normalize(
            images,
            mirror=fn.random.coin_flip(),
            mean=[127.5] * ch,
            std=[127.5] * ch,
            dtype=types.FLOAT,
            output_layout="CHW",
        )
        labels = fn.cast(cls, dtype=types.INT64) - 48  # one ASCII digit (Fashion-MNIST has 10 classes)
        return images, labels

    p = pipe()
    p.build()
    it = DALIGenericIterator(p, ["images", "labels"], reader_name="wds", auto_reset=True)
    next(it)
    total = epochs * manifest.num_samples - BATCH
    meter = CpuMeter(server)
    t0, n = time.perf_counter(), 0
    while n < total:
        try:
            out = next(it)[0]
        except StopIteration:  # epoch end (auto_reset starts the next)
            continue
        x = out["images"].to(device).expand(-1, 3, -1, -1)
        n += len(x)
    if use_gpu:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), meter.spent() / n * 1e6


def run_pipeline(name: str, uri: str, manifest: Manifest, env: Env, cache_dir: str, server) -> tuple[float, float]:
    cores = os.cpu_count() or 1
    if name in ("pil", "pil_grey"):
        return bench_pil(uri, manifest, env, cores, server, grey=name == "pil_grey")
    if name == "dali_cpu_reader":
        return bench_dali_reader(manifest, cache_dir, cores, "cpu", server)
    device = "cuda" if name == "dali_gpu" else "cpu"
    return bench_dali(uri, manifest, cores, device, server, cache_dir if name == "dali_cpu_cached" else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=18000, help="samples per resolution (64² gets this, 256² a third)")
    ap.add_argument("--resolutions", default="64,256")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every pipeline (median kept)")
    ap.add_argument(
        "--no-rgb",
        dest="rgb",
        action="store_false",
        help="skip the colour copy of the largest resolution (pipelines suffixed _rgb)",
    )
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    console = Console(width=max(120, shutil.get_terminal_size().columns))
    root = Path(tempfile.mkdtemp(prefix="gf-bench-data-"))
    env = Env.from_environ(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-" + os.urandom(6).hex(),
            "GANFORGE_BUCKET": "ganforge",
        }
    )
    stack = LocalStack(root=root, env=env, ports=Ports.free())
    names = ["pil", "pil_grey", "dali_cpu", "dali_cpu_cached", "dali_cpu_reader"]
    if torch.cuda.is_available():
        names.append("dali_gpu")
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {k: {} for k in names}
    runs.update({f"{k}_rgb": {} for k in names} if args.rgb else {})
    try:
        stack._save_state()
        stack._start_s3()  # S3 only: the benchmark needs neither MLflow nor Ray
        stack._wait("s3", stack._s3_healthy, 60)
        stack._ensure_bucket()
        os.environ.update({k: v for k, v in stack.client_environ().items() if k.startswith(("AWS_", "GANFORGE_"))})
        env = Env.from_environ()
        server = [p for p in psutil.process_iter(["cmdline"]) if str(root) in " ".join(p.info["cmdline"] or [])]
        sets = [(res, False) for res in map(int, args.resolutions.split(","))]
        if args.rgb:
            sets.append((max(r for r, _ in sets), True))
        for res, rgb in sets:
            n = args.samples if res <= 64 else max(BATCH * 4, args.samples // 3)
            uri = f"s3://ganforge/bench/fmnist-{res}" + ("-rgb" if rgb else "")
            t0 = time.perf_counter()
            source = colour_folder(root / "rgb", n) if rgb else "fashion-mnist"
            manifest = write_shards(
                source,
                uri,
                resolution=res,
                image_format="jpg",
                max_samples=n,
                samples_per_shard=max(1, n // 8),
                progress=False,
                env=env,
            )
            size = sum(s.bytes for s in manifest.shards) / 2**20
            console.print(
                f"{res}² {'colour' if rgb else 'grey'}: {n} JPEG samples, {size:.1f} MiB in "
                f"{len(manifest.shards)} shards, written in {time.perf_counter() - t0:.1f} s"
            )
            suffix = "_rgb" if rgb else ""
            cache_dir = str(root / f"cache-{res}{suffix}")
            fill_cache(uri, manifest, cache_dir)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no pipeline always first
                    if rgb and name == "pil_grey":
                        continue
                    got = run_pipeline(name, uri, manifest, env, cache_dir, server)
                    runs[name + suffix].setdefault(str(res), []).append(got)
                last = ", ".join(
                    f"{k} {runs[k + suffix][str(res)][-1][0]:,.0f}" for k in names if str(res) in runs[k + suffix]
                )
                console.print(f"  round {r + 1}: {last} img/s")
    finally:
        stack.down(log=lambda *_: None)
        shutil.rmtree(root, ignore_errors=True)

    runs = {k: row for k, row in runs.items() if row}
    results = {k: {r: statistics.median(x[0] for x in v) for r, v in row.items()} for k, row in runs.items()}
    cpu_us = {k: {r: statistics.median(x[1] for x in v) for r, v in row.items()} for k, row in runs.items()}
    resolutions = sorted({r for row in results.values() for r in row}, key=int)
    table = Table(
        title=f"data loading, img/s (median of {args.rounds} interleaved runs; batch {BATCH}, {cores} cores, "
        "JPEG q95 shards from S3) and CPU µs per image"
    )
    table.add_column("pipeline", no_wrap=True)
    for r in resolutions:
        table.add_column(f"{r}² img/s", justify="right")
        table.add_column(f"{r}² CPU µs/img", justify="right")
    for name in results:
        table.add_row(
            name, *(f"{d[name][r]:,.0f}" if r in d[name] else "" for r in resolutions for d in (results, cpu_us))
        )

    def ratios(name: str, base: str) -> None:
        cells = []
        for r in resolutions:
            ok = r in results[name] and r in results.get(base, {})
            cells += [
                f"{results[name][r] / results[base][r]:.1f}×" if ok else "",
                f"{cpu_us[base][r] / cpu_us[name][r]:.1f}×" if ok else "",
            ]
        table.add_row(f"{name} / {base}", *cells)

    for name in results:
        if not name.startswith("pil"):
            ratios(name, "pil_rgb" if name.endswith("_rgb") else "pil")
    ratios("dali_cpu", "pil_grey")
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for path, table in ((RESULTS, results), (CPU_RESULTS, cpu_us)):
        path.write_text(
            json.dumps({k: {r: round(v, 1) for r, v in row.items()} for k, row in table.items()}, indent=2) + "\n"
        )
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
