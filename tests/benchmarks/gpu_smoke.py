"""One-shot smoke test of the GPU path: environment, DALI loader (CPU ≡ GPU), models, NCCL DDP, FID features and an
end-to-end Ray Train run with resume, in under 5 minutes on one GPU.

Run with ``make gpu-smoke`` (not collected by pytest); ``GPU_SMOKE_ARGS="--quick"`` skips the end-to-end stage,
``--compile`` adds ``train.compile=true`` steps, ``--stages models,ddp`` runs a subset. Without CUDA it prints one line
and exits 0. ``--device cpu`` runs every stage on the CPU instead (gloo for NCCL, CPU bf16 autocast standing in for
CUDA's, DALI's CPU backend on both sides of each comparison), so the script itself can be developed without a GPU.

The parent starts the real local stack once (SeaweedFS S3, MLflow, a Ray head that detects the GPUs), writes tiny
synthetic datasets (RGB PNG 32², JPEG 64², Fashion-MNIST grey 32² when the Debian package is there) and runs each
stage in its own subprocess with a timeout: a DALI hang or a CUDA error fails that stage, never the script. A stage
re-writes its results file after every measurement, so even a killed stage reports what it had measured and which
check it was in. Results: ``tests/benchmarks/results/gpu_smoke.json`` ({stage: {ok, seconds, checks, ...}} plus the
machine) and a table. Exit code 1 if any stage failed on a CUDA run, else 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without the package installed (a GPU machine with a bare torch)
from gan_models.steps import HostReads, count_host_reads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_smoke.json"
JOB_CONFIGS = ROOT / "jobs" / "configs"


# ---------------------------------------------------------------------------------------------------------------------
# Host syncs


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str = "cpu", *optimizers: torch.optim.Optimizer) -> Iterator[HostReads]:
    """Count device→host synchronisations made inside the block (read the counter after it).

    CUDA: the syncs torch itself detects (``torch.cuda.set_sync_debug_mode("warn")`` warns once per synchronising
    call). CPU has no syncs: ``gan_models.steps.count_host_reads`` counts the tensor reads into Python that are one on
    a GPU (the ``optimizers``' CPU step counters left out).
    """
    if torch.device(device).type != "cuda":
        with count_host_reads(*optimizers) as reads:
            yield reads
        reads.sites = collections.Counter({_site(s): k for s, k in reads.sites.items()})
        return
    reads = HostReads()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not just the first one per line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield reads
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchroniz" in str(w.message):
            reads.kinds["cuda sync"] += 1
            reads.sites[f"{_short(w.filename)}:{w.lineno}"] += 1


def _site(site: str) -> str:
    path, _, line = site.rpartition(":")
    return f"{_short(path)}:{line}"


def _short(path: str) -> str:
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.relative_to(ROOT))
    return "/".join(p.parts[-2:])


# ---------------------------------------------------------------------------------------------------------------------
# A stage's results (child side)


class Results(dict):
    """One stage's results, re-written to ``path`` after every change, so a stage killed by its timeout still
    reports what it had measured. ``checks`` maps each check to pass/fail, ``errors`` says why one failed, and
    ``summary`` holds the lines for the table."""

    def __init__(self, path: Path):
        super().__init__(ok=True, checks={}, errors={}, summary=[], seconds_by_part={})
        self.path = path
        self.flush()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        os.replace(tmp, self.path)

    def check(self, name: str, passed: bool, error: str | None = None) -> bool:
        self["checks"][name] = bool(passed)
        if not passed:
            self["ok"] = False
            if error:
                self["errors"][name] = error[:500]
        self.flush()
        return bool(passed)

    def note(self, line: str) -> None:
        self["summary"].append(line)
        self.flush()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """A sub-check: an exception fails it, with its message, and the stage goes on with the next one."""
        self["running"] = name
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:
            traceback.print_exc()  # into the stage's log
            self.check(name, False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            self.note(f"{name}: FAILED {type(e).__name__}")
        finally:
            self["seconds_by_part"][name] = round(time.perf_counter() - t0, 2)
            self["running"] = None


def stage_device(args) -> torch.device:
    return torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_with_timeout(fn: Callable[[], object], seconds: float) -> object:
    """fn() on a daemon thread; TimeoutError if it has not returned after ``seconds`` (a hung DALI pipeline)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no result after {seconds:.0f} s (hung)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: environment


def _try(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"


def stage_env(res: Results, ctx: dict, args) -> None:
    cuda = args.device == "cuda"
    res["torch"] = torch.__version__
    res["torch_cuda"] = torch.version.cuda
    res["cuda_available"] = torch.cuda.is_available()
    res["cudnn"] = _try(torch.backends.cudnn.version)
    res["nccl"] = _try(lambda: ".".join(map(str, torch.cuda.nccl.version()))) if torch.version.cuda else None
    res["nccl_available"] = torch.distributed.is_nccl_available()
    res["gloo_available"] = torch.distributed.is_gloo_available()
    res["device_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    res["devices"] = [_try(lambda i=i: torch.cuda.get_device_name(i)) for i in range(res["device_count"])]
    if res["device_count"]:
        props = torch.cuda.get_device_properties(0)
        res["capability"] = f"{props.major}.{props.minor}"
        res["memory_gb"] = round(props.total_memory / 2**30, 1)
        res["bf16"] = _try(torch.cuda.is_bf16_supported)
    try:
        import nvidia.dali as dali
        from nvidia.dali import backend

        res["dali"] = dali.__version__
        res["dali_cuda"] = _try(backend.GetCudaVersion) or None  # CUDA runtime DALI found, e.g. 12080; 0: none
        res["dali_nvjpeg"] = _try(backend.GetNvjpegVersion)
        res["dali_nvimgcodec"] = _try(backend.GetNvimgcodecVersion)
        dali_ok = True
    except Exception as e:  # a wheel that cannot load its libraries: reported, never raised
        res["dali"] = f"import failed: {type(e).__name__}: {e}"
        dali_ok = False
    res.check("dali imports", dali_ok, str(res["dali"]))
    if cuda:
        res.check("torch built for CUDA", res["torch_cuda"] is not None, f"torch {torch.__version__} is a CPU build")
        res.check("CUDA device visible", res["device_count"] >= 1, "torch.cuda.device_count() == 0")
        res.check("NCCL available", res["nccl_available"] and not str(res["nccl"]).startswith("error"), res["nccl"])
        res.check("bf16 supported", res.get("bf16") is True, str(res.get("bf16")))
    else:
        res.check("gloo available", res["gloo_available"])
    devices = ", ".join(res["devices"]) or "no GPU"
    res.note(f"torch {res['torch']} (CUDA {res['torch_cuda']}), cuDNN {res['cudnn']}, NCCL {res['nccl']}")
    res.note(f"{res['device_count']} device(s): {devices}; bf16 {res.get('bf16', '-')}")
    res.note(f"DALI {res['dali']} (CUDA runtime {res.get('dali_cuda') or '-'})")


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: loader


def _compare(res: Results, name: str, ds: dict, device: torch.device) -> None:
    """The CPU loader and the device loader over the same shards with the same seed, batch for batch (past an
    epoch boundary, so the second epoch's order is compared too)."""
    from orchestrator.config import DataConfig
    from orchestrator.data.loader import ShardLoader

    batch = 64
    cfg = DataConfig(dataset=ds["uri"], batch_size=batch, shuffle_buffer=128, seed=7)
    # The device side runs 2 DALI threads (2 pipelines on CPU): the order must not depend on that either.
    dev_cfg = DataConfig(dataset=ds["uri"], batch_size=batch, shuffle_buffer=128, seed=7, num_threads=2)
    n_batches = math.ceil(1.5 * ds["n"] / batch)
    stats = {"batches": n_batches, "max_abs_diff": 0.0, "sum_abs_diff": 0.0, "differing": 0, "values": 0}
    labels_equal, contract = True, []
    with ShardLoader(cfg, device="cpu") as a, ShardLoader(dev_cfg, device=device) as b:
        ia, ib = iter(a), iter(b)
        for _ in range(n_batches):
            xa, ya = next(ia)
            xb, yb = next(ib)
            if device.type == "cuda":
                # Delay this stream before reading the batch: a DALI buffer handed out before its copy finished, or
                # re-used too early, would show up as a difference.
                torch.cuda._sleep(20_000_000)
            contract.append(
                xb.dtype == torch.float32
                and yb.dtype == torch.int64
                and xb.device.type == device.type
                and yb.device.type == device.type
                and xb.shape == xa.shape
                and bool(xb.min() >= -1)
                and bool(xb.max() <= 1)
            )
            xb, yb = xb.cpu(), yb.cpu()
            d = (xa - xb).abs()
            stats["max_abs_diff"] = max(stats["max_abs_diff"], float(d.max()))
            stats["sum_abs_diff"] += float(d.sum())
            stats["differing"] += int((d > 0).sum())
            stats["values"] += d.numel()
            labels_equal &= torch.equal(ya, yb)
    out = {
        "format": ds["format"],
        "resolution": ds["resolution"],
        "samples": ds["n"],
        "batches": n_batches,
        "max_abs_diff": stats["max_abs_diff"],
        "mean_abs_diff": stats["sum_abs_diff"] / max(stats["values"], 1),
        # in uint8 levels: the normalisation is x/127.5 - 1
        "max_abs_diff_levels": round(stats["max_abs_diff"] * 127.5, 3),
        "differing_fraction": stats["differing"] / max(stats["values"], 1),
        "labels_equal": labels_equal,
        "contract": all(contract),
    }
    res[name] = out
    res.check(f"{name}: labels and order equal", labels_equal)
    res.check(f"{name}: float32 in [-1,1], int64 labels, on {device.type}", all(contract))
    if ds["format"] == "png":  # lossless: any difference is a loader bug
        res.check(f"{name}: max|diff| == 0", out["max_abs_diff"] == 0, f"max|diff| {out['max_abs_diff']:.4g}")
        res.note(f"{name} ({ds['format']} {ds['resolution']}²): max|diff| {out['max_abs_diff']:.3g}")
    else:  # JPEG: mixed decode skips libjpeg's fancy chroma upsampling by default; this measures how much it moves
        levels = f"max|diff| {out['max_abs_diff_levels']:.1f} levels, mean {out['mean_abs_diff'] * 127.5:.3f}"
        res.note(f"{name} ({ds['format']} {ds['resolution']}²): {levels}, {out['differing_fraction']:.1%} differ")


def _two_loaders(res: Results, ds: dict, device: torch.device) -> None:
    """Two device loaders alive at once (the training loader beside the evaluator's reference loader)."""
    from orchestrator.config import DataConfig
    from orchestrator.data.loader import ShardLoader

    cfg = DataConfig(dataset=ds["uri"], batch_size=32, shuffle_buffer=64, seed=3)
    with ShardLoader(cfg, device=device) as a, ShardLoader(cfg, device=device) as b:
        ia, ib = iter(a), iter(b)
        same = all(torch.equal(next(ia)[0], next(ib)[0]) for _ in range(4))
    res.check(f"two {device.type} loaders at once give the same batches", same)


def _throughput(res: Results, ds: dict, device: torch.device, threads: int, batches: int) -> None:
    from orchestrator.config import DataConfig
    from orchestrator.data.loader import ShardLoader

    cfg = DataConfig(dataset=ds["uri"], batch_size=256, num_threads=threads, seed=0)
    with ShardLoader(cfg, device=device) as loader:
        it = iter(loader)
        for _ in range(3):  # pipelines built, queues full
            next(it)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        sync(device)
        dt = time.perf_counter() - t0
    row = {
        "dataset": ds["name"],
        "batch": 256,
        "threads": threads,
        "batches": batches,
        "seconds": round(dt, 3),
        "img_per_s": round(batches * 256 / dt, 1),
        "epochs": round(batches * 256 / ds["n"], 1),
    }
    res["throughput"] = [*res.get("throughput", []), row]
    res.note(
        f"{device.type} img/s {ds['name']} b256 {threads} thread(s): {row['img_per_s']:,.0f} "
        f"({batches} batches, {row['epochs']} epochs from S3)"
    )


def _damaged_copy(uri: str, shard: str, sample: int = 20) -> str:
    """A copy of a PNG dataset in which one image of ``shard`` passes the cheap checks (scrambled IDAT data under a
    recomputed CRC, manifest sha256 updated) but not the decoder: the fixture of the CPU integration test."""
    import hashlib

    from orchestrator.data.s3 import client
    from orchestrator.env import split_s3_uri
    from tests.damage import scramble_png

    s3 = client()
    bucket, prefix = split_s3_uri(uri)
    dst = f"{prefix}-damaged"
    for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        name = o["Key"].rsplit("/", 1)[1]
        s3.copy_object(Bucket=bucket, Key=f"{dst}/{name}", CopySource={"Bucket": bucket, "Key": o["Key"]})
    tar = bytearray(s3.get_object(Bucket=bucket, Key=f"{dst}/{shard}")["Body"].read())
    idx_name = shard.removesuffix(".tar") + ".idx"
    idx = s3.get_object(Bucket=bucket, Key=f"{dst}/{idx_name}")["Body"].read().decode().splitlines()
    ext, offset, size = idx[sample].split()[:3]  # line 0 is the header, so this is sample `sample - 1`
    assert ext == "png", ext
    scramble_png(tar, int(offset), int(size))
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{dst}/manifest.json")["Body"].read())
    next(e for e in manifest["shards"] if e["name"] == shard)["sha256"] = hashlib.sha256(tar).hexdigest()
    s3.put_object(Bucket=bucket, Key=f"{dst}/{shard}", Body=bytes(tar))
    s3.put_object(Bucket=bucket, Key=f"{dst}/manifest.json", Body=json.dumps(manifest).encode())
    return f"s3://{bucket}/{dst}"


def _decode_error_recovery(res: Results, ds: dict, device: torch.device) -> None:
    """One image only the decoder rejects: the device loader must skip exactly it, without hanging, and deliver
    what the CPU loader delivers (whose recovery the integration tests cover)."""
    from orchestrator.config import DataConfig
    from orchestrator.data.loader import ShardLoader

    # No shuffle window, and the damage in the epoch's last shard: the bad image must not be in the first batch,
    # which DALI decodes inside DALIGenericIterator's constructor, outside the loader's recovery.
    cfg = DataConfig(dataset=ds["uri"], batch_size=40, shuffle_buffer=1, hflip=False, seed=5)
    last_shard = ShardLoader(cfg)._epoch_shards(0)[-1]["name"]
    cfg = DataConfig(dataset=_damaged_copy(ds["uri"], last_shard), batch_size=40, shuffle_buffer=1, hflip=False, seed=5)

    def epoch(dev) -> tuple[torch.Tensor, int]:
        with ShardLoader(cfg, device=dev) as loader:
            xs, it = [], iter(loader)
            while sum(len(x) for x in xs) < loader.epoch_size - loader.skipped:
                xs.append(next(it)[0].cpu())
            n = loader.epoch_size - loader.skipped
            return torch.cat(xs)[:n], loader.skipped

    x_cpu, skipped_cpu = epoch("cpu")
    x_dev, skipped_dev = call_with_timeout(lambda: epoch(device), 90)
    res["decode_error_recovery"] = {
        "skipped_cpu": skipped_cpu,
        "skipped_device": skipped_dev,
        "delivered": len(x_dev),
        "epoch_size": ds["n"],
        "damaged_shard": last_shard,
    }
    same = x_cpu.shape == x_dev.shape and torch.equal(x_cpu, x_dev)
    res.check(
        f"decode-error recovery on {device.type}: 1 skipped, rest equal to CPU",
        skipped_dev == 1 and same,
        f"skipped {skipped_dev} (CPU {skipped_cpu}), same images: {same}",
    )
    res.note(f"decode-error recovery: skipped {skipped_dev}, delivered {len(x_dev)}/{ds['n']}")


def stage_loader(res: Results, ctx: dict, args) -> None:
    device = stage_device(args)
    datasets = ctx["datasets"]
    for name, ds in datasets.items():
        with res.part(f"{name} cpu vs {device.type}"):
            _compare(res, name, ds, device)
    with res.part("two loaders"):
        _two_loaders(res, datasets["png32"], device)
    for threads in (1, 4) if device.type == "cuda" else (2,):
        with res.part(f"throughput {threads} thread(s)"):
            _throughput(res, datasets["jpg64"], device, threads, batches=200 if device.type == "cuda" else 12)
    with res.part("decode-error recovery"):
        _decode_error_recovery(res, datasets["png32"], device)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3: models


# Small 64² versions of the job configurations: jobs/configs/<model>.yaml, with every phase on (BigGAN's attention;
# StyleGAN2's path length, style mixing and ADA, which the demo configuration turns off).
MODEL_OVERRIDES = {
    "biggan": ["model.resolution=64", "model.attn=32"],
    "stylegan2": [
        "model.resolution=64",
        "hparams.pl_weight=2",
        "hparams.style_mixing_prob=0.9",
        "hparams.augment=ada",
        "hparams.augment_p=0.2",
    ],
}


def make_recipe(model: str, overrides: list[str] = (), hparams: dict | None = None):
    """(recipe, job config) from the job's YAML with ``overrides``; ``hparams`` replaces the YAML's hyper-parameters
    by the model's paper defaults with these changes."""
    import gan_models
    from orchestrator.config import build_config

    job = build_config(model, JOB_CONFIGS / f"{model}.yaml", list(overrides))
    hp = job.hparams if hparams is None else gan_models.module(model).HParams(**hparams)
    torch.manual_seed(0)
    return gan_models.make_recipe(model, job.model, hp), job


def setup_recipe(recipe, device: torch.device, wrap=lambda m: m, *, compile: bool = False, cpu_amp: str = "bf16"):
    """``recipe.setup`` as the training loop calls it (amp on); returns what autocast the steps run under.

    The recipes' amp is CUDA-only; on CPU, ``cpu_amp="bf16"`` patches CPU bf16 autocast in as a stand-in, so the
    bf16 dtype chain of the GPU path runs here too (the ops that matter are in both devices' lower-precision lists).
    """
    recipe.setup(device, wrap, amp=True, compile=compile)
    if device.type == "cuda":
        return "bf16 (cuda autocast)" if recipe.amp else "fp32"
    if cpu_amp == "bf16" and hasattr(recipe, "_autocast"):
        recipe._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        return "bf16 (cpu autocast stand-in)"
    return "fp32"


def fake_batch(recipe, job, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    res = job.model.resolution
    images = (torch.rand(n, 3, res, res, generator=g) * 2 - 1).to(device)
    labels = torch.randint(max(recipe.c_dim, 1), (n,), generator=g).to(device)
    return images, labels


def _compile_counters() -> dict:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def measure_model(model: str, device: torch.device, args, *, compile: bool = False, timed_steps: int = 3) -> dict:
    """A warm-up step, ``timed_steps`` timed steps (ms/step, peak memory), one more step counting host syncs."""
    recipe, job = make_recipe(model, MODEL_OVERRIDES[model])
    amp = setup_recipe(recipe, device, compile=compile, cpu_amp=args.cpu_amp)
    images, labels = fake_batch(recipe, job, device, job.data.batch_size)
    sync(device)
    t0 = time.perf_counter()
    recipe.train_step(images, labels)  # the warm-up (and, compiled, the compilation)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        recipe.train_step(images, labels)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    with count_host_syncs(device, recipe.opt_G, recipe.opt_D) as syncs:
        metrics = recipe.train_step(images, labels)
    sync(device)  # outside the count: only the step's own syncs
    # Values may be 0-d device tensors: converted only now, after the count.
    values = {k: float(v) for k, v in metrics.items()}
    losses = {k: round(v, 5) for k, v in values.items() if k.startswith("loss/")}
    conv = [p for p in recipe.G.parameters() if p.ndim == 4]
    out = {
        "resolution": job.model.resolution,
        "batch": len(images),
        "amp": amp,
        "compile": compile,
        "channels_last": all(p.is_contiguous(memory_format=torch.channels_last) for p in conv) if conv else None,
        "warmup_s": round(warmup_s, 3),
        "ms_per_step": round(1000 * sorted(times)[len(times) // 2], 2),
        "ms_per_step_all": [round(1000 * t, 2) for t in times],
        "peak_mem_mb": round(peak / 2**20, 1) if peak is not None else None,
        "host_syncs_per_step": syncs.count,
        "host_sync_kind": "torch.cuda.set_sync_debug_mode('warn')"
        if device.type == "cuda"
        else "tensor reads into Python",
        "host_sync_sites": syncs.top(8),
        "losses": losses,
        "finite": all(math.isfinite(v) for v in values.values()),
        "params_G": sum(p.numel() for p in recipe.G.parameters()),
        "params_D": sum(p.numel() for p in recipe.D.parameters()),
        "overrides": MODEL_OVERRIDES[model],
    }
    if compile:
        out["dynamo"] = _compile_counters()
    return out


def stage_models(res: Results, ctx: dict, args) -> None:
    device = stage_device(args)  # torch's default TF32 / cuDNN settings, as the training loop leaves them
    for compile in (False, True) if args.compile else (False,):
        for model in ("biggan", "stylegan2"):
            key = f"{model}{' compiled' if compile else ''}"
            with res.part(key):
                r = measure_model(model, device, args, compile=compile)
                res[key] = r
                res.check(f"{key}: finite losses", r["finite"], json.dumps(r["losses"]))
                if device.type == "cuda":
                    res.check(f"{key}: channels_last", r["channels_last"] is not False)
                mem = f", peak {r['peak_mem_mb']:,.0f} MB" if r["peak_mem_mb"] is not None else ""
                syncs = f"{r['host_syncs_per_step']} host syncs/step"
                res.note(
                    f"{key} {r['resolution']}² b{r['batch']} {r['amp']}: {r['ms_per_step']:.1f} ms/step "
                    f"(warm-up {r['warmup_s']:.1f} s){mem}, {syncs}"
                )
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Stage 4: DDP at world size 1


# (model, hparams changes from the paper defaults, the review finding that predicts a failure there)
DDP_CASES = {
    "biggan hinge": ("biggan", {}, None),
    "biggan r1_gamma=1": ("biggan", {"r1_gamma": 1.0}, "S1-2"),
    "biggan loss=wgan": ("biggan", {"loss": "wgan"}, "S1-2"),
    "stylegan2 defaults (R1+PL)": ("stylegan2", {}, "S1-1 under bf16"),
    "stylegan2 R1, no PL": ("stylegan2", {"pl_weight": 0.0}, None),
    "stylegan2 loss=wgan": ("stylegan2", {"loss": "wgan"}, "S1-2"),
    "stylegan2 noise_mode=none": ("stylegan2", {"noise_mode": "none"}, "S1-2"),
}


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[str]:
    """A world-size-1 process group through a TCP store on loopback: nccl on CUDA, gloo on CPU."""
    from datetime import timedelta

    import torch.distributed as dist

    from orchestrator.stack import LOOPBACK, free_ports

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(LOOPBACK, free_ports(1)[0], world_size=1, is_master=True, timeout=timedelta(seconds=60))
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=120))
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def ddp_wrap(device: torch.device) -> Callable:
    """DDP exactly as ray.train.torch.prepare_model builds it (there only when world_size > 1)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return lambda m: DistributedDataParallel(m, device_ids=[device], output_device=device)
    return lambda m: DistributedDataParallel(m)


def ddp_case(model: str, hparams: dict, device: torch.device, args, *, compile: bool = False) -> dict:
    recipe, job = make_recipe(model, hparams=hparams)  # the YAML's demo shapes (32²), paper hyper-parameters
    amp = setup_recipe(recipe, device, ddp_wrap(device), compile=compile, cpu_amp=args.cpu_amp)
    images, labels = fake_batch(recipe, job, device, 8)
    losses = {}  # of both steps: lazy regularisers run in the first one only
    for _ in range(2):  # the second step's forward is where an unfinished reduction is detected
        metrics = recipe.train_step(images, labels)
        losses.update({k: float(v) for k, v in metrics.items() if k.startswith("loss/")})
    sync(device)
    return {
        "amp": amp,
        "losses": {k: round(v, 5) for k, v in losses.items()},
        "finite": all(math.isfinite(v) for v in losses.values()),
    }


def stage_ddp(res: Results, ctx: dict, args) -> None:
    import torch.distributed as dist

    device = stage_device(args)
    with process_group(device) as backend:
        res["backend"] = backend
        with res.part("all_reduce fp64"):
            t = torch.arange(4, dtype=torch.float64, device=device) / 3
            expected = t.clone()
            dist.all_reduce(t)
            res.check("all_reduce fp64", torch.equal(t, expected))
        with res.part("all_gather_object"):
            box = [None]
            dist.all_gather_object(box, {"rank": 0, "x": 1.5})
            res.check("all_gather_object", box == [{"rank": 0, "x": 1.5}], repr(box))
        cases = dict(DDP_CASES)
        if args.compile:
            cases["biggan hinge compiled"] = ("biggan", {}, "S2-7")
        res["cases"] = {}
        for name, (model, hparams, known) in cases.items():
            try:
                r = ddp_case(model, hparams, device, args, compile=name.endswith("compiled"))
                ok, error = r["finite"], None if r["finite"] else f"non-finite losses {r['losses']}"
            except Exception as e:
                traceback.print_exc()
                r, ok = {}, False
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            res["cases"][name] = {"ok": ok, "error": error, "known_issue": known, **r}
            res.check(f"ddp {name}", ok, error)
            tag = f" (predicted: {known})" if known and not ok else ""
            res.note(f"{name}: {'ok' if ok else 'FAIL ' + (error or '')[:90]}{tag}")
    res.note(f"{backend}, world size 1, DDP as prepare_model builds it, 2 steps per case")


# ---------------------------------------------------------------------------------------------------------------------
# Stage 5: FID features


def stage_fid(res: Results, ctx: dict, args) -> None:
    from orchestrator.metrics.features import FeatureExtractor
    from orchestrator.metrics.fid import FeatureStats

    device = stage_device(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, generator=g)
    with res.part("cpu vs device features"):
        cpu = FeatureExtractor(device="cpu").extract(images)
        ext = FeatureExtractor(device=device)  # what the evaluator builds (get_extractor's defaults)
        dev = ext.extract(images).cpu()
        rel = float((cpu - dev).abs().max() / cpu.abs().max())
        res["features_rel_max_diff"] = rel
        res.check("features cpu ≈ device (rel. max diff < 1e-3)", rel < 1e-3, f"{rel:.3g}")
        res.note(f"Inception features cpu vs {device.type}: rel. max diff {rel:.3g} (64 images)")
    with res.part("throughput"):
        n = 2000 if device.type == "cuda" else 64
        # generated-looking input: float in [-1, 1] on the device, as the evaluator feeds G's samples
        fake = torch.rand(n, 3, 64, 64, generator=g).to(device) * 2 - 1
        ext.extract(fake[: ext.batch_size])  # cuDNN / allocator warm-up
        sync(device)
        t0 = time.perf_counter()
        stats = FeatureStats(2048, device)
        for i in range(0, n, 500):
            stats.update(ext.extract(fake[i : i + 500]))
        sync(device)
        dt = time.perf_counter() - t0
        mean = stats.sum / stats.count
        res["throughput"] = {
            "images": n,
            "seconds": round(dt, 3),
            "img_per_s": round(n / dt, 1),
            "batch_size": ext.batch_size,
            "stats_dtype": str(stats.sum.dtype),
        }
        res.check("feature stats finite, fp64", bool(torch.isfinite(mean).all()) and stats.n == n)
        res.note(f"{device.type} features + fp64 stats: {n / dt:,.0f} img/s ({n} images, batch {ext.batch_size})")


# ---------------------------------------------------------------------------------------------------------------------
# Stage 6: end to end


# a worker's progress line, as Ray forwards it: "(RayTrainWorker pid=…) step      4/8  kimg … 123 img/s …"
_STEP = re.compile(r"\bstep\s+(\d+)/(\d+)\s.*?(\d+) img/s")


def _run_job(args_: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "jobs/biggan.py", *args_],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    print(proc.stdout)  # into the stage's log
    return proc.returncode, proc.stdout, time.perf_counter() - t0


def _last_checkpoint_step(bucket: str, prefix: str) -> int | None:
    from orchestrator.data.s3 import client
    from orchestrator.train import checkpoint as ckpt

    s3 = client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    metas = sorted(k for k in keys if k.endswith("/" + ckpt.META))
    if not metas:
        return None
    return int(json.loads(s3.get_object(Bucket=bucket, Key=metas[-1])["Body"].read())["step"])


def stage_e2e(res: Results, ctx: dict, args) -> None:
    cuda = args.device == "cuda"
    tick = 5 if cuda else 2
    name = f"gpu-smoke-{uuid.uuid4().hex[:6]}"
    bucket = ctx["bucket"]
    ds = ctx["datasets"]["jpg64"]
    common = [
        f"data.dataset={ds['uri']}",
        f"train.storage_path=s3://{bucket}/runs-gpu-smoke",
        f"train.name={name}",
        f"train.use_gpu={'true' if cuda else 'false'}",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        f"train.tick_steps={tick}",
        "train.checkpoint_ticks=1",
        "train.sample_ticks=1",
        "train.keep_checkpoints=10",
        "train.grid_size=4",
        "model.resolution=64",
        "model.ch=8",
        "data.batch_size=16",
        "tracking.experiment=gpu-smoke",
    ]
    if cuda:  # the in-training FID on the GPU too (Inception is minutes on 2 CPU cores)
        common += [
            "train.metric_kimg=0.1",
            "train.metric_n=256",
            "train.metric_ref_n=512",
            "train.quality_signals=false",
        ]
    env = {**os.environ, "RAY_ADDRESS": ctx["ray_address"], "GANFORGE_OUTPUT_DIR": ctx["output_dir"]}
    res["run_name"] = name
    res["overrides"] = common
    prefix = f"runs-gpu-smoke/{name}/"
    for label, steps, first in (("run", 2 * tick, tick), ("resume", 4 * tick, 3 * tick)):
        with res.part(label):
            rc, out, wall = _run_job([*common, f"train.steps={steps}"], env, timeout=args.job_timeout)
            printed = [(int(m[1]), int(m[3])) for m in _STEP.finditer(out)]
            steps_seen = [s for s, _ in printed]
            device_line = re.search(r"worker\(s\), (GPU|CPU)", out)
            fid = re.findall(r"\bfid\s+([\d.]+)", out)
            r = {
                "rc": rc,
                "seconds": round(wall, 1),
                "steps_printed": steps_seen,
                "img_per_s": printed[-1][1] if printed else None,
                "device": device_line[1] if device_line else None,
                "last_checkpoint_step": _last_checkpoint_step(bucket, prefix),
                "fid": fid,
            }
            res[label] = r
            if rc != 0:
                res["errors"][f"{label} output"] = out[-3000:]
            res.check(f"{label}: job exits 0", rc == 0, out.strip().splitlines()[-1] if out.strip() else "")
            res.check(
                f"{label}: starts at step {first}", bool(steps_seen) and steps_seen[0] == first, f"printed {steps_seen}"
            )
            res.check(
                f"{label}: checkpoint at step {steps}",
                r["last_checkpoint_step"] == steps,
                f"latest checkpoint step {r['last_checkpoint_step']}",
            )
            res.check(
                f"{label}: on {'GPU' if cuda else 'CPU'}",
                r["device"] == ("GPU" if cuda else "CPU"),
                f"job said {r['device']}",
            )
            for marker in ("Duplicate GPU", "IndexError"):
                res.check(f"{label}: no {marker!r} in output", marker not in out)
            if cuda:
                res.check(f"{label}: FID evaluated", bool(fid), "no fid in the progress lines")
            res.note(
                f"{label}: steps {steps_seen} in {wall:.0f} s, {r['img_per_s']} img/s, checkpoint step "
                f"{r['last_checkpoint_step']}" + (f", fid {fid[-1]}" if fid else "")
            )


# ---------------------------------------------------------------------------------------------------------------------
# The parent: stack, datasets, stages in subprocesses, report


@dataclass
class Stage:
    run: Callable[[Results, dict, argparse.Namespace], None]
    needs_stack: bool
    timeout_s: tuple[int, int]  # (CUDA, CPU)
    compile_extra_s: int = 0  # more with --compile: compiling takes minutes


STAGES = {
    "env": Stage(stage_env, False, (60, 60)),
    "loader": Stage(stage_loader, True, (150, 300)),
    "models": Stage(stage_models, False, (180, 420), compile_extra_s=300),
    "ddp": Stage(stage_ddp, False, (150, 420), compile_extra_s=150),
    "fid": Stage(stage_fid, False, (120, 300)),
    "e2e": Stage(stage_e2e, True, (400, 700)),
}


def synthetic_folder(root: Path, n: int, resolution: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` RGB images in class sub-folders: smooth colour gradients, a disc and a little noise, so JPEG has real
    chroma detail to subsample and the images differ from each other."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution
    for i in range(n):
        label = i % classes
        a, b, c = rng.uniform(0, 1, 3)
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        img = np.stack([a * xx + (1 - a) * yy, b * (1 - xx) + disc * 0.5, c * yy * xx + (1 - disc) * 0.3 * label / 9])
        img = img + rng.normal(0, 0.03, img.shape)
        pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        d = root / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(d / f"{i:05d}.png")
    return root


def write_datasets(tmp: Path, bucket: str) -> dict:
    """The tiny datasets every stage reads, in the stack's S3: {name: {uri, n, format, resolution}}."""
    from orchestrator.data import fashion_mnist
    from orchestrator.data.writer import write_shards

    run = uuid.uuid4().hex[:6]
    specs = {  # name: (source, resolution, format, samples, per shard)
        "png32": (lambda: str(synthetic_folder(tmp / "png32", 320, 32)), 32, "png", 320, 80),
        "jpg64": (lambda: str(synthetic_folder(tmp / "jpg64", 1024, 64, seed=1)), 64, "jpg", 1024, 256),
    }
    try:
        fashion_mnist.find_dir()
        specs["grey32"] = (lambda: "fashion-mnist", 32, "png", 320, 80)
    except FileNotFoundError:
        pass  # the Debian package is optional here: the grey path is then not checked
    out = {}
    for name, (source, resolution, fmt, n, per_shard) in specs.items():
        uri = f"s3://{bucket}/datasets/gpu-smoke-{run}/{name}"
        manifest = write_shards(
            source(),
            uri,
            resolution=resolution,
            image_format=fmt,
            max_samples=n,
            samples_per_shard=per_shard,
            progress=False,
            workers=2,
        )
        out[name] = {
            "name": name,
            "uri": uri,
            "n": manifest.num_samples,
            "format": fmt,
            "resolution": resolution,
            "channels": manifest.channels,
            "shards": len(manifest.shards),
        }
    return out


@contextlib.contextmanager
def local_stack(root: Path) -> Iterator[object]:
    """The real local stack on free loopback ports (as tests/conftest.py starts it), its client environment
    exported for this process and every stage; torn down at the end."""
    from orchestrator.env import Env
    from orchestrator.stack import LocalStack, Ports

    env = Env.from_environ(
        {
            "AWS_ACCESS_KEY_ID": "ganforge-smoke",
            "GANFORGE_BUCKET": "ganforge",
            "AWS_SECRET_ACCESS_KEY": "smoke-secret-" + os.urandom(6).hex(),
        }
    )
    with LocalStack(root=root, env=env, ports=Ports.free(), num_cpus=4).running(
        log=lambda *a: print("  stack:", *a, flush=True)
    ) as st:
        yield st


def start_stack(teardown: contextlib.ExitStack, tmp: Path, ctx: dict, ctx_path: Path) -> dict:
    """The stack (stopped by ``teardown``) and the datasets, recorded in ``ctx`` for the stages; the setup's result."""
    t0 = time.monotonic()
    setup: dict = {"ok": False, "checks": {}, "summary": []}
    try:
        st = teardown.enter_context(local_stack(tmp / "stack"))
        ctx.update(bucket=st.env.bucket, ray_address=st.ray_gcs_address)
        ctx["datasets"] = write_datasets(tmp / "images", st.env.bucket)
        ctx_path.write_text(json.dumps(ctx))
        sizes = ", ".join(f"{k} ({v['n']}, {v['shards']} shards)" for k, v in ctx["datasets"].items())
        setup.update(ok=True, datasets=ctx["datasets"], summary=[f"stack up (S3, MLflow, Ray head); datasets {sizes}"])
    except Exception as e:
        traceback.print_exc()
        setup["error"] = f"stack or datasets failed: {type(e).__name__}: {e}"
    setup["seconds"] = round(time.monotonic() - t0, 1)
    return setup


def run_stage(name: str, args, ctx_path: Path, log_dir: Path) -> dict:
    """One stage in its own process (own session, so a timeout kills everything it started)."""
    stage = STAGES[name]
    timeout = stage.timeout_s[0 if args.device == "cuda" else 1] + (stage.compile_extra_s if args.compile else 0)
    timeout *= args.timeout_scale
    result_path, log_path = log_dir / f"{name}.json", log_dir / f"{name}.log"
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--stage",
        name,
        "--ctx",
        str(ctx_path),
        "--result",
        str(result_path),
        "--device",
        args.device,
        "--cpu-amp",
        args.cpu_amp,
        "--job-timeout",
        str(args.job_timeout),
        *(["--compile"] if args.compile else []),
    ]
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    res = json.loads(result_path.read_text()) if result_path.exists() else {"ok": False, "checks": {}, "summary": []}
    if not res.get("finished"):
        res["ok"] = False
        running = f" (in {res['running']})" if res.get("running") else ""
        if timed_out:
            res["error"] = f"timed out after {timeout:.0f} s{running}"
        else:
            res["error"] = f"exited with code {rc} before finishing{running}"
    res["seconds"] = round(time.monotonic() - t0, 1)
    lines = log_path.read_text(errors="replace").splitlines()
    if not res["ok"]:
        res["log_tail"] = lines[-40:]
    if args.log_dir is not None:
        res["log"] = str(log_path)
    return res


def child_main(args) -> int:
    """Run one stage (the ``--stage`` process): results on disk, then exit at once."""
    ctx = json.loads(Path(args.ctx).read_text())
    res = Results(Path(args.result))
    try:
        STAGES[args.stage].run(res, ctx, args)
    except Exception as e:
        traceback.print_exc()
        res.check(f"{args.stage} ran", False, f"{type(e).__name__}: {e}")
    res["ok"] = res["ok"] and bool(res["checks"])
    res["finished"] = True
    sys.stdout.flush()
    sys.stderr.flush()
    # DALI's and Ray's threads can hold up interpreter shutdown; everything is on disk already.
    os._exit(0)


def describe_machine(args) -> dict:
    import psutil

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": args.device,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_report(results: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    m = results["machine"]
    gpu = ", ".join(results.get("env", {}).get("devices", [])) or "no GPU"
    table = Table(
        title=f"gpu-smoke --device {args.device} — {gpu}; torch {m['torch']}, {m['cpus']} CPUs "
        f"({results['seconds']:.0f} s in all)"
    )
    table.add_column("stage", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    table.add_column("s", justify="right")
    table.add_column("results")
    for name, r in results.items():
        if name not in STAGES and name != "setup":
            continue
        if r.get("skipped"):
            table.add_row(name, "[dim]skipped[/]", "", r["skipped"])
            continue
        ok = "[green]ok[/]" if r.get("ok") else "[red]FAIL[/]"
        lines = list(r.get("summary", []))
        if r.get("error"):
            lines.append(f"[red]{r['error']}[/]")
        for check, passed in r.get("checks", {}).items():
            if not passed:
                why = r.get("errors", {}).get(check, "")
                lines.append(f"[red]✗ {check}[/]" + (f": {why.splitlines()[0][:120]}" if why else ""))
        table.add_row(name, ok, f"{r.get('seconds', 0):.0f}", "\n".join(lines))
    console.print(table)
    console.print(f"wrote {args.out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (what `make gpu-smoke` runs) or cpu: every stage on the CPU, to develop the script",
    )
    ap.add_argument("--quick", action="store_true", help="skip the end-to-end Ray Train stage")
    ap.add_argument("--compile", action="store_true", help="also steps with train.compile=true (torch.compile)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of: " + ", ".join(STAGES))
    ap.add_argument(
        "--cpu-amp",
        choices=("bf16", "fp32"),
        default="bf16",
        help="with --device cpu: CPU bf16 autocast standing in for CUDA's (default), or plain fp32",
    )
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every stage's timeout")
    ap.add_argument("--job-timeout", type=float, default=240.0, help="seconds for each e2e job")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--log-dir", type=Path, help="keep each stage's log and results here (default: a temp dir)")
    # the child side
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        return child_main(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built for CPU"
        print(f"gpu-smoke: no CUDA device (torch {torch.__version__}, {build}); nothing to check")
        return 0
    wanted = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    if args.quick and "e2e" in wanted:
        wanted.remove("e2e")

    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="gf-smoke-"))
    log_dir = args.log_dir or tmp / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": describe_machine(args), "args": {k: str(v) for k, v in vars(args).items()}}
    ctx: dict = {"device": args.device, "output_dir": str(tmp / "outputs")}
    ctx_path = tmp / "ctx.json"
    ctx_path.write_text(json.dumps(ctx))

    def stage(name: str) -> None:
        print(f"gpu-smoke: {name} ...", flush=True)
        results[name] = run_stage(name, args, ctx_path, log_dir)
        r = results[name]
        print(f"gpu-smoke: {name} {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.0f} s", flush=True)

    try:
        if "env" in wanted:  # first, and without the stack: a broken CUDA install shows in seconds
            stage("env")
        with contextlib.ExitStack() as teardown:
            if any(STAGES[s].needs_stack for s in wanted):
                results["setup"] = start_stack(teardown, tmp, ctx, ctx_path)
            stack_ok = results.get("setup", {}).get("ok", False)
            for name in wanted:
                if name == "env":
                    continue
                if STAGES[name].needs_stack and not stack_ok:
                    results[name] = {"ok": False, "error": "not run: the stack or datasets failed", "seconds": 0}
                    continue
                stage(name)
            if stack_ok:
                print("gpu-smoke: stopping the stack ...", flush=True)
    finally:
        if args.quick:
            results["e2e"] = {"skipped": "--quick", "ok": None}
        results["seconds"] = round(time.monotonic() - t_start, 1)
        failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
        results["ok"] = not failed
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)  # stack state, images, outputs (and the logs, unless --log-dir)
    print_report(results, args)
    return 1 if failed and args.device == "cuda" else 0


if __name__ == "__main__":
    sys.exit(main())
