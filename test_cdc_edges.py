"""Edges of cdc.py's network (section 4) that the property tests in test_cdc.py do not reach: the model
config's checks and the forward pass against DiT's equations written out by hand. Each was found by
mutation testing (bench/mutation.py): a change to the code that every other test let pass."""

import pytest
import torch

import cdc


# ------------------------------------------------------------------------------------------------
#                                          Model config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, words", [
    (dict(width=64, heads=6), "divisible by heads"),        # 64 = 6 * 10 + 4: not divisible (even quotient)
    (dict(width=36, heads=4), "even head dim"),             # head dim 9
    (dict(width=6, heads=1), "divisible by 4"),
    (dict(width=64.0), "positive int"),
    (dict(depth=0), "positive int"),
    (dict(num_classes=-1), "num_classes must be >= 0"),
    (dict(resolutions=(8, 12), patch_size=8), "not divisible by patch size"),
    (dict(fusion="cat"), "unknown fusion"),
])
def test_model_config_refuses(kw, words):
    with pytest.raises(ValueError, match=words):
        cdc.DiTConfig(**{**dict(depth=1, width=32, heads=2, patch_size=2, resolutions=(4, 8)), **kw})


def test_model_config_edge_values_are_allowed():
    c = cdc.DiTConfig(depth=1, width=4, heads=2, patch_size=1, in_channels=1, num_classes=0, freq_dim=1,
                      resolutions=(1, 2))
    assert (c.depth, c.width, c.num_classes, c.resolutions) == (1, 4, 0, (1, 2))
    model = cdc.DiT(cdc.DiTConfig(depth=1, width=8, heads=2, patch_size=1, in_channels=1, num_classes=0, resolutions=(2,)))
    assert model(torch.zeros(3, 1, 2, 2), torch.rand(3)).shape == (3, 1, 2, 2) and model.null_class == 0


# ------------------------------------------------------------------------------------------------
#                     The network against DiT's equations, written out by hand
# ------------------------------------------------------------------------------------------------


def woken(seed=0, **kw):
    torch.manual_seed(seed)
    model = cdc.create_model("tiny", **{**dict(depth=2, width=32, heads=2, num_classes=3, resolutions=(4, 8)), **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no zero (adaLN-Zero) or symmetric weights left
    return model.double()


def test_embeddings_are_the_transformer_sinusoids():
    v = torch.tensor([0.0, 0.3, 7.0], dtype=torch.float64)
    half = 4
    f = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(half) / half)
    want = torch.cat([torch.cos(v[:, None] * f), torch.sin(v[:, None] * f)], 1)
    torch.testing.assert_close(cdc.sinusoidal_embedding(v, 8).double(), want, rtol=1e-6, atol=1e-6)
    side, dim = 3, 8
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    e = lambda p: torch.cat([torch.sin(p * omega), torch.cos(p * omega)])  # noqa: E731
    want = torch.stack([torch.cat([e(r), e(c)]) for r in range(side) for c in range(side)])  # rows first
    torch.testing.assert_close(cdc.pos_embed_2d(side, dim).double(), want, rtol=1e-6, atol=1e-6)


def test_dit_forward_is_eqs_39_to_45_written_out():
    """patchify + position -> adaLN-Zero blocks (LN, x (1 + scale) + shift, attention / MLP, gated
    residual) -> final adaLN + linear -> unpatchify, with c = Gamma(tau) + fusion(E(r_k)) + label."""
    model = woken(fusion="xattn")
    F = torch.nn.functional
    x, tau, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0.2, 0.9], dtype=torch.float64), torch.tensor([1, 3])
    p, D, H = 2, 32, 2

    def mlp(m, v):
        return m.mlp[2](F.silu(m.mlp[0](v)))

    def sinus(v, dim=256):
        f = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(dim // 2) / (dim // 2)).double()
        return torch.cat([torch.cos(v[:, None] * f), torch.sin(v[:, None] * f)], 1)

    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731
    mod = lambda v, shift, scale: v * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    tokens = x.unfold(2, p, p).unfold(3, p, p)                        # (N, C, 4, 4, p, p)
    tokens = tokens.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * p * p)
    W = model.x_embedder.weight.reshape(D, -1)
    h = tokens @ W.T + model.x_embedder.bias + model.pos_embed_8.double()
    gamma = mlp(model.t_embedder, sinus(1000 * tau))
    e = mlp(model.r_embedder, sinus(torch.tensor([4.0], dtype=torch.float64)))
    fu = model.fusion
    c = gamma + fu.W_o(fu.W_v(e)) + model.y_embedder.weight[y]       # eq. 42's softmax over one key is 1
    for blk in model.blocks:
        s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation[1](F.silu(c)).chunk(6, 1)
        a = mod(ln(h), s1, sc1)
        q, k, v = (blk.attn.qkv(a).view(2, 16, 3, H, D // H).permute(2, 0, 3, 1, 4))
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
