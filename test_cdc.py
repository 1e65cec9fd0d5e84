"""Property tests for cdc.py: each test names the paper statement it checks, and each identity is tested
once, here, where it is strongest.

Exact identities run in float64 with tolerances at rounding level. Distributional checks use a Gaussian
oracle (the exact velocity field for Gaussian data, theory/prior_equivalence.py) in place of the DiT,
with tolerances stated as Monte-Carlo standard errors plus the solver's discretisation slack.
"""

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


def images(seed, n, c, side):
    return torch.randn(n, c, side, side, dtype=f64, generator=torch.Generator().manual_seed(seed))


def coefficients(kind, tau):
    """(alpha, beta, alpha_dot, beta_dot) of interpolant `kind`, shaped to broadcast over images."""
    return [c.view(-1, 1, 1, 1) for c in cdc.INTERPOLANTS[kind].coefficients(tau)]


# ------------------------------------------------------------------------------------------------
#                                   1. Operators (§3.1)
# ------------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2 ** 16))


@given(shapes, st.integers(1, 3))
def test_D_is_transitive_D_after_U_is_identity_and_U_after_D_an_orthogonal_projection(shape, levels):
    """§3.1 at every factor a stage may use (2x2 blocks, and 4x4 and 8x8 for Table 6's 4x steps): one pool
    of side 2^L equals L nested 2x2 means, D U = id, and P = U D is idempotent and self-adjoint."""
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
    """D is the 2x2 block mean and U the replication: as matrices, D U = 1 and U = 4 D^T. Unbatched
    (C, H, W) images with H != W give the batched result (a swapped axis would show)."""
    Dm = operator_matrix(cdc.down, (1, 4, 4))
    Um = operator_matrix(cdc.up, (1, 2, 2))
    assert torch.equal(Dm @ Um, torch.eye(4, dtype=f64))
    assert torch.equal(Um, 4 * Dm.T)
    assert set(Dm.unique().tolist()) == {0.0, 0.25}
    x = torch.randn(3, 4, 8, dtype=f64)
    torch.testing.assert_close(cdc.down(x), cdc.down(x[None])[0], rtol=0, atol=0)
    torch.testing.assert_close(cdc.up(x, 2), cdc.up(x[None], 2)[0], rtol=0, atol=0)
    assert cdc.down(x).shape == (3, 2, 4) and cdc.up(x).shape == (3, 8, 16)


@given(shapes, st.integers(2, 4))
def test_detail_vectors_orthogonal_and_lemma1_energy(shape, K):
    """Definition 4, Assumption 1 and Lemma 1: with these operators the detail vectors of different levels
    are orthogonal for every image (not only in expectation), so the energy decomposes exactly."""
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


# ------------------------------------------------------------------------------------------------
#                                2. Stages and time (§3.2)
# ------------------------------------------------------------------------------------------------

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
    assert stage.tolist() == [1, 2, 3, 0, 3]
    assert tau[:3].tolist() == [0.0, 0.0, 0.0]


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
    assert torch.all(torch.isfinite(da)) and da.abs().max() <= 71
    assert a[0] == 0 and b[0] == 1


def test_config_normalises_its_fields_and_counts_levels():
    import numpy as np
    c = cdc.CDCConfig(resolutions=[np.int64(4), 8], windows=[0.25, 0.75])
    assert c.resolutions == (4, 8) and all(type(r) is int for r in c.resolutions)
    assert c.windows == (0.25, 0.75) and all(type(w) is float for w in c.windows)
    assert hash(c) == hash(cdc.CDCConfig(resolutions=(4, 8), windows=(0.25, 0.75)))  # frozen and hashable
    assert type(cdc.CDCConfig(resolutions=(4,), windows=[1]).windows[0]) is float
    assert cdc.CDCConfig(resolutions=(1, 2, 4)).K == 3                                # a 1-pixel first stage is allowed
    c = cdc.CDCConfig(resolutions=(16, 32, 128, 256))
    assert [c.levels(s) for s in range(4)] == [0, 1, 2, 1]            # stage 0 has no stage before it
    assert [c.levels_below_top(s) for s in range(4)] == [4, 3, 1, 0]


