"""Property tests for cdc.py: each paper identity once, where strongest. Exact identities in float64 at rounding
level; distributions against the exact Gaussian field (theory/prior_equivalence.py), within Monte-Carlo errors."""

import math
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, strategies as st
from scipy import stats
from torch._subclasses.fake_tensor import FakeTensorMode

import cdc
from conftest import HostToDevice, wake
from theory.prior_equivalence import GaussianOracle, exact_chain_moments, moment_test, operator_matrix, random_gaussian

f64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))
RES = (8, 16, 32)


def images(seed, n, c, side):
    return torch.randn(n, c, side, side, dtype=f64, generator=torch.Generator().manual_seed(seed))


def coefficients(kind, tau):
    """(alpha, beta, alpha_dot, beta_dot) of interpolant `kind`, shaped to broadcast over images."""
    return [c.view(-1, 1, 1, 1) for c in cdc.INTERPOLANTS[kind].coefficients(tau)]


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return cdc.create_model("tiny", **{**dict(depth=2, width=64, heads=2, num_classes=5, resolutions=RES), **kw})


# ---- 1. Operators (§3.1) ----

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2 ** 16))


@given(shapes, st.integers(1, 3))
def test_D_is_transitive_D_after_U_is_identity_and_U_after_D_an_orthogonal_projection(shape, levels):
    """§3.1 at factors 2, 4, 8: D_L = L nested 2x2 means, D U = id, P = U D idempotent and self-adjoint."""
    n, c, side, seed = shape
    x, y = images(seed, n, c, side * 2 ** levels), images(seed + 1, n, c, side * 2 ** levels)
    nested = x
    for _ in range(levels):
        nested = cdc.down(nested)
    torch.testing.assert_close(cdc.down(x, levels), nested, rtol=0, atol=1e-12)            # transitivity
    torch.testing.assert_close(cdc.down(cdc.up(nested, levels), levels), nested, rtol=0, atol=1e-12)  # D U = id
    P = lambda v: cdc.up(cdc.down(v, levels), levels)  # noqa: E731
    assert P(x).shape == x.shape
    torch.testing.assert_close(P(P(x)), P(x), rtol=0, atol=1e-12)                  # idempotent
    torch.testing.assert_close((P(x) * y).sum(), (x * P(y)).sum(), rtol=1e-12, atol=1e-12)  # self-adjoint
    torch.testing.assert_close(((x - P(x)) * P(y)).sum(), torch.zeros((), dtype=f64), rtol=0, atol=1e-10)


def test_operator_matrices_are_the_block_mean_and_replication_on_the_last_two_dims():
    """D is the 2x2 block mean, U = 4 D^T; unbatched (C, H, W) with H != W gives the batched result."""
    Dm, Um = operator_matrix(cdc.down, (1, 4, 4)), operator_matrix(cdc.up, (1, 2, 2))
    assert torch.equal(Dm @ Um, torch.eye(4, dtype=f64)) and torch.equal(Um, 4 * Dm.T)
    assert set(Dm.unique().tolist()) == {0.0, 0.25}
    x = torch.randn(3, 4, 8, dtype=f64)
    torch.testing.assert_close(cdc.down(x), cdc.down(x[None])[0], rtol=0, atol=0)
    torch.testing.assert_close(cdc.up(x, 2), cdc.up(x[None], 2)[0], rtol=0, atol=0)
    assert cdc.down(x).shape == (3, 2, 4) and cdc.up(x).shape == (3, 8, 16)


@given(shapes, st.integers(2, 4))
def test_detail_vectors_orthogonal_and_lemma1_energy(shape, K):
    """Definition 4, Assumption 1, Lemma 1: details of different levels are orthogonal for every image (eq. 48),
    sum to x (eq. 49), and their energies add up to |x|^2 (eq. 50)."""
    n, c, base, seed = shape
    x = images(seed, n, c, base * 2 ** (K - 1))
    x_tilde = [torch.zeros_like(x)] + [cdc.up(cdc.down(x, K - 1 - s), K - 1 - s) for s in range(K)]
    assert torch.equal(x_tilde[-1], x)
    details = [x_tilde[k] - x_tilde[k - 1] for k in range(1, K + 1)]
    torch.testing.assert_close(sum(details), x, rtol=0, atol=1e-12)                # eq. 49
    energy = lambda v: v.pow(2).flatten(1).sum(1)  # noqa: E731
    for i in range(K):
        for j in range(i + 1, K):
            inner = (details[i] * details[j]).flatten(1).sum(1)
            torch.testing.assert_close(inner, torch.zeros_like(inner), rtol=0, atol=1e-10)  # eq. 48
    torch.testing.assert_close(energy(x), sum(energy(e) for e in details), rtol=1e-12, atol=1e-10)  # eq. 50


# ---- 2. Stages and time (§3.2) ----

window_lists = st.lists(st.floats(0.05, 1.0), min_size=1, max_size=5).map(lambda w: tuple(v / sum(w) for v in w))


