"""
App. E and the Markov chain of eq. 16: the training prior equals the inference prior, and a Gaussian
oracle shows cdc.py's multi-stage samplers reproduce every stage's true marginal D_{K->k}(x).

    python theory/prior_equivalence.py                         # built-in shapes; oracle on 3x8x8, res 2,4,8
    python theory/prior_equivalence.py --data-path mnist32.npz --resolutions 8,16,32 --json

(a) For every refinement stage, the training source cdc.coupling_source(x1^(k)) and the inference prior
    U(x1^(k-1)) + sigma_k zeta are compared with the same zeta (they must be equal) and, drawn from two
    disjoint halves of the data, with a two-sample Kolmogorov-Smirnov test on random projections and
    on the squared norm (Bonferroni-combined p-value). A deliberately wrong prior (sigma_k doubled) shows the test has power.
(b) Data x ~ N(mu, Sigma), mu and Sigma the mean and (ridged) covariance of the data at --oracle-size
    pixels. GaussianOracle is the exact field E[I_dot | I_tau = x]; cdc.sample runs the whole chain with
    it. Each stage's samples are tested against the true marginal N(D mu, D Sigma D^T): the mean by
    n (xbar - m)^T S^-1 (xbar - m) ~ chi2_d (exact null), the covariance by per-entry z-scores
    (c_ij - S_ij) / sqrt((S_ii S_jj + S_ij^2) / n) (Bonferroni p-value). Because the field is affine,
    an Euler or Heun stage is an affine map: we also push the mean and covariance through
    cdc.integrate_stage exactly, which isolates the discretisation error from Monte-Carlo noise.
"""

import argparse
import math
import os
import sys

import torch
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cdc  # noqa: E402
from theory import common  # noqa: E402

# ------------------------------------------------------------------------------------------------
#                     Gaussian oracle: the exact velocity field, in closed form
# ------------------------------------------------------------------------------------------------


def operator_matrix(op, shape) -> torch.Tensor:
    """The matrix of a linear image operator (e.g. cdc.down) acting on images of `shape` = (C, H, W),
    built by applying it to every basis image: the oracle uses cdc's operators, never a re-derived copy."""
    d = int(torch.tensor(shape).prod())
    basis = torch.eye(d, dtype=torch.float64).view(d, *shape)
    return op(basis).reshape(d, -1).T.contiguous()


