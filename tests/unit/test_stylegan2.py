"""StyleGAN2 networks, ops and training recipe (CPU, small configs except construction-only parity checks)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gan_models
from gan_models import losses
from gan_models.steps import read_metrics
from gan_models.stylegan2 import Config, HParams, Recipe, num_params, path_lengths
from gan_models.stylegan2.ops import (
    FullyConnectedLayer,
    MinibatchStdLayer,
    conv2d_resample,
    downsample2d,
    modulated_conv2d,
    setup_filter,
    upfirdn2d,
    upsample2d,
)

# ---------------------------------------------------------------------------------------------------------------------
# Parameter parity with NVlabs


def nvlabs_param_count(res, cbase, cmax=512, map_depth=8, c_dim=0, z_dim=512, w_dim=512, img_ch=3, d_map_depth=8):
    """(G, D) trainable parameter counts from NVlabs' channel formula ch(r) = min(cbase // r, cmax) and layer list
    (training/networks.py of stylegan2-ada-pytorch; buffers such as w_avg, noise_const and filters excluded)."""

    def ch(r):
        return min(cbase // r, cmax)

    def fc(i, o):
        return i * o + o

    embed = w_dim if c_dim else 0
    g = (fc(c_dim, embed) if c_dim else 0) + fc(z_dim + embed, w_dim) + (map_depth - 1) * fc(w_dim, w_dim)
    r = 4
    while r <= res:
        out = ch(r)
        if r == 4:
            g += out * 16  # const input
            convs = [(out, out)]
        else:
            convs = [(ch(r // 2), out), (out, out)]
        for i, o in convs:  # affine + 3×3 weight + noise strength + bias
            g += fc(w_dim, i) + o * i * 9 + 1 + o
        g += fc(w_dim, out) + img_ch * out + img_ch  # toRGB: affine + 1×1 weight + bias
        r *= 2

    d = 0
    r = res
    while r >= 8:
        tmp, out = ch(r), ch(r // 2)
        if r == res:
            d += img_ch * tmp + tmp  # fromrgb
        d += tmp * tmp * 9 + tmp + out * tmp * 9 + out + out * tmp  # conv0, conv1, skip (no bias)
        r //= 2
    c4 = ch(4)
    cmap = c4 if c_dim else 0
    d += (c4 + 1) * c4 * 9 + c4 + fc(c4 * 16, c4) + fc(c4, cmap or 1)  # epilogue: mbstd conv, fc, out
    if c_dim:
        d += fc(c_dim, cmap) + d_map_depth * fc(cmap, cmap)  # D's label mapping (NVlabs default depth 8)
    return g, d


# (kwargs, G params, D params). The counts were obtained by instantiating NVlabs' own networks on CPU
# (github NVlabs/stylegan2-ada-pytorch, training.networks.Generator/Discriminator, img_channels=3,
# mapping_kwargs=dict(num_layers=map), channel_base/channel_max as below; sum of p.numel() over parameters()).
NVLABS_COUNTS = [
    (dict(resolution=256, channel_base=16384, mapping_layers=2), 23_191_522, 24_001_089),
    (dict(resolution=32, channel_base=16384, mapping_layers=2), 19_947_539, 21_507_073),
    (dict(resolution=1024, channel_base=32768, mapping_layers=8), 30_370_060, 29_012_513),
    (dict(resolution=256, channel_base=16384, mapping_layers=2, c_dim=10), 23_459_298, 26_370_112),
    (
        dict(resolution=32, channel_base=512, channel_max=64, mapping_layers=2, c_dim=10, z_dim=64, w_dim=64),
        193_411,
        256_528,
    ),
]


@pytest.mark.parametrize("kwargs,g_expected,d_expected", NVLABS_COUNTS)
def test_param_counts_match_nvlabs(kwargs, g_expected, d_expected):
    formula = nvlabs_param_count(
        kwargs["resolution"],
        kwargs["channel_base"],
        kwargs.get("channel_max", 512),
        kwargs["mapping_layers"],
        kwargs.get("c_dim", 0),
        kwargs.get("z_dim", 512),
        kwargs.get("w_dim", 512),
    )
    assert formula == (g_expected, d_expected)  # our derivation agrees with NVlabs' instantiated networks
    G, D = gan_models.build("stylegan2", **kwargs)
    assert (num_params(G), num_params(D)) == (g_expected, d_expected)


def test_defaults_are_nvlabs_stylegan2_cfg():
    cfg, hp = Config(), HParams()
    assert (cfg.channel_base, cfg.channel_max, cfg.mapping_layers, cfg.z_dim, cfg.w_dim) == (32768, 512, 8, 512, 512)
    assert (cfg.mbstd_group_size, cfg.mbstd_num_channels, cfg.mapping_lr_multiplier) == (4, 1, 0.01)
    assert (hp.g_lr, hp.d_lr, hp.betas, hp.eps) == (0.002, 0.002, (0.0, 0.99), 1e-8)
    assert (hp.r1_interval, hp.pl_interval, hp.pl_weight, hp.pl_decay, hp.pl_batch_shrink) == (16, 4, 2.0, 0.01, 2)
    assert (hp.style_mixing_prob, hp.ema_kimg, hp.ema_rampup) == (0.9, 10.0, 0.05)
    assert hp.resolved_r1_gamma(256, 32) == pytest.approx(0.0002 * 256**2 / 32)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(resolution=48), "48"),
        (dict(resolution=4), "valid"),
        (dict(c_dim=-1), "c_dim"),
        (dict(channel_base=0), "channel_base"),
    ],
)
def test_bad_config_values_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        gan_models.build("stylegan2", **kwargs)


def test_bad_hparams_raise():
    with pytest.raises(ValueError, match=r"augment 'foo'.*valid: none, ada, diffaugment"):
        HParams(augment="foo")
    with pytest.raises(ValueError, match="r1_interval"):
        HParams(r1_interval=0)


# ---------------------------------------------------------------------------------------------------------------------
# Networks

SMALL = dict(resolution=32, channel_base=256, channel_max=16, mapping_layers=2, z_dim=16, w_dim=16)


def test_shapes_and_sampling_small():
    torch.manual_seed(0)
    G, D = gan_models.build("stylegan2", **SMALL)
    assert (G.z_dim, G.c_dim, G.num_ws) == (16, 0, 2 * 4)  # 4 blocks: 1 + 2 + 2 + 2 convs + last toRGB
    img = G(torch.randn(8, 16), None)
    assert img.shape == (8, 3, 32, 32) and torch.isfinite(img).all()
    assert img.abs().mean() < 3  # roughly unit scale at init; training pulls it into [-1, 1]
    logits = D(img, None)
    assert logits.shape == (8,)
    with pytest.raises(ValueError, match="D expects images"):
        D(torch.zeros(8, 3, 16, 16), None)


def test_truncation_moves_toward_w_avg():
    torch.manual_seed(0)
    G, _ = gan_models.build("stylegan2", **SMALL)
    G.mapping.w_avg.normal_()
    z = torch.randn(4, 16)
    ws = G.mapping(z, None)
    ws0 = G.mapping(z, None, truncation_psi=0.0)
    assert torch.allclose(ws0, G.mapping.w_avg.expand_as(ws0))
    ws_half = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=3)
    assert torch.allclose(ws_half[:, :3], G.mapping.w_avg.lerp(ws[:, :3], 0.5))
    assert torch.equal(ws_half[:, 3:], ws[:, 3:])


def test_w_avg_tracks_only_in_training():
    torch.manual_seed(0)
    G, _ = gan_models.build("stylegan2", **SMALL)
    G.eval()(torch.randn(4, 16), None)
    assert G.mapping.w_avg.abs().sum() == 0
    G.train()(torch.randn(4, 16), None)
    assert G.mapping.w_avg.abs().sum() > 0


def test_conditional_labels_int_and_onehot_agree():
    torch.manual_seed(0)
    G, D = gan_models.build("stylegan2", **SMALL, c_dim=5)
    G.eval()
    z = torch.randn(4, 16)
    labels = torch.tensor([0, 1, 4, 2])
    a = G(z, labels, noise_mode="const")
    b = G(z, F.one_hot(labels, 5).float(), noise_mode="const")
    assert torch.allclose(a, b)
    other = G(z, torch.tensor([3, 3, 3, 3]), noise_mode="const")
    assert not torch.allclose(a, other)
    assert D(a, labels).shape == (4,)
    assert not torch.allclose(D(a, labels), D(a, torch.tensor([3, 3, 3, 3])))
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        G(z, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="conditional"):
        G(z, None)


def test_fused_and_unfused_modconv_agree():
    torch.manual_seed(0)
    G, _ = gan_models.build("stylegan2", **SMALL)
    z = torch.randn(3, 16)
    a = G(z, None, noise_mode="const", fused_modconv=True)
    b = G(z, None, noise_mode="const", fused_modconv=False)
    assert torch.allclose(a, b, atol=1e-4)


def test_style_mixing_and_return_ws():
    torch.manual_seed(0)
    G, _ = gan_models.build("stylegan2", **SMALL)
    z = torch.randn(3, 16)
    torch.manual_seed(1)
    _, ws = G(z, None, style_mixing_prob=1.0, return_ws=True)
    plain = G.mapping(z, None, update_w_avg=False)
    assert ws.shape == (3, G.num_ws, 16)
    assert torch.allclose(ws[:, 0], plain[:, 0])  # cutoff >= 1: the first ws always come from z
    assert not torch.allclose(ws[:, -1], plain[:, -1])  # the last ones from the second latent


# ---------------------------------------------------------------------------------------------------------------------
# Ops


def test_mapping_lr_multiplier_scales_storage_and_updates():
    torch.manual_seed(0)
    slow = FullyConnectedLayer(64, 32, lr_multiplier=0.01)
    assert slow.weight.std().item() == pytest.approx(100, rel=0.1)  # stored as N(0,1)/lr_mul
    assert slow.weight_gain == pytest.approx(0.01 / 8)
    x = torch.randn(8, 64)
    assert torch.allclose(slow(x), x @ (slow.weight * slow.weight_gain).t() + slow.bias * 0.01)
    # Same effective weights at lr_mul 1: one Adam step moves the effective weights 100× less at lr_mul 0.01.
    fast = FullyConnectedLayer(64, 32, lr_multiplier=1.0)
    with torch.no_grad():
        fast.weight.copy_(slow.weight * 0.01)
    assert torch.allclose(fast(x), slow(x), atol=1e-5)
    moves = []
    for layer in (fast, slow):
        before = (layer.weight * layer.weight_gain).detach().clone()
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        layer(x).square().sum().backward()
        opt.step()
        moves.append(((layer.weight * layer.weight_gain).detach() - before).abs().mean())
    assert (moves[1] / moves[0]).item() == pytest.approx(0.01, rel=0.01)  # Adam's first step ≈ lr per weight


def test_demodulation_gives_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 24, 24)
    weight = torch.randn(32, 64, 3, 3) * 3.0
    styles = torch.rand(4, 64) * 2 + 0.1
    y = modulated_conv2d(x, weight, styles, demodulate=True, padding=0)
    var = y.var(dim=[2, 3])  # per sample and output channel
    assert var.mean() == pytest.approx(1.0, abs=0.05)
    assert (var - 1).abs().max() < 0.35
    undemod = modulated_conv2d(x, weight, styles, demodulate=False, padding=0)
    assert undemod.var() > 10  # without demodulation the scale follows weight and style
    y_unfused = modulated_conv2d(x, weight, styles, demodulate=True, padding=0, fused=False)
    assert torch.allclose(y, y_unfused, atol=1e-4)


def test_fir_up_then_down_keeps_constant():
    f = setup_filter([1, 3, 3, 1])
    assert f.sum() == pytest.approx(1.0)
    x = torch.full((1, 2, 8, 8), 0.7)
    up = upsample2d(x, f)
    assert up.shape == (1, 2, 16, 16)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 0.7))  # borders see zero padding
    down = downsample2d(up, f)
    assert down.shape == (1, 2, 8, 8)
    assert torch.allclose(down[..., 2:-2, 2:-2], torch.full_like(down[..., 2:-2, 2:-2], 0.7))


def test_conv2d_resample_matches_reference():
    torch.manual_seed(0)
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(5, 3, 3, 3)
    # Up: zero-insert, pad (3, 2), filter ×4, then a true convolution with w.
    ref_up = F.conv2d(upfirdn2d(x, f, up=2, pad=(3, 2), gain=4), w.flip([2, 3]))
    assert torch.allclose(conv2d_resample(x, w, f, up=2, padding=1), ref_up, atol=1e-5)
    # Down: pad (2, 2), filter, correlate with w, keep every second pixel.
    ref_down = F.conv2d(upfirdn2d(x, f, pad=(2, 2)), w)[..., ::2, ::2]
    assert torch.allclose(conv2d_resample(x, w, f, down=2, padding=1), ref_down, atol=1e-5)
    w1 = torch.randn(5, 3, 1, 1)
    assert torch.allclose(conv2d_resample(x, w1, f, down=2), F.conv2d(downsample2d(x, f), w1), atol=1e-5)


def test_minibatch_stddev_values():
    layer = MinibatchStdLayer(group_size=4, num_channels=1)
    # 8 samples → 2 groups {0,2,4,6} and {1,3,5,7} (NVlabs' reshape puts the group index first).
    vals = torch.tensor([0.0, 10.0, 2.0, 10.0, 4.0, 10.0, 6.0, 10.0])
    x = vals.view(8, 1, 1, 1).expand(8, 2, 3, 3).contiguous()
    y = layer(x)
    assert y.shape == (8, 3, 3, 3)
    assert torch.equal(y[:, :2], x)
    std_even = torch.tensor([0.0, 2.0, 4.0, 6.0]).var(unbiased=False).add(1e-8).sqrt()
    assert torch.allclose(y[0::2, 2], std_even.expand(4, 3, 3))
    assert torch.allclose(y[1::2, 2], torch.full((4, 3, 3), 1e-4))  # constant group: sqrt(1e-8)
    with pytest.raises(ValueError, match="multiple"):
        layer(torch.zeros(6, 2, 3, 3))


def test_r1_penalty_on_linear_and_quadratic_D():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    r1 = losses.r1_penalty(x, (x * a).sum(dim=[1, 2, 3]))  # ∇D = a for every sample
    assert r1.item() == pytest.approx(a.square().sum().item(), rel=1e-5)
    r1q = losses.r1_penalty(x, 0.5 * x.square().sum(dim=[1, 2, 3]))  # ∇D = x
    assert r1q.item() == pytest.approx(x.detach().square().sum(dim=[1, 2, 3]).mean().item(), rel=1e-5)


def test_path_lengths_of_linear_generator():
    torch.manual_seed(0)
    n, num_ws, w_dim, side = 64, 3, 64, 32
    scale = torch.tensor(3.0, requires_grad=True)
    q, _ = torch.linalg.qr(torch.randn(side * side, w_dim))  # orthonormal columns
    ws = torch.randn(n, num_ws, w_dim, requires_grad=True)
    img = (ws.sum(dim=1) @ (scale * q).t()).view(n, 1, side, side)  # every w has the same Jacobian scale·Q
    lengths = path_lengths(img, ws)
    # y has variance 1/(H·W) per pixel, so E‖scale·Qᵀy‖² = scale²·w_dim/(H·W).
    assert lengths.mean().item() == pytest.approx(3.0 * math.sqrt(w_dim / side**2), rel=0.05)
    lengths.sum().backward()  # the graph is kept, so the penalty reaches G's parameters (here: scale)
    assert scale.grad.item() == pytest.approx(lengths.sum().item() / 3.0, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Recipe

TINY = dict(resolution=16, channel_base=128, channel_max=8, mapping_layers=2, z_dim=8, w_dim=8)


def make_recipe(c_dim=0, wrap=lambda m: m, accumulate=1, **hp):
    torch.manual_seed(0)
    recipe = Recipe(Config(**TINY, c_dim=c_dim), HParams(**hp))
    recipe.setup(torch.device("cpu"), wrap, accumulate=accumulate)
    return recipe


def batch(n=8, c_dim=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(c_dim, 1), (n,), generator=g)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, labels


def test_recipe_protocol_and_optimiser_rescaling():
    from gan_models.protocol import Recipe as RecipeProtocol

    recipe = make_recipe()
    assert isinstance(recipe, RecipeProtocol)
    g = recipe.opt_G.param_groups[0]
    assert g["lr"] == pytest.approx(0.002 * 4 / 5) and g["betas"] == pytest.approx((0.0, 0.99 ** (4 / 5)))
    d = recipe.opt_D.param_groups[0]
    assert d["lr"] == pytest.approx(0.002 * 16 / 17) and d["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)))
    no_pl = make_recipe(pl_weight=0)
    assert no_pl.opt_G.param_groups[0]["lr"] == pytest.approx(0.002)


def test_phase_table_follows_the_regularisers():
    def table(**hp):
        return [(p.name, p.interval) for p in Recipe(Config(**TINY), HParams(**hp)).phases]

    assert table() == [("Gmain", 1), ("Greg", 4), ("Dmain", 1), ("Dreg", 16)]  # NVlabs' intervals
    assert table(pl_weight=0, r1_gamma=0) == [("Gmain", 1), ("Dmain", 1)]


def test_train_steps_lazy_schedule_and_metrics():
    recipe = make_recipe(augment="ada", augment_p=0.2, ada_interval=2, r1_interval=3, pl_interval=2)
    images, labels = batch()
    ema_before = copy.deepcopy(recipe.G_ema.state_dict())
    seen = []
    for _ in range(4):
        m = read_metrics(recipe.train_step(images, labels))
        assert all(math.isfinite(v) for v in m.values())
        assert {"loss/G", "loss/D", "D/real", "D/fake", "aug/p"} <= set(m)
        seen.append(("loss/pl" in m, "loss/r1" in m))
    assert seen == [(True, True), (False, False), (True, False), (False, True)]
    assert recipe.cur_nimg == 32 and recipe.step == 4
    assert m["aug/p"] != 0.2  # ADA moved p at steps 2 and 4
    changed = [not torch.equal(ema_before[k], v) for k, v in recipe.G_ema.state_dict().items()]
    assert any(changed)
    assert recipe.pl_mean.item() > 0


def test_recipe_conditional_and_diffaugment_step():
    recipe = make_recipe(c_dim=3, augment="diffaugment")
    images, labels = batch(c_dim=3)
    m = read_metrics(recipe.train_step(images, labels))
    assert math.isfinite(m["loss/D"]) and "loss/r1" in m
    out = recipe.sample(recipe.latents(4, torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0]), 0.7)
    assert out.shape == (4, 3, 16, 16) and out.abs().max() <= 1


def test_sample_is_deterministic_and_eval():
    recipe = make_recipe()
    z = recipe.latents(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 8)
    a = recipe.sample(z, None)
    b = recipe.sample(z, None)
    assert torch.equal(a, b)  # const noise, no w_avg update
    assert not recipe.G_ema.training


def test_same_seed_same_training():
    runs = []
    for _ in range(2):
        recipe = make_recipe(augment="ada", augment_p=0.5)
        torch.manual_seed(123)
        images, labels = batch()
        runs.append([read_metrics(recipe.train_step(images, labels)) for _ in range(2)])
    assert runs[0] == runs[1]


def test_state_dict_round_trip_gives_identical_next_step():
    hp = dict(augment="ada", augment_p=0.3, ada_interval=2, r1_interval=2, pl_interval=2)
    a = make_recipe(**hp)
    images, labels = batch()
    for _ in range(3):
        a.train_step(images, labels)
    state = copy.deepcopy(a.state_dict())
    torch.manual_seed(1)
    b = Recipe(Config(**TINY), HParams(**hp))  # other weights; the checkpoint is loaded before setup
    b.load_state_dict(state)
    b.setup(torch.device("cpu"), lambda m: m)
    torch.manual_seed(7)
    ma = [read_metrics(a.train_step(images, labels)) for _ in range(2)]
    torch.manual_seed(7)
    mb = [read_metrics(b.train_step(images, labels)) for _ in range(2)]
    assert ma == mb
    for key in ("G", "D", "G_ema"):
        sa, sb = getattr(a, key).state_dict(), getattr(b, key).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a.cur_nimg, a.step, float(a.ada.p)) == (b.cur_nimg, b.step, float(b.ada.p))
    assert float(a.pl_mean) == float(b.pl_mean)


# Deterministic given z: no per-call noise draws, no style-mixing draw, no augmentation.
EXACT = dict(noise_mode="const", style_mixing_prob=0.0, pl_weight=0.0, r1_interval=1)


def params(recipe) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{n}": p.detach().clone() for k in ("G", "D", "G_ema") for n, p in getattr(recipe, k).named_parameters()
    }


@pytest.mark.parametrize("hp", [{}, {"loss": "wgan"}], ids=["logistic+r1", "wgan-gp+r1"])
def test_accumulation_equals_the_full_batch(hp):
    """Micro-batches of 4 (whole minibatch-stddev groups) give the batch-of-16 update of G, D and G_ema."""
    results = {}
    for k in (1, 2, 4):
        recipe = make_recipe(c_dim=3, accumulate=k, **EXACT, **hp)
        images, labels = batch(n=16, c_dim=3)
        torch.manual_seed(11)
        metrics = [read_metrics(recipe.train_step(images, labels)) for _ in range(2)]
        results[k] = (params(recipe), metrics)
    full, m_full = results[1]
    for k in (2, 4):
        state, m = results[k]
        for key in full:
            torch.testing.assert_close(state[key], full[key], rtol=1e-4, atol=1e-5, msg=f"{k} micro-batches: {key}")
        for key in ("loss/G", "loss/D", "loss/r1", "health/grad_norm_D", "health/D_sign_acc"):
            assert m[1][key] == pytest.approx(m_full[1][key], rel=1e-4, abs=1e-6), key


def test_micro_batches_take_whole_stddev_groups():
    from gan_models.steps import micro_batches

    parts = micro_batches(16, 2, group=4)
    assert [p.tolist() for p in parts] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert [p.tolist() for p in micro_batches(6, 3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="batch of 10 cannot be split into 4"):
        micro_batches(10, 4)


def test_accumulation_under_ddp_matches_one_process():
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(wrap):
        recipe = make_recipe(accumulate=2, wrap=wrap, r1_interval=2, pl_interval=2)
        images, labels = batch()
        torch.manual_seed(3)
        for _ in range(2):
            recipe.train_step(images, labels)
        return params(recipe)

    plain = run(lambda m: m)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = run(lambda m: DDP(m))
    finally:
        dist.destroy_process_group()
    for key in plain:
        torch.testing.assert_close(wrapped[key], plain[key], rtol=0, atol=0, msg=key)


def test_health_signals_losses_and_lr_scale():
    recipe = make_recipe()
    m = read_metrics(recipe.train_step(*batch()))
    assert {"health/grad_norm_G", "health/grad_norm_D", "health/D_sign_acc", "health/nonfinite"} <= set(m)
    assert m["health/nonfinite"] == 0.0 and m["health/grad_norm_G"] > 0 and 0 <= m["health/D_sign_acc"] <= 1
    images, labels = batch()
    images[3] = float("nan")
    before = params(recipe)
    bad = read_metrics(recipe.train_step(images, labels))
    assert bad["health/nonfinite"] == 1.0
    after = params(recipe)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("D."))  # D's step was skipped
    for loss in ("hinge", "wgan"):
        m = read_metrics(make_recipe(loss=loss).train_step(*batch()))
        assert math.isfinite(m["loss/D"]) and (("loss/gp" in m) == (loss == "wgan"))
    assert HParams(loss="wgan").resolved_gp_weight == 10.0 and HParams().resolved_gp_weight == 0.0
    with pytest.raises(ValueError, match="unknown loss 'lsgan'"):
        HParams(loss="lsgan")
    lr = recipe.opt_G.param_groups[0]["lr"]
    recipe.set_lr_scale(0.5)
    assert recipe.opt_G.param_groups[0]["lr"] == pytest.approx(lr / 2) and recipe.base_lrs()["G"] == 0.002
    b = make_recipe()
    b.load_state_dict(copy.deepcopy(recipe.state_dict()))
    assert b.opt_G.param_groups[0]["lr"] == pytest.approx(lr / 2) and b.lr_scale.scale == 0.5