@given(window_lists, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=64))
def test_time_map_windows_cover_unit_interval(windows, ts):
    config = cdc.CDCConfig(resolutions=tuple(4 * 2 ** s for s in range(len(windows))), windows=windows)
    b = config.boundaries()
    assert b[0] == 0 and b[-1] == 1 and torch.all(b[1:] > b[:-1])
    torch.testing.assert_close(b[1:] - b[:-1], torch.tensor(windows, dtype=f64))
    t = torch.tensor(ts + [0.0, 1.0], dtype=torch.float32)
    stage, tau = config.stage_and_tau(t)
    assert stage.dtype == torch.long and stage.min() >= 0 and stage.max() < config.K
    assert torch.all((tau >= 0) & (tau <= 1))
    t64 = t.double()
    assert torch.all((t64 >= b[stage]) & ((t64 < b[stage + 1]) | (stage == config.K - 1)))
    torch.testing.assert_close(b[stage] + tau.double() * (b[stage + 1] - b[stage]), t64, rtol=0, atol=1e-6)
    assert stage[-2] == 0 and tau[-2] == 0                                       # t = 0: start of stage 1
    assert stage[-1] == config.K - 1 and tau[-1] == 1                            # t = 1: end of stage K


def test_stage_boundaries_belong_to_the_next_stage():
    config = cdc.CDCConfig(resolutions=(8, 16, 32, 64))
    stage, tau = config.stage_and_tau(torch.tensor([0.25, 0.5, 0.75, 0.2499, 0.9999]))
    assert stage.tolist() == [1, 2, 3, 0, 3] and tau.tolist() == pytest.approx([0, 0, 0, 0.9996, 0.9996], abs=1e-6)


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
@given(tau=st.floats(0.01, 0.99), seed=st.integers(0, 2 ** 16))
def test_interpolant_ends_and_derivative(kind, tau, seed):
    """I_0 = x0, I_1 = x1 (eq. 1), and I_dot is the derivative of I (central finite differences)."""
    config = cdc.CDCConfig(resolutions=(4,), interpolant=kind)
    x0, x1 = images(seed, 2, 1, 4), images(seed + 1, 2, 1, 4)
    t = lambda v: torch.full((2,), v, dtype=f64)  # noqa: E731
    torch.testing.assert_close(config.interpolate(x0, x1, t(0.0))[0], x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(config.interpolate(x0, x1, t(1.0))[0], x1, rtol=0, atol=1e-12)
    h = 1e-6
    _, I_dot = config.interpolate(x0, x1, t(tau))
    fd = (config.interpolate(x0, x1, t(tau + h))[0] - config.interpolate(x0, x1, t(tau - h))[0]) / (2 * h)
    torch.testing.assert_close(I_dot, fd, rtol=1e-5, atol=1e-6)


def test_score_interpolant_derivative_is_bounded_near_one():
    a, b, da, db = cdc.INTERPOLANTS["score"].coefficients(torch.tensor([1.0, 1 - 1e-9], dtype=f64))
    assert torch.all(torch.isfinite(da)) and da.abs().max() <= 71 and a[0] == 0 and b[0] == 1


def test_config_normalises_its_fields_and_counts_levels():
    import numpy as np
    c = cdc.CDCConfig(resolutions=[np.int64(4), 8], windows=[0.25, 0.75])
    assert c.resolutions == (4, 8) and all(type(r) is int for r in c.resolutions)
    assert c.windows == (0.25, 0.75) and all(type(w) is float for w in c.windows)
    assert hash(c) == hash(cdc.CDCConfig(resolutions=(4, 8), windows=(0.25, 0.75)))  # frozen and hashable
    assert type(cdc.CDCConfig(resolutions=(4,), windows=[1]).windows[0]) is float
    assert cdc.CDCConfig(resolutions=(1, 2, 4)).K == 3                                # a 1-pixel first stage
    c = cdc.CDCConfig(resolutions=(16, 32, 128, 256))
    assert [c.levels(s) for s in range(4)] == [0, 1, 2, 1]            # stage 0 has no stage before it
    assert [c.levels_below_top(s) for s in range(4)] == [4, 3, 1, 0]


# ---- 3. Coupling (eq. 8-11) and the inference prior (App. E.2) ----

@pytest.mark.parametrize("res", [(2, 4, 8), (2, 8), (2, 4, 16), (4, 16, 32)])
@given(seed=st.integers(0, 2 ** 16), sigma=st.floats(0.1, 2.0), gamma=st.floats(1.0, 4.0))
def test_training_source_equals_inference_prior(res, seed, sigma, gamma):
    """App. E.2 on 2x and 4x steps: U_L(D_L x1^(k)) + sigma_k zeta == U_L(x1^(k-1)) + sigma_k zeta for the same
    zeta, L = cfg.levels(k), and sigma_k = gamma^-(k-1) sigma (eq. 20) whatever the factor."""
    config = cdc.CDCConfig(resolutions=res, sigma=sigma, gamma=gamma)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, res[-1], res[-1], dtype=f64, generator=g)
    for s in range(1, config.K):
        zeta = torch.randn(3, 3, res[s], res[s], dtype=f64, generator=g)
        x1, x1_prev = (cdc.down(x, config.levels_below_top(k)) for k in (s, s - 1))
        train_x0 = cdc.coupling_source(x1, s, config, zeta=zeta)
        infer_x0 = cdc.up(x1_prev, config.levels(s)) + config.sigma_k(s) * zeta
        torch.testing.assert_close(train_x0, infer_x0, rtol=0, atol=1e-12)
        assert config.sigma_k(s) == pytest.approx(gamma ** -s * sigma)


# ---- Bad arguments: one clear error where they enter ----

