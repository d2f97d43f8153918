"""BigGAN: parity with BigGAN-PyTorch's parameter counts, shapes, spectral norm, the training recipe."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import parametrize

import gan_models
from gan_models import biggan, layers, losses
from gan_models.protocol import Recipe as RecipeProtocol
from gan_models.steps import read_metrics

# A tiny model with attention in G (16²) and in every D block (BigGAN-PyTorch labels all 32² D blocks '16').
TINY = dict(resolution=32, ch=4, dim_z=16, shared_dim=8, n_classes=3, attn="16")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def identity(m: nn.Module) -> nn.Module:
    return m


# Expected counts come from instantiating BigGAN-PyTorch itself (github.com/ajbrock/BigGAN-PyTorch at the commit
# fetched 2026-11; its code is not in this repo). How: `git archive HEAD | tar -x -C /tmp/biggan-ref`, then with
# /tmp/biggan-ref on sys.path, `import BigGAN` and for each row below
#   G = BigGAN.Generator(**kw, skip_init=True, no_optim=True); D = BigGAN.Discriminator(**kw, skip_init=True)
#   sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())
# (the count its train.py prints as "Number of params in G: {} D: {}"; SN's u/sv are buffers, not counted), where kw
# is resolution, G_ch=D_ch=ch, dim_z, shared_dim, G_shared, hier, G_attn=D_attn, n_classes as in the comment:
PARITY = [
    # 32, ch 64, shared + hier, dim_z 128, shared_dim 128, attn '0', 10 classes
    (dict(resolution=32, ch=64), 4_373_251, 4_207_361),
    # its CIFAR script (launch_cifar_ema.sh): G_shared=False, hier=False, shared_dim=0, dim_z 128, attn '0'
    (dict(resolution=32, ch=64, g_shared=False, hier=False, init="N02"), 4_304_387, 4_207_361),
    # 64, ch 64, dim_z 128 (→125 with hier), shared_dim 128, attn '32', 1000 classes
    (dict(resolution=64), 31_995_396, 20_571_842),
    # 128, ch 96, dim_z 120, shared_dim 128, attn '64', 1000 classes (launch_BigGAN_bs256x8.sh) — the paper's model
    (dict(resolution=128, ch=96, n_classes=1000), 70_433_988, 87_982_370),
    # 256, ch 96, dim_z 140, shared_dim 128, attn '128', 1000 classes (TFHub converter's config)
    (dict(resolution=256), 82_097_604, 99_191_330),
    # 512, ch 96, dim_z 128, attn '64': G only; BigGAN.py has no 512² D (ours follows the paper's table)
    (dict(resolution=512), 82_296_804, None),
]


@pytest.mark.parametrize(("kw", "g_count", "d_count"), PARITY, ids=lambda v: str(v) if isinstance(v, int) else None)
def test_param_counts_match_biggan_pytorch(kw, g_count, d_count):
    with torch.device("meta"):  # construction only: skips the orthogonal inits' QR on real memory
        G, D = gan_models.build("biggan", **kw)
    assert n_params(G) == g_count
    if d_count is not None:
        assert n_params(D) == d_count


def test_defaults_follow_the_paper_per_resolution():
    c = biggan.Config(resolution=128)
    assert (c.ch, c.g_ch, c.d_ch, c.dim_z, c.shared_dim, c.n_classes, c.c_dim, c.attn) == (
        96,
        96,
        96,
        120,
        128,
        1000,
        1000,
        "64",
    )
    assert (c.hier, c.g_shared) == (True, True)
    assert biggan.Config(resolution=64).dim_z == 125  # rounded down to 5 z chunks, as BigGAN-PyTorch does
    assert biggan.Config(resolution=256).dim_z == 140
    assert biggan.Config(resolution=128, attn=32).attn_resolutions == {32}
    assert biggan.Config(**dataclasses.asdict(c)) == c  # resolved configs round-trip (checkpoints, MLflow params)


@pytest.mark.parametrize("res", biggan.RESOLUTIONS)
def test_shapes_and_range(res):
    torch.manual_seed(0)
    # ch 8: attention needs ≥ 8 channels; at 256² attention at 32² (128²'s 16k×4k map is slow on a CPU)
    G, D = biggan.build(biggan.Config(resolution=res, ch=8, n_classes=5, attn="32" if res == 256 else None))
    assert (G.z_dim, G.c_dim) == (biggan.Config(resolution=res).dim_z, 5)
    z, c = torch.randn(2, G.z_dim), torch.tensor([0, 4])
    x = G(z, c)
    assert x.shape == (2, 3, res, res)
    assert x.abs().max() <= 1
    assert D(x, c).shape == (2,)


def test_projection_discriminator_uses_the_class():
    torch.manual_seed(0)
    _, D = biggan.build(biggan.Config(**TINY))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(D(x, torch.tensor([0, 0])), D(x, torch.tensor([1, 1])))


def test_spectral_norm_everywhere_and_sigma_one():
    torch.manual_seed(0)
    # N(0, 0.02) init: unlike orthogonal init, its singular values spread, so σ≈1 needs SN's power iteration.
    G, D = biggan.build(biggan.Config(**{**TINY, "init": "N02"}))
    for m in (G, D):
        layers_ = [x for x in m.modules() if isinstance(x, nn.Conv2d | nn.Linear | nn.Embedding)]
        plain = [x for x in layers_ if not parametrize.is_parametrized(x, "weight")]
        assert plain == ([G.shared] if m is G else [])
    c = torch.tensor([0, 1, 2, 0])
    for _ in range(10):
        D(G(torch.randn(4, G.z_dim), c), c)
    G.eval()
    D.eval()  # read the normalised weights without another power iteration
    for m in (G, D):
        for x in m.modules():
            if parametrize.is_parametrized(x, "weight"):
                sigma = torch.linalg.matrix_norm(x.weight.detach().flatten(1), ord=2)
                assert sigma == pytest.approx(1.0, abs=0.05), x  # 1 power iteration per pass converges slowly
                raw = torch.linalg.matrix_norm(x.parametrizations.weight.original.detach().flatten(1), ord=2)
                assert raw != pytest.approx(1.0, abs=0.1)  # so the check above is SN's doing


def test_hinge_losses_on_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 → 0.25; fake: relu(1-2)=0, relu(1+0)=1 → 0.5
    assert losses.hinge_d(real, fake).item() == pytest.approx(0.75)
    assert losses.hinge_g(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_ortho_reg_gradient_matches_autograd():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    layers.ortho_penalty([w]).mul(1e-2).backward()
    expected = w.grad.clone()
    w.grad = torch.zeros_like(w)
    layers.ortho_reg_([w], 1e-2)
    torch.testing.assert_close(w.grad, expected)
    q = nn.init.orthogonal_(torch.empty(4, 9))
    assert layers.ortho_penalty([q]).item() == pytest.approx(0.0, abs=1e-10)


def make_recipe(seed: int, wrap=identity, accumulate: int = 1, **hp) -> biggan.Recipe:
    torch.manual_seed(seed)
    hparams = biggan.HParams(**{"n_d": 2, "ema_start": 2, "g_ortho": 1e-4, **hp})
    r = biggan.Recipe(biggan.Config(**TINY), hparams)
    r.setup(torch.device("cpu"), wrap, accumulate=accumulate)
    return r


def batch(seed: int = 1, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(3, (n,), generator=g)


def snapshot(r: biggan.Recipe) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": t.detach().clone() for k in ("G", "D", "G_ema") for n, t in getattr(r, k).state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_recipe_is_a_recipe_and_steps():
    r = make_recipe(0, n_d=2)
    assert isinstance(r, RecipeProtocol)
    assert (r.z_dim, r.c_dim) == (16, 3)
    before = snapshot(r)
    m1 = read_metrics(r.train_step(*batch()))
    d_keys = {"loss/D", "D/real", "D/fake", "health/D_sign_acc", "health/grad_norm_D", "health/nonfinite"}
    assert set(m1) == d_keys and all(isinstance(v, float) for v in m1.values())
    assert m1["health/nonfinite"] == 0.0 and m1["health/grad_norm_D"] > 0 and 0 <= m1["health/D_sign_acc"] <= 1
    after_d = snapshot(r)
    assert not torch.equal(before["D.linear.bias"], after_d["D.linear.bias"])
    assert torch.equal(before["G.linear.bias"], after_d["G.linear.bias"])  # n_d=2: no G step yet
    m2 = read_metrics(r.train_step(*batch()))
    assert (r.d_steps, r.g_steps) == (2, 1) and set(m2) == d_keys | {"loss/G", "health/grad_norm_G"}
    assert not torch.equal(after_d["G.linear.bias"], r.G.linear.bias)
    torch.testing.assert_close(r.G_ema.linear.bias, r.G.linear.bias, rtol=0, atol=0)  # before ema_start: a copy
    r.train_step(*batch())
    r.train_step(*batch())  # 2nd G step ≥ ema_start: the average lags G
    assert not torch.equal(r.G_ema.linear.bias, r.G.linear.bias)
    assert all(p.grad is None for p in r.D.parameters())  # G step threw D's grads away


def test_deterministic_under_a_seed():
    runs = []
    for _ in range(2):
        r = make_recipe(0, n_d=1)
        for i in range(3):
            r.train_step(*batch(i))
        runs.append(snapshot(r))
    assert_same(*runs)


def test_state_dict_round_trip_continues_identically():
    a = make_recipe(0)
    for i in range(3):
        a.train_step(*batch(i))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = make_recipe(123)  # different weights until loaded
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    torch.manual_seed(7)
    ma = read_metrics(a.train_step(*batch(3)))
    torch.manual_seed(7)
    mb = read_metrics(b.train_step(*batch(3)))
    assert ma == mb
    assert_same(snapshot(a), snapshot(b))
    assert a.opt_G.state_dict()["state"].keys() == b.opt_G.state_dict()["state"].keys()


def test_a_checkpoint_loads_before_or_after_setup_alike():
    a = make_recipe(0)
    for i in range(3):
        a.train_step(*batch(i))
    a.set_lr_scale(0.5)
    torch.manual_seed(1)
    early = biggan.Recipe(biggan.Config(**TINY), a.hp)  # other weights; loaded before setup
    early.load_state_dict(copy.deepcopy(a.state_dict()))  # own copies: Adam keeps the tensors it is given
    early.setup(torch.device("cpu"), identity)
    late = make_recipe(2)
    late.load_state_dict(copy.deepcopy(a.state_dict()))
    for r in (early, late):
        torch.manual_seed(7)
        r.train_step(*batch(3))  # the 4th D step runs G too (n_d=2)
    assert_same(snapshot(early), snapshot(late))
    assert early.lr_scale.scale == late.lr_scale.scale == 0.5 and early.g_steps == late.g_steps == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_matches_unwrapped():
    plain = make_recipe(0, n_d=1)
    for i in range(2):
        plain.train_step(*batch(i))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = make_recipe(0, wrap=lambda m: DDP(m), n_d=1)
        for i in range(2):
            ddp.train_step(*batch(i))
    finally:
        dist.destroy_process_group()
    assert_same(snapshot(plain), snapshot(ddp))


def test_truncated_latents_and_samples():
    r = make_recipe(0)
    z = r.latents(512, torch.Generator().manual_seed(0), truncation=0.5)
    assert z.shape == (512, 16) and z.abs().max() <= 0.5
    assert r.latents(512, torch.Generator().manual_seed(0)).abs().max() > 0.5
    torch.testing.assert_close(z, r.latents(512, torch.Generator().manual_seed(0), truncation=0.5))
    x = r.sample(z[:6], torch.tensor([0, 1, 2, 0, 1, 2]))
    assert x.shape == (6, 3, 32, 32) and x.abs().max() <= 1 and not r.G_ema.training
    with pytest.raises(ValueError, match="truncation -1"):
        r.latents(2, torch.Generator(), truncation=-1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(resolution=48), "resolution 48 not supported; valid: 32, 64, 128, 256, 512"),
        (dict(resolution=32, attn="64"), "attn '64' not supported at 32²; valid: '_'-separated from 0, 8, 16, 32"),
        (dict(resolution=32, attn="sixteen"), "attn 'sixteen' not supported"),
        (dict(resolution=32, ch=0), "ch 0 not supported; valid: a positive integer"),
        (dict(resolution=32, n_classes=-1), "n_classes -1 not supported"),
        (dict(resolution=32, init="kaiming"), "init 'kaiming' not supported; valid: ortho, N02, xavier"),
        (dict(resolution=32, g_shared=False), "hier=True needs g_shared=True"),
        (dict(resolution=128, dim_z=3), "dim_z 3 too small"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        biggan.Config(**kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [(dict(n_d=0), "n_d 0 not supported"), (dict(loss="l2"), "unknown loss 'l2'"), (dict(g_lr=0), "g_lr 0")],
)
def test_bad_hparams_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        biggan.HParams(**kw)


def test_unknown_config_key_via_registry():
    with pytest.raises(ValueError, match="unknown biggan config key"):
        gan_models.config("biggan", G_ch=64)


def test_state_dict_is_copyable_and_holds_counters():
    r = make_recipe(0)
    r.train_step(*batch())
    s = copy.deepcopy(r.state_dict())
    assert (s["d_steps"], s["g_steps"]) == (1, 0)
    assert s["config"]["resolution"] == 32


def d_state(r: biggan.Recipe) -> dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot(r).items() if k.startswith("D.")}


@pytest.mark.parametrize("hp", [{}, {"loss": "wgan"}, {"r1_gamma": 1.0}], ids=["hinge", "wgan-gp", "r1"])
def test_accumulated_d_update_equals_the_full_batch(hp):
    """2 and 4 micro-batches of 8 give the full batch's D update (fakes come from one pass, one SN iteration)."""
    results = []
    for k in (1, 2, 4):
        r = make_recipe(0, accumulate=k, n_d=2, **hp)  # n_d=2: the first step updates D only
        torch.manual_seed(5)
        m = read_metrics(r.train_step(*batch(1, n=8)))
        results.append((d_state(r), m))
    (full, m_full), *rest = results
    for state, m in rest:
        for key in full:
            torch.testing.assert_close(state[key], full[key], rtol=1e-5, atol=1e-6, msg=key)
        assert m["loss/D"] == pytest.approx(m_full["loss/D"], rel=1e-5)
        assert m["health/grad_norm_D"] == pytest.approx(m_full["health/grad_norm_D"], rel=1e-4)


