"""Training-step speed of each model: the Recipe's optimised path against a plain eager fp32 step, same process.

Run with ``make bench-models`` (not collected by pytest). For every model/config one fixed real batch goes through

* **recipe** — what training runs: ``recipe.setup(device, wrap, amp=True)`` (bf16 autocast + channels_last on CUDA,
  fp32 + channels_last on CPU; ``--compile`` is ``train.compile=true``: the main passes compiled, the regularisers'
  double backward on the eager twins) and
  ``recipe.train_step`` with every phase the recipe has (StyleGAN2: Gmain with D frozen, lazy path length, Dmain,
  lazy R1, style mixing, EMA; BigGAN: D step, G step with D frozen, EMA). Lazy regularisers are amortised exactly:
  the step is timed with none / path length / both due (the recipe's step counter decides) and weighted by their
  intervals, so ``step_s`` is the mean cost of a step over a full cycle.
* **eager** — the same G and D (same initial weights) in a minimal hand-written step: one D step (logistic or hinge
  on a real and a no-grad fake batch) and one G step (which, written plainly, also computes D's unused weight
  gradients), plain ``torch.optim.Adam``, fp32, contiguous NCHW, StyleGAN2's unfused modulated conv, no EMA — what a
  plain implementation pays for the same networks. StyleGAN2's lazy R1 and path length are written plainly too and
  run in the same phases as the recipe's, so both sides do the same work.

The paths alternate (warm-up, then repeats, median) so machine noise hits both alike. Reported per config: step time
and img/s (wall), process CPU time per step (steadier than wall on a shared machine), ``speedup`` (eager / recipe)
and ``speedup_unregularised`` (the same, for steps with no regulariser due), peak
memory (CUDA: ``torch.cuda.max_memory_allocated`` during the step; CPU: peak RSS growth over one untimed step after
glibc ``malloc_trim``, psutil sampling every 5 ms), analytic FLOPs per step (the formulas of
``torch.utils.flop_counter`` for every convolution and matmul dispatched, forward and backward), achieved TFLOP/s,
and on CUDA s/kimg and MFU against ``--peak-tflops`` (H100 SXM dense bf16: 989) plus the issue's targets. CPU runs
use 1 thread by default (a demo worker's ``cpus_per_worker``). Results: ``tests/benchmarks/results/models.json``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import gan_models
from gan_models import losses, stylegan2
from gan_models.steps import count_host_reads
from orchestrator.config import build_config

ROOT = Path(__file__).resolve().parents[2]
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
except (OSError, TypeError):
    _LIBC = None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # glibc only
    _LIBC = None
RESULTS = Path(__file__).parent / "results" / "models.json"


# ---------------------------------------------------------------------------------------------------------------------
# Configs


def yaml_model(name: str) -> tuple[object, object]:
    """(model Config, HParams) of jobs/configs/<name>.yaml — the demo configuration the jobs run."""
    job = build_config(name, ROOT / "jobs" / "configs" / f"{name}.yaml")
    return job.model, job.hparams


def configs(cuda: bool) -> dict[str, dict]:
    """name → model, cfg, hp, batch (and a target on CUDA). CPU sizes keep the whole run to a few minutes."""
    bg, sg = gan_models.module("biggan"), gan_models.module("stylegan2")
    out = {
        "biggan/demo-32-ch8": dict(model="biggan", cfgs=yaml_model("biggan"), batch=32),
        "biggan/32-ch64": dict(model="biggan", cfgs=(bg.Config(resolution=32, ch=64), bg.HParams()), batch=8),
        "stylegan2/demo-32": dict(model="stylegan2", cfgs=yaml_model("stylegan2"), batch=32),
        "stylegan2/32-cbase16384-map2": dict(
            model="stylegan2",
            cfgs=(sg.Config(resolution=32, channel_base=16384, mapping_layers=2), sg.HParams()),
            batch=4,
        ),
    }
    if cuda:
        out["biggan/32-ch64"]["batch"] = 64
        out["stylegan2/32-cbase16384-map2"]["batch"] = 64
        # The H100 targets. NVlabs `--cfg=stylegan2 --cbase=16384 --map-depth=2` at 256², batch 16: R1 γ
        # from their heuristic, path length on; BigGAN-PyTorch's ImageNet 128² model (ch 96, attention at 64²).
        out["stylegan2/256-cbase16384-map2"] = dict(
            model="stylegan2",
            cfgs=(sg.Config(resolution=256, channel_base=16384, mapping_layers=2), sg.HParams()),
            batch=16,
            target=("s_per_kimg", "<=", 3.0),
        )
        out["biggan/128-ch96"] = dict(
            model="biggan",
            cfgs=(bg.Config(resolution=128, ch=96), bg.HParams()),
            batch=256,
            target=("img_per_s", ">=", 700.0),
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The plain eager baseline


class EagerStep:
    """One D step + one G step written the obvious way: fp32, plain Adam, no EMA; StyleGAN2's lazy R1 and path
    length written plainly when ``reg`` asks for them (same weights and intervals as the recipe)."""

    def __init__(self, model: str, recipe, device: torch.device):
        self.model, self.device = model, device
        # Same initial weights as the recipe (copied before its first step), own optimisers.
        self.G, self.D = copy.deepcopy(recipe.G).float(), copy.deepcopy(recipe.D).float()
        self.G.to(device, memory_format=torch.contiguous_format).train()
        self.D.to(device, memory_format=torch.contiguous_format).train()
        hp = recipe.hp
        if model == "biggan":
            self.d_loss, self.g_loss = losses.get_loss(hp.loss)
            kw = dict(betas=hp.betas, eps=hp.adam_eps)
        else:
            self.d_loss, self.g_loss = losses.logistic_d, losses.logistic_ns_g
            kw = dict(betas=hp.betas, eps=hp.eps)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=hp.g_lr, **kw)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=hp.d_lr, **kw)
        self.z_dim, self.c_dim = recipe.z_dim, recipe.c_dim
        self.hp, self.resolution, self.pl_mean = hp, recipe.cfg.resolution, torch.zeros([], device=device)

    def _G(self, z, c):
        return self.G(z, c, fused_modconv=False) if self.model == "stylegan2" else self.G(z, c)

    def _labels(self, n: int, labels: torch.Tensor) -> torch.Tensor | None:
        if not self.c_dim:
            return None
        return torch.randint(self.c_dim, (n,), device=self.device) if self.model == "biggan" else labels

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, reg: str = "none") -> None:
        images, labels = images.to(self.device), labels.to(self.device)
        n = images.shape[0]
        c_real = labels if self.c_dim else None
        c = self._labels(n, labels)
        with torch.no_grad():
            fake = self._G(torch.randn(n, self.z_dim, device=self.device), c)
        loss_d = self.d_loss(self.D(images, c_real), self.D(fake, c))
        self.opt_D.zero_grad()
        loss_d.backward()
        self.opt_D.step()
        c = self._labels(n, labels)
        loss_g = self.g_loss(self.D(self._G(torch.randn(n, self.z_dim, device=self.device), c), c))
        self.opt_G.zero_grad()
        loss_g.backward()
        self.opt_G.step()
        float(loss_g.detach())  # as the recipe's metrics do: the step is finished when its loss is known
        if "pl" in reg:
            self._path_length(n, c_real)
        if "r1" in reg:
            self._r1(images, c_real, n)

    def _path_length(self, n: int, c) -> None:
        hp = self.hp
        m = max(n // hp.pl_batch_shrink, 1)
        img, ws = self.G(
            torch.randn(m, self.z_dim, device=self.device),
            c[:m] if c is not None else None,
            fused_modconv=False,
            return_ws=True,
        )
        lengths = stylegan2.path_lengths(img, ws)
        self.pl_mean = self.pl_mean.lerp(lengths.mean().detach(), hp.pl_decay)
        self.opt_G.zero_grad()
        ((lengths - self.pl_mean).square().mean() * hp.pl_weight * hp.pl_interval).backward()
        self.opt_G.step()

    def _r1(self, images: torch.Tensor, c, n: int) -> None:
        hp = self.hp
        real = images.detach().requires_grad_(True)
        r1 = losses.r1_penalty(real, self.D(real, c))
        self.opt_D.zero_grad()
        (r1 * hp.resolved_r1_gamma(self.resolution, n) / 2 * hp.r1_interval).backward()
        self.opt_D.step()


# ---------------------------------------------------------------------------------------------------------------------
# The recipe's step, amortised over its lazy regularisers


def recipe_phases(model: str, recipe) -> list[tuple[str, int, float]]:
    """(label, recipe.step value, weight) so that Σ weight·t(step) is the mean step cost over a full lazy cycle.

    StyleGAN2 runs path length when step % pl_interval == 0 and R1 when step % r1_interval == 0 (r1_interval a
    multiple of pl_interval in NVlabs' and our defaults): t = t(none) + (t(pl) − t(none))/pl_i + (t(both) − t(pl))/r1_i.
    BigGAN (n_d D steps per G step): t = t(D only)·(n_d − 1)/n_d + t(D + G)/n_d.
    """
    hp = recipe.hp
    if model == "biggan":
        if hp.n_d == 1:
            return [("step", 0, 1.0)]
        return [("D", 0, (hp.n_d - 1) / hp.n_d), ("D+G", hp.n_d - 1, 1 / hp.n_d)]
    pl_i = hp.pl_interval if hp.pl_weight > 0 else None
    r1_i = hp.r1_interval if hp.r1_gamma != 0 else None
    if pl_i == 1 or r1_i == 1 or (pl_i and r1_i and r1_i % pl_i):
        raise ValueError("lazy regularisers: intervals must be > 1 and r1_interval a multiple of pl_interval")
    if pl_i and r1_i:
        return [("none", 1, 1 - 1 / pl_i), ("pl", pl_i, 1 / pl_i - 1 / r1_i), ("pl+r1", 0, 1 / r1_i)]
    if pl_i:
        return [("none", 1, 1 - 1 / pl_i), ("pl", 0, 1 / pl_i)]
    if r1_i:
        return [("none", 1, 1 - 1 / r1_i), ("r1", 0, 1 / r1_i)]
    return [("none", 1, 1.0)]


def run_recipe_phase(model: str, recipe, step: int, images, labels) -> None:
    """One recipe step with its step counter set to ``step``."""
    if model == "biggan":
        recipe.d_steps = step  # the G step runs when (step + 1) % n_d == 0
    else:
        recipe.step = step
    recipe.train_step(images, labels)


# ---------------------------------------------------------------------------------------------------------------------
# Measurement


class PeakRSS:
    """Peak resident set size above the RSS at entry, sampled every 5 ms on a thread (CPU memory)."""

    def __init__(self):
        self.proc = psutil.Process()
        self.peak = 0

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._top = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._top = max(self._top, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._top = max(self._top, self.proc.memory_info().rss)
        self.peak = max(self.peak, self._top - self.base)


def timed(fn: Callable[[], None], device: torch.device, mem: dict) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn(); on CUDA updates mem['peak'] (bytes) for this path."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
        mem["peak"] = max(mem.get("peak", 0), torch.cuda.max_memory_allocated())
    return time.perf_counter() - t0, time.process_time() - c0


def cpu_peak(fn: Callable[[], None], mem: dict) -> None:
    """Peak RSS growth of one untimed run of fn() after handing the allocator's free memory back to the OS (glibc
    malloc_trim), so the step's working memory shows instead of being served from pages kept by earlier steps."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with PeakRSS() as rss:
        fn()
    mem["peak"] = max(mem.get("peak", 0), rss.peak)