def dit_config(**kw):
    return cdc.DiTConfig(**{**dict(depth=1, width=32, heads=2, patch_size=2, resolutions=(4, 8)), **kw})


@pytest.mark.parametrize("build, error, words", [
    *[(lambda r=r: cdc.CDCConfig(resolutions=r), ValueError, "power-of-two multiple")
      for r in [(), (0, 2), (-2, 4), (8, 8), (8, 8, 16), (4, 12), (32, 48, 96), (32, 96), (64, 32)]],
    *[(lambda w=w: cdc.CDCConfig(resolutions=(4, 8, 16)[:len(w)], windows=w), ValueError, "summing to 1")
      for w in [(0.2, 0.2), (0.0, 1.0), (-0.5, 1.5), (0.5, 0.5, 0.0)]],
    (lambda: cdc.CDCConfig(interpolant="cosine"), ValueError, "choose one of linear"),
    (lambda: cdc.CDCConfig(gamma=0.5), ValueError, "gamma >= 1"),
    (lambda: cdc.CDCConfig(sigma=0.0), ValueError, "sigma > 0"),
    (lambda: cdc.create_model("XXL"), ValueError, "choose one of tiny"),
    (lambda: cdc.create_model("tiny", widht=64), ValueError, "unknown model option"),
    *[(lambda kw=kw: dit_config(**kw), ValueError, words) for kw, words in [
        (dict(width=64, heads=6), "divisible by heads"),        # 64 = 6 * 10 + 4: not divisible (even quotient)
        (dict(width=36, heads=4), "even head dim"),             # head dim 9
        (dict(width=6, heads=1), "divisible by 4"),
        (dict(width=64.0), "positive int"), (dict(depth=0), "positive int"),
        (dict(num_classes=-1), "num_classes must be >= 0"),
        (dict(resolutions=(8, 12), patch_size=8), "not divisible by patch size"),
        (dict(fusion="cat"), "unknown fusion")]],
    (lambda: small_model()(torch.randn(1, 3, 24, 24), torch.rand(1)), ValueError, "does not match the model"),
    (lambda: cdc.sample(lambda x, t, s: x, cdc.CDCConfig(resolutions=(4, 8)), 1, steps=[3]), ValueError, "list of 2"),
    (lambda: cdc.sample(lambda x, t, s: x, cdc.CDCConfig(resolutions=(4,)), 1, steps=2.7), ValueError, "positive int"),
    (lambda: cdc.sample(lambda x, t, s: x, cdc.CDCConfig(resolutions=(4,)), 1, solver="rk4"), AssertionError, "rk4"),
    (lambda: cdc.sample(lambda x, t, s: x, cdc.CDCConfig(resolutions=(4,)), 1, solver="sde", sde_scale=-1),
     AssertionError, "sde_scale"),
    *[(lambda s=s: cdc.down(torch.zeros(s), 2 if s[-1] == 6 else 1), ValueError, "cannot downsample")
      for s in [(1, 1, 4, 5), (1, 1, 5, 4), (1, 5, 4), (1, 4, 6)]],                # 6 halves once, not twice
    *[(lambda op=op, v=v: op(torch.zeros(1, 1, 4, 4), v), TypeError, None)          # 2^levels is no int kernel
      for op in (cdc.down, cdc.up) for v in (-1, 1.0, "1")],
    *[(lambda h=h, w=w: cdc.training_losses(Recorder(), torch.zeros(2, 3, h, w), None, cdc.CDCConfig(resolutions=RES)),
       AssertionError, "must be 32x32") for h, w in ((16, 16), (16, 32), (32, 16))],  # either side wrong
    *[(lambda kw=kw: cdc.training_losses(Recorder(), torch.zeros(2, 3, 32, 32), None, cdc.CDCConfig(resolutions=RES),
                                         **kw), AssertionError, None)
      for kw in (dict(class_dropout=1.5), dict(reduction="max"), dict(stage_sampling="random"))],
])
def test_bad_arguments_raise_one_clear_error(build, error, words):
    """ValueError with words where a user can get it wrong, an assert where only calling code can, TypeError
    for levels that are no non-negative int: never a silent wrong result."""
    with pytest.raises(error, match=words):
        build()


def test_model_config_edge_values_are_allowed_and_a_new_model_is_zero_with_parameters_only():
    c = cdc.DiTConfig(depth=1, width=4, heads=2, patch_size=1, in_channels=1, num_classes=0, freq_dim=1,
                      resolutions=(1, 2))
    assert (c.depth, c.width, c.num_classes, c.resolutions) == (1, 4, 0, (1, 2))
    model = cdc.DiT(cdc.DiTConfig(depth=1, width=8, heads=2, patch_size=1, in_channels=1, num_classes=0, resolutions=(2,)))
    assert torch.equal(model(torch.randn(3, 1, 2, 2), torch.rand(3)), torch.zeros(3, 1, 2, 2))  # adaLN-Zero
    assert model.null_class == 0 and model.y_embedder.num_embeddings == 1              # the labels and a null class
    assert all(getattr(model.fusion, n).bias is None for n in ("W_q", "W_k", "W_v", "W_o"))  # eqs. 41-43
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # position tables are recomputed


# ---- 4. Model (App. F) ----