# ------------------------------------------------------------------------------------------------
#                         3. Coupling (eq. 8-11) and the inference prior (App. E.2)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res", [(2, 4, 8), (2, 8), (2, 4, 16), (4, 16, 32)])
@given(seed=st.integers(0, 2 ** 16), sigma=st.floats(0.1, 2.0), gamma=st.floats(1.0, 4.0))
def test_training_source_equals_inference_prior(res, seed, sigma, gamma):
    """App. E.2 on 2x and 4x steps: U_L(D_L(x1^(k))) + sigma_k zeta == U_L(x1^(k-1)) + sigma_k zeta for the
    same zeta (L = cfg.levels(k): so also D_L x1^(k) = x1^(k-1), the pyramid's transitivity with the path's
    levels), and sigma_k is eq. 20's gamma^-(k-1) sigma whatever the factor."""
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


def test_stage1_source_is_independent_gaussian():
    config = cdc.CDCConfig(resolutions=(8, 16), sigma=0.7)
    x1 = torch.full((4000, 1, 8, 8), 5.0)
    x0 = cdc.coupling_source(x1, 0, config, generator=torch.Generator().manual_seed(0))
    assert abs(x0.mean().item()) < 5 * 0.7 / math.sqrt(x0.numel())               # eq. 8: mean 0, not x1
    assert x0.std().item() == pytest.approx(0.7, rel=0.01)


# ------------------------------------------------------------------------------------------------
#                      Bad arguments: one clear error where they enter
# ------------------------------------------------------------------------------------------------

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
    """A ValueError with words where a user or a command line can get it wrong (the model config's own checks:
    test_cdc_edges.py), an assert where only calling code can, a TypeError for levels that are no
    non-negative int: never a silent wrong result."""
    with pytest.raises(error, match=words):
        build()


# ------------------------------------------------------------------------------------------------
#                                      4. Model (App. F)
# ------------------------------------------------------------------------------------------------

RES = (8, 16, 32)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return cdc.create_model("tiny", **{**dict(depth=2, width=64, heads=2, num_classes=5, resolutions=RES), **kw})


def test_xl_preset_counts_677M_parameters():
    with torch.device("meta"):
        model = cdc.create_model("XL", patch_size=4, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    D, p, C, F, d_h, classes = 1152, 4, 3, 256, 72, 1000      # Table 7
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D + 4 * D * D + D) + (6 * D * D + 6 * D)
    embedders = 2 * (F * D + D + D * D + D) + 4 * D * d_h + (classes + 1) * D   # Gamma, E, eqs. 41-43, labels
    io = (C * p * p * D + D) + (D * p * p * C + p * p * C) + (2 * D * D + 2 * D)  # patchify, final layer
    assert n == 28 * block + embedders + io == 676_846_128    # the count stated in README (paper Table 1: 677M)
    assert model.config.width // model.config.heads == 72     # Table 7: head dim


@pytest.mark.parametrize("fusion", cdc.FUSIONS)
def test_model_output_shape_every_stage_and_zero_at_init(fusion):
    model = small_model(fusion=fusion)
    for r in RES:
        x = torch.randn(3, 3, r, r)
        out = model(x, torch.rand(3), torch.tensor([0, 4, 5]))
        assert out.shape == x.shape
        assert torch.equal(out, torch.zeros_like(out))       # adaLN-Zero + zero final layer


def test_initialisation_is_dits_adaln_zero():
    """DiT's initialisation (kept by App. F): every block is the identity and the field is zero (adaLN-Zero:
    gates, shifts, scales and the output layer start at zero), linear layers are Xavier-uniform with zero
    bias, the patch embedding is Xavier-uniform as a (D, C p p) matrix, and the label, time and resolution
    embeddings are N(0, 0.02^2)."""
    model = cdc.create_model("tiny", depth=2, width=256, heads=4, num_classes=5, resolutions=RES)
    h, c = torch.randn(2, 16, 256), torch.randn(2, 256)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)                                  # identity at initialisation
    for mod in [*(b.adaLN_modulation[-1] for b in model.blocks), model.final_layer.adaLN_modulation[-1],
                model.final_layer.linear]:
        assert not mod.weight.any() and not mod.bias.any()

    def xavier_uniform(w, fan_in, fan_out):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    D, p, C = 256, model.config.patch_size, model.config.in_channels
    w = model.x_embedder.weight
    assert xavier_uniform(w, C * p * p, D) and not model.x_embedder.bias.any()  # not Conv2d's fan_out D p p
    qkv = model.blocks[0].attn.qkv
    assert xavier_uniform(qkv.weight, D, 3 * D) and not qkv.bias.any()
    assert xavier_uniform(model.blocks[1].mlp[2].weight, 4 * D, D)
    for w in (model.y_embedder.weight, *(e.mlp[i].weight for e in (model.t_embedder, model.r_embedder) for i in (0, 2))):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002, w.shape


