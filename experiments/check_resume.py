"""
Exact resume of bench/claims.py's train_curve, checked in seconds on random tensors (no MNIST needed):

    OMP_NUM_THREADS=1 python bench/check_resume.py

A tiny K = 3 model (width 32, depth 1, batch 4, 40 random "digits", so the data order wraps every 10
steps) is trained to 6 evaluation marks four ways: (a) uninterrupted; (b) stopped at mark 3 by max_pflop
and continued by a second call; (c) killed (Interrupted) at a step between two evaluations, checkpointing
every step, and resumed from the checkpoint of that step; (d) killed between evaluations with checkpoints
at evaluations only, so the resumed call redoes the steps since the last one. Each resume builds a fresh
model, EMA and optimiser (as a new process would) and loads the checkpoint. The model, EMA and
optimiser tensors, step, FLOPs, stage counts and every evaluation (except its wall times) must be
identical to (a), bit for bit. A control (e) resumes like (c) but with the data position reset to 0
and must differ. Prints one line per variant and exits non-zero on any failure.
"""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import claims  # noqa: E402

TIMES = ("train_seconds", "sample_seconds")


class StubEvaluator:
    """Metrics that change with every sample bit: mean and sd of the generated pixels."""

    def metrics(self, x, y):
        return {"cfd": float(x.double().mean()), "acc": float(x.double().std())}


def tiny_spec():
    s = claims.spec(resolutions=(8, 16, 32), lr=4e-3, seed=3, width=32, depth=1, heads=1, patch=4, batch=4,
                    eval_n=20, steps=2)
    model = claims.make_model(s, (8, 16, 32))
    per_step = s["batch"] * sum(3.0 * model.flops_per_sample(r) for r in (8, 16, 32)) / 3 / 1e15
    s["eval_pflop"] = [float(f"{per_step * k:.6g}") for k in (3, 7, 12, 18, 25, 33)]  # marks ~3, 7, ... steps
    s["budget_pflop"], s["n_evals"] = s["eval_pflop"][-1], 6
    return s


def run(s, data, tmp, tag, **kw):
    out = os.path.join(tmp, tag, "run.json")
    ck = os.path.join(tmp, tag, "ckpt.pt")
    return claims.train_curve(s, data, StubEvaluator(), out, lambda m: None, ckpt_path=ck,
                              ema_dir=os.path.join(tmp, tag, "ema"), **kw), ck


def final_state(ck):
    return torch.load(ck, weights_only=False)


def same(a, b, where=""):
    """Exact equality of nested checkpoint contents (tensors bit for bit), wall times ignored."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(k in TIMES or k == "code" or same(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(40, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (40,), generator=g))
    s = tiny_spec()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        ref, ck_ref = run(s, data, tmp, "a")
        A = final_state(ck_ref)
        print(f"(a) uninterrupted: {ref['steps']} steps, {len(ref['evals'])} evals, complete={ref['complete']}")
        # (b) stop at mark 3, continue
        r1, ck = run(s, data, tmp, "b", max_pflop=s["eval_pflop"][2])
        r2, ck = run(s, data, tmp, "b")
        variants = [("(b) max_pflop stop at mark 3, continued", r1, r2, ck)]
        # (c) killed mid-interval, checkpoint every step
        kill = ref["evals"][3]["step"] + 2
        try:
            run(s, data, tmp, "c", ckpt_every_s=0.0, interrupt_at_step=kill)
        except claims.Interrupted:
            pass
        r1 = final_state(os.path.join(tmp, "c", "ckpt.pt"))["state"]
        r2, ck = run(s, data, tmp, "c")
        variants.append((f"(c) killed at step {kill}, checkpoint of step {r1['step']}", r1, r2, ck))
        # (d) killed mid-interval, checkpoints at evaluations only: the steps since are redone
        try:
            run(s, data, tmp, "d", ckpt_every_s=float("inf"), interrupt_at_step=kill)
        except claims.Interrupted:
            pass
        r1 = final_state(os.path.join(tmp, "d", "ckpt.pt"))["state"]
        r2, ck = run(s, data, tmp, "d")
        variants.append((f"(d) killed at step {kill}, checkpoint of step {r1['step']}", r1, r2, ck))
        # (e) control: the same kill, resumed with the data position reset to 0 (a naive resume): must differ
        try:
            run(s, data, tmp, "e", ckpt_every_s=0.0, interrupt_at_step=kill)
        except claims.Interrupted:
            pass
        p = os.path.join(tmp, "e", "ckpt.pt")
        c = torch.load(p, weights_only=False)
        c["pos"] = 0
        torch.save(c, p)
        r2, ck = run(s, data, tmp, "e")
        E = final_state(ck)
        control = same(A["ema"], E["ema"])
        ok &= not control
        print(f"(e) control, resumed with the data position reset: {'IDENTICAL (the check is blind!)' if control else 'DIFFERENT, as it must be'}")
        for label, first, r, ck in variants:
            B = final_state(ck)
            checks = {k: same(A[k], B[k]) for k in ("model", "ema", "opt", "perm", "pos", "order_gen")}
            checks["state"] = same(A["state"], B["state"])
            checks["json evals"] = same(ref["evals"], r["evals"]) and ref["steps"] == r["steps"] \
                and ref["pflop"] == r["pflop"] and r["complete"]
            events = [c["event"] for c in r["code"]]
            good = all(checks.values())
            ok &= good
            print(f"{label}: {'IDENTICAL' if good else 'DIFFERENT ' + str([k for k, v in checks.items() if not v])}"
                  f" (code events {events})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