def test_xl_preset_counts_677M_parameters():
    with torch.device("meta"):
        model = cdc.create_model("XL", patch_size=4, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    D, p, C, F, d_h, classes = 1152, 4, 3, 256, 72, 1000      # Table 7 (attention bias: the 3 D in the block)
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D + 4 * D * D + D) + (6 * D * D + 6 * D)
    embedders = 2 * (F * D + D + D * D + D) + 4 * D * d_h + (classes + 1) * D   # Gamma, E, eqs. 41-43, labels + null
    io = (C * p * p * D + D) + (D * p * p * C + p * p * C) + (2 * D * D + 2 * D)  # patchify, final layer
    assert n == 28 * block + embedders + io == 676_846_128    # the count stated in README (paper Table 1: 677M)
    assert model.config.width // model.config.heads == 72     # Table 7: head dim


@pytest.mark.parametrize("fusion", cdc.FUSIONS)
def test_initialisation_is_dits_adaln_zero(fusion):
    """Every block is the identity and the field is zero at every stage; linear layers Xavier-uniform with zero
    bias (the patch embedding as a (D, C p p) matrix); label, time and resolution embeddings N(0, 0.02^2)."""
    model = small_model(fusion=fusion, width=256, heads=4)
    for r in RES:
        x = torch.randn(3, 3, r, r)
        assert torch.equal(model(x, torch.rand(3), torch.tensor([0, 4, 5])), torch.zeros_like(x))
    h, c = torch.randn(2, 16, 256), torch.randn(2, 256)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    for mod in [*(b.adaLN_modulation[-1] for b in model.blocks), model.final_layer.adaLN_modulation[-1],
                model.final_layer.linear]:
        assert not mod.weight.any() and not mod.bias.any()

    def xavier_uniform(w, fan_in, fan_out):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    D, p, C = 256, model.config.patch_size, model.config.in_channels
    assert xavier_uniform(model.x_embedder.weight, C * p * p, D) and not model.x_embedder.bias.any()
    qkv = model.blocks[0].attn.qkv
    assert xavier_uniform(qkv.weight, D, 3 * D) and not qkv.bias.any()
    assert xavier_uniform(model.blocks[1].mlp[2].weight, 4 * D, D)
    for w in (model.y_embedder.weight, *(e.mlp[i].weight for e in (model.t_embedder, model.r_embedder) for i in (0, 2))):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002, w.shape


def test_gradient_checkpointing_changes_memory_not_results(monkeypatch):
    """Each block is recomputed in training only: the same loss and gradients; none checkpointed in evaluation."""
    calls = []
    real = cdc.checkpoint
    monkeypatch.setattr(cdc, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = wake(small_model())
    x, tau, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 1, 2])
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model.train()(x, tau, y).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert len(calls) == (model.config.depth if flag else 0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    calls.clear()
    with torch.no_grad():
        model.eval()(x, tau, y)
    assert calls == []


@pytest.mark.parametrize("fusion, patch, channels", [("xattn", 2, 3), ("add", 2, 3), ("xattn", 4, 1)])
def test_flops_per_sample_matches_counted_flops(fusion, patch, channels):
    """The analytic count (for MFU) equals torch's FLOP counter, attention included: on the math backend
    attention is two batched matmuls the counter sees (the CPU's fused kernel is invisible to it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = small_model(fusion=fusion, patch_size=patch, in_channels=channels)
    cfg = model.config
    for r in RES:
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
            model(torch.randn(1, channels, r, r), torch.rand(1), torch.tensor([1]))
        n = (r // cfg.patch_size) ** 2
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        assert counts.get("aten.bmm") == cfg.depth * 4 * n * n * cfg.width  # attention seen, not assumed
        assert model.flops_per_sample(r) == counter.get_total_flops() and isinstance(model.flops_per_sample(r), int)


def sinusoids(v, dim):
    f = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=f64) / (dim // 2))
    return torch.cat([torch.cos(v[:, None] * f), torch.sin(v[:, None] * f)], 1)


def test_position_embedding_is_2d_sin_cos_rows_first():
    torch.testing.assert_close(cdc.sinusoidal_embedding(torch.tensor([0.0, 0.3, 7.0]), 8).double(),
                               sinusoids(torch.tensor([0.0, 0.3, 7.0], dtype=f64), 8), rtol=1e-6, atol=1e-6)
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=f64) / 2)
    e = lambda p: torch.cat([torch.sin(p * omega), torch.cos(p * omega)])  # noqa: E731
    want = torch.stack([torch.cat([e(r), e(c)]) for r in range(3) for c in range(3)])
    torch.testing.assert_close(cdc.pos_embed_2d(3, 8).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fusion", cdc.FUSIONS)
def test_dit_forward_is_eqs_39_to_45_written_out(fusion):
    """patchify + position -> adaLN-Zero blocks -> final adaLN + linear -> unpatchify, with c = Gamma(tau) +
    fusion(E(r_k = H / p)) + label; xattn is W_o W_v e_k (eq. 42's softmax over one key is 1, no bias)."""
    torch.manual_seed(0)
    model = cdc.create_model("tiny", depth=2, width=32, heads=2, num_classes=3, resolutions=(4, 8), fusion=fusion)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)  # no zero (adaLN-Zero) or symmetric weights left
    model = model.double()
    F = torch.nn.functional
    x, tau, y = torch.randn(2, 3, 8, 8, dtype=f64), torch.tensor([0.2, 0.9], dtype=f64), torch.tensor([1, 3])
    p, D, H = 2, 32, 2
    mlp = lambda m, v: m.mlp[2](F.silu(m.mlp[0](v)))  # noqa: E731
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731
    mod = lambda v, shift, scale: v * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    tokens = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * p * p)
    h = tokens @ model.x_embedder.weight.reshape(D, -1).T + model.x_embedder.bias + model.pos_embed_8.double()
    e = mlp(model.r_embedder, sinusoids(torch.tensor([4.0], dtype=f64), 256))
    fu = model.fusion
    fused = e if fusion == "add" else e @ fu.W_v.weight.T @ fu.W_o.weight.T
    c = mlp(model.t_embedder, sinusoids(1000 * tau, 256)) + fused + model.y_embedder.weight[y]
    for blk in model.blocks:
        s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation[1](F.silu(c)).chunk(6, 1)
        q, k, v = blk.attn.qkv(mod(ln(h), s1, sc1)).view(2, 16, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, -1) @ v
        h = h + g1[:, None] * blk.attn.proj(att.transpose(1, 2).reshape(2, 16, D))
        h = h + g2[:, None] * blk.mlp[2](F.gelu(blk.mlp[0](mod(ln(h), s2, sc2)), approximate="tanh"))
    shift, scale = model.final_layer.adaLN_modulation[1](F.silu(c)).chunk(2, 1)
    out = model.final_layer.linear(mod(ln(h), shift, scale))          # (N, 16, p * p * C), (p, q, c) order
    out = out.view(2, 4, 4, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 8, 8)
    with torch.no_grad():  # (the sinusoids are computed in float32 inside the model)
        got = model(x, tau, y)
    assert out.abs().max() > 0.1 and out.std() > 0.01
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)