class FlopCount(TorchDispatchMode):
    """Analytic FLOPs of every convolution and matmul dispatched (forward and backward), from their shapes, with
    torch.utils.flop_counter's formulas. (FlopCounterMode's module tracker breaks the double backward of R1.)"""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flops_of(fn: Callable[[], None]) -> int:
    with FlopCount() as counter:
        fn()
    return counter.total


def bench_config(name: str, spec: dict, device: torch.device, args) -> dict:
    model = spec["model"]
    cfg, hp = spec["cfgs"]
    n = spec["batch"]
    torch.manual_seed(0)
    recipe = gan_models.make_recipe(model, cfg, hp)
    eager = EagerStep(model, recipe, device)  # before any step: identical starting weights
    res = cfg.resolution
    images = torch.rand(n, 3, res, res, device=device) * 2 - 1  # a fixed batch; the loader's cost is not measured
    labels = torch.randint(max(recipe.c_dim, 1), (n,), device=device)
    phases = recipe_phases(model, recipe)

    paths: dict[str, Callable[[], None]] = {}
    for label, step, _ in phases:
        paths[label] = lambda step=step: run_recipe_phase(model, recipe, step, images, labels)
        paths[f"eager/{label}"] = lambda label=label: eager(images, labels, reg=label)

    # Analytic FLOPs, counted on the uncompiled modules (the counter sees aten convolutions and matmuls, forward and
    # backward); then setup(compile=...) compiles the main passes as train.compile=true does.
    recipe.setup(device, lambda m: m, amp=True)
    flops = {k: flops_of(fn) for k, fn in paths.items()}
    if args.compile:
        recipe.setup(device, lambda m: m, amp=True, compile=True)

    t_start = time.perf_counter()
    for _ in range(args.warmup):  # after the FLOP-counting pass, which runs under a dispatch mode
        for fn in paths.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    mems: dict[str, dict] = {"eager": {}, "recipe": {}}
    for r in range(args.repeats):
        for k, fn in paths.items():
            wall, cpu_s = timed(fn, device, mems["eager" if k.startswith("eager") else "recipe"])
            times[k].append(wall)
            cpu[k].append(cpu_s)
        if r + 1 >= args.min_repeats and time.perf_counter() - t_start > args.budget_s:
            break
    if device.type != "cuda":
        for k, fn in paths.items():
            cpu_peak(fn, mems["eager" if k.startswith("eager") else "recipe"])
    reads = {}  # tensor reads into Python per phase: each is a host sync on a GPU (Adam's CPU step counters aside)
    for label, _, _ in phases:
        with count_host_reads(recipe.opt_G, recipe.opt_D) as counted:
            paths[label]()
        reads[label] = counted.count
    med = {k: statistics.median(v) for k, v in times.items()}
    step_s = sum(w * med[label] for label, _, w in phases)
    eager_s = sum(w * med[f"eager/{label}"] for label, _, w in phases)
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    eager_cpu = sum(w * med_cpu[f"eager/{label}"] for label, _, w in phases)
    first = phases[0][0]  # the phase with no lazy regulariser due
    step_cpu = sum(w * med_cpu[label] for label, _, w in phases)
    row = {
        "batch": n,
        "step_s": round(step_s, 5),
        "img_per_s": round(n / step_s, 2),
        "eager_step_s": round(eager_s, 5),
        "eager_img_per_s": round(n / eager_s, 2),
        "speedup": round(eager_s / step_s, 3),
        # The recipe's step when no lazy regulariser is due against the bare eager step: same work, so this isolates
        # implementation speed from the regularisers' (real, extra) cost.
        "speedup_unregularised": round(med[f"eager/{first}"] / med[first], 3),
        # Process CPU seconds (all threads): on a shared CPU machine, less sensitive to other load than wall time.
        "step_cpu_s": round(step_cpu, 5),
        "eager_cpu_s": round(eager_cpu, 5),
        "cpu_speedup": round(eager_cpu / step_cpu, 3),
        "host_syncs_per_step": round(sum(w * reads[label] for label, _, w in phases), 2),
        "peak_mem_mb": round(mems["recipe"]["peak"] / 2**20, 1),
        "eager_peak_mem_mb": round(mems["eager"]["peak"] / 2**20, 1),
        "mem_kind": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS growth over one step after malloc_trim (psutil, 5 ms sampling)",
        "device": describe(device),
        "repeats": len(times[first]),
        "phase_s": {k: round(v, 5) for k, v in med.items()},
        "phase_weights": {label: round(w, 5) for label, _, w in phases},
        "params_G": sum(p.numel() for p in recipe.G.parameters()),
        "params_D": sum(p.numel() for p in recipe.D.parameters()),
        "config": {k: v for k, v in vars(cfg).items() if not k.startswith("_")},
        "recipe": recipe_summary(model, hp, res, n),
    }
    if flops:
        step_flops = sum(w * flops[label] for label, _, w in phases)
        row["gflop_per_step"] = round(step_flops / 1e9, 3)
        eager_flops = sum(w * flops[f"eager/{label}"] for label, _, w in phases)
        row["eager_gflop_per_step"] = round(eager_flops / 1e9, 3)
        row["tflop_per_s"] = round(step_flops / step_s / 1e12, 4)
        row["eager_tflop_per_s"] = round(eager_flops / eager_s / 1e12, 4)
    if device.type == "cuda":
        row["s_per_kimg"] = round(1000 * step_s / n, 3)
        row["eager_s_per_kimg"] = round(1000 * eager_s / n, 3)
        if flops:
            row["mfu"] = round(row["tflop_per_s"] / args.peak_tflops, 4)
            row["eager_mfu"] = round(row["eager_tflop_per_s"] / args.peak_tflops, 4)
        if "target" in spec:
            key, op, value = spec["target"]
            row["target"] = f"{key} {op} {value}"
            row["meets_target"] = row[key] <= value if op == "<=" else row[key] >= value
    return row


