"""What would break the first GPU run, reproduced on the CPU (GPU_REVIEW.md): bf16 autocast on the CPU stands in for
CUDA's, gloo DDP (world 1, the reducer logic is NCCL's) for multi-GPU training, a tensor that reports a CUDA device for
a checkpoint loaded onto the GPU, and a counter of tensor reads into Python for the host syncs of a GPU step."""

from __future__ import annotations

import math
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_models import biggan, stylegan2
from gan_models.steps import count_host_reads, load_optimizer_state, read_metrics
from orchestrator.train import checkpoint as ckpt

BIGGAN = dict(resolution=32, ch=4, dim_z=16, shared_dim=8, n_classes=3, attn="16")
STYLEGAN2 = dict(resolution=16, channel_base=128, channel_max=8, mapping_layers=2, z_dim=8, w_dim=8, c_dim=3)


def make(model: str, wrap=lambda m: m, **hp):
    torch.manual_seed(0)
    if model == "biggan":
        recipe = biggan.Recipe(biggan.Config(**BIGGAN), biggan.HParams(**{"n_d": 1, **hp}))
    else:
        recipe = stylegan2.Recipe(stylegan2.Config(**STYLEGAN2), stylegan2.HParams(**hp))
    recipe.setup(torch.device("cpu"), wrap)
    return recipe


def batch(model: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    res, n = (32, 4) if model == "biggan" else (16, 8)
    return torch.rand(n, 3, res, res, generator=g) * 2 - 1, torch.randint(3, (n,), generator=g)


def weights(recipe) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{n}": t.detach().clone() for k in ("G", "D", "G_ema") for n, t in getattr(recipe, k).state_dict().items()
    }


# ---------------------------------------------------------------------------------------------- 1. bf16 autocast
def test_stylegan2_path_length_regularisation_trains_under_bf16_autocast():
    """The mapping ran in bf16, so ws and the path lengths were bf16, and pl_mean.lerp(bf16) raised at step 0."""
    recipe = make("stylegan2", pl_interval=2, style_mixing_prob=0.9)
    recipe.amp = True  # what setup(amp=True) sets on a GPU: the recipes autocast on their device's type
    for i in range(3):
        m = read_metrics(recipe.train_step(*batch("stylegan2", i)))
        assert all(math.isfinite(v) for v in m.values()), m
    assert "loss/pl" in m or recipe.step % 2 == 1
    assert recipe.pl_mean.dtype == torch.float32 and float(recipe.pl_mean) > 0
    z = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, ws = recipe.G(z, torch.arange(4) % 3, return_ws=True)
    assert ws.dtype == torch.float32 and torch.isfinite(img).all()  # the mapping stays fp32 (as NVlabs')


def test_biggan_trains_under_bf16_autocast_with_every_penalty():
    recipe = make("biggan", r1_gamma=1.0, loss="wgan")
    recipe.amp = True
    for i in range(2):
        m = read_metrics(recipe.train_step(*batch("biggan", i)))
    assert {"loss/gp", "loss/r1"} <= set(m) and all(math.isfinite(v) for v in m.values()), m


# ------------------------------------------------------------------------------------------ 2. every loss under DDP
@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


CASES = [
    ("biggan", {}),
    ("biggan", {"r1_gamma": 1.0}),
    ("biggan", {"loss": "wgan"}),
    ("biggan", {"loss": "logistic", "r1_gamma": 1.0}),
    ("stylegan2", {}),
    ("stylegan2", {"loss": "wgan"}),
    ("stylegan2", {"noise_mode": "none"}),
    ("stylegan2", {"loss": "hinge", "noise_mode": "none", "pl_weight": 0.0}),
]


@pytest.mark.parametrize(
    "model,hp", CASES, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in h.items()) or 'defaults'}" for m, h in CASES]
)
def test_every_loss_option_trains_under_ddp_exactly_as_one_process(process_group, model, hp):
    """DDP (find_unused_parameters=False, as Ray's prepare_model builds it) needs a gradient for every parameter in
    every synchronised backward: penalties on ∇ₓD never reach D's output bias, noise_mode=none never uses the noise
    strengths. Before the fix the second step raised "Expected to have finished reduction"."""
    hp = {"r1_interval": 1, "pl_interval": 1, **hp} if model == "stylegan2" else hp
    plain, wrapped = make(model, **hp), make(model, wrap=lambda m: DDP(m), **hp)
    for recipe in (plain, wrapped):
        torch.manual_seed(5)
        for i in range(3):
            m = read_metrics(recipe.train_step(*batch(model, i)))
            assert all(math.isfinite(v) for v in m.values()), m
    a, b = weights(plain), weights(wrapped)
    for key in a:  # world 1: DDP's averaging is the identity, so the updates are the same to the bit
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    first = "G." + next(iter(plain.G.state_dict()))
    assert not torch.equal(a[first], weights(make(model, **hp))[first])  # and training did move G