# ---- 5. Training step (eq. 13, Alg. 1, 3) ----

class Recorder(torch.nn.Module):
    """A field that records what it is fed; its output depends on I, tau and y."""

    null_class = 5

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls, self.inputs = [], []

    def forward(self, I, tau, y):
        self.calls.append((I.shape, tau.clone(), None if y is None else y.clone()))
        self.inputs.append(I.detach().clone())
        y = torch.full_like(tau, self.null_class) if y is None else y.to(tau.dtype)
        return self.w * I + tau.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)


@pytest.mark.parametrize("stage_sampling", cdc.STAGE_SAMPLINGS)
def test_training_step_feeds_each_stage_once_largest_first_and_labels_only_when_given(stage_sampling):
    """One forward per stage, largest first (DDP's buckets), the whole batch; dropout 1 feeds only the null
    class, 0 only the labels, 0.1 drops a tenth; no labels feed y = None."""
    config = cdc.CDCConfig(resolutions=RES)
    x, y = torch.randn(64, 3, 32, 32), torch.arange(64) % 5
    for labels, p, want in ((y, 1.0, lambda seen: torch.all(seen == 5)), (y, 0.0, lambda seen: torch.all(seen < 5)),
                            (None, 0.5, None)):
        model = Recorder()
        out = cdc.training_losses(model, x, labels, config, class_dropout=p, stage_sampling=stage_sampling, step=1,
                                  generator=torch.Generator().manual_seed(3))
        counts = out["stage_count"]
        assert sum(counts) == 64 and all(n > 0 for n in counts)
        assert [c[0] for c in model.calls] == [(counts[s], 3, RES[s], RES[s]) for s in reversed(range(3))]
        seen = [s for _, _, s in model.calls]
        assert all(s is None for s in seen) if labels is None else want(torch.cat(seen))
    y, g = torch.randint(0, 5, (20000,)), torch.Generator().manual_seed(0)      # the coin's rate
    frac = (cdc.drop_labels(y, 0.1, 5, g) == 5).float().mean().item()
    assert abs(frac - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(y))


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
@pytest.mark.parametrize("reduction", [*cdc.REDUCTIONS, None])  # None: the default, Alg. 1's weights / d_K
@pytest.mark.parametrize("sampling", cdc.STAGE_SAMPLINGS)
def test_training_step_equals_alg1_rebuilt_by_hand_per_sample(kind, reduction, sampling):
    """Alg. 1/3 per sample from what the model was fed: stage assignment (stratified: quotas in batch order; iid:
    eq. 12), x1 = D x, x0 = (I - beta x1) / alpha, I_dot, eq. 13's loss and its gradient, per-stage means; the
    recovered zeta = (x0 - U D x1) / sigma_k is standard normal (x has mean 1: a stage-1 source around x1 shows).
    B = 25 is not divisible by K = 3."""
    B, step = 25, 7
    config = cdc.CDCConfig(resolutions=RES, sigma=0.8, gamma=3.0, interpolant=kind)
    x, y = torch.randn(B, 3, 32, 32) + 1, torch.randint(0, 5, (B,))
    model = Recorder()
    got = cdc.training_losses(model, x, y, config, class_dropout=0.0, **({} if reduction is None else {"reduction": reduction}),
                              generator=torch.Generator().manual_seed(11), stage_sampling=sampling, step=step)
    if sampling == "iid":
        stage, tau_iid = config.stage_and_tau(torch.rand(B, generator=torch.Generator().manual_seed(11)))
        order = torch.argsort(stage, stable=True)
    else:
        stage = torch.repeat_interleave(torch.arange(3), torch.tensor(cdc.stage_quotas(config, B, step)))
        order = torch.arange(B)
    assert set(stage.tolist()) == {0, 1, 2}
    assert got["stage_count"] == torch.bincount(stage, minlength=3).tolist()
    fed = {shape[-1]: (tau, labels, I) for (shape, tau, labels), I in zip(model.calls, model.inputs)}
    per_sample, zetas = torch.zeros(B), {}
    for s in range(3):
        tau, labels, I = fed[RES[s]]
        idx = order[stage[order] == s]                          # the batch samples of stage s, in feed order
        if sampling == "iid":
            torch.testing.assert_close(tau, tau_iid[idx])
        assert torch.equal(labels, y[idx]) and bool(((tau >= 0) & (tau < 1)).all())
        a, b, da, db = coefficients(kind, tau)
        x1 = cdc.down(x[idx], 2 - s)
        x0 = (I - b * x1) / a
        m = torch.zeros_like(x1) if s == 0 else cdc.up(cdc.down(x1))
        zetas[s] = ((x0 - m) / config.sigma_k(s)).flatten()
        b_out = model.w * I + tau.view(-1, 1, 1, 1) + 0.1 * labels.view(-1, 1, 1, 1)
        err = (b_out - (da * x0 + db * x1)).pow(2).flatten(1)
        per_sample = per_sample.index_put((idx,), {"mean": err.mean(1), "sum": err.sum(1),
                                                   "scaled-sum": err.sum(1) / (3 * 32 * 32)}[reduction or "scaled-sum"])
    torch.testing.assert_close(got["loss"].detach(), per_sample.detach().mean(), rtol=1e-4, atol=1e-5)
    grads = [torch.autograd.grad(v, model.w)[0] for v in (got["loss"], per_sample.mean())]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)       # every stage reaches the weights
    for s in range(3):
        torch.testing.assert_close(got["stage_loss"][s], per_sample[stage == s].detach().mean(), rtol=1e-4, atol=1e-5)
        assert abs(zetas[s].mean()) < 0.15 and abs(zetas[s].var() - 1) < 0.2, (s, zetas[s].mean(), zetas[s].var())