def test_gradient_checkpointing_changes_memory_not_results(monkeypatch):
    """grad_checkpointing recomputes each block in the backward pass, in training only: the loss and every
    gradient are the same as without, and in evaluation (or with the flag off) no block is checkpointed."""
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
        model.eval()(x, tau, y)                                             # flag on, evaluation: not used
    assert calls == []


def test_model_rejects_a_size_it_was_not_built_for():
    with pytest.raises(ValueError, match="does not match the model"):
        small_model()(torch.randn(1, 3, 24, 24), torch.rand(1))


def test_xattn_fusion_is_a_linear_map_of_e_k_independent_of_W_q():
    """Eq. 42 is a softmax over one key, identically 1: changing W_q (or W_k) leaves c_{k,t} unchanged."""
    fusion = cdc.ResolutionFusion(32, 8, "xattn")
    g, e = torch.randn(5, 32), torch.randn(1, 32)
    before = fusion(g, e)
    with torch.no_grad():
        fusion.W_q.weight.normal_(0, 3.0)
        fusion.W_k.weight.normal_(0, 3.0)
    after = fusion(g, e)
    assert torch.equal(before, after)
    torch.testing.assert_close(after, g + fusion.W_o(fusion.W_v(e)))             # eq. 43-44 with alpha = 1
    after.pow(2).sum().backward()
    assert torch.equal(fusion.W_q.weight.grad, torch.zeros_like(fusion.W_q.weight))


def test_fusion_by_addition_and_the_bias_free_maps_of_eqs_41_43():
    g, e = torch.randn(5, 32), torch.randn(1, 32)
    torch.testing.assert_close(cdc.ResolutionFusion(32, 8, "add")(g, e), g + e, rtol=0, atol=0)  # Table 4
    fusion = cdc.ResolutionFusion(32, 8, "xattn")
    assert all(m.bias is None for m in (fusion.W_q, fusion.W_k, fusion.W_v, fusion.W_o))


def test_attention_bias_null_class_and_what_a_checkpoint_holds():
    model = small_model()
    assert all(b.attn.qkv.bias is not None for b in model.blocks)  # Table 7: attention bias true
    assert model.y_embedder.num_embeddings == model.config.num_classes + 1  # the labels and one null class
    # the position tables are recomputed from the config, not saved: a checkpoint holds parameters only
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("fusion", cdc.FUSIONS)
def test_resolution_embedding_sees_the_feature_map_side_and_reaches_the_output(fusion):
    """§3.2 / App. F: E embeds r_k = H / patch (not H), and e_k changes the field through the fusion."""
    model = wake(small_model(fusion=fusion))
    seen = []
    model.r_embedder.register_forward_hook(lambda m, i, o: seen.append(i[0].tolist()))
    x = {r: torch.randn(2, 3, r, r) for r in RES}
    before = {r: model(x[r], torch.tensor([0.3, 0.7]), None) for r in RES}
    assert seen == [[r / model.config.patch_size] for r in RES]
    with torch.no_grad():
        model.r_embedder.mlp[2].bias.add_(0.5)
    for r in RES:
        assert not torch.allclose(model(x[r], torch.tensor([0.3, 0.7]), None), before[r], atol=1e-4)


@pytest.mark.parametrize("fusion, patch, channels", [("xattn", 2, 3), ("add", 2, 3), ("xattn", 4, 1)])
def test_flops_per_sample_matches_counted_flops(fusion, patch, channels):
    """The analytic count used for MFU equals torch's FLOP counter, attention included. The CPU's fused
    attention kernel is invisible to the counter, so the forward runs on the math backend, where
    attention is two batched matmuls (q k^T and a v) that the counter sees: nothing is added back."""
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
        assert model.flops_per_sample(r) == counter.get_total_flops()
        assert isinstance(model.flops_per_sample(r), int)  # exact: sums over billions of samples stay exact




