"""CDC-FM: Stochastic Interpolants via Conditional Dependent Coupling, in one file, in the paper's order:

    1. Operators            §3.1        D (2x2 block average), U (replication)
    2. Stages and time      §3.2        sigma_k (eq. 20), t -> (stage, tau) (eq. 12), interpolants (Table 5)
    3. Coupling             eq. 8-11    x0^(1) ~ N(0, s^2 I);  x0^(k) = U(D(x1^(k))) + sigma_k zeta
    4. Model                App. F      one DiT for every stage, resolution embedding fused by eqs. 41-44
    5. Loss                 eq. 13, 75  MSE form, class dropout, one training step over all stages (Alg. 1/3)
    6. Samplers             Alg. 2, 4   Euler / Heun per stage, CFG, and the SDE of App. D (eq. 34)

Images are NCHW. Stages count from 0 (`stage = k - 1`): stage 0 is the paper's k = 1, stage K-1 the full
resolution. A velocity field is any callable field(x, tau, stage) -> b, tau an (N,) tensor in [0, 1].
Arguments are checked once, where they enter. Derivations and departures: docs/method.md.
"""

import itertools
import math
import random
from dataclasses import dataclass, asdict, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ------------------------------ 1. Operators (§3.1) -----------------------------------------------

def down(x: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """D applied `levels` times: the mean over (2^levels x 2^levels) blocks; down(x, K-k) is D_{K->k} (§3.1).
    One pool of side 2^L equals L nested 2x2 means (§3.1's transitivity), and is cheaper."""
    f = 2 ** levels
    if f == 1:
        return x
    if x.shape[-1] % f or x.shape[-2] % f:  # avg_pool2d would silently drop the last rows and columns
        raise ValueError(f"cannot downsample {tuple(x.shape[-2:])} by {f}: sides must be divisible by {f}")
    return F.avg_pool2d(x, f)


def up(x: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """U applied `levels` times: replicate every pixel into a (2^levels x 2^levels) block."""
    f = 2 ** levels
    return x if f == 1 else x.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


# D o U = id, so P = U o D is an orthogonal projection and Assumption 1 / Lemma 1 hold exactly, not as
# assumptions (test_cdc.py). Derivation: docs/method.md#coarse-projection

# ------------------------------ 2. Stages and time (§3.2) -----------------------------------------

# Departure (Table 5, score interpolant): alpha_dot = -tau/alpha diverges at tau = 1. Training targets take it
# at min(tau, SCORE_TAU_MAX), |alpha_dot| <= 70.7; the samplers step uniformly in sqrt(1 - tau) (`Interpolant.grid`).
# Derivation: docs/method.md#score-based-interpolant-at-the-singular-end
SCORE_TAU_MAX = 1.0 - 1e-4


@dataclass(frozen=True)
class Interpolant:
    """I_tau = alpha x0 + beta x1 (eq. 1, 12; Table 5); adding one touches only INTERPOLANTS.
    coefficients: tau -> (alpha, beta, alpha_dot, beta_dot).
    singular_end: alpha_dot diverges at tau = 1 (grid uniform in sqrt(1 - tau); Heun skips the last corrector)."""
    coefficients: Callable
    singular_end: bool = False

    def grid(self, steps: int) -> list:
        """tau_0 = 0 < ... < tau_N = 1: uniform (Alg. 2 line 10), or 1 - (1 - n/N)^2 for a singular end."""
        if self.singular_end:
            return [1.0 - (1.0 - n / steps) ** 2 for n in range(steps + 1)]
        return [n / steps for n in range(steps + 1)]


def _linear(tau):  # eq. 12: alpha = 1 - tau, beta = tau
    return 1 - tau, tau, -torch.ones_like(tau), torch.ones_like(tau)


def _trigonometric(tau):  # Table 5 (Albergo et al. 2023a): alpha = cos(pi tau / 2), beta = sin(pi tau / 2)
    h = math.pi / 2
    return torch.cos(h * tau), torch.sin(h * tau), -h * torch.sin(h * tau), h * torch.cos(h * tau)


def _score(tau):  # Table 5 (Song et al. 2021): alpha = sqrt(1 - tau^2), beta = tau; alpha_dot clamped (above)
    tc = tau.clamp(max=SCORE_TAU_MAX)
    return torch.sqrt((1 - tau * tau).clamp(min=0)), tau, -tc / torch.sqrt(1 - tc * tc), torch.ones_like(tau)


INTERPOLANTS = {
    "linear": Interpolant(_linear),
    "trigonometric": Interpolant(_trigonometric),
    "score": Interpolant(_score, singular_end=True),
}


@dataclass(frozen=True)
class CDCConfig:
    """Everything that defines the multi-stage interpolant (not the network); checked here, once.
    resolutions: image side of every stage, coarse to fine, each a power-of-two multiple of the one before
                 (Table 6's 64 -> 256 is 4x: D and U then act on 4x4 blocks, and sigma_k is unchanged).
    sigma, gamma: stage-1 source std (eq. 8) and diminish factor, sigma_k = gamma^-(k-1) sigma (eq. 20).
    windows:     widths of the stage windows [t0^k, t1^k] (eq. 12), summing to 1 (None = equal); also each
                 stage's share of every batch (`stage_quotas`).
    interpolant: 'linear' (eq. 12), 'trigonometric' or 'score' (Table 5)."""
    resolutions: tuple = (32, 64, 128, 256)
    sigma: float = 1.0
    gamma: float = 2.0
    windows: Optional[tuple] = None
    interpolant: str = "linear"

    def __post_init__(self):
        res = tuple(int(r) for r in self.resolutions)
        w = None if self.windows is None else tuple(float(v) for v in self.windows)
        object.__setattr__(self, "resolutions", res)
        object.__setattr__(self, "windows", w)
        if not res or res[0] < 1 or any(b <= a or b % a or (b // a) & (b // a - 1) for a, b in zip(res, res[1:])):
            raise ValueError(f"resolutions must be positive sides, each a power-of-two multiple (2x, 4x, ...) of the "
                             f"one before, e.g. 32,64,128,256 or 64,256; got {res}")
        if not (self.sigma > 0 and self.gamma >= 1):
            raise ValueError(f"need sigma > 0 (eq. 8) and gamma >= 1 (eq. 20), got {self.sigma}, {self.gamma}")
        if self.interpolant not in INTERPOLANTS:
            raise ValueError(f"unknown interpolant {self.interpolant!r}; choose one of {', '.join(INTERPOLANTS)}")
        if w is not None and (len(w) != len(res) or min(w) <= 0 or abs(sum(w) - 1) > 1e-6):
            raise ValueError(f"windows must be {len(res)} positive widths summing to 1 (one per stage), got {w}")

    @property
    def K(self) -> int:
        return len(self.resolutions)

    def levels(self, stage: int) -> int:
        """2x2 levels from stage `stage` - 1 to `stage` (1 for 2x, 2 for 4x): D, U of eq. 9 and 17 use 2^levels."""
        return (self.resolutions[stage] // self.resolutions[stage - 1]).bit_length() - 1 if stage > 0 else 0

    def levels_below_top(self, stage: int) -> int:
        """Levels of D_{K->k}: from the full resolution down to stage `stage`."""
        return (self.resolutions[-1] // self.resolutions[stage]).bit_length() - 1

    def sigma_k(self, stage: int) -> float:
        """eq. 20: sigma_k = gamma^-(k-1) sigma; stage 0 (k = 1) gives sigma itself (eq. 8)."""
        return self.sigma * self.gamma ** (-stage)

    def widths(self) -> torch.Tensor:
        """Window widths t1^k - t0^k (float64, K values summing to 1)."""
        return torch.tensor(self.windows or [1.0 / self.K] * self.K, dtype=torch.float64)

    def boundaries(self) -> torch.Tensor:
        """t0^1 = 0 < t1^1 = t0^2 < ... < t1^K = 1 (float64, K + 1 values)."""
        b = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.widths(), 0)])
        b[-1] = 1.0
        return b

    def stage_and_tau(self, t: torch.Tensor):
        """eq. 12, vectorised: (stage: long, tau: float32) on t's device, k = arg_k {t in [t0^k, t1^k)} (t = 1
        in the last), tau = (t - t0^k) / (t1^k - t0^k). A float32 t rounded onto a boundary goes later."""
        b = self.boundaries().to(t.device)
        t64 = t.to(torch.float64)
        stage = torch.searchsorted(b[1:-1].contiguous(), t64, right=True)
        tau = (t64 - b[stage]) / (b[stage + 1] - b[stage])
        return stage, tau.clamp(0, 1).to(torch.float32)

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, tau: torch.Tensor):
        """I_tau and its time derivative I_dot (eq. 1, 12); tau has shape (N,)."""
        a, b, da, db = (c.view(-1, 1, 1, 1).to(x0.dtype) for c in INTERPOLANTS[self.interpolant].coefficients(tau))
        return a * x0 + b * x1, da * x0 + db * x1

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------ 3. Conditional dependent coupling (eq. 8-11) ----------------------

def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise, drawn on the generator's device (a CPU generator gives the same numbers anywhere)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device=device, dtype=dtype)


def coupling_source(x1: torch.Tensor, stage: int, cfg: CDCConfig, zeta: Optional[torch.Tensor] = None,
                    generator=None) -> torch.Tensor:
    """x0^(k) ~ rho_0^(k)(x0 | x1^(k)): sigma zeta at stage 0 (eq. 8), else U(D(x1)) + sigma_k zeta (eq. 9, 10).
    As D(x1^(k)) = x1^(k-1), the latter is also the inference prior, eq. 17 (App. E.2)."""
    if zeta is None:
        zeta = randn(x1.shape, generator, x1.device, x1.dtype)
    if stage == 0:
        return cfg.sigma * zeta
    L = cfg.levels(stage)
    return up(down(x1, L), L) + cfg.sigma_k(stage) * zeta


# ------------------------------ 4. Model (App. F) -------------------------------------------------

FUSIONS = ("xattn", "add")


@dataclass
class DiTConfig:
    """The network's shape (checked when built; create_model fills it from a preset)."""
    depth: int = 28
    width: int = 1152          # d_model
    heads: int = 16            # head dim d_h = width / heads (72 for XL, Table 7)
    patch_size: int = 4        # Table 7
    in_channels: int = 3
    num_classes: int = 1000    # label `num_classes` is the null class used for CFG
    mlp_ratio: float = 4.0
    fusion: str = "xattn"      # 'xattn' (eqs. 41-44) or 'add' (Table 4 ablation)
    resolutions: tuple = CDCConfig.resolutions  # stage sides it accepts: pass the CDCConfig's (create_model)
    freq_dim: int = 256        # sinusoidal frequency features before the embedding MLPs

    def __post_init__(self):
        self.resolutions = tuple(int(r) for r in self.resolutions)
        for name in ("depth", "width", "heads", "patch_size", "in_channels", "freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads} into an even head dim")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by 4 (2D sin-cos position embedding)")
        for r in self.resolutions:
            if r % self.patch_size:
                raise ValueError(f"image size {r} is not divisible by patch size {self.patch_size}; "
                                 f"choose resolutions that are multiples of the patch size")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")


PRESETS = {  # DiT's widths, depths and heads (Peebles & Xie 2023, Table 1); tiny is for CPU demos
    "tiny": dict(depth=4, width=192, heads=3, patch_size=2),
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "XL": dict(depth=28, width=1152, heads=16),
}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sinusoidal_embedding(v: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoids (Vaswani et al.) of a batch of scalars: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=v.device, dtype=torch.float32) / half)
    args = v.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of a side x side token grid: (side^2, dim), rows first."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(side, dtype=torch.float64)
    emb1d = torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], dim=1)  # (side, dim/2)
    gy, gx = emb1d[:, None, :].expand(side, side, -1), emb1d[None, :, :].expand(side, side, -1)
    return torch.cat([gy, gx], dim=-1).reshape(side * side, dim).float()