@pytest.mark.parametrize("stage_sampling", cdc.STAGE_SAMPLINGS)
def test_training_step_draws_are_independent_per_sample(stage_sampling):
    """On one image and label repeated B times, tau, zeta and the dropout coin still differ per sample: B distinct
    U[0, 1] taus, pairwise uncorrelated zetas, about half the labels dropped in every stage, and iid stage counts
    of Binomial(B, 1/K) size (one draw broadcast over the batch or a stage fails)."""
    B, config = 96, cdc.CDCConfig(resolutions=RES)
    x, y = torch.randn(1, 3, 32, 32).repeat(B, 1, 1, 1), torch.full((B,), 2)
    model = Recorder()
    torch.manual_seed(0)
    out = cdc.training_losses(model, x, y, config, class_dropout=0.5, stage_sampling=stage_sampling, step=1,
                              generator=torch.Generator().manual_seed(0))
    zetas = []
    for (shape, tau, labels), I in zip(model.calls, model.inputs):
        s = RES.index(shape[-1])
        a, b, _, _ = coefficients("linear", tau.double())
        x1 = cdc.down(x[:1], 2 - s).double()
        m = 0 if s == 0 else cdc.up(cdc.down(x1))
        zetas.append((((I.double() - b * x1) / a - m) / config.sigma_k(s)).flatten(1)[:, :3 * 8 * 8])
        assert 0.1 < (labels == model.null_class).float().mean().item() < 0.9, s  # not one coin per stage
    tau = torch.cat([t for _, t, _ in model.calls])
    assert len(set(tau.tolist())) == B and stats.kstest(tau.numpy(), "uniform").pvalue > 1e-3
    labels = torch.cat([seen for _, _, seen in model.calls])
    assert abs((labels == model.null_class).float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / B)
    z = torch.cat(zetas)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    off = (z @ z.T / (z.shape[1] - 1))[~torch.eye(B, dtype=torch.bool)]
    assert off.abs().max() < 5.5 / math.sqrt(z.shape[1]), off.abs().max()  # no zeta shared by two samples
    if stage_sampling == "iid":
        assert all(abs(n - B / 3) < 4 * math.sqrt(B * 2 / 9) for n in out["stage_count"]), out["stage_count"]


# ---- Stratified stage quotas (a departure from Alg. 1) ----

WINDOWS = [None, (0.2, 0.3, 0.5), (0.1, 0.6, 0.3), (0.25, 0.75), (math.sqrt(2) - 1, 2 - math.sqrt(2))]


def quota_config(windows):
    return cdc.CDCConfig(resolutions=(4, 8, 16)[:len(windows or (0, 0, 0))], windows=windows)


@given(st.sampled_from(WINDOWS), st.integers(1, 64), st.integers(0, 10 ** 9))
@example(None, 30, 7)
@example((0.2, 0.3, 0.5), 20, 5)
@example((0.25, 0.75), 8, 3)
def test_quotas_are_floor_or_ceil_of_B_w_k_summing_to_B_exact_for_integer_shares(windows, B, step):
    config = quota_config(windows)
    counts, share = cdc.stage_quotas(config, B, step), (B * config.widths()).tolist()
    assert sum(counts) == B and len(counts) == config.K
    assert all(math.floor(v + 1e-9) <= n <= math.ceil(v - 1e-9) for n, v in zip(counts, share)), (counts, share)
    if all(abs(v - round(v)) < 1e-9 for v in share):
        assert counts == [round(v) for v in share]