class GaussianOracle:
    """The exact field b_tau(x) = E[I_dot | I_tau = x] at every stage, for data x ~ N(mu, Sigma).

    At stage k, x1 = A x with A = D_{K->k} (a matrix), and the source is x0 = M x1 + sigma_k zeta with
    M = U o D (stage > 1, eq. 9) or M = 0 (stage 1, eq. 8). So
        I    = (alpha M + beta) x1 + alpha sigma_k zeta    =: G x1 + alpha sigma_k zeta
        Idot = (alpha' M + beta') x1 + alpha' sigma_k zeta =: G' x1 + alpha' sigma_k zeta
    are jointly Gaussian with x1 ~ N(A mu, A Sigma A^T) =: N(m, S), and the conditional mean is affine:
        b(x) = G' m + Cov(Idot, I) Cov(I)^-1 (x - G m),
        Cov(I) = G S G^T + alpha^2 sigma_k^2 1,   Cov(Idot, I) = G' S G^T + alpha' alpha sigma_k^2 1.
    Plugged into cdc.sample in place of the DiT, the chain must end in N(A mu, A Sigma A^T) per stage.
    """

    def __init__(self, mu: torch.Tensor, Sigma: torch.Tensor, config: "cdc.CDCConfig"):
        self.cdc, self.shape = config, tuple(mu.shape)          # mu: (C, R, R) at the last resolution
        self.mu, self.Sigma = mu.reshape(-1).double(), Sigma.double()
        C = self.shape[0]
        self.A, self.M = [], []
        for s, r in enumerate(config.resolutions):
            self.A.append(operator_matrix(lambda v, s=s: cdc.down(v, config.levels_below_top(s)), self.shape))
            L = config.levels(s)  # 1 for a 2x step, 2 for Table 6's 4x step
            P = operator_matrix(lambda v: cdc.up(cdc.down(v, L), L), (C, r, r)) if s > 0 else torch.zeros(C * r * r, C * r * r, dtype=torch.float64)
            self.M.append(P)
        self._cache = {}

    def marginal(self, stage: int):
        """Mean and covariance of x1^(k) = D_{K->k}(x): what stage k must produce."""
        A = self.A[stage]
        return A @ self.mu, A @ self.Sigma @ A.T

    def affine(self, stage: int, tau: float):
        """(c, B) with b(x) = c + B x, for one stage and one tau."""
        key = (stage, float(tau))
        if key not in self._cache:
            m, S = self.marginal(stage)
            eye = torch.eye(m.numel(), dtype=torch.float64)
            a, b, da, db = (float(v) for v in cdc.INTERPOLANTS[self.cdc.interpolant].coefficients(torch.tensor([float(tau)], dtype=torch.float64)))
            s2 = self.cdc.sigma_k(stage) ** 2
            G, Gd = a * self.M[stage] + b * eye, da * self.M[stage] + db * eye
            cov_I = G @ S @ G.T + a * a * s2 * eye
            cov_dI = Gd @ S @ G.T + da * a * s2 * eye
            B = torch.linalg.solve(cov_I, cov_dI.T).T               # Cov(Idot, I) Cov(I)^-1
            self._cache[key] = (Gd @ m - B @ (G @ m), B)
        return self._cache[key]

    def __call__(self, x: torch.Tensor, tau: torch.Tensor, stage: int) -> torch.Tensor:
        """cdc's field signature: x (N, C, r, r), tau (N,) (one value per call, as the samplers pass)."""
        if not torch.all(tau == tau[0]):
            raise ValueError("the oracle expects one tau per call")
        c, B = self.affine(stage, tau[0].item())
        flat = x.reshape(x.shape[0], -1).double()
        return (c + flat @ B.T).view(x.shape)


# ------------------------------------------------------------------------------------------------
#                 (a) App. E.2: the training source equals the inference prior
# ------------------------------------------------------------------------------------------------


def ks_projections(a: torch.Tensor, b: torch.Tensor, n_proj: int, generator) -> tuple:
    """Two-sample KS tests of a (n, d) against b (m, d) on n_proj random unit directions plus the squared
    norm (a scale-sensitive statistic: a wrong noise level shows there first). Returns (largest KS
    statistic, Bonferroni p-value = min(1, (n_proj + 1) * smallest p))."""
    u = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    feats = lambda v: torch.cat([v.double() @ u, v.double().pow(2).sum(1, keepdim=True)], 1).numpy()  # noqa: E731
    pa, pb = feats(a), feats(b)
    res = [stats.ks_2samp(pa[:, j], pb[:, j]) for j in range(n_proj + 1)]
    return max(r.statistic for r in res), min(1.0, (n_proj + 1) * min(r.pvalue for r in res))