class ScalarEmbedder(nn.Module):
    """Sinusoid + MLP. As Gamma it embeds time (eq. 39); as E it embeds the feature-map side r_k (eq. 40)."""

    def __init__(self, width: int, freq_dim: int, scale: float = 1.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, v):
        return self.mlp(sinusoidal_embedding(v * self.scale, self.freq_dim).to(self.mlp[0].weight.dtype))


class ResolutionFusion(nn.Module):
    """c_{k,t} from gamma_t and e_k: cross-attention (eqs. 41-44) or plain addition (Table 4 ablation).
    Eq. 42 is a softmax over one key, so identically 1: c = gamma_t + W_o W_v e_k, and W_q, W_k never train.
    Kept as written (bias-free). Derivation: docs/method.md#resolution-fusion"""

    def __init__(self, width: int, head_dim: int, mode: str):
        super().__init__()
        self.mode, self.head_dim = mode, head_dim
        if mode == "xattn":
            self.W_q = nn.Linear(width, head_dim, bias=False)
            self.W_k = nn.Linear(width, head_dim, bias=False)
            self.W_v = nn.Linear(width, head_dim, bias=False)
            self.W_o = nn.Linear(head_dim, width, bias=False)

    def forward(self, gamma_t, e_k):
        if self.mode == "add":
            return gamma_t + e_k
        q, k, v = self.W_q(gamma_t), self.W_k(e_k), self.W_v(e_k)           # eq. 41
        logits = (q * k).sum(-1, keepdim=True) / math.sqrt(self.head_dim)   # one key per query
        alpha = logits.softmax(dim=-1)                                      # eq. 42 (== 1)
        z = self.W_o(alpha * v)                                             # eq. 43
        return gamma_t + z                                                  # eq. 44


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)  # Table 7: attention bias true
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels where available
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    """adaLN-Zero block (eq. 45): shift, scale and gate from c; zero gates make it the identity at init."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, width, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """b^theta(I_tau^(k), tau, e_k, c): one set of weights for every stage (App. F). The stage is read off
    the input size: E embeds the feature-map side r_k = H / p (§3.2)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.null_class = config.num_classes
        self.grad_checkpointing = False
        D, p = config.width, config.patch_size
        self.x_embedder = nn.Conv2d(config.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = ScalarEmbedder(D, config.freq_dim, scale=1000.0)  # Table 7: 1000 train timesteps
        self.r_embedder = ScalarEmbedder(D, config.freq_dim)
        self.fusion = ResolutionFusion(D, D // config.heads, config.fusion)
        self.y_embedder = nn.Embedding(config.num_classes + 1, D)  # +1: the null class for CFG (App. I)
        self.blocks = nn.ModuleList([DiTBlock(D, config.heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, p, config.in_channels)
        for r in config.resolutions:  # one fixed position table per stage token grid, never recomputed
            self.register_buffer(f"pos_embed_{r}", pos_embed_2d(r // p, D), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for emb in (self.t_embedder, self.r_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)  # the field is exactly 0 at initialisation
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x, side):
        p, C = self.config.patch_size, self.config.in_channels
        x = x.view(x.shape[0], side, side, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, side * p, side * p)

    def forward(self, x, tau, y=None):
        """x: (N, C, H, H) at one stage's resolution, tau: (N,) in [0, 1], y: (N,) labels or None (= null)."""
        N, C, H, W = x.shape
        if H != W or H not in self.config.resolutions or C != self.config.in_channels:
            raise ValueError(f"input {tuple(x.shape[1:])} does not match the model: expected "
                             f"({self.config.in_channels}, r, r) with r in {self.config.resolutions}")
        r_k = H // self.config.patch_size
        # fp32 residual stream, cast explicitly (DiT's fp32 position table promotes it implicitly); matmuls
        # stay bf16 under autocast. Why: docs/method.md#residual-stream-in-fp32
        h = self.x_embedder(x).flatten(2).transpose(1, 2).float() + getattr(self, f"pos_embed_{H}")
        gamma_t = self.t_embedder(tau)                     # eq. 39
        e_k = self.r_embedder(x.new_full((1,), r_k))       # eq. 40, shared by the batch
        c = self.fusion(gamma_t, e_k)                      # eqs. 41-44
        if y is None:
            y = torch.full((N,), self.null_class, device=x.device, dtype=torch.long)
        c = c + self.y_embedder(y)                         # class condition, added as in DiT
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.unpatchify(self.final_layer(h, c), r_k)

    def flops_per_sample(self, resolution: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add, attention's N^2 products included) of one image;
        training costs 3x this."""
        config = self.config
        n, D = (resolution // config.patch_size) ** 2, config.width
        p2c = config.patch_size ** 2 * config.in_channels
        hidden, d_h = int(D * config.mlp_ratio), D // config.heads
        per_block = 2 * n * D * (3 * D + D + 2 * hidden) + 4 * n * n * D + 2 * D * 6 * D
        embed = 2 * (2 * (config.freq_dim * D + D * D))                    # Gamma(tau) and E(r_k) MLPs
        fusion = 2 * (3 * D * d_h + d_h * D) if config.fusion == "xattn" else 0
        io = 2 * n * p2c * D * 2 + 2 * D * 2 * D                            # patchify, final adaLN + linear
        return config.depth * per_block + embed + fusion + io


def create_model(name: str = "XL", **overrides) -> DiT:
    """cdc.create_model('XL', patch_size=4, num_classes=1000, resolutions=cdc_cfg.resolutions) -> the paper's
    677M-parameter DiT, accepting the stage sides of the interpolant it is trained with."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(DiTConfig)}
    if set(overrides) - known:
        raise ValueError(f"unknown model option(s) {', '.join(sorted(set(overrides) - known))}; "
                         f"choose from {', '.join(sorted(known))}")
    return DiT(DiTConfig(**{**PRESETS[name], **overrides}))


# ------------------------------ 5. Loss (eq. 13, 75; Alg. 1, 3) -----------------------------------

REDUCTIONS = ("mean", "sum", "scaled-sum")
STAGE_SAMPLINGS = ("stratified", "iid")


def velocity_loss(b: torch.Tensor, I_dot: torch.Tensor, reduction: str = "mean",
                  top_pixels: Optional[int] = None) -> torch.Tensor:
    """Per-sample loss of eq. 13 in MSE form ||b - I_dot||^2 (eq. 13 plus ||I_dot||^2, no theta: the same gradient
    without cancelling two large terms), over the d_k = C*H*W values of a stage-k sample: 'sum' is Alg. 1 line 17
    / eq. 75 read literally (a stage-k sample weighs d_k); 'scaled-sum' (training_losses' default) is that sum /
    d_K (top_pixels): the paper's stage weights at a per-pixel mean's gradient scale; 'mean' weighs every stage
    alike (a departure, the CPU demo's: it learns sooner early, README#the-loss-weighting-of-alg-1).
    Derivation: docs/method.md#loss-in-mse-form"""
    sq = (b.float() - I_dot.float()).pow(2).flatten(1)
    if reduction == "mean":
        return sq.mean(1)
    return sq.sum(1) if reduction == "sum" else sq.sum(1) / top_pixels


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device copy that never blocks the host (pinned memory) on CUDA."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator=None) -> torch.Tensor:
    """eq. 74: each label becomes the null class with probability p (coins: `generator`, else y's device RNG)."""
    coin_device = y.device if generator is None else generator.device
    drop = torch.rand(y.shape, generator=generator, device=coin_device) < p
    return torch.where(_to_device(drop, y.device), torch.full_like(y, null_class), y)


def stage_quotas(cfg: CDCConfig, batch: int, step: int = 0) -> list:
    """Samples per stage in one stratified step: systematic sampling of Alg. 1's t ~ U[0, 1] over eq. 12's windows,
    n_k = ceil(B t1^k - theta) - ceil(B t0^k - theta) (floor(B w_k) or one more, summing to B). theta =
    (step mod K + u) / K, u ~ U[0, 1) seeded by the step: uniform, so E[n_k] = B w_k; the same on every rank;
    pure Python, so the step reads no device value; exact when every B w_k is an integer, and with equal
    windows over any K consecutive steps. Derivation: docs/method.md#stratified-stage-sampling"""
    t = itertools.accumulate(cfg.windows or (1.0 / cfg.K,) * cfg.K, initial=0.0)
    edges = [round(e) if abs(e - round(e)) < 1e-9 else e for e in (batch * v for v in t)]  # float sums miss by a hair
    edges[-1] = batch
    theta = (step % cfg.K + random.Random(step).random()) / cfg.K
    return [math.ceil(hi - theta) - math.ceil(lo - theta) for lo, hi in zip(edges, edges[1:])]


def stage_loss(model: nn.Module, x1: torch.Tensor, y: Optional[torch.Tensor], tau: torch.Tensor, stage: int,
               cfg: CDCConfig, reduction: str = "scaled-sum") -> torch.Tensor:
    """Per-sample loss of one stage (Alg. 1 lines 6-18) for images x1 = x1^(k) at the stage's side."""
    x0 = coupling_source(x1, stage, cfg)                        # lines 6-12 (eq. 8, 9)
    I, I_dot = cfg.interpolate(x0, x1, tau)                     # lines 13-14
    top_pixels = x1[0].numel() * 4 ** cfg.levels_below_top(stage)  # d_K, for 'scaled-sum'
    return velocity_loss(model(I, tau, y), I_dot, reduction, top_pixels)  # lines 16-18


def forward_order(K: int):
    """Stages largest first, so that DDP's all-reduce overlaps the largest stage's backward.
    Why: docs/method.md#stage-order-and-ddp"""
    return range(K - 1, -1, -1)


def training_losses(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], cfg: CDCConfig,
                    class_dropout: float = 0.1, reduction: str = "scaled-sum", generator=None,
                    stage_sampling: str = "stratified", step: int = 0) -> dict:
    """One step of Alg. 1 / Alg. 3 for full-resolution images x^(K) and labels y, one model call per non-empty
    stage in `forward_order`. 'iid' is Alg. 1 lines 3-4 (t from the CPU `generator`, samples grouped by stage);
    'stratified' (default, a departure: docs/method.md#stratified-stage-sampling) gives stage k `stage_quotas`
    samples in batch order, tau ~ U[0, 1] on x's device. Pass the bare (or compiled) model (it reads
    model.null_class); for DDP, wrap a module that calls this. Returns {'loss': the batch mean (differentiable),
    'stage_loss': (K,) detached per-stage means (NaN for an empty stage), 'stage_count': K ints}."""
    B, K, R, device = x.shape[0], cfg.K, cfg.resolutions[-1], x.device
    assert x.shape[-2:] == (R, R), f"training images must be {R}x{R} (a smaller one would pass for a lower stage's)"
    assert 0 <= class_dropout <= 1 and reduction in REDUCTIONS and stage_sampling in STAGE_SAMPLINGS
    if stage_sampling == "iid":
        t = torch.rand(B, generator=generator)                  # Alg. 1 line 3, on the CPU
        stage, tau = cfg.stage_and_tau(t)                       # Alg. 1 line 4
        counts = torch.bincount(stage, minlength=K).tolist()
        order = _to_device(torch.argsort(stage, stable=True), device)
        x, y, tau = x[order], None if y is None else y[order], _to_device(tau[order], device)
    else:
        counts, tau = stage_quotas(cfg, B, step), torch.rand(B, device=device)
    if y is not None and class_dropout > 0:
        y = drop_labels(y, class_dropout, model.null_class)     # Alg. 3 line 15
    starts = [sum(counts[:s]) for s in range(K)]
    total = torch.zeros((), device=device)
    per_stage = torch.full((K,), float("nan"), device=device)
    for s in forward_order(K):
        if counts[s] == 0:
            continue
        part = slice(starts[s], starts[s] + counts[s])
        x1 = down(x[part], cfg.levels_below_top(s))             # x1^(k) = D_{K->k}(x^(K)), line 5
        per_sample = stage_loss(model, x1, None if y is None else y[part], tau[part], s, cfg, reduction)
        total = total + per_sample.sum()
        per_stage[s] = per_sample.detach().mean()
    return {"loss": total / B, "stage_loss": per_stage, "stage_count": counts}


# ------------------------------ 6. Samplers (Alg. 2, Alg. 4, App. D eq. 34) -----------------------

SOLVERS = ("euler", "heun", "sde")
Field = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def guided_field(model: nn.Module, y: Optional[torch.Tensor], cfg_scale: float = 1.0) -> Field:
    """The DiT as a velocity field with CFG (eq. 77): b_null + S (b_c - b_null), one S for every stage (§3.4),
    both halves in one batch. y=None samples the unconditional model."""
    def field(x, tau, stage):
        if y is None or cfg_scale == 1:  # b_cfg = b_c: one network evaluation, not two
            return model(x, tau, y).float()
        null = torch.full_like(y, model.null_class)
        b = model(torch.cat([x, x]), torch.cat([tau, tau]), torch.cat([y, null])).float()
        b_c, b_null = b.chunk(2)
        return b_null + cfg_scale * (b_c - b_null)
    return field


def source_noise_estimate(field_value, x, tau, stage, cfg: CDCConfig):
    """E[sigma_k zeta | I_tau = x] from the velocity b = E[I_dot | I_tau = x], in closed form:
    (beta b - beta' x + P(alpha b - alpha' x)) / (alpha' beta - beta' alpha), P = U o D (eq. 9), P = 0 at stage 0.
    It gives the score of eq. 28 for the SDE (eq. 34). Derivation: docs/method.md#source-noise-from-the-velocity"""
    a, bt, da, db = (c.view(-1, 1, 1, 1) for c in INTERPOLANTS[cfg.interpolant].coefficients(tau))
    est = bt * field_value - db * x
    if stage > 0:
        L = cfg.levels(stage)
        est = est + up(down(a * field_value - da * x, L), L)
    return est / (da * bt - db * a)


def steps_per_stage(steps, K: int) -> list:
    """N_k of Alg. 2 for each of the K stages, from one positive int (every stage) or a list of K."""
    many = list(steps) if isinstance(steps, (list, tuple)) else [steps] * K
    if len(many) != K or not all(isinstance(n, int) and n >= 1 for n in many):
        raise ValueError(f"steps per stage must be a positive int or a list of {K} positive ints")
    return many


@torch.no_grad()
def integrate_stage(field: Field, x: torch.Tensor, stage: int, steps: int, cfg: CDCConfig,
                    solver: str = "euler", sde_scale: float = 1.0, generator=None) -> torch.Tensor:
    """Carry X_0^(k) = x to X_1^(k) along one stage (Alg. 2 lines 9-13, eq. 78-80).
    euler: X += h b(X, tau) (Alg. 2, 1 NFE per step). heun: predictor-corrector (2 NFE; 1 on a singular end).
    sde:   Euler-Maruyama on eq. 34 with s = -E[sigma_k zeta | x] / (alpha sigma_k^2) (eq. 28) and, our choice,
           eps_tau = sde_scale * alpha_tau * sigma_k^2, so eps s is finite; no noise on the last step.
           Derivation: docs/method.md#sde-sampler"""
    assert solver in SOLVERS and sde_scale >= 0, f"solver {solver!r} not in {SOLVERS}, or sde_scale {sde_scale} < 0"
    path = INTERPOLANTS[cfg.interpolant]
    grid = path.grid(steps)
    ones = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    for t_n, t_next in zip(grid[:-1], grid[1:]):
        h, tau = t_next - t_n, ones * t_n
        b = field(x, tau, stage)
        if solver == "euler" or (solver == "heun" and t_next == 1.0 and path.singular_end):
            x = x + h * b
        elif solver == "heun":
            x_pred = x + h * b
            x = x + 0.5 * h * (b + field(x_pred, ones * t_next, stage))
        else:
            noise = source_noise_estimate(b, x, tau, stage, cfg)
            eps = sde_scale * path.coefficients(tau)[0].view(-1, 1, 1, 1) * cfg.sigma_k(stage) ** 2
            x = x + h * (b - sde_scale * noise)
            if t_next < 1.0:
                x = x + torch.sqrt(2 * eps * h) * randn(x.shape, generator, x.device, x.dtype)
    return x


@torch.no_grad()
def sample(field: Field, cfg: CDCConfig, n: int, channels: int = 3, steps=24, solver: str = "euler",
           sde_scale: float = 1.0, generator=None, device=None, return_stages: bool = False):
    """Multi-stage sampling (Alg. 2 / Alg. 4, eq. 16-17, 79-81): x0^(1) ~ N(0, sigma^2 I), then each stage
    starts from U(x1^(k-1)) + sigma_k zeta (eq. 17). steps: N_k, one int or a list of K. Noise: `generator`
    (on its device; on a GPU pass one there). Returns the images, or with return_stages each stage's (Fig. 9)."""
    steps = steps_per_stage(steps, cfg.K)
    r = cfg.resolutions[0]
    x = cfg.sigma * randn((n, channels, r, r), generator, device)          # Alg. 2 line 1
    outputs = []
    for s in range(cfg.K):
        if s > 0:                                                           # lines 4-8, eq. 17
            zeta = randn((n, channels, cfg.resolutions[s], cfg.resolutions[s]), generator, device)
            x = up(x, cfg.levels(s)) + cfg.sigma_k(s) * zeta
        x = integrate_stage(field, x, s, steps[s], cfg, solver, sde_scale, generator)
        outputs.append(x)
    return outputs if return_stages else x