@pytest.mark.parametrize("windows, B", [(None, 8), (None, 7), ((0.2, 0.3, 0.5), 7), ((0.1, 0.6, 0.3), 9),
                                        ((0.25, 0.75), 3), (WINDOWS[-1], 5)])
def test_quotas_are_unbiased_and_exact_over_K_steps_for_equal_windows(windows, B):
    """E[n_k] = B w_k over N steps within 5 standard errors; equal windows give exactly B / K per K steps."""
    config, N = quota_config(windows), 4000
    counts = torch.tensor([cdc.stage_quotas(config, B, s) for s in range(N)], dtype=f64)
    assert torch.all((counts.mean(0) - B * config.widths()).abs() < 5 * 0.5 / math.sqrt(N)), counts.mean(0)
    for start in range(0, 40 if windows is None else 0):
        torch.testing.assert_close(counts[start:start + 3].mean(0), B * config.widths(), rtol=0, atol=1e-9)


def test_quotas_depend_on_the_step_alone():
    """Every rank gets the same counts: not from the global RNG, nor the process (salted string hashes), nor a
    tensor value (they agree under fake tensors)."""
    code = "[cdc.stage_quotas(cdc.CDCConfig(resolutions=(4, 8, 16), windows=(0.2, 0.3, 0.5)), 7, s) for s in range(40)]"
    want = eval(code)
    torch.manual_seed(1)
    random.seed(1)
    assert eval(code) == want
    with FakeTensorMode():
        assert eval(code) == want
    p = subprocess.run([sys.executable, "-c", f"import cdc; print({code})"], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": "7"}, timeout=300)
    assert p.stdout.strip() == str(want), p.stderr


# ---- 6. Samplers and CFG (Alg. 2, 4) ----

def test_cfg_scale_one_is_conditional_zero_is_unconditional_in_one_forward():
    model = wake(small_model(seed=1))
    x, tau, y = torch.randn(4, 3, 16, 16), torch.rand(4), torch.tensor([0, 1, 2, 3])
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        b_c, b_null = model(x, tau, y), model(x, tau, None)
        calls.clear()
        torch.testing.assert_close(cdc.guided_field(model, y, 1.0)(x, tau, 1), b_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cdc.guided_field(model, y, 0.0)(x, tau, 1), b_null, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cdc.guided_field(model, y, 3.0)(x, tau, 1), b_null + 3 * (b_c - b_null),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cdc.guided_field(model, None, 3.0)(x, tau, 1), b_null, rtol=0, atol=0)
    assert calls == [4, 8, 8, 4] and not torch.allclose(b_c, b_null)  # S = 1 or no labels: one pass of N, else 2N


def test_sample_defaults_to_table7_24_euler_steps_per_stage_and_the_time_grids():
    calls = []
    cdc.sample(lambda x, t, s: calls.append((s, t[0].item())) or torch.zeros_like(x), cdc.CDCConfig(resolutions=(4, 8, 16)), 2)
    assert [s for s, _ in calls] == [0] * 24 + [1] * 24 + [2] * 24       # one evaluation per Euler step
    assert [t for _, t in calls[:24]] == pytest.approx([n / 24 for n in range(24)])
    g = cdc.INTERPOLANTS["score"].grid(10)                               # score: uniform in sqrt(1 - tau)
    assert g[0] == 0 and g[-1] == 1 and all(b > a for a, b in zip(g, g[1:]))
    assert max(abs(math.sqrt(1 - g[i]) - math.sqrt(1 - g[i + 1]) - 0.1) for i in range(10)) < 1e-12
    assert cdc.INTERPOLANTS["linear"].grid(4) == [0, 0.25, 0.5, 0.75, 1.0]


def test_sde_without_noise_is_euler_and_its_last_step_adds_no_noise():
    """App. D's SDE at sde_scale 0 is Alg. 2's Euler step, at scale 1 it is not; its last step is deterministic."""
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    field = lambda x, t, s: -0.7 * x + t.view(-1, 1, 1, 1)  # noqa: E731  any smooth field
    x = torch.randn(3, 3, 8, 8)
    one = lambda solver, steps=4, seed=1, **kw: cdc.integrate_stage(  # noqa: E731
        field, x, 1, steps, config, solver, generator=torch.Generator().manual_seed(seed), **kw)
    torch.testing.assert_close(one("sde", sde_scale=0.0), one("euler"), rtol=0, atol=1e-7)
    assert not torch.allclose(one("sde", sde_scale=1.0), one("euler"))
    assert torch.equal(one("sde", 1, 1, sde_scale=1.0), one("sde", 1, 2, sde_scale=1.0))


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
@pytest.mark.parametrize("res, solver, steps", [((2, 4, 8), "euler", 400), ((2, 4, 8), "heun", 40),
                                                ((2, 8), "heun", 40)])
def test_ode_chain_transports_exactly_to_every_stage_marginal(kind, res, solver, steps):
    """eq. 16 on 2x and 4x steps: with the exact field the ODE ends at N(D mu, D Sigma D^T) at every stage, within
    2% of the largest variance (exact_chain_moments is checked against cdc.sample in test_theory.py)."""
    mu, Sigma = random_gaussian((1, 8, 8), seed=0)
    config = cdc.CDCConfig(resolutions=res, interpolant=kind)
    oracle = GaussianOracle(mu, Sigma, config)
    for s, (mean, cov) in enumerate(exact_chain_moments(oracle, steps, solver)):
        m, S = oracle.marginal(s)
        scale = S.diag().max().sqrt()
        assert (mean - m).abs().max() < 0.02 * scale and (cov - S).abs().max() < 0.02 * scale ** 2, s


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
def test_sde_chain_reaches_every_stage_marginal(kind):
    """App. D's SDE (eq. 34) with the exact field, through cdc.sample: 3000 chains pass theory's moment_test of
    every stage's marginal N(D mu, D Sigma D^T)."""
    mu, Sigma = random_gaussian((3, 4, 4), seed=3)
    config = cdc.CDCConfig(resolutions=(1, 2, 4), interpolant=kind)
    oracle = GaussianOracle(mu, Sigma, config)
    outs = cdc.sample(oracle, config, 3000, channels=3, steps=200, solver="sde",
                      generator=torch.Generator().manual_seed(0), return_stages=True)
    for s, out in enumerate(outs):
        t = moment_test(out.reshape(3000, -1), *oracle.marginal(s))
        assert t["mean_p"] > 1e-3 and t["cov_p"] > 1e-3, (s, t)


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
@given(stage=st.integers(0, 2), tau=st.floats(0.0, 0.95), seed=st.integers(0, 100))
def test_sde_score_from_velocity_is_the_exact_score(kind, stage, tau, seed):
    """eq. 28/34: the SDE's score from the velocity, -E[sigma_k zeta | x] / (alpha sigma_k^2) (Tweedie), equals
    grad log rho_tau (eq. 26) of the oracle's Gaussian marginal of I_tau at every stage."""
    mu, Sigma = random_gaussian((1, 8, 8), seed=seed % 3)
    config = cdc.CDCConfig(resolutions=(2, 4, 8), interpolant=kind, sigma=0.9, gamma=2.5)
    oracle = GaussianOracle(mu, Sigma, config)
    r, d = config.resolutions[stage], config.resolutions[stage] ** 2
    x = images(seed, 4, 1, r)
    t = torch.full((4,), tau, dtype=f64)
    a, b, _, _ = (float(v) for v in cdc.INTERPOLANTS[kind].coefficients(t[:1]))
    noise = cdc.source_noise_estimate(oracle(x, t, stage), x, t, stage, config)
    score = (-noise / (a * config.sigma_k(stage) ** 2)).reshape(4, d)
    m, S = oracle.marginal(stage)
    G = a * oracle.M[stage] + b * torch.eye(d, dtype=f64)
    cov_I = G @ S @ G.T + (a * config.sigma_k(stage)) ** 2 * torch.eye(d, dtype=f64)
    true = -torch.linalg.solve(cov_I, (x.reshape(4, d) - G @ m).T).T
    torch.testing.assert_close(score, true, rtol=1e-7, atol=1e-7 * true.abs().max().item())


@pytest.mark.parametrize("solver", cdc.SOLVERS)
def test_same_seed_same_samples_and_stage_outputs(solver):
    field = cdc.guided_field(wake(small_model(seed=2)), torch.tensor([1, 2]), 3.0)
    run = lambda seed, **kw: cdc.sample(field, cdc.CDCConfig(resolutions=RES), 2, steps=[2, 1, 1],  # noqa: E731
                                        solver=solver, generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = run(0, return_stages=True), run(0, return_stages=True), run(1)
    assert [o.shape[-1] for o in a] == list(RES) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[-1], c) and torch.equal(run(0), a[-1])


@pytest.mark.parametrize("res", [(2, 4, 8), (2, 8)])
def test_next_stage_starts_from_upsampled_output_plus_sigma_k_noise(res):
    """Alg. 2 lines 4-7 (eq. 17), 2x and 4x steps: with a zero field stage k's output - U(stage k-1's) is
    sigma_k zeta (block means: sigma_k / 2^L); stage 1 outputs its N(0, sigma^2) source."""
    config = cdc.CDCConfig(resolutions=res, sigma=1.0, gamma=2.0)
    outs = cdc.sample(lambda x, t, s: torch.zeros_like(x), config, 20000, channels=1, steps=1,
                      generator=torch.Generator().manual_seed(0), return_stages=True)
    assert outs[0].std().item() == pytest.approx(1.0, rel=0.02)
    for s in range(1, config.K):
        L = config.levels(s)
        residual = outs[s] - cdc.up(outs[s - 1], L)
        assert residual.std().item() == pytest.approx(config.sigma_k(s), rel=0.02)
        assert cdc.down(residual, L).std().item() == pytest.approx(config.sigma_k(s) / 2 ** L, rel=0.03)


def test_sampling_noise_is_drawn_on_the_sampling_device():
    """On the meta device with no generator no host-to-device copy happens; a CPU generator does copy."""
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    zero = lambda x, t, s: torch.zeros_like(x)  # noqa: E731  outputs are then the sampler's own noise
    for solver in ("euler", "sde"):
        with HostToDevice() as seen:
            out = cdc.sample(zero, config, 3, steps=2, solver=solver, device="meta")
        assert seen.copies == [] and out.device.type == "meta" and out.shape == (3, 3, 16, 16)
    with HostToDevice() as seen:
        cdc.sample(zero, config, 3, steps=1, generator=torch.Generator("cpu").manual_seed(5), device="meta")
    assert seen.copies
