"""
Exact resume of experiments/claims.py's training loop (train_loop), checked in seconds on random tensors (no
MNIST needed):

    OMP_NUM_THREADS=1 python experiments/check_resume.py

A tiny K = 3 model (width 32, depth 1, batch 4, 40 random "digits", so the data order wraps every 10
steps) is trained to 6 evaluation marks four ways: (a) uninterrupted; (b) stopped at mark 3 by max_pflop
and continued by a second call; (c) killed (Interrupted) at a step between two evaluations, checkpointing
every step, and resumed from the checkpoint of that step; (d) killed between evaluations with checkpoints
at evaluations only, so the resumed call redoes the steps since the last one. Each resume builds a fresh
model, EMA and optimiser (as a new process would) and loads the checkpoint. The final checkpoint (model,
EMA and optimiser tensors, data order, step, FLOPs, stage counts, every evaluation; wall times and code
events aside) must be identical to (a), bit for bit. Claim 6's stage-specific run (three lanes, one network
per stage) is checked the same way, killed in its second lane. A control (e) resumes like (c) but with the data position reset to 0
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

    clf_sha1 = None

    def metrics(self, x, y):
        return {"cfd": float(x.double().mean()), "acc": float(x.double().std())}


def tiny_specs():
    """A K = 3 curve (marks ~3, 7, 12, 18, 25, 33 steps apart) and claim 6's stage-specific run (3 lanes,
    3 marks ~4 steps apart per lane), both at width 32, depth 1, batch 4."""
    s = claims.spec(resolutions=(8, 16, 32), lr=4e-3, seed=3, width=32, depth=1, heads=1, patch=4, batch=4,
                    eval_n=20, steps=2)
    model = claims.make_model(s, (8, 16, 32))
    per_step = s["batch"] * sum(3.0 * model.flops_per_sample(r) for r in (8, 16, 32)) / 3 / 1e15
    s["eval_pflop"] = [float(f"{per_step * k:.6g}") for k in (3, 7, 12, 18, 25, 33)]
    s["budget_pflop"], s["n_evals"] = s["eval_pflop"][-1], 6
    st = claims.spec(**{k: v for k, v in s.items() if k != "eval_pflop"})
    st.update(stage_specific=True, n_evals=3)
    _, _, lanes, _ = claims.build(st, 1)
    st["budget_pflop"] = float(f"{3 * 4.5 * st['batch'] * sum(sum(ln.flops_of) for ln in lanes) / 1e15:.6g}")
    return s, st


def run(s, data, tmp, tag, **kw):
    out = os.path.join(tmp, tag, "run.json")
    ck = os.path.join(tmp, tag, "ckpt.pt")
    return claims.train_loop(s, data, StubEvaluator(), out, lambda m: None, ckpt_path=ck,
                        ema_dir=os.path.join(tmp, tag, "ema"), **kw), ck


def final_state(ck):
    return torch.load(ck, weights_only=False)


def same(a, b):
    """Exact equality of nested checkpoint contents (tensors bit for bit), wall times and code events aside."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(k in TIMES or k == "code" or same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def killed(s, data, tmp, tag, kill, **kw):
    try:
        run(s, data, tmp, tag, interrupt_at_step=kill, **kw)
    except claims.Interrupted:
        pass
    return final_state(os.path.join(tmp, tag, "ckpt.pt"))["state"]


def check(s, data, tmp, what):
    ref, ck_ref = run(s, data, tmp, "a")
    A = final_state(ck_ref)
    print(f"{what}\n(a) uninterrupted: {ref['steps']} steps, {len(ref['evals'])} evals, complete={ref['complete']}")
    r1, _ = run(s, data, tmp, "b", max_pflop=claims.marks_of(s)[0][1])
    r2, ck = run(s, data, tmp, "b")
    variants = [(f"(b) max_pflop stop at mark 2 ({len(r1['evals'])} evals), continued", r2, ck)]
    # a kill between two marks: the single lane 2 steps after mark 3; the stage-specific run in its second lane
    if len(A["lanes"]) == 1:
        kill = ref["evals"][3]["step"] + 2
    else:  # all lanes at mark 2, then lane 0 through mark 3, then 2 steps of lane 1 (steps count over lanes)
        e, e3 = ref["evals"][1]["step"], ref["evals"][2]["step"]
        kill = sum(e) + e3[0] - e[0] + 2
    st = killed(s, data, tmp, "c", kill, ckpt_every_s=0.0)
    r2, ck = run(s, data, tmp, "c")
    variants.append((f"(c) killed at step {kill}, checkpoint of that step ({len(st['evals'])} evals)", r2, ck))
    st = killed(s, data, tmp, "d", kill, ckpt_every_s=float("inf"))
    r2, ck = run(s, data, tmp, "d")
    variants.append((f"(d) killed at step {kill}, checkpoint of the last mark ({len(st['evals'])} evals)", r2, ck))
    # (e) control: the same kill, resumed with the data position of the lane it was in reset to 0: must differ
    killed(s, data, tmp, "e", kill, ckpt_every_s=0.0)
    p = os.path.join(tmp, "e", "ckpt.pt")
    c = torch.load(p, weights_only=False)
    c["lanes"][min(1, len(c["lanes"]) - 1)]["pos"] = 0
    torch.save(c, p)
    _, ck = run(s, data, tmp, "e")
    control = same(A, final_state(ck))
    ok = not control
    print(f"(e) control, resumed with the data position reset: "
          f"{'IDENTICAL (the check is blind!)' if control else 'DIFFERENT, as it must be'}")
    for label, r, ck in variants:
        checks = {"checkpoint": same(A, final_state(ck)),
                  "json evals": same(ref["evals"], r["evals"]) and ref["steps"] == r["steps"]
                  and ref["pflop"] == r["pflop"] and r["complete"]}
        good = all(checks.values())
        ok &= good
        print(f"{label}: {'IDENTICAL' if good else 'DIFFERENT ' + str([k for k, v in checks.items() if not v])}"
              f" (code events {[c['event'] for c in r['code']]})")
    return ok


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(40, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (40,), generator=g))
    ok = True
    for s, what in zip(tiny_specs(), ("K = 3, one network (the curves)", "K = 3 stage-specific networks (claim 6)")):
        with tempfile.TemporaryDirectory() as tmp:
            ok &= check(s, data, tmp, what)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
