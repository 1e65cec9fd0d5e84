"""
App. E and the Markov chain of eq. 16: the training prior equals the inference prior, and a Gaussian
oracle shows cdc.py's multi-stage samplers reproduce every stage's true marginal D_{K->k}(x).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cdc  # noqa: E402

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
        C, K = self.shape[0], config.K
        self.A, self.M = [], []
        for s, r in enumerate(config.resolutions):
            self.A.append(operator_matrix(lambda v, s=s: cdc.down(v, K - 1 - s), self.shape))
            P = operator_matrix(lambda v: cdc.up(cdc.down(v)), (C, r, r)) if s > 0 else torch.zeros(C * r * r, C * r * r, dtype=torch.float64)
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
            a, b, da, db = (float(v) for v in cdc.interpolant_coefficients(self.cdc.interpolant, torch.tensor([float(tau)], dtype=torch.float64)))
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