# ------------------------------------------------------------------------------------------------
#                                      5. Loss (eq. 13, 75)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", cdc.REDUCTIONS)
def test_loss_gradient_equals_eq13_gradient(reduction):
    torch.manual_seed(0)
    b = torch.randn(4, 3, 8, 8, dtype=f64, requires_grad=True)
    I_dot = torch.randn(4, 3, 8, 8, dtype=f64)
    g_mse, = torch.autograd.grad(cdc.velocity_loss(b, I_dot, reduction, top_pixels=768).double().sum(), b)
    eq13 = (b.pow(2) - 2 * I_dot * b).flatten(1)                                 # ||b||^2 - 2 I_dot . b
    eq13 = {"mean": eq13.mean(1), "sum": eq13.sum(1), "scaled-sum": eq13.sum(1) / 768}[reduction]
    g_eq13, = torch.autograd.grad(eq13.sum(), b)
    torch.testing.assert_close(g_mse.double(), g_eq13, rtol=1e-6, atol=1e-6)


def test_loss_reduction_sum_weights_by_pixel_count():
    b8, b16 = torch.ones(1, 3, 8, 8), torch.ones(1, 3, 16, 16)
    assert cdc.velocity_loss(b8, 0 * b8, "mean") == cdc.velocity_loss(b16, 0 * b16, "mean")
    assert cdc.velocity_loss(b16, 0 * b16, "sum") == 4 * cdc.velocity_loss(b8, 0 * b8, "sum")
    # scaled-sum: Alg. 1's weights d_k / d_K; the last stage's sample weighs what it weighs under 'mean'
    assert cdc.velocity_loss(b16, 0 * b16, "scaled-sum", 3 * 16 * 16) == cdc.velocity_loss(b16, 0 * b16, "mean")
    assert cdc.velocity_loss(b8, 0 * b8, "scaled-sum", 3 * 16 * 16) == cdc.velocity_loss(b8, 0 * b8, "mean") / 4


def test_label_dropout_rate_and_extremes():
    y = torch.randint(0, 5, (20000,))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(cdc.drop_labels(y, 0.0, 5, g), y)
    assert torch.all(cdc.drop_labels(y, 1.0, 5, g) == 5)
    frac = (cdc.drop_labels(y, 0.1, 5, g) == 5).float().mean().item()
    assert abs(frac - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(y))


