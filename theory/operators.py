"""
§3.1 and App. G.1.2 on real images: transitivity of D, D o U = id, U o D an orthogonal projection,
orthogonality of the detail vectors (Assumption 1) and the energy decomposition (Lemma 1).

    python theory/operators.py                                  # built-in shapes, 32 px, 4 levels
    python theory/operators.py --data-path mnist32.npz --resolutions 8,16,32 --json

Everything uses cdc.down and cdc.up. With 2x2 block averaging and replication, every
statement here is an identity: the errors printed are float64 round-off (~1e-16 relative), whatever the
data. In particular Assumption 1 is not an assumption for these operators: it holds for every image,
not only in expectation.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from theory import common  # noqa: E402
from theory.common import cdc  # noqa: E402


def repeated_down(x: torch.Tensor, levels: int) -> torch.Tensor:
    """D applied `levels` times, one 2x2 level at a time (the right side of D_{K->k} = D_k o ... o D_K)."""
    for _ in range(levels):
        x = cdc.down(x, 1)
    return x


def pyramid(x: torch.Tensor, K: int) -> list:
    """[x1^(1), ..., x1^(K)] with x1^(k) = D_{K->k}(x) (§3.1), for sides that double from stage to stage."""
    return [cdc.down(x, K - 1 - s) for s in range(K)]


def details(x: torch.Tensor, K: int) -> list:
    """Definition 4: eps~^(k) = U_{k->K} D_{K->k} x - U_{k-1->K} D_{K->k-1} x (full resolution), k = 1..K,
    with x~^(0) = 0."""
    pyr = pyramid(x, K)
    lifted = [cdc.up(p, K - 1 - s) for s, p in enumerate(pyr)]  # x~^(k) = U_{k->K}(x1^(k))
    return [lifted[0]] + [lifted[s] - lifted[s - 1] for s in range(1, K)]


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.abs().max() / ref.abs().max().clamp(min=1e-300))


def operator_checks(x: torch.Tensor, K: int) -> dict:
    """All identities on a batch x (N, C, R, R), R divisible by 2^(K-1). Errors are max abs errors
    relative to the largest entry involved (so 1e-16 means exact in float64)."""
    x = x.double()
    N = x.shape[0]
    flat = lambda v: v.reshape(N, -1)  # noqa: E731

    # Transitivity: one pass of side 2^L equals L nested 2x2 averages, for every L.
    trans = max((_rel(cdc.down(x, L) - repeated_down(x, L), x) for L in range(1, K)), default=0.0)

    # D o U = id on every stage image (and on arbitrary images of that size: x1^(k) is arbitrary).
    pyr = pyramid(x, K)
    du = max((_rel(cdc.down(cdc.up(p)) - p, p) for p in pyr), default=0.0)

    # P = U o D on each stage k > 1 is idempotent and self-adjoint, and x - Px is orthogonal to Px.
    idem = adj = orth = 0.0
    for p in pyr[1:]:
        P = lambda v: cdc.up(cdc.down(v))  # noqa: E731
        Pp = P(p)
        idem = max(idem, _rel(P(Pp) - Pp, p))
        q = torch.roll(p, 1, 0)  # pairs of different images
        scale = float((flat(p).norm(dim=1) * flat(q).norm(dim=1)).max())
        adj = max(adj, float(((flat(P(p)) * flat(q)).sum(1) - (flat(p) * flat(P(q))).sum(1)).abs().max()) / scale)
        orth = max(orth, float((flat(p - Pp) * flat(Pp)).sum(1).abs().max()) / float(flat(p).norm(dim=1).pow(2).max()))

    # Assumption 1: <eps~^(k), eps~^(j)> for k != j, per image and in expectation.
    eps = details(x, K)
    E = torch.stack([flat(e) for e in eps])                           # (K, N, d_K)
    gram_per_image = torch.einsum("kni,jni->nkj", E, E)                # (N, K, K)
    energy = gram_per_image.diagonal(dim1=1, dim2=2)                   # (N, K) = ||eps~^(k)||^2
    norms = energy.sqrt()
    off = ~torch.eye(K, dtype=torch.bool)
    cos = gram_per_image / (norms[:, :, None] * norms[:, None, :]).clamp(min=1e-300)
    max_cos = float(cos[:, off].abs().max()) if K > 1 else 0.0
    gram = gram_per_image.mean(0)                                      # E[<eps~^(k), eps~^(j)>]
    max_off_expect = float(gram[off].abs().max() / gram.diagonal().max()) if K > 1 else 0.0

    # Lemma 1: ||x||^2 = sum_k ||eps~^(k)||^2, per image and in expectation; x = sum_k eps~^(k) (eq. 49).
    total = flat(x).pow(2).sum(1)
    lemma_img = float(((energy.sum(1) - total).abs() / total.clamp(min=1e-300)).max())
    telescoping = _rel(sum(eps) - x, x)
    return {
        "n_images": N, "shape": list(x.shape[1:]), "levels": K,
        "transitivity": trans, "DU_identity": du, "UD_idempotent": idem, "UD_self_adjoint": adj,
        "UD_residual_orthogonal": orth,
        "detail_max_abs_cosine": max_cos, "detail_gram_offdiag_rel": max_off_expect,
        "detail_gram": gram, "detail_energy": energy.mean(0), "energy_total": float(total.mean()),
        "energy_sum_details": float(energy.sum(1).mean()), "lemma1_max_rel_error": lemma_img,
        "telescoping": telescoping,
    }


def render(r: dict) -> str:
    K = r["levels"]
    rows = [
        ("transitivity  D_{K->k} = D o ... o D", r["transitivity"], "max |diff| / max |x|"),
        ("D o U = id", r["DU_identity"], "on every stage image"),
        ("P = U o D idempotent  PP = P", r["UD_idempotent"], "every stage k > 1"),
        ("P self-adjoint  <Pa,b> = <a,Pb>", r["UD_self_adjoint"], "/ |a||b|, pairs of images"),
        ("<x - Px, Px> = 0", r["UD_residual_orthogonal"], "/ |x|^2"),
        ("Assumption 1, per image", r["detail_max_abs_cosine"], "max |cos(eps~k, eps~j)|, k != j"),
        ("Assumption 1, in expectation", r["detail_gram_offdiag_rel"], "max |E<eps~k,eps~j>| / max E|eps~k|^2"),
        ("x = sum_k eps~^(k)  (eq. 49)", r["telescoping"], "max |diff| / max |x|"),
        ("Lemma 1 |x|^2 = sum_k |eps~k|^2", r["lemma1_max_rel_error"], "max over images, relative"),
    ]
    out = [f"{r['n_images']} images of shape {tuple(r['shape'])}, {K} levels (float64)", "",
           common.table(["identity", "error", "measured as"], rows), ""]
    gram = r["detail_gram"]
    out.append(common.table(["k"] + [f"E<eps~k, eps~{j + 1}>" for j in range(K)],
                            [[k + 1] + [float(gram[k, j]) for j in range(K)] for k in range(K)],
                            "Gram matrix of the detail vectors at full resolution (diagonal = energies):"))
    out += ["", f"E|x|^2 = {common.fmt(r['energy_total'])}   sum_k E|eps~^(k)|^2 = {common.fmt(r['energy_sum_details'])}"]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=common.int_list, default=(4, 8, 16, 32),
                   help="stage sides, coarse to fine; images are loaded at the last one")
    common.add_common_args(p, n_images=1000)
    a = p.parse_args(argv)
    common.apply_threads(a)
    res = cdc.CDCConfig(resolutions=a.resolutions).resolutions  # validates the doubling
    x = common.load_images(a.data_path, res[-1], a.n_images, a.seed)
    r = operator_checks(x, len(res))
    common.emit(r, a.json, render)
    return r


if __name__ == "__main__":
    main()