# ---------------------------------------------------------------------------- 3. CUDA RNG: this worker's device only
class FakeCuda:
    """torch.cuda of a node with ``count`` visible GPUs whose worker runs on ``current``."""

    def __init__(self, count: int, current: int):
        self.count, self.current = count, current
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device=None: self.states[self._index(device)].clone())
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(self.count)])
        monkeypatch.setattr(cuda, "set_rng_state", self._set)
        monkeypatch.setattr(cuda, "set_rng_state_all", lambda states: [self._set(s, i) for i, s in enumerate(states)])

    def _index(self, device) -> int:
        if device is None or device == "cuda":
            i = self.current
        else:
            i = device if isinstance(device, int) else torch.device(device).index
        if i >= self.count:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[i]
        return i

    def _set(self, state, device=None) -> None:
        self.states[self._index(device)] = state.clone()


def test_a_checkpoint_from_a_bigger_gpu_node_restores_this_workers_cuda_rng_on_a_smaller_one(monkeypatch):
    big = FakeCuda(count=8, current=5)  # local rank 5 of an 8-GPU node
    big.install(monkeypatch)
    saved = ckpt.rng_state()
    small = FakeCuda(count=1, current=0)  # the same rank restarted alone on a 1-GPU node
    small.install(monkeypatch)
    ckpt.set_rng_state(saved)  # before the fix: IndexError (a state for each of the 8 GPUs)
    assert torch.equal(small.states[0], big.states[5])  # its own stream continues, not GPU 0's of the old node


def test_a_checkpoint_with_one_state_per_visible_gpu_still_restores(monkeypatch):
    old = FakeCuda(count=2, current=1)
    old.install(monkeypatch)
    saved = {**ckpt.rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # the earlier format
    now = FakeCuda(count=2, current=1)
    now.install(monkeypatch)
    now.states[1] = torch.zeros(16, dtype=torch.uint8)
    ckpt.set_rng_state(saved)
    assert torch.equal(now.states[1], old.states[1])


# --------------------------------------------------------------------------- 4. Adam's step stays on the CPU
class OnCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: what torch.load(map_location=cuda) gives a step counter."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("model", ["biggan", "stylegan2"])
def test_resumed_optimisers_keep_adams_step_counters_on_the_cpu(model):
    recipe = make(model)
    recipe.train_step(*batch(model))
    state = recipe.state_dict()
    saved = [float(st["step"]) for opt in ("opt_G", "opt_D") for st in state[opt]["state"].values()]
    for opt in ("opt_G", "opt_D"):
        for st in state[opt]["state"].values():
            st["step"] = st["step"].as_subclass(OnCuda)
    resumed = make(model)
    resumed.load_state_dict(state)
    steps = [st["step"] for opt in (resumed.opt_G, resumed.opt_D) for st in opt.state.values()]
    assert steps and all(type(s) is torch.Tensor and s.device.type == "cpu" for s in steps)
    assert [float(s) for s in steps] == saved


def test_load_optimizer_state_leaves_fused_and_capturable_steps_where_they_are():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], fused=True)
    w.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()
    state["state"][0]["step"] = state["state"][0]["step"].as_subclass(OnCuda)
    load_optimizer_state(opt, state)
    assert type(opt.state[w]["step"]) is OnCuda


# ------------------------------------------------------------------------------ 6. host syncs per training step
@pytest.mark.parametrize(
    "model,hp,expected",
    [
        ("biggan", {}, [2, 2, 2]),  # the finite checks of the D and the G step
        ("biggan", {"r1_gamma": 1.0, "loss": "wgan", "n_d": 2}, [1, 2, 1]),  # G every second step
        # Gmain, Dmain every step; Greg and Dreg on their intervals (0, 2, …); ADA's p update every 2 steps reads 2
        ("stylegan2", {"pl_interval": 2, "r1_interval": 2, "augment": "ada", "ada_interval": 2}, [4, 2 + 2, 4]),
    ],
)
def test_a_training_step_reads_the_device_only_for_its_finite_checks(model, hp, expected):
    """Every step metric stays a device tensor (the loop reads a tick's worth at once): a GPU step waits for the host
    only where it must decide something, whether an optimiser step is finite (and ADA's p, once per interval)."""
    recipe = make(model, **hp)
    counts = []
    for i in range(3):
        with count_host_reads(recipe.opt_G, recipe.opt_D) as reads:
            metrics = recipe.train_step(*batch(model, i))
        counts.append(reads.count)
        assert any(isinstance(v, torch.Tensor) for v in metrics.values())
    assert counts == expected


def test_count_host_reads_counts_each_kind_and_restores_torch():
    t = torch.tensor([1.5, 2.0])
    with count_host_reads() as reads:
        reads_line = sys._getframe().f_lineno + 1
        float(t[0]), t[1].item(), bool(t[0] > 0), int(t[1]), t.tolist()
    assert dict(reads.kinds) == {"__float__": 1, "item": 1, "__bool__": 1, "__int__": 1, "tolist": 1}
    assert list(reads.sites) == [f"{__file__}:{reads_line}"] and reads.sites.total() == 5
    with count_host_reads() as again:
        torch.testing.assert_close(t, t)  # torch's own Python code reads values too: on a GPU those sync as well
    float(t[0])
    assert again.count > 0 and "item" not in torch.Tensor.__dict__  # inherited again, as before