class Recorder(torch.nn.Module):
    """A field that records what the training step feeds it. Its output depends on I, tau and y, so a
    sample paired with another sample's tau or label changes the loss."""

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
    """One forward per non-empty stage, the largest first (so that DDP's buckets fill during its backward:
    test_hotpath.py), together the whole batch, at the stages' sides as the stage counts say (which sample
    goes where: test_training_step_equals_alg1_rebuilt_by_hand_per_sample); label dropout 1 feeds only the
    null class, 0 only the labels, and without labels the model sees y = None; the loss reaches the model."""
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
        if labels is None:
            assert all(seen is None for _, _, seen in model.calls)
        else:
            assert want(torch.cat([seen for _, _, seen in model.calls]))
    out["loss"].backward()
    assert model.w.grad is not None and model.w.grad != 0


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
@pytest.mark.parametrize("reduction", cdc.REDUCTIONS)
@pytest.mark.parametrize("sampling", cdc.STAGE_SAMPLINGS)
def test_training_step_equals_alg1_rebuilt_by_hand_per_sample(kind, reduction, sampling):
    """Every line of Alg. 1/3 rebuilt per sample from what the model was fed: which samples go to which
    stage (stratified: fixed quotas in batch order; iid: stage and tau from t, eq. 12), x1 = D_{K->k} x,
    the coupling (eq. 8, 9) read back from I as x0 = (I - beta x1) / alpha, I_dot, the model call, the
    loss; the result is the exact batch mean, each stage's logged loss is the mean over its samples, and
    the recovered zeta = (x0 - U D x1) / sigma_k is standard normal (a wrong sigma_k, m_k or alpha fails).
    No order of random draws is assumed. B = 25 is not divisible by K = 3."""
    B, step = 25, 7
    config = cdc.CDCConfig(resolutions=RES, sigma=0.8, gamma=3.0, interpolant=kind)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 5, (B,))
    model = Recorder()
    got = cdc.training_losses(model, x, y, config, class_dropout=0.0, reduction=reduction,
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
    per_sample, zetas = torch.zeros(B), {s: [] for s in range(3)}
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
        zetas[s].append((x0 - m) / config.sigma_k(s))
        err = (0.5 * I + tau.view(-1, 1, 1, 1) + 0.1 * labels.view(-1, 1, 1, 1) - (da * x0 + db * x1)).pow(2).flatten(1)
        per_sample[idx] = {"mean": err.mean(1), "sum": err.sum(1), "scaled-sum": err.sum(1) / (3 * 32 * 32)}[reduction]
    torch.testing.assert_close(got["loss"].detach(), per_sample.mean(), rtol=1e-4, atol=1e-5)
    for s in range(3):
        torch.testing.assert_close(got["stage_loss"][s], per_sample[stage == s].mean(), rtol=1e-4, atol=1e-5)
        z = torch.cat(zetas[s]).flatten()
        assert abs(z.mean()) < 0.15 and abs(z.var() - 1) < 0.2, (s, z.mean(), z.var())


@pytest.mark.parametrize("stage_sampling", cdc.STAGE_SAMPLINGS)
def test_training_step_draws_are_independent_per_sample(stage_sampling):
    """Alg. 1 and 3 draw t (iid: stage and tau; stratified: tau), zeta and the label-dropout coin for every
    sample on its own. On one image and one label repeated B times, what the model is fed must still differ
    from sample to sample, within a stage and across stages, and look like independent draws: the taus
    are B distinct values spread as U[0, 1], the zetas read back from I are pairwise uncorrelated, the
    coins drop about half the labels of every stage, and iid's stage counts are Binomial(B, 1/K)-sized.
    (A tau, zeta, coin or t drawn once and broadcast over the batch or over a stage fails.)"""
    B, config = 96, cdc.CDCConfig(resolutions=RES)
    x, y = torch.randn(1, 3, 32, 32).repeat(B, 1, 1, 1), torch.full((B,), 2)
    model = Recorder()
    torch.manual_seed(0)
    out = cdc.training_losses(model, x, y, config, class_dropout=0.5, stage_sampling=stage_sampling, step=1,
                              generator=torch.Generator().manual_seed(0))
    taus, zetas = [], []
    for (shape, tau, labels), I in zip(model.calls, model.inputs):
        s = RES.index(shape[-1])
        a, b, _, _ = coefficients("linear", tau.double())
        x1 = cdc.down(x[:1], 2 - s).double()
        m = 0 if s == 0 else cdc.up(cdc.down(x1))
        zetas.append((((I.double() - b * x1) / a - m) / config.sigma_k(s)).flatten(1)[:, :3 * 8 * 8])
        taus.append(tau)
        dropped = (labels == model.null_class).float().mean().item()
        assert 0.1 < dropped < 0.9, (s, dropped)                  # not one coin for a stage or the batch
    tau = torch.cat(taus)
    assert len(set(tau.tolist())) == B                            # no tau shared by two samples
    assert stats.kstest(tau.numpy(), "uniform").pvalue > 1e-3
    labels = torch.cat([seen for _, _, seen in model.calls])
    assert abs((labels == model.null_class).float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / B)
    z = torch.cat(zetas)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    corr = z @ z.T / (z.shape[1] - 1)
    off = corr[~torch.eye(B, dtype=torch.bool)]
    assert off.abs().max() < 5.5 / math.sqrt(z.shape[1]), off.abs().max()  # no zeta shared by two samples
    if stage_sampling == "iid":
        assert all(abs(n - B / 3) < 4 * math.sqrt(B * 2 / 9) for n in out["stage_count"]), out["stage_count"]


def test_training_step_trains_the_dit_end_to_end():
    """AdamW steps on one fixed draw of (t, zeta) lower the loss: every stage's gradient reaches the shared
    weights through the grouped forwards."""
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    model = small_model(resolutions=config.resolutions)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(8, 3, 16, 16).clamp(-1, 1), torch.randint(0, 5, (8,))
    losses = []
    for step in range(10):
        torch.manual_seed(0)
        out = cdc.training_losses(model, x, y, config, generator=torch.Generator().manual_seed(0))
        assert all(n > 0 for n in out["stage_count"])          # all three stages in the batch
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "W_q" not in n and "W_k" not in n)
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0] and all(b < a for a, b in zip(losses[:3], losses[1:4]))


# ------------------------------------------------------------------------------------------------
#                          Stratified stage quotas (a departure from Alg. 1)
# ------------------------------------------------------------------------------------------------

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
    """E[n_k] = B w_k: the mean over N steps is B w_k within 5 standard errors (each n_k is floor or ceil, so
    its variance is at most 1/4). With equal windows (the default) every K consecutive steps give each stage
    exactly B / K per step, so every stage also sees both batch sizes."""
    config, N = quota_config(windows), 4000
    counts = torch.tensor([cdc.stage_quotas(config, B, s) for s in range(N)], dtype=f64)
    assert torch.all((counts.mean(0) - B * config.widths()).abs() < 5 * 0.5 / math.sqrt(N)), counts.mean(0)
    if windows is None:
        K = config.K
        for start in range(0, 40):
            torch.testing.assert_close(counts[start:start + K].mean(0), B * config.widths(), rtol=0, atol=1e-9)