def source_equivalence(x: torch.Tensor, config: "cdc.CDCConfig", n_proj: int = 16, seed: int = 0) -> list:
    """Per refinement stage: max |training source - inference source| for the same zeta, and the KS
    two-sample test of training sources (first half of x) against inference priors (second half)."""
    g = torch.Generator().manual_seed(seed)
    K, half = config.K, x.shape[0] // 2
    x = x[torch.randperm(x.shape[0], generator=g)]  # halves must be exchangeable (data files are often sorted)
    rows = []
    for s in range(1, K):
        x1 = cdc.down(x, K - 1 - s)            # x1^(k)
        x1_prev = cdc.down(x, K - s)           # x1^(k-1) = D_{K->k-1}(x)
        zeta = cdc.randn(x1.shape, g, dtype=x.dtype)
        train_src = cdc.coupling_source(x1, s, config, zeta=zeta)            # eq. 9
        infer_src = cdc.up(x1_prev) + config.sigma_k(s) * zeta                # eq. 17
        paired = float((train_src - infer_src).abs().max())
        a = cdc.coupling_source(x1[:half], s, config, generator=g).flatten(1)
        zeta_b = cdc.randn(x1_prev[half:].shape[:1] + x1.shape[1:], g, dtype=x.dtype)
        b = (cdc.up(x1_prev[half:]) + config.sigma_k(s) * zeta_b).flatten(1)
        ks, p = ks_projections(a, b, n_proj, g)
        wrong = (cdc.up(x1_prev[half:]) + 2 * config.sigma_k(s) * zeta_b).flatten(1)   # control
        _, p_wrong = ks_projections(a, wrong, n_proj, g)
        rows.append({"stage": s + 1, "resolution": config.resolutions[s], "sigma_k": config.sigma_k(s),
                     "paired_max_abs_diff": paired, "ks_statistic": ks, "p_value": p,
                     "p_value_control_2sigma": p_wrong, "n_per_sample": half})
    return rows


# ------------------------------------------------------------------------------------------------
#               (b) The Gaussian oracle through cdc's samplers: eq. 16 end to end
# ------------------------------------------------------------------------------------------------


def gaussian_from_data(x: torch.Tensor, ridge: float = 0.05):
    """mu (C, R, R) and a full-rank Sigma: the data's covariance plus ridge * (mean variance) * I."""
    flat = x.reshape(x.shape[0], -1).double()
    mu = flat.mean(0)
    S = torch.cov(flat.T)
    S = S + ridge * S.diagonal().mean() * torch.eye(S.shape[0], dtype=torch.float64)
    return mu.view(x.shape[1:]), S