def recipe_summary(model: str, hp, res: int, batch: int) -> str:
    if model == "biggan":
        return f"{hp.loss}, n_d {hp.n_d}, EMA"
    parts = ["logistic"]
    if hp.pl_weight > 0:
        parts.append(f"path length w{hp.pl_weight:g}/{hp.pl_interval}")
    gamma = hp.resolved_r1_gamma(res, batch)
    if gamma > 0:
        parts.append(f"R1 γ{gamma:.3g}/{hp.r1_interval}")
    parts.append(f"mixing {hp.style_mixing_prob:g}, EMA")
    if hp.augment != "none":
        parts.append(hp.augment)
    return ", ".join(parts)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of config names to run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: a demo worker's cpus_per_worker; on a shared 2-core machine "
        "2 threads mostly measure the neighbours)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile G and D (the recipe's wrap)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each path before timing")
    ap.add_argument("--repeats", type=int, default=7, help="at most this many timed repeats per path")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop repeating a config after this long")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100 SXM: 989)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    console = Console(width=max(Console().width, 180))
    wanted = [s for s in args.only.split(",") if s]
    results: dict[str, dict] = {}
    for name, spec in configs(cuda).items():
        if wanted and not any(w in name for w in wanted):
            continue
        t0 = time.perf_counter()
        try:
            results[name] = bench_config(name, spec, device, args)
        except Exception as e:  # e.g. a compile failure: record it and go on with the other configs
            results[name] = {"batch": spec["batch"], "device": describe(device), "error": f"{type(e).__name__}: {e}"}
        r = results[name]
        console.print(
            f"{name}: {json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)})} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        if cuda:
            torch.cuda.empty_cache()

    mode = "bf16 autocast + channels_last" if cuda else "fp32"
    table = Table(
        title=f"training step, recipe ({mode}{', compiled' if args.compile else ''}) vs plain eager fp32 "
        f"— {describe(device)}"
    )
    for col in (
        "model/config",
        "batch",
        "step s",
        "img/s",
        "eager s",
        "eager img/s",
        "speedup",
        "unreg. speedup",
        "syncs/step",
        "peak MB",
        "eager MB",
        "GFLOP/step",
        "TFLOP/s",
    ):
        table.add_column(col, justify="left" if col == "model/config" else "right", no_wrap=col == "model/config")
    if not cuda:
        for col in ("CPU s", "eager CPU s", "CPU speedup"):
            table.add_column(col, justify="right")
    if cuda:
        table.add_column("s/kimg", justify="right")
        table.add_column("MFU", justify="right")
        table.add_column("target", justify="right")
    for name, r in results.items():
        if "error" in r:
            table.add_row(name, str(r["batch"]), r["error"][:80])
            continue
        cells = [
            name,
            str(r["batch"]),
            f"{r['step_s']:.4f}",
            f"{r['img_per_s']:,.1f}",
            f"{r['eager_step_s']:.4f}",
            f"{r['eager_img_per_s']:,.1f}",
            f"{r['speedup']:.2f}×",
            f"{r['speedup_unregularised']:.2f}×",
            f"{r.get('host_syncs_per_step', float('nan')):.2f}",
            f"{r['peak_mem_mb']:,.0f}",
            f"{r['eager_peak_mem_mb']:,.0f}",
            f"{r.get('gflop_per_step', float('nan')):,.1f}",
            f"{r.get('tflop_per_s', float('nan')):.4f}",
        ]
        if not cuda:
            cells += [f"{r['step_cpu_s']:.4f}", f"{r['eager_cpu_s']:.4f}", f"{r['cpu_speedup']:.2f}×"]
        if cuda:
            ok = {True: "met", False: "MISSED"}.get(r.get("meets_target"), "")
            cells += [f"{r['s_per_kimg']:.3f}", f"{r.get('mfu', float('nan')):.1%}", f"{r.get('target', '')} {ok}"]
        table.add_row(*cells)
    console.print(table)
    console.print(
        "step s: recipe step amortised over its lazy regularisers (+ EMA); eager: plain D + G step with the same lazy "
        "regularisers written plainly, no EMA; speedup = eager / recipe; unreg. speedup: the same on steps with no "
        "regulariser due; "
        "median of interleaved repeats; CPU s: process CPU time (all threads), steadier than wall time on a shared "
        "machine"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() and wanted else {}
    args.out.write_text(json.dumps({**previous, **results}, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