def test_accumulation_under_ddp_matches_one_process():
    plain = make_recipe(0, accumulate=2, n_d=1)
    for i in range(2):
        torch.manual_seed(i)
        plain.train_step(*batch(i, n=8))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = make_recipe(0, wrap=lambda m: DDP(m), accumulate=2, n_d=1)
        for i in range(2):
            torch.manual_seed(i)
            ddp.train_step(*batch(i, n=8))
    finally:
        dist.destroy_process_group()
    assert_same(snapshot(plain), snapshot(ddp))
    with pytest.raises(ValueError, match="batch of 6 cannot be split into 4 equal micro-batches"):
        make_recipe(0, accumulate=4).train_step(*batch(1, n=6))


def test_losses_as_options():
    images, labels = batch(1, n=8)
    values = {}
    for loss in ("hinge", "logistic", "wgan"):
        r = make_recipe(0, loss=loss, n_d=1)
        torch.manual_seed(3)
        values[loss] = read_metrics(r.train_step(images, labels))
    assert values["wgan"]["loss/gp"] > 0 and "loss/gp" not in values["hinge"]
    # same weights and fakes: the losses differ exactly as their formulas do
    real, fake = values["hinge"]["D/real"], values["hinge"]["D/fake"]
    assert values["logistic"]["D/real"] == pytest.approx(real) and values["wgan"]["D/fake"] == pytest.approx(fake)
    assert values["wgan"]["loss/D"] == pytest.approx(fake - real, abs=1e-6)
    assert biggan.HParams(loss="wgan").resolved_gp_weight == 10.0 and biggan.HParams().resolved_gp_weight == 0.0
    r1 = read_metrics(make_recipe(0, r1_gamma=10.0).train_step(images, labels))
    assert r1["loss/r1"] > 0
    with pytest.raises(ValueError, match="gp_weight -1"):
        biggan.HParams(gp_weight=-1)


def test_nonfinite_gradients_skip_the_step_and_raise_the_flag():
    r = make_recipe(0, n_d=1)
    before = snapshot(r)
    images, labels = batch(1)
    images[0, 0, 0, 0] = float("nan")
    m = read_metrics(r.train_step(images, labels))
    assert m["health/nonfinite"] == 1.0 and not math.isfinite(m["health/grad_norm_D"])
    after = snapshot(r)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("D.") and "parametrizations" not in k)
    assert read_metrics(r.train_step(*batch(2)))["health/nonfinite"] == 0.0  # the next clean batch trains normally


def test_lr_scale_and_its_checkpoint():
    r = make_recipe(0)
    assert r.base_lrs() == {"G": 1e-4, "D": 4e-4}
    r.set_lr_scale(0.25)
    assert r.opt_G.param_groups[0]["lr"] == pytest.approx(2.5e-5) and r.opt_D.param_groups[0]["lr"] == 1e-4
    b = make_recipe(1)
    b.load_state_dict(r.state_dict())
    assert b.lr_scale.scale == 0.25 and b.opt_D.param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="learning-rate scale 0"):
        r.set_lr_scale(0)