def random_gaussian(shape, seed: int = 0):
    """A random mean and a random full covariance (Wishart-like, well conditioned) for images of `shape`."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    W = torch.randn(d, 2 * d, generator=g, dtype=torch.float64) / math.sqrt(2 * d)
    return 0.5 * torch.randn(shape, generator=g, dtype=torch.float64), W @ W.T + 0.1 * torch.eye(d, dtype=torch.float64)


def stage_affine_map(oracle: GaussianOracle, stage: int, steps: int, solver: str):
    """(c, A) with integrate_stage(x) = c + A x exactly, for a deterministic solver and the affine
    oracle field: cdc.integrate_stage run on the zero image and on every basis image."""
    C, r = oracle.shape[0], oracle.cdc.resolutions[stage]
    d = C * r * r
    inp = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)]).view(d + 1, C, r, r)
    out = cdc.integrate_stage(oracle, inp, stage, steps, oracle.cdc, solver).reshape(d + 1, d).double()
    return out[0], (out[1:] - out[0]).T


def exact_chain_moments(oracle: GaussianOracle, steps, solver: str) -> list:
    """Mean and covariance of every stage's output of cdc.sample(oracle, ...) with an ODE solver, with
    no Monte-Carlo error: x0^(1) ~ N(0, sigma^2 I); stage map affine; x0^(k) = U x1^(k-1) + sigma_k zeta."""
    cfg, C = oracle.cdc, oracle.shape[0]
    steps = [steps] * cfg.K if isinstance(steps, int) else list(steps)
    d1 = C * cfg.resolutions[0] ** 2
    m, S = torch.zeros(d1, dtype=torch.float64), cfg.sigma ** 2 * torch.eye(d1, dtype=torch.float64)
    out = []
    for s in range(cfg.K):
        if s > 0:
            U = operator_matrix(lambda v: cdc.up(v, cfg.levels(s)), (C,) + (cfg.resolutions[s - 1],) * 2)
            m, S = U @ m, U @ S @ U.T + cfg.sigma_k(s) ** 2 * torch.eye(U.shape[0], dtype=torch.float64)
        c, A = stage_affine_map(oracle, s, steps[s], solver)
        m, S = c + A @ m, A @ S @ A.T
        out.append((m, S))
    return out


def moment_test(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> dict:
    """Samples (n, d) against N(mean, cov): errors in Monte-Carlo standard errors and p-values.
    mean: chi2_d statistic n (xbar - m)^T S^-1 (xbar - m), exact under the null.
    cov: per-entry z = (c_ij - S_ij) / se_ij, se_ij^2 = (S_ii S_jj + S_ij^2) / n (Gaussian data),
         over the d(d+1)/2 distinct entries; Bonferroni p = min(1, entries * P(|N(0,1)| > max |z|))."""
    n, d = samples.shape
    x = samples.double()
    dm = x.mean(0) - mean
    chi2 = float(n * dm @ torch.cholesky_solve(dm[:, None], torch.linalg.cholesky(cov)).squeeze(1))
    se_m = (cov.diagonal() / n).sqrt()
    C = torch.cov(x.T).reshape(d, d)
    v = cov.diagonal()
    se_c = ((v[:, None] * v[None, :] + cov ** 2) / n).sqrt()
    iu = torch.triu_indices(d, d)
    zc = ((C - cov) / se_c)[iu[0], iu[1]]
    zmax = float(zc.abs().max())
    entries = zc.numel()
    return {"n": n, "d": d, "mean_max_abs_err": float(dm.abs().max()), "mean_max_se": float(se_m.max()),
            "mean_max_z": float((dm / se_m).abs().max()), "mean_chi2": chi2, "mean_p": float(stats.chi2.sf(chi2, d)),
            "cov_max_abs_err": float((C - cov).abs().max()), "cov_max_se": float(se_c.max()),
            "cov_max_z": zmax, "cov_p": min(1.0, entries * 2 * float(stats.norm.sf(zmax))),
            "top_variance": float(v.max())}


DEFAULT_SOLVERS = (("euler", 100), ("heun", 20), ("sde", 200))


def oracle_check(oracle: GaussianOracle, n: int, solvers=DEFAULT_SOLVERS, seed: int = 0) -> list:
    """Run cdc.sample with the oracle for each (solver, steps) and test every stage's output against the
    true marginal D_{K->k} x. For euler / heun also the exact (MC-free) discretisation error, in units of
    the Monte-Carlo standard error of n samples: below 1 means invisible at this n."""
    C, rows = oracle.shape[0], []
    for solver, steps in solvers:
        outs = cdc.sample(oracle, oracle.cdc, n, channels=C, steps=steps, solver=solver,
                          generator=torch.Generator().manual_seed(seed), return_stages=True)
        exact = exact_chain_moments(oracle, steps, solver) if solver != "sde" else [None] * oracle.cdc.K
        for s, out in enumerate(outs):
            m, S = oracle.marginal(s)
            row = {"solver": solver, "steps": steps, "stage": s + 1, "resolution": oracle.cdc.resolutions[s]}
            row.update(moment_test(out.reshape(n, -1), m, S))
            if exact[s] is not None:
                em, eS = exact[s]
                v = S.diagonal()
                row["disc_mean_err_in_se"] = float(((em - m).abs() / (v / n).sqrt()).max())
                row["disc_cov_err_in_se"] = float(((eS - S).abs() / ((v[:, None] * v[None] + S ** 2) / n).sqrt()).max())
                row["disc_mean_max_abs_err"] = float((em - m).abs().max())
                row["disc_cov_max_abs_err"] = float((eS - S).abs().max())
            rows.append(row)
    return rows


def run(x, config, x_oracle, oracle_config, n_samples, solvers=DEFAULT_SOLVERS, n_proj=16, ridge=0.05, seed=0):
    mu, Sigma = gaussian_from_data(x_oracle, ridge)
    oracle = GaussianOracle(mu, Sigma, oracle_config)
    return {"config": config.to_dict(), "oracle_config": oracle_config.to_dict(),
            "oracle_shape": list(mu.shape), "n_images": x.shape[0],
            "source_equivalence": source_equivalence(x, config, n_proj, seed),
            "oracle": oracle_check(oracle, n_samples, solvers, seed)}


def render(r: dict) -> str:
    out = [f"(a) App. E.2 on {r['n_images']} images, resolutions {r['config']['resolutions']}, "
           f"sigma {r['config']['sigma']}, gamma {r['config']['gamma']}", ""]
    out.append(common.table(
        ["stage k", "res", "sigma_k", "max|train - infer| same zeta", "KS stat", "p (KS, Bonferroni)",
         "p control (2 sigma_k)"],
        [[e["stage"], e["resolution"], e["sigma_k"], e["paired_max_abs_diff"], e["ks_statistic"], e["p_value"],
          e["p_value_control_2sigma"]] for e in r["source_equivalence"]]))
    oc = r["oracle_config"]
    out += ["", f"(b) Gaussian oracle: x ~ N(mu, Sigma) on {tuple(r['oracle_shape'])}, resolutions "
                f"{oc['resolutions']}, {oc['interpolant']} interpolant; n = {r['oracle'][0]['n']} chains per solver.",
            "    z: errors in Monte-Carlo standard errors; disc: exact (MC-free) discretisation error of the",
            "    same solver in the same units (an SDE stage is not affine in its noise: no exact column).", ""]
    dash = "-"
    out.append(common.table(
        ["solver", "steps", "stage", "d", "max|dmean|", "max z mean", "p mean (chi2)", "max|dcov|", "max z cov",
         "p cov (Bonf.)", "disc mean (se)", "disc cov (se)"],
        [[o["solver"], o["steps"], o["stage"], o["d"], o["mean_max_abs_err"], o["mean_max_z"], o["mean_p"],
          o["cov_max_abs_err"], o["cov_max_z"], o["cov_p"], o.get("disc_mean_err_in_se", dash),
          o.get("disc_cov_err_in_se", dash)] for o in r["oracle"]]))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=common.int_list, default=(8, 16, 32), help="stages for part (a)")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--n-proj", type=int, default=16, help="random projections for the KS test")
    p.add_argument("--oracle-resolutions", type=common.int_list, default=(2, 4, 8),
                   help="stages of the oracle chain; the data is viewed at the last one")
    p.add_argument("--interpolant", default="linear", choices=cdc.INTERPOLANTS, help="for the oracle chain")
    p.add_argument("--ridge", type=float, default=0.05, help="Sigma = cov + ridge * mean variance * I")
    p.add_argument("--n-samples", type=int, default=4000, help="oracle chains per solver")
    p.add_argument("--euler-steps", type=int, default=100)
    p.add_argument("--heun-steps", type=int, default=20)
    p.add_argument("--sde-steps", type=int, default=200)
    common.add_common_args(p, n_images=2000, threads=1)
    a = p.parse_args(argv)
    common.apply_threads(a)
    config = cdc.CDCConfig(resolutions=a.resolutions, sigma=a.sigma, gamma=a.gamma)
    oracle_config = cdc.CDCConfig(resolutions=a.oracle_resolutions, sigma=a.sigma, gamma=a.gamma,
                                  interpolant=a.interpolant)
    x = common.load_images(a.data_path, config.resolutions[-1], a.n_images, a.seed)
    # The oracle's Gaussian has the data's mean and covariance at the oracle's (small) size: the same
    # images, block-averaged down when the sizes divide (no second resize), else reloaded at that size.
    R, r = config.resolutions[-1], oracle_config.resolutions[-1]
    if R % r == 0 and (R // r) & (R // r - 1) == 0:
        x_oracle = cdc.down(x, int(math.log2(R // r)))
    else:
        x_oracle = common.load_images(a.data_path, r, a.n_images, a.seed)
    solvers = (("euler", a.euler_steps), ("heun", a.heun_steps), ("sde", a.sde_steps))
    r_ = run(x, config, x_oracle, oracle_config, a.n_samples, solvers, a.n_proj, a.ridge, a.seed)
    common.emit(r_, a.json, render)
    return r_


if __name__ == "__main__":
    main()