def test_quotas_depend_on_the_step_alone():
    """Every rank gets the same counts at the same step: they depend on (config, B, step) only, not on the
    global random state (every rank seeds its own), not on the process (string hashes are salted per
    process), and read no tensor (they run, and agree, under fake tensors: no device value is waited for)."""
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


def test_stratified_estimator_has_alg1_mean_and_no_more_variance():
    """On a fixed network, the stratified batch loss and Alg. 1's i.i.d. batch loss have the same mean
    over many draws (within 4 Monte-Carlo standard errors of the difference), and the stratified one's
    variance is smaller: stage 1 (pure noise source) has a far larger loss than the later stages, and
    stratification removes that between-stage part of the variance."""
    torch.manual_seed(0)
    model = wake(cdc.create_model("tiny", depth=1, width=32, heads=2, num_classes=4, resolutions=(4, 8, 16))).eval()
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    losses = {s: [] for s in cdc.STAGE_SAMPLINGS}
    with torch.no_grad():
        for i in range(300):
            for s in cdc.STAGE_SAMPLINGS:
                torch.manual_seed(i)
                out = cdc.training_losses(model, x, y, config, class_dropout=0.0, stage_sampling=s, step=i,
                                          generator=torch.Generator().manual_seed(i))
                losses[s].append(out["loss"].item())
    a, b = torch.tensor(losses["stratified"], dtype=f64), torch.tensor(losses["iid"], dtype=f64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    assert a.var() < b.var(), (a.var(), b.var())


# ------------------------------------------------------------------------------------------------
#                                6. Samplers and CFG (Alg. 2, 4)
# ------------------------------------------------------------------------------------------------

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
    # S = 1 or no labels: one evaluation of N; else cond + uncond in one forward of 2N
    assert calls == [4, 8, 8, 4]
    assert not torch.allclose(b_c, b_null)


def test_sample_defaults_to_table7_24_euler_steps_per_stage():
    calls = []
    cdc.sample(lambda x, t, s: calls.append((s, t[0].item())) or torch.zeros_like(x), cdc.CDCConfig(resolutions=(4, 8, 16)), 2)
    assert [s for s, _ in calls] == [0] * 24 + [1] * 24 + [2] * 24       # one evaluation per Euler step
    assert [t for _, t in calls[:24]] == pytest.approx([n / 24 for n in range(24)])


def test_sde_without_noise_is_euler_and_its_last_step_adds_no_noise():
    """App. D's SDE at sde_scale 0 (no diffusion, no score drift) is Alg. 2's Euler step for step; at any
    other scale it is not; and its last step is deterministic. (sde_scale is this code's knob, not the
    paper's: its default is not pinned here; sample.py passing --sde-scale on is test_flags.py's.)"""
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    field = lambda x, t, s: -0.7 * x + t.view(-1, 1, 1, 1)  # noqa: E731  any smooth field
    x = torch.randn(3, 3, 8, 8)
    one = lambda solver, **kw: cdc.integrate_stage(field, x, 1, 4, config, solver,  # noqa: E731
                                                   generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(one("sde", sde_scale=0.0), one("euler"), rtol=0, atol=1e-7)
    assert not torch.allclose(one("sde", sde_scale=1.0), one("euler"))
    # the last step adds no noise: one step of the SDE is deterministic, whatever the generator
    last = [cdc.integrate_stage(field, x, 1, 1, config, "sde", sde_scale=1.0, generator=torch.Generator().manual_seed(g))
            for g in (1, 2)]
    torch.testing.assert_close(last[0], last[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
@pytest.mark.parametrize("res, solver, steps", [((2, 4, 8), "euler", 400), ((2, 4, 8), "heun", 40),
                                                ((2, 8), "heun", 40)])
def test_ode_chain_transports_exactly_to_every_stage_marginal(kind, res, solver, steps):
    """eq. 16 end to end, without sampling noise, on 2x steps and Table 6's 4x step: the multi-stage ODE with
    the exact field ends at N(D_{K->k} mu, D_{K->k} Sigma D_{K->k}^T) at every stage, up to the solver's
    discretisation error (2% of the largest variance; the last stage is the stiffest, its source noise
    sigma_3 = sigma/4 is small). The moments come from theory/prior_equivalence.exact_chain_moments, itself
    tested against Monte-Carlo runs of cdc.sample in test_theory.py."""
    mu, Sigma = random_gaussian((1, 8, 8), seed=0)
    config = cdc.CDCConfig(resolutions=res, interpolant=kind)
    oracle = GaussianOracle(mu, Sigma, config)
    for s, (mean, cov) in enumerate(exact_chain_moments(oracle, steps, solver)):
        m, S = oracle.marginal(s)
        scale = S.diag().max().sqrt()
        assert (mean - m).abs().max() < 0.02 * scale, (s, (mean - m).abs().max())
        assert (cov - S).abs().max() < 0.02 * scale ** 2, (s, (cov - S).abs().max())


@pytest.mark.parametrize("kind", cdc.INTERPOLANTS)
def test_sde_chain_reaches_every_stage_marginal(kind):
    """App. D's SDE (eq. 34) with the exact field, through cdc.sample: 3000 chains end at every stage's
    marginal N(D mu, D Sigma D^T) of a full-covariance Gaussian, by theory's moment_test (chi2 of the mean,
    Bonferroni z of every covariance entry; its calibration and power are test_theory.py's)."""
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
    """App. D, eq. 28/34: the score as the SDE sampler derives it from the velocity, s = -E[sigma_k zeta | x] /
    (alpha sigma_k^2) (Tweedie: I = (a function of x1) + alpha sigma_k zeta with zeta independent of x1),
    equals grad log rho_tau (eq. 26) of the oracle's Gaussian marginal of I_tau, at every stage (stage 1
    Gaussian source; k > 1 the coupling)."""
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
    model = wake(small_model(seed=2))
    config = cdc.CDCConfig(resolutions=RES)
    field = cdc.guided_field(model, torch.tensor([1, 2]), 3.0)
    run = lambda seed: cdc.sample(field, config, 2, steps=[2, 1, 1], solver=solver,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed), return_stages=True)
    a, b, c = run(0), run(0), run(1)
    assert [o.shape[-1] for o in a] == list(RES)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[-1], c[-1])
    final = cdc.sample(field, config, 2, steps=[2, 1, 1], solver=solver, generator=torch.Generator().manual_seed(0))
    assert torch.equal(final, a[-1])


@pytest.mark.parametrize("res", [(2, 4, 8), (2, 8)])
def test_next_stage_starts_from_upsampled_output_plus_sigma_k_noise(res):
    """Alg. 2 lines 4-7 (eq. 17), on 2x steps and Table 6's 4x step: with a zero field each stage passes its
    input through, so stage k's output minus U(stage k-1's) is sigma_k zeta: std sigma_k, and its mean over
    each block of 4^L pixels std sigma_k / 2^L; stage 1 outputs its N(0, sigma^2) source."""
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
    """No host draw per stage: sampling on the meta device with no generator (the device's own RNG) makes
    no host-to-device copy at all, while a CPU generator feeding the same device does copy (so the count
    can see one). A host draw plus a copy per stage fails the first assertion."""
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    zero = lambda x, t, s: torch.zeros_like(x)  # noqa: E731  outputs are then the sampler's own noise
    for solver in ("euler", "sde"):
        with HostToDevice() as seen:
            out = cdc.sample(zero, config, 3, steps=2, solver=solver, device="meta")
        assert seen.copies == [] and out.device.type == "meta" and out.shape == (3, 3, 16, 16)
    with HostToDevice() as seen:
        cdc.sample(zero, config, 3, steps=1, generator=torch.Generator("cpu").manual_seed(5), device="meta")
    assert seen.copies


def test_score_time_grid_is_uniform_in_sqrt_one_minus_tau():
    g = cdc.INTERPOLANTS["score"].grid(10)
    assert g[0] == 0 and g[-1] == 1 and all(b > a for a, b in zip(g, g[1:]))
    u = [math.sqrt(1 - v) for v in g]
    assert max(abs((u[i] - u[i + 1]) - 0.1) for i in range(10)) < 1e-12
    assert cdc.INTERPOLANTS["linear"].grid(4) == [0, 0.25, 0.5, 0.75, 1.0]
