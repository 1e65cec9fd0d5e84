"""
The paper's claims at small scale on real data (MNIST digits padded to 32 px), at equal training FLOPs.

    python bench/claims.py run claim1            # one named set of experiments, resumable
    python bench/claims.py run claim1 --dry-run  # list its runs and which are done
    python bench/claims.py report                # tables (markdown) and figures from bench/results/
    python bench/claims.py run curves --max-pflop 0.064 --commit   # the long curves, stoppable, resumable
    python bench/claims.py report curves         # the curves' figure and compute-ratio table only

Every run trains in-process with the project's own code (train.Objective, train.make_optimizer,
train.train_step, train.update_ema through train_step, train.step_seed; cdc.sample, cdc.guided_field),
so what is measured is what a user runs. A run stops when its training FLOPs (3 x the analytic
cdc.DiT.flops_per_sample of every sample's stage, as drawn) reach its budget; its EMA is evaluated at
evenly spaced fractions of the budget. Each finished run writes one JSON under bench/results/<set>/ and
is skipped next time; a run killed midway starts again from scratch (runs are minutes long).

Data: the MNIST test set (10k digits, idx files; not shipped), zero-padded to 32 px, one channel, in
[-1, 1]. A fixed permutation (seed 0) holds out 2,000 digits for evaluation; the other 8,000 train both
the generators and the evaluation classifier.

Metrics of a set of generated digits (labels 0..9, equal counts):
  cfd  Frechet distance between Gaussian fits of the classifier's 128-d penultimate features of the
       samples and of the 8,000 training digits (lower is better);
  acc  conditional accuracy: the fraction the classifier labels as the class they were generated for.
Floors: the same numbers for as many held-out real digits as there are samples.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cdc  # noqa: E402
import train  # noqa: E402
from theory.common import read_idx_images  # noqa: E402

from fid import frechet_distance  # noqa: E402  (results before fid.py landed used scipy's sqrtm; see README)

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results")
CACHE = os.path.join(BENCH, "cache")  # classifier and EMA weights (not committed)
MACHINE = "2-core CPU, 1 thread, no GPU"


def cpu_name():
    """The CPU model and torch's vector ISA: runs on two CPUs round differently, so a re-run on another
    CPU is not bit-identical (an AMD EPYC with AVX512 did not reproduce the earlier machine's runs)."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        model = "?"
    return f"{model}, torch {torch.backends.cpu.get_cpu_capability()}"


CPU = cpu_name()

# ------------------------------------------------------------------------------------------------
#                                              Data
# ------------------------------------------------------------------------------------------------

N_HELDOUT = 2000


def load_mnist(mnist_dir):
    """(train_x, train_y, held_x, held_y): float32 (N, 1, 32, 32) in [-1, 1] and long labels."""
    imgs = read_idx_images(os.path.join(mnist_dir, "mnist-t10k-images-idx3-ubyte.gz"))
    with __import__("gzip").open(os.path.join(mnist_dir, "mnist-t10k-labels-idx1-ubyte.gz"), "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)))
    x = torch.from_numpy(imgs).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.from_numpy(labels)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    held, tr = perm[:N_HELDOUT], perm[N_HELDOUT:]
    return x[tr], y[tr], x[held], y[held]


# ------------------------------------------------------------------------------------------------
#                                    Evaluation classifier
# ------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc, self.out = nn.Linear(64 * 8 * 8, 128), nn.Linear(128, 10)

    def features(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))


def get_classifier(data):
    """Trained once (seed 0, 4 epochs, Adam 1e-3, batch 128, 1-px random shifts) on the training split."""
    path = os.path.join(CACHE, "classifier.pt")
    info_path = os.path.join(RESULTS, "classifier.json")
    if os.path.exists(path):
        net = Classifier()
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    tx, ty, hx, hy = data
    torch.manual_seed(0)  # before the initialisation too (it used to come after: retrains were not identical)
    net = Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.time()
    for epoch in range(4):
        perm = torch.randperm(len(tx))
        for i in range(0, len(tx), 128):
            idx = perm[i:i + 128]
            xb = torch.roll(tx[idx], shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(net(xb), ty[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(hx).argmax(1) == hy).float().mean())
    os.makedirs(CACHE, exist_ok=True)
    torch.save(net.state_dict(), path)
    if os.path.exists(info_path):  # the record of the classifier claims 1-9 were scored with stays
        print(f"retrained the classifier (held-out accuracy {acc:.4f}); {info_path} is left as it is", flush=True)
        return net
    write_json(info_path, {"heldout_accuracy": acc, "n_heldout": len(hx), "n_train": len(tx),
                           "train_seconds": time.time() - t0, "machine": MACHINE})
    return net


@torch.no_grad()
def feats_and_preds(clf, x, bs=500):
    f, p = [], []
    for i in range(0, len(x), bs):
        h = clf.features(x[i:i + bs].clamp(-1, 1))
        f.append(h.double())
        p.append(clf.out(h).argmax(1))
    return torch.cat(f).numpy(), torch.cat(p)


def gauss(f):
    return f.mean(0), np.cov(f, rowvar=False)


class Evaluator:
    """Reference statistics of the training split, at full resolution and at every stage resolution
    (real digits taken down to the stage's side and replicated back up to 32 px, like a stage output)."""

    def __init__(self, data, clf):
        self.data, self.clf = data, clf
        self.ref = {}

    def ref_stats(self, side):
        if side not in self.ref:
            tx = self.data[0]
            L = int(math.log2(32 // side))
            self.ref[side] = gauss(feats_and_preds(self.clf, cdc.up(cdc.down(tx, L), L))[0])
        return self.ref[side]

    def metrics(self, x, y):
        """x: (N, 1, s, s) at any stage side s <= 32; y: the labels they were generated for."""
        side = x.shape[-1]
        L = int(math.log2(32 // side))
        f, p = feats_and_preds(self.clf, cdc.up(x.float(), L))
        mu, sig = gauss(f)
        return {"cfd": frechet_distance(mu, sig, *self.ref_stats(side)), "acc": float((p == y).float().mean())}

    def floor(self, n, side=32, seed=0):
        """The metrics of n held-out real digits (n per evaluation, so the small-sample bias matches)."""
        hx, hy = self.data[2], self.data[3]
        idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(hx))[:n])
        L = int(math.log2(32 // side))
        return self.metrics(cdc.down(hx[idx], L), hy[idx])


# ------------------------------------------------------------------------------------------------
#                                    Training and sampling
# ------------------------------------------------------------------------------------------------

# The scale (see bench/README.md for why): tiny DiT (width 192, depth 4, 3 heads) at patch 4,
# batch 32, the paper's AdamW betas (0.9, 0.95), grad clip 1, EMA 0.9999 with the train.py warm-up.
BASE = dict(width=192, depth=4, heads=3, patch=4, batch=32, sigma=1.0, gamma=2.0, interpolant="linear",
            fusion="xattn", reduction="mean", stage_sampling="stratified", resolutions=(8, 16, 32), lr=1e-3,
            budget_pflop=0.008, n_evals=4, seed=0, eval_n=200, cfg=3.0, steps=8, solver="euler",
            stage_specific=False)


def run_name(spec):
    keys = ["resolutions", "lr", "seed", "budget_pflop", "sigma", "gamma", "interpolant", "fusion", "reduction",
            "stage_sampling", "width", "depth", "patch", "batch"]
    parts = []
    for k in keys:
        if spec[k] == BASE[k] and k not in ("resolutions", "lr", "seed"):
            continue
        v = spec[k]
        v = "-".join(str(r) for r in v) if isinstance(v, (tuple, list)) else v
        parts.append(f"{k}{v}")
    if spec.get("stage_specific"):
        parts.append("stagespecific")
    return "_".join(parts)


def make_model(spec, res):
    return cdc.create_model("tiny", width=spec["width"], depth=spec["depth"], heads=spec["heads"],
                            patch_size=spec["patch"], in_channels=1, num_classes=10, resolutions=res,
                            fusion=spec["fusion"])


@torch.no_grad()
def draw(ema, cfg, n_per_class, spec, seed, return_stages=False, cfg_scale=None, steps=None):
    """n_per_class samples of each digit, fixed noise per seed; returns (images or stages, labels, seconds)."""
    y = torch.arange(10).repeat_interleave(n_per_class)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    out = cdc.sample(cdc.guided_field(ema, y, spec["cfg"] if cfg_scale is None else cfg_scale), cfg, len(y),
                     channels=1, steps=spec["steps"] if steps is None else steps, solver=spec["solver"],
                     generator=gen, return_stages=return_stages)
    return out, y, time.time() - t0


def load_ema(path):
    """(spec, CDC config, EMA model in eval mode) of EMA weights saved by a run in bench/cache/ema."""
    saved = torch.load(path, weights_only=False)
    s = saved["spec"]
    cfg = cdc.CDCConfig(resolutions=tuple(s["resolutions"]), sigma=s["sigma"], gamma=s["gamma"],
                        interpolant=s["interpolant"])
    ema = make_model(s, cfg.resolutions)
    ema.load_state_dict(saved["ema"])
    return s, cfg, ema.eval()


def save_digits(x, path, nrow=10):
    from data import save_grid
    save_grid(x.float().repeat(1, 3, 1, 1), path, nrow)


def build(spec):
    """The run's CDC config, model (initialised from spec['seed']), EMA, optimiser arguments, optimiser,
    objective and training FLOPs per sample of each stage."""
    res = tuple(spec["resolutions"])
    cfg = cdc.CDCConfig(resolutions=res, sigma=spec["sigma"], gamma=spec["gamma"], interpolant=spec["interpolant"])
    torch.manual_seed(spec["seed"])
    model = make_model(spec, res)
    ema = deepcopy(model).requires_grad_(False).eval()
    args = SimpleNamespace(lr=spec["lr"], beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip=1.0,
                           ema_decay=0.9999, ema_warmup=True, precision="fp32")
    opt = train.make_optimizer(model, args)
    objective = train.Objective(model, cfg, 0.1, spec["reduction"], spec["stage_sampling"])
    flops_of = [3.0 * model.flops_per_sample(r) for r in res]
    return res, cfg, model, ema, args, opt, objective, flops_of


def train_run(spec, data, ev, out_path, log):
    """Train one model to spec['budget_pflop'] training FLOPs, evaluating the EMA n_evals times."""
    res, cfg, model, ema, args, opt, objective, flops_of = build(spec)
    tx, ty = data[0], data[1]
    budget = spec["budget_pflop"] * 1e15
    marks = [budget * (i + 1) / spec["n_evals"] for i in range(spec["n_evals"])]
    gen, order_gen = torch.Generator(), torch.Generator().manual_seed(spec["seed"])
    perm, pos = torch.randperm(len(tx), generator=order_gen), 0
    flops, step, train_s, evals, loss_sum, loss_n = 0.0, 0, 0.0, [], 0.0, 0
    counts_total = [0] * len(res)
    model.train()
    while marks:
        t0 = time.time()
        if pos + spec["batch"] > len(tx):
            perm, pos = torch.randperm(len(tx), generator=order_gen), 0
        idx = perm[pos:pos + spec["batch"]]
        pos += spec["batch"]
        seed = train.step_seed(spec["seed"], 0, step)
        torch.manual_seed(seed)
        gen.manual_seed(seed)
        out, gnorm, ok = train.train_step(objective, model, ema, opt, tx[idx], ty[idx], gen, step, args)
        if not bool(ok):  # recorded as diverged; best_lr never picks it
            log(f"  non-finite loss or gradient at step {step}: diverged")
            return {"kind": "train", "spec": spec, "diverged_at_step": step, "evals": evals,
                    "final": {"cfd": float("inf"), "acc": 0.0}, "machine": MACHINE}
        step += 1
        flops += sum(c * f for c, f in zip(out["stage_count"], flops_of))
        counts_total = [a + b for a, b in zip(counts_total, out["stage_count"])]
        loss_sum, loss_n = loss_sum + float(out["loss"].detach()), loss_n + 1
        train_s += time.time() - t0
        if flops >= marks[0]:
            marks.pop(0)
            x, y, sample_s = draw(ema, cfg, spec["eval_n"] // 10, spec, seed=1234)
            m = ev.metrics(x, y)
            evals.append({"step": step, "pflop": flops / 1e15, "train_seconds": train_s, "sample_seconds": sample_s,
                          "loss_recent": loss_sum / loss_n, **m})
            log(f"  step {step} {flops / 1e15:.4f} PFLOP train {train_s:.0f}s loss {loss_sum / loss_n:.4f} "
                f"cfd {m['cfd']:.2f} acc {m['acc']:.3f} (sampling {sample_s:.1f}s)")
            loss_sum, loss_n = 0.0, 0
    os.makedirs(os.path.join(CACHE, "ema"), exist_ok=True)
    name = os.path.splitext(os.path.basename(out_path))[0]
    set_name = os.path.basename(os.path.dirname(out_path))
    torch.save({"ema": ema.state_dict(), "spec": spec}, os.path.join(CACHE, "ema", f"{set_name}__{name}.pt"))
    save_digits(x[::spec["eval_n"] // 100][:100] if spec["eval_n"] >= 100 else x,
                os.path.join(os.path.dirname(out_path), name + ".png"))
    return {"kind": "train", "spec": spec, "cdc": cfg.to_dict(), "steps": step, "pflop": flops / 1e15,
            "train_seconds": train_s, "stage_count_total": counts_total,
            "params": sum(p.numel() for p in model.parameters()), "evals": evals, "final": evals[-1],
            "machine": MACHINE, "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------
#                     Curves: long, stoppable, exactly resumable training runs
# ------------------------------------------------------------------------------------------------

CKPT = os.path.join(CACHE, "ckpt")  # resume checkpoints (not committed)
CKPT_EVERY_S = 180.0  # wall seconds between resume checkpoints (also one at every evaluation)


class Interrupted(Exception):
    """Raised by train_curve(interrupt_at_step=...): a simulated kill, for bench/check_resume.py."""


def git_out(*cmd):
    try:
        r = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version():
    """The code this process runs: HEAD, and the .py files that differ from it (with a sha1 of that diff)."""
    dirty = git_out("diff", "--name-only", "HEAD", "--", "*.py")
    diff = git_out("diff", "HEAD", "--", "*.py") or ""
    sha = hashlib.sha1(diff.encode()).hexdigest() if dirty else None
    if sha:  # kept beside the checkpoints (not committed), so that the code can be rebuilt
        path = os.path.join(CACHE, "code", sha + ".diff")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(diff + "\n")
    return {"commit": git_out("rev-parse", "HEAD"), "dirty_py": dirty.split() if dirty else [], "dirty_diff_sha1": sha}


PROCESS_CODE = None  # code_version() at the start of this process (set by main; the code in memory)


def save_ckpt(path, spec, model, ema, opt, order_gen, perm, pos, st):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"spec": spec, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "order_gen": order_gen.get_state(), "perm": perm, "pos": pos, "state": st}, tmp)
    os.replace(tmp, path)


def train_curve(spec, data, ev, out_path, log, max_pflop=None, ckpt_path=None, ckpt_every_s=CKPT_EVERY_S,
                on_write=None, interrupt_at_step=None, ema_dir=os.path.join(CACHE, "ema")):
    """Like train_run, with the EMA evaluated at the absolute compute marks spec['eval_pflop'] (PFLOP), and
    stoppable and exactly resumable:

    - it stops after the last mark <= max_pflop (default: the whole budget) and writes the JSON with
      "complete": false until the last mark is reached; a later call with a larger max_pflop continues;
    - every ckpt_every_s wall seconds and at every evaluation it saves model, EMA, optimiser state, data
      order (the permutation generator's state, the permutation and the position in it), step, FLOPs,
      stage counts, the loss window, the evaluations so far and the training seconds to ckpt_path; a call
      that finds ckpt_path continues from it. Every random draw of a step is re-seeded from (seed, step)
      (train.step_seed) and evaluation draws its own noise, so a resumed run is bit-identical to an
      uninterrupted one under the same code (bench/check_resume.py checks this);
    - "code" lists the code version (git HEAD, modified .py files) at the start and at every resume.

    The JSON (and the grid of the latest evaluation's samples beside it) is rewritten at every evaluation;
    on_write(paths, message, final) is called after each write (final: the call is about to return). A
    complete run also leaves its final EMA in ema_dir/<set>__<name>.pt, like train_run."""
    res, cfg, model, ema, args, opt, objective, flops_of = build(spec)
    tx, ty = data[0], data[1]
    marks = list(spec["eval_pflop"])
    stop = spec["budget_pflop"] if max_pflop is None else max_pflop
    n_target = sum(1 for m in marks if m <= stop * (1 + 1e-9))
    order_gen = torch.Generator().manual_seed(spec["seed"])
    perm, pos = torch.randperm(len(tx), generator=order_gen), 0
    st = dict(step=0, flops=0.0, train_seconds=0.0, loss_sum=0.0, loss_n=0, counts=[0] * len(res), evals=[], code=[])
    code = PROCESS_CODE or code_version()
    if ckpt_path and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["spec"] != spec:
            raise SystemExit(f"{ckpt_path} holds another spec: move it away to start afresh")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        order_gen.set_state(ck["order_gen"])
        perm, pos, st = ck["perm"], ck["pos"], ck["state"]
        log(f"  resumed from {os.path.relpath(ckpt_path, ROOT)}: step {st['step']}, {st['flops'] / 1e15:.5f} PFLOP, "
            f"{len(st['evals'])} evaluations")
        event = "resume"
    else:
        event = "start"
    st["code"].append({"event": event, "step": st["step"], "pflop": st["flops"] / 1e15,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S"), **code})
    name = os.path.splitext(os.path.basename(out_path))[0]
    png = os.path.join(os.path.dirname(out_path), name + ".png")

    def result(extra=None):
        r = {"kind": "train", "set_kind": "curve", "spec": spec, "cdc": cfg.to_dict(), "steps": st["step"],
             "pflop": st["flops"] / 1e15, "train_seconds": st["train_seconds"], "stage_count_total": st["counts"],
             "params": sum(p.numel() for p in model.parameters()), "complete": len(st["evals"]) >= len(marks),
             "n_marks": len(marks), "evals": st["evals"], "final": st["evals"][-1] if st["evals"] else None,
             "code": st["code"], "classifier_sha1": getattr(ev, "clf_sha1", None), "machine": MACHINE, "cpu": CPU,
             "torch": torch.__version__}
        r.update(extra or {})
        return r

    def ckpt():
        if ckpt_path:
            save_ckpt(ckpt_path, spec, model, ema, opt, order_gen, perm, pos, st)

    gen = torch.Generator()
    model.train()
    last_ckpt = time.time()
    while len(st["evals"]) < n_target:
        if interrupt_at_step is not None and st["step"] == interrupt_at_step:
            raise Interrupted(st["step"])
        t0 = time.time()
        if pos + spec["batch"] > len(tx):
            perm, pos = torch.randperm(len(tx), generator=order_gen), 0
        idx = perm[pos:pos + spec["batch"]]
        pos += spec["batch"]
        seed = train.step_seed(spec["seed"], 0, st["step"])
        torch.manual_seed(seed)
        gen.manual_seed(seed)
        out, gnorm, ok = train.train_step(objective, model, ema, opt, tx[idx], ty[idx], gen, st["step"], args)
        if not bool(ok):  # terminal: recorded, never resumed
            log(f"  non-finite loss or gradient at step {st['step']}: diverged")
            r = result({"diverged_at_step": st["step"], "complete": True})
            write_json(out_path, r)
            if on_write:
                on_write([out_path], f"{name}: diverged at step {st['step']}", True)
            return r
        st["step"] += 1
        st["flops"] += sum(c * f for c, f in zip(out["stage_count"], flops_of))
        st["counts"] = [a + b for a, b in zip(st["counts"], out["stage_count"])]
        st["loss_sum"], st["loss_n"] = st["loss_sum"] + float(out["loss"].detach()), st["loss_n"] + 1
        st["train_seconds"] += time.time() - t0
        if st["flops"] >= marks[len(st["evals"])] * 1e15:
            x, y, sample_s = draw(ema, cfg, spec["eval_n"] // 10, spec, seed=1234)
            m = ev.metrics(x, y)
            st["evals"].append({"mark_pflop": marks[len(st["evals"])], "step": st["step"], "pflop": st["flops"] / 1e15,
                                "train_seconds": st["train_seconds"], "sample_seconds": sample_s,
                                "loss_recent": st["loss_sum"] / st["loss_n"], **m})
            log(f"  step {st['step']} {st['flops'] / 1e15:.5f} PFLOP train {st['train_seconds']:.0f}s "
                f"loss {st['loss_sum'] / st['loss_n']:.4f} cfd {m['cfd']:.2f} acc {m['acc']:.3f} "
                f"(sampling {sample_s:.1f}s)")
            st["loss_sum"], st["loss_n"] = 0.0, 0
            ckpt()
            last_ckpt = time.time()
            save_digits(x[::max(1, len(x) // 100)][:100], png)
            grid = os.path.join(CACHE, "grids", f"{os.path.basename(os.path.dirname(out_path))}__{name}__"
                                f"{st['evals'][-1]['mark_pflop']:g}.png")  # every mark's grid (not committed)
            os.makedirs(os.path.dirname(grid), exist_ok=True)
            save_digits(x[::max(1, len(x) // 100)][:100], grid)
            r = result()
            write_json(out_path, r)
            done = len(st["evals"]) >= n_target
            if on_write:
                on_write([out_path, png], f"{name} to {m_label(r)}", done)
        elif time.time() - last_ckpt >= ckpt_every_s:
            ckpt()
            last_ckpt = time.time()
    r = result()
    if r["complete"]:
        os.makedirs(ema_dir, exist_ok=True)
        set_name = os.path.basename(os.path.dirname(out_path))
        torch.save({"ema": ema.state_dict(), "spec": spec}, os.path.join(ema_dir, f"{set_name}__{name}.pt"))
    if not os.path.exists(out_path) or read_json(out_path)["evals"] != r["evals"]:
        write_json(out_path, r)  # resumed past the stop already (a smaller max_pflop than before)
    return r


def m_label(r):
    last = r["evals"][-1]["mark_pflop"] if r["evals"] else 0.0
    return f"{last:g} PFLOP ({len(r['evals'])}/{r['n_marks']} evals, {'complete' if r['complete'] else 'partial'})"


class StageObjective(nn.Module):
    """The loss of one stage alone: what cdc.training_losses computes for the samples it assigns to stage
    `stage` (eq. 8/9 coupling, eq. 12 interpolant, eq. 74 label dropout, eq. 13 loss), for a whole batch.
    The stage-specific baseline of Table 3 trains one such model per stage."""

    def __init__(self, model, cfg, stage, reduction, class_dropout=0.1):
        super().__init__()
        self.model, self.cfg, self.stage, self.reduction, self.p = model, cfg, stage, reduction, class_dropout

    def forward(self, x, y, generator, step):
        s, B = self.stage, x.shape[0]
        tau = torch.rand(B, generator=generator)
        y = cdc.drop_labels(y, self.p, self.model.null_class, generator)
        per = cdc.stage_loss(self.model, cdc.down(x, self.cfg.levels_below_top(s)), y, tau, s, self.cfg, self.reduction)
        counts = [0] * self.cfg.K
        counts[s] = B
        stage_loss = torch.full((self.cfg.K,), float("nan"))
        stage_loss[s] = per.detach().mean()
        return {"loss": per.mean(), "stage_loss": stage_loss, "stage_count": counts}


class StageRouter(nn.Module):
    """K stage-specific networks as one field for cdc.guided_field / cdc.sample: routed by input side."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleDict({str(k): m for k, m in models.items()})
        self.null_class = next(iter(models.values())).null_class

    def forward(self, x, tau, y=None):
        return self.models[str(x.shape[-1])](x, tau, y)


def train_stage_specific(spec, data, ev, out_path, log):
    """K separate models, model k trained only on stage k, with stage k's share of the budget: the share
    the unified model spends on stage k (equal windows: flops_per_sample(r_k) / sum over stages). All K
    reach each evaluation mark before the chain of their EMAs is sampled."""
    res = tuple(spec["resolutions"])
    cfg = cdc.CDCConfig(resolutions=res, sigma=spec["sigma"], gamma=spec["gamma"], interpolant=spec["interpolant"])
    args = SimpleNamespace(lr=spec["lr"], beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip=1.0,
                           ema_decay=0.9999, ema_warmup=True, precision="fp32")
    tx, ty = data[0], data[1]
    per_stage = []
    for s, r in enumerate(res):
        torch.manual_seed(spec["seed"] * 100 + s)
        model = make_model(spec, (r,))
        ema = deepcopy(model).requires_grad_(False).eval()
        og = torch.Generator().manual_seed(spec["seed"] * 100 + s)
        per_stage.append(dict(model=model, ema=ema, opt=train.make_optimizer(model, args),
                              obj=StageObjective(model, cfg, s, spec["reduction"]), f=3.0 * model.flops_per_sample(r),
                              flops=0.0, step=0, og=og, perm=torch.randperm(len(tx), generator=og), pos=0, secs=0.0))
    total_f = sum(st["f"] for st in per_stage)
    budget = spec["budget_pflop"] * 1e15
    gen, evals = torch.Generator(), []
    router = StageRouter({r: st["ema"] for r, st in zip(res, per_stage)}).eval()
    for i in range(spec["n_evals"]):
        mark = budget * (i + 1) / spec["n_evals"]
        for s, st in enumerate(per_stage):
            st["model"].train()
            while st["flops"] < mark * st["f"] / total_f:
                t0 = time.time()
                if st["pos"] + spec["batch"] > len(tx):
                    st["perm"], st["pos"] = torch.randperm(len(tx), generator=st["og"]), 0
                idx = st["perm"][st["pos"]:st["pos"] + spec["batch"]]
                st["pos"] += spec["batch"]
                seed = train.step_seed(spec["seed"] * 100 + s, 0, st["step"])
                torch.manual_seed(seed)
                gen.manual_seed(seed)
                out, gnorm, ok = train.train_step(st["obj"], st["model"], st["ema"], st["opt"], tx[idx], ty[idx], gen,
                                                  st["step"], args)
                if not bool(ok):
                    log(f"  stage {s}: non-finite loss or gradient at step {st['step']}: diverged")
                    return {"kind": "train", "spec": spec, "diverged_at_step": st["step"], "evals": evals,
                            "final": {"cfd": float("inf"), "acc": 0.0}, "machine": MACHINE}
                st["step"] += 1
                st["flops"] += spec["batch"] * st["f"]
                st["secs"] += time.time() - t0
        x, y, sample_s = draw(router, cfg, spec["eval_n"] // 10, spec, seed=1234)
        m = ev.metrics(x, y)
        flops = sum(st["flops"] for st in per_stage)
        train_s = sum(st["secs"] for st in per_stage)
        evals.append({"step": [st["step"] for st in per_stage], "pflop": flops / 1e15, "train_seconds": train_s,
                      "sample_seconds": sample_s, **m})
        log(f"  steps {[st['step'] for st in per_stage]} {flops / 1e15:.4f} PFLOP train {train_s:.0f}s "
            f"cfd {m['cfd']:.2f} acc {m['acc']:.3f} (sampling {sample_s:.1f}s)")
    name = os.path.splitext(os.path.basename(out_path))[0]
    save_digits(x[::spec["eval_n"] // 100][:100], os.path.join(os.path.dirname(out_path), name + ".png"))
    return {"kind": "train", "spec": spec, "cdc": cfg.to_dict(), "steps": sum(st["step"] for st in per_stage),
            "steps_per_stage_model": [st["step"] for st in per_stage], "pflop": evals[-1]["pflop"],
            "train_seconds": evals[-1]["train_seconds"],
            "params": sum(p.numel() for st in per_stage for p in st["model"].parameters()), "evals": evals,
            "final": evals[-1], "machine": MACHINE, "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------
#                                       Experiment sets
# ------------------------------------------------------------------------------------------------

K1, K3 = (32,), (8, 16, 32)
LR_GRID = (1e-3, 2e-3, 4e-3)
GRID_BUDGET = 0.003
HEADLINE_SEEDS = (0, 1, 2)


def spec(**kw):
    s = dict(BASE)
    s.update(kw)
    s["resolutions"] = list(s["resolutions"])
    return s


def best_lr(resolutions):
    """The learning rate with the lowest final cfd in the lr grid (None until the grid is done)."""
    best = None
    for lr in LR_GRID:
        p = os.path.join(RESULTS, "lrgrid", run_name(spec(resolutions=resolutions, lr=lr, seed=100,
                                                          budget_pflop=GRID_BUDGET, n_evals=1)) + ".json")
        if not os.path.exists(p):
            return None
        r = read_json(p)
        if r.get("diverged_at_step") is not None:
            continue
        if best is None or r["final"]["cfd"] < best[0]:
            best = (r["final"]["cfd"], lr)
    if best is None:
        raise SystemExit(f"every lr of the grid diverged for {resolutions}")
    return best[1]


def set_lrgrid():
    return [spec(resolutions=res, lr=lr, seed=100, budget_pflop=GRID_BUDGET, n_evals=1)
            for res in (K1, K3) for lr in LR_GRID]


def set_claim1():
    out = []
    for seed in HEADLINE_SEEDS:
        for res in (K3, K1):
            lr = best_lr(res)
            if lr is None:
                raise SystemExit("claim1 needs the lr grid first: python bench/claims.py run lrgrid")
            out.append(spec(resolutions=res, lr=lr, seed=seed))
    return out


def cdc_lr():
    lr = best_lr(K3)
    if lr is None:
        raise SystemExit("needs the lr grid first: python bench/claims.py run lrgrid")
    return lr


# The ablations (claims 2-7) evaluate once, at the end of the budget: evaluation draws its own noise
# (seed 1234) and never touches the training RNG, so the final numbers equal those of a 4-point run
# (claim 1's K = 3 row, their baseline) and each run saves ~2 minutes of sampling on the CPU.
def ablation(**kw):
    return spec(**{"lr": cdc_lr(), "n_evals": 1, **kw})


ABLATION_SEEDS = (0,)  # claims 2-6; `run --seeds 0,1,2` adds seeds (claim 7 always runs the headline seeds)


def set_claim2():
    return [ablation(resolutions=res, seed=s) for s in ABLATION_SEEDS for res in ((16, 32), (8, 32))]


def set_claim3():
    return [run for seed in ABLATION_SEEDS for run in  # gamma 2, sigma 1 is claim 1's K = 3
            [ablation(gamma=g, seed=seed) for g in (1.0, 1.5, 3.0, 4.0)] + [ablation(sigma=s, seed=seed) for s in (0.5, 2.0)]]


def set_claim4():
    return [ablation(interpolant=i, seed=s) for s in ABLATION_SEEDS for i in ("trigonometric", "score")]


def set_claim5():
    return [ablation(fusion="add", seed=s) for s in ABLATION_SEEDS]


def set_claim6():
    return [ablation(stage_specific=True, seed=s) for s in ABLATION_SEEDS]


def set_claim7():  # seed 0 of both variants first, then seeds 1 and 2
    return [ablation(seed=seed, **kw) for seed in HEADLINE_SEEDS
            for kw in (dict(reduction="sum"), dict(stage_sampling="iid"))]


def curve_marks():
    """The evaluation marks of the curves (PFLOP, 21 points, log-spaced): 0.001 * 2^(i/2) up to 0.008,
    2^(1/4) apart from 0.008 to 0.064 (where single-stage flow matching learns), 2^(1/2) apart to 0.128."""
    m = [0.001 * 2 ** (i / 2) for i in range(7)]
    m += [0.008 * 2 ** (j / 4) for j in range(1, 13)]
    m += [0.064 * 2 ** (j / 2) for j in range(1, 3)]
    return [float(f"{v:.6g}") for v in m]


CURVE_BUDGET = 0.128


CURVE_SEEDS = HEADLINE_SEEDS  # `run curves --seeds 2` runs only seed 2


def set_curves():
    """Claim 1's pair (K = 1 and K = 3 at their grid learning rates, the same network, batch and optimiser)
    trained to CURVE_BUDGET, evaluated (200 samples) at curve_marks(); K = 1 before K = 3, seed by seed."""
    marks = curve_marks()
    out = []
    for seed in CURVE_SEEDS:
        for res in (K1, K3):
            lr = best_lr(res)
            if lr is None:
                raise SystemExit("curves needs the lr grid first: python bench/claims.py run lrgrid")
            out.append(spec(resolutions=res, lr=lr, seed=seed, budget_pflop=CURVE_BUDGET, n_evals=len(marks),
                            eval_pflop=marks))
    return out


# Re-checks on models that have learned (issue: the curves' lrs came from a grid at 0.003 PFLOP, claim 3's
# gamma sweep and claim 4's score row were at 0.008, where single-stage FM had not learned).
LONG_MARKS = [0.004, 0.008, 0.016, 0.032]  # curve marks: these evaluations equal the curves' at those points
LONG_SEED = 100  # the lr grid's seed, not a headline seed


def lr_ladder(results, lrs):
    """lrs widened by factors of 2 until the best (lowest final cfd of `results(lr)`, None while a run is
    missing) is interior; returns the lrs to run."""
    lrs = sorted(lrs)
    while True:
        finals = [results(lr) for lr in lrs]
        if any(f is None for f in finals):
            return lrs
        best = min(range(len(lrs)), key=lambda i: finals[i])
        if 0 < best < len(lrs) - 1:
            return lrs
        lrs = [lrs[0] / 2] + lrs if best == 0 else lrs + [lrs[-1] * 2]


def final_cfd(set_name, s):
    p = os.path.join(RESULTS, set_name, run_name(s) + ".json")
    if not os.path.exists(p):
        return None
    r = read_json(p)
    if r.get("diverged_at_step") is not None:
        return math.inf
    return r["final"]["cfd"] if r.get("complete", True) else None


def set_lrlong():
    """Both methods' lr at 0.032 PFLOP (seed 100, evaluated at LONG_MARKS): x1/2, x1, x2 the curves' lr,
    widened until the optimum is interior."""
    out = []
    for res in (K3, K1):
        mk = lambda lr, res=res: spec(resolutions=res, lr=lr, seed=LONG_SEED, budget_pflop=LONG_MARKS[-1],  # noqa: E731
                                      n_evals=len(LONG_MARKS), eval_pflop=LONG_MARKS)
        base = best_lr(res)
        out += [mk(lr) for lr in lr_ladder(lambda lr: final_cfd("lrlong", mk(lr)), [base / 2, base, base * 2])]
    return out


LONG_SEEDS = (0, 1)


def set_claim3long():
    """gamma in {1, 4, 6} at 0.032 PFLOP, where CDC's curve has flattened, seeds 0 and 1; gamma 2 is the
    curves' K = 3 run at its 0.032 mark (the same evaluation noise and n)."""
    return [spec(resolutions=K3, lr=cdc_lr(), gamma=g, seed=seed, budget_pflop=LONG_MARKS[-1], n_evals=3,
                 eval_pflop=LONG_MARKS[1:]) for seed in LONG_SEEDS for g in (1.0, 4.0, 6.0)]


def set_claim4lr():
    """The score interpolant at its own lr (claim 4's budget 0.008 PFLOP, seed 0): x1/4..x2 CDC's lr,
    widened until the optimum is interior (the lr 4e-3 run repeats claim 4's row)."""
    mk = lambda lr: ablation(interpolant="score", seed=0, lr=lr)  # noqa: E731
    base = cdc_lr()
    return [mk(lr) for lr in lr_ladder(lambda lr: final_cfd("claim4lr", mk(lr)), [base / 4, base / 2, base, base * 2])]


def set_curves_rerun():
    """The curves' runs whose final evaluation is missing (their EMA weights were lost with a machine's
    bench/cache), trained again from step 0 under the same specs, for that final evaluation. On another CPU
    the floats round differently: a re-run is then another sample of the same training (same seed, data
    order and noise), not a bit-identical copy, and the classifier retrains to other weights (its sha1 is in
    each JSON), so its curve is a replication, kept apart from the record in results/curves_rerun/."""
    return [s for s in set_curves() if not os.path.exists(final_path("curves", run_name(s)))]


def set_curveslr():
    """K = 3's curve at its long-budget lr: lrlong's lowest cfd at 0.032 PFLOP (1e-3; the curves' 4e-3 came
    from the grid at 0.003 PFLOP and is too high there). K = 1's long-budget optimum is its curves' lr, so
    its curves stand; same seeds, marks, budget and evaluation as the curves."""
    runs = [s for s in set_lrlong() if s["resolutions"] == list(K3)]
    cfds = [final_cfd("lrlong", s) for s in runs]
    if None in cfds:
        raise SystemExit("curveslr needs lrlong first: python bench/claims.py run lrlong")
    lr = min(zip(cfds, [s["lr"] for s in runs]))[1]
    marks = curve_marks()
    return [spec(resolutions=K3, lr=lr, seed=seed, budget_pflop=CURVE_BUDGET, n_evals=len(marks), eval_pflop=marks)
            for seed in CURVE_SEEDS]


# Issue: the paper's loss weighting at convergence. Alg. 1 line 17 sums over a stage's d_k pixels, so a stage-k
# sample weighs d_k (1 : 4 : 16 here); 'scaled-sum' is that sum / d_K (the same relative weights at the gradient
# scale of 'mean'), 'sum' the literal form. Each gets its own lr from a ladder at the long budget (as lrlong did
# for 'mean'), then the curves' seeds, marks and budget, and the final evaluation with the guidance sweep.
WEIGHTINGS = ("scaled-sum", "sum")


LR_SETS = {"scaled-sum": "lrweight", "sum": "lrsum"}  # the ladder of each weighting, in its own results folder


def lr_ladder_of(red):
    """K = 3 under weighting `red` at 0.032 PFLOP (seed 100, LONG_MARKS): lr x1/2, x1, x2 of 'mean''s long-budget
    optimum (1e-3), widened until the optimum is interior."""
    mk = lambda lr: spec(resolutions=K3, lr=lr, seed=LONG_SEED, budget_pflop=LONG_MARKS[-1],  # noqa: E731
                         n_evals=len(LONG_MARKS), eval_pflop=LONG_MARKS, reduction=red)
    return [mk(lr) for lr in lr_ladder(lambda lr: final_cfd(LR_SETS[red], mk(lr)), [5e-4, 1e-3, 2e-3])]


def weighting_lr(red):
    runs = lr_ladder_of(red)
    cfds = [final_cfd(LR_SETS[red], s) for s in runs]
    if None in cfds:
        raise SystemExit(f"weighting needs the {red} ladder first: python bench/claims.py run {LR_SETS[red]}")
    return min(zip(cfds, [s["lr"] for s in runs]))[1]


def set_weighting():
    """K = 3 under the paper's weights (scaled-sum first, then sum) at its lrweight optimum, to CURVE_BUDGET with
    the curves' marks, seed by seed; compared with K = 1 and K = 3 'mean' at their own best guidance."""
    marks = curve_marks()
    return [spec(resolutions=K3, lr=weighting_lr(red), seed=seed, budget_pflop=CURVE_BUDGET, n_evals=len(marks),
                 eval_pflop=marks, reduction=red) for red in WEIGHTINGS[:1] for seed in CURVE_SEEDS]


CURVE_SETS = ("curves", "curves_rerun", "curveslr", "lrlong", "claim3long", "lrweight", "lrsum", "weighting")  # train_curve: stoppable at --max-pflop, resumable

SETS = {"lrgrid": set_lrgrid, "claim1": set_claim1, "claim2": set_claim2, "claim3": set_claim3,
        "claim4": set_claim4, "claim5": set_claim5, "claim6": set_claim6,
        "claim7": set_claim7, "curves": set_curves, "lrlong": set_lrlong, "claim3long": set_claim3long,
        "claim4lr": set_claim4lr, "curves_rerun": set_curves_rerun, "curveslr": set_curveslr,
        "lrweight": functools.partial(lr_ladder_of, "scaled-sum"), "lrsum": functools.partial(lr_ladder_of, "sum"),
        "weighting": set_weighting}
# sampling-only sets on the claim-1 checkpoints (no training)
SAMPLING_SETS = ("claim8", "claim9")


def sampling_sweep(set_name, data, ev, log, seeds=HEADLINE_SEEDS):
    """claim8: per-stage quality against S_cfg; claim9: quality against steps per stage (and time)."""
    lr3 = cdc_lr()
    lr1 = best_lr(K1)
    jobs = []
    for seed in seeds:
        if set_name == "claim8":
            for s in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0):
                jobs.append((K3, lr3, seed, dict(cfg_scale=s), f"cfg{s}"))
        else:
            for n in (2, 4, 8, 16, 24):
                for res, lr in ((K3, lr3), (K1, lr1)):
                    jobs.append((res, lr, seed, dict(steps=n), f"steps{n}"))
    for res, lr, seed, kw, tag in jobs:
        base = run_name(spec(resolutions=res, lr=lr, seed=seed))
        path = os.path.join(RESULTS, set_name, f"{base}_{tag}.json")
        if os.path.exists(path):
            continue
        ck = os.path.join(CACHE, "ema", f"claim1__{base}.pt")
        if not os.path.exists(ck):
            log(f"skip {path}: no checkpoint {ck} (run claim1 first)")
            continue
        s, cfg, ema = load_ema(ck)
        stages, y, secs = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234, return_stages=True, **kw)
        per_stage = [dict(side=x.shape[-1], **ev.metrics(x, y)) for x in stages]
        result = {"kind": "sampling", "set": set_name, "checkpoint_spec": s, "sampler": {**kw, "solver": s["solver"]},
                  "sample_seconds": secs, "n": len(y), "per_stage": per_stage, "final": per_stage[-1],
                  "machine": MACHINE, "torch": torch.__version__}
        write_json(path, result)
        log(f"{path}: {json.dumps(per_stage)} ({secs:.1f}s)")


# ------------------------------------------------------------------------------------------------
#                                             Plumbing
# ------------------------------------------------------------------------------------------------


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def cmd_run(a):
    global ABLATION_SEEDS, LONG_SEEDS, CURVE_SEEDS
    try:
        if a.seeds is not None:  # only these seeds (two processes can share a set's runs this way)
            ABLATION_SEEDS = LONG_SEEDS = CURVE_SEEDS = tuple(int(v) for v in a.seeds.split(","))
    except ValueError:
        raise SystemExit(f"error: --seeds takes comma-separated integers, got {a.seeds!r}") from None
    torch.set_num_threads(a.threads)
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731
    data = load_mnist(a.mnist)
    clf = get_classifier(data)
    ev = Evaluator(data, clf)
    ev.clf_sha1 = classifier_sha1()
    floor_path = os.path.join(RESULTS, "floor.json")
    if not os.path.exists(floor_path):
        fl = {"n": BASE["eval_n"], "per_side": {s: [ev.floor(BASE["eval_n"], s, seed) for seed in range(3)]
                                                for s in (8, 16, 32)},
              "full_heldout_32": ev.floor(N_HELDOUT, 32), "machine": MACHINE}
        write_json(floor_path, fl)
        log(f"floors: {json.dumps(fl)}")
    for name in a.sets:
        if name in SAMPLING_SETS:
            continue
        seen = set()
        while todo := [s for s in SETS[name]() if run_name(s) not in seen]:  # re-read: a grid may widen
            s = todo[0]
            seen.add(run_name(s))
            path = os.path.join(RESULTS, name, run_name(s) + ".json")
            if name in CURVE_SETS:
                run_curve(name, s, path, data, ev, log, a)
                continue
            if os.path.exists(path):
                log(f"done already: {path}")
                continue
            if a.dry_run:
                log(f"to run: {path}")
                continue
            log(f"run {path}")
            result = (train_stage_specific if s.get("stage_specific") else train_run)(s, data, ev, path, log)
            write_json(path, result)
            log(f"wrote {path}")
    sweeps = [n for n in a.sets if n in SAMPLING_SETS]
    if sweeps and not a.dry_run:  # seed 0 of every sweep first, then the other seeds
        for seeds in ((HEADLINE_SEEDS[0],), HEADLINE_SEEDS):
            for name in sweeps:
                sampling_sweep(name, data, ev, log, seeds)


def git_commit(paths, message, log, tries=40):
    """git add + git commit of exactly these paths (never anything else), retried while another git
    process holds the index lock."""
    rel = [os.path.relpath(p, ROOT) for p in paths if os.path.exists(p)]
    lock = git_out("rev-parse", "--git-path", "index.lock")
    lock = os.path.join(ROOT, lock) if lock else None
    err = "the index stayed locked"
    for _ in range(tries):
        if lock and os.path.exists(lock):
            time.sleep(3)
            continue
        add = subprocess.run(["git", "add", "--", *rel], cwd=ROOT, capture_output=True, text=True)
        if add.returncode != 0:
            err = add.stderr
            time.sleep(3)
            continue
        if subprocess.run(["git", "diff", "--cached", "--quiet", "HEAD", "--", *rel], cwd=ROOT).returncode == 0:
            return True  # nothing new in these files
        com = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=ROOT, capture_output=True,
                             text=True)
        if com.returncode == 0:
            log(f"  committed {' '.join(rel)}")
            return True
        err = com.stderr or com.stdout
        time.sleep(3)
    log(f"  could not commit {' '.join(rel)} (left in the working tree): {err.strip()[:300]}")
    return False


COMMIT_EVERY_S = 900.0  # --commit: a run's partial JSON at most every 15 min, and always when it stops


CURVES_FLOOR = os.path.join(RESULTS, "curves_floor.json")


def classifier_sha1():
    with open(os.path.join(CACHE, "classifier.pt"), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def curves_floor(name, data, ev, log):
    """The floor of a curve set, measured with the classifier it is scored by (bench/cache/classifier.pt,
    identified by its sha1): the metrics of 200 held-out real digits (3 draws) and of all 2,000 at 32 px.
    The curves, lrlong and claim3long share results/curves_floor.json; later sets have their own. A set whose
    floor names another classifier stops here: its evaluations so far would not compare with new ones (the
    classifier retrains to other weights on another CPU). results/floor.json belongs to claims 1-9."""
    path = CURVES_FLOOR if name in ("curves", "lrlong", "claim3long") else os.path.join(RESULTS, name, "floor.json")
    if os.path.exists(path):
        old = read_json(path)["classifier"]["sha1"]
        if old == classifier_sha1():
            return
        raise SystemExit(f"error: {name} is scored with classifier {old[:7]}, bench/cache/classifier.pt is "
                         f"{classifier_sha1()[:7]}: new evaluations would not compare (run curves_rerun instead)")
    with torch.no_grad():
        acc = float((ev.clf(data[2]).argmax(1) == data[3]).float().mean())
    fl = {"classifier": {"sha1": classifier_sha1(), "heldout_accuracy": acc, "n_heldout": len(data[2])},
          "n": BASE["eval_n"], "per_side": {"32": [ev.floor(BASE["eval_n"], 32, seed) for seed in range(3)]},
          "full_heldout_32": ev.floor(N_HELDOUT, 32), "machine": MACHINE, "cpu": CPU}
    write_json(path, fl)
    log(f"{name} floor: {json.dumps(fl)}")


def run_curve(name, s, path, data, ev, log, a):
    """One run of a curve set, up to the last mark <= --max-pflop; skipped when its JSON is there already."""
    stop = s["budget_pflop"] if a.max_pflop is None else a.max_pflop
    n_target = sum(1 for m in s["eval_pflop"] if m <= stop * (1 + 1e-9))
    ckpt_path = os.path.join(CKPT, f"{name}__{run_name(s)}.pt")
    if os.path.exists(path):
        r = read_json(path)
        if r.get("complete") or len(r["evals"]) >= n_target:
            log(f"done already to {m_label(r)}: {path}")
            return
        if not os.path.exists(ckpt_path):
            log(f"  {path} is partial but {ckpt_path} is missing: the run starts again from step 0")
    curves_floor(name, data, ev, log)
    if a.dry_run:
        log(f"to run (to the mark {s['eval_pflop'][n_target - 1]:g} PFLOP): {path}")
        return
    last = [0.0]

    def on_write(paths, message, final):
        if a.commit and (final or time.time() - last[0] >= COMMIT_EVERY_S):
            git_commit(paths, f"bench: {name} {message}", log)
            last[0] = time.time()

    log(f"run {path} (to {stop:g} PFLOP)")
    r = train_curve(s, data, ev, path, log, max_pflop=a.max_pflop, ckpt_path=ckpt_path, on_write=on_write,
                    ema_dir=os.path.dirname(ema_path(name, s)))
    log(f"wrote {path}: {m_label(r)}")
    if name in FINAL_SETS and r["complete"]:
        out = final_eval(name, s, data, ev, log)
        if a.commit and out:
            git_commit(out, f"bench: {name} final evaluation of {run_name(s)}", log)


# ------------------------------------------------------------------------------------------------
#            The curves' final models: 1,000 samples, classifier metrics and the Inception FID
# ------------------------------------------------------------------------------------------------

FINAL = os.path.join(RESULTS, "curves_final")
FINAL_SETS = ("curves", "curves_rerun", "curveslr", "weighting")  # their complete runs get the final evaluation


def final_path(set_name, stem):
    """results/curves_final/<stem>.json for the curves, <set>__<stem>.json for the later sets."""
    return os.path.join(FINAL, ("" if set_name == "curves" else set_name + "__") + stem + ".json")


def ema_path(set_name, s):
    return os.path.join(CACHE, "ema", f"{set_name}__{run_name(s)}.pt")


FINAL_N, FINAL_SEED = 1000, 4321  # 100 per digit; noise unlike the curves' (seed 1234, 200 samples)
STEPS_SWEEP = (2, 4, 8, 16, 24)  # claim 9 again, on the learned models (200 samples, the curves' noise)


def inception_stats(det, x):
    """Mean and covariance of the standard Inception's pool features of digits in [-1, 1] (N, 1, 32, 32),
    as fid.py sees samples: uint8, grey replicated to RGB, the TF graph's resize to 299."""
    import fid
    from data import to_uint8
    u8 = to_uint8(x.float().repeat(1, 3, 1, 1)).numpy()  # to_uint8 clamps to [-1, 1]
    return fid.extract(det, fid.npz_batches(u8, 50), "cpu", every=1e9)["pool"].result()


def inception_ref(det, data, log):
    """The reference: all 2,000 held-out digits (cached); floor: 1,000 training digits against it, and the
    classifier metrics of 1,000 held-out digits (results/curves_final/floor.json)."""
    path = os.path.join(CACHE, f"inception_heldout{N_HELDOUT}_{det.sha1[:12]}.npz")
    if not os.path.exists(path):
        t0 = time.time()
        mu, sigma = inception_stats(det, data[2])
        np.savez(path, mu=mu, sigma=sigma)
        log(f"  Inception statistics of the {N_HELDOUT} held-out digits ({time.time() - t0:.0f}s)")
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def final_eval(set_name, s, data, ev, log):
    """FINAL_N samples of a complete curves run's final EMA (bench/cache/ema): classifier cfd / acc, the
    Inception FID against the 2,000 held-out digits, and the steps-per-stage sweep. Returns the paths written."""
    import fid
    name = run_name(s)
    out, ck = final_path(set_name, name), ema_path(set_name, s)
    if os.path.exists(out) or not os.path.exists(ck):
        return []
    det = fid.load_detector(None, "cpu")
    ref = inception_ref(det, data, log)
    paths = []
    floor_path = final_path(set_name, "floor")
    if os.path.exists(floor_path) and read_json(floor_path)["classifier_sha1"] != getattr(ev, "clf_sha1", None):
        raise SystemExit(f"error: {floor_path} was measured with another classifier than bench/cache/classifier.pt")
    if not os.path.exists(floor_path):
        t0 = time.time()
        fl = {"inception_fid": fid.frechet_distance(*inception_stats(det, data[0][:FINAL_N]), *ref),
              "inception_what": f"the first {FINAL_N} training digits against the {N_HELDOUT} held-out digits",
              "classifier": ev.floor(FINAL_N, 32), "classifier_what": f"{FINAL_N} held-out digits (seed 0)",
              "classifier_sha1": getattr(ev, "clf_sha1", None), "detector_sha1": det.sha1,
              "seconds": time.time() - t0, "machine": MACHINE, "cpu": CPU}
        write_json(floor_path, fl)
        paths.append(floor_path)
        log(f"  final floor: {json.dumps(fl)}")
    s, cfg, ema = load_ema(ck)
    x, y, sample_s = draw(ema, cfg, FINAL_N // 10, s, seed=FINAL_SEED)
    t0 = time.time()
    r = {"kind": "final", "spec": s, "n": len(x), "seed": FINAL_SEED, "sample_seconds": sample_s, **ev.metrics(x, y),
         "inception_fid": fid.frechet_distance(*inception_stats(det, x), *ref), "inception_ref_n": N_HELDOUT}
    r["inception_seconds"] = time.time() - t0
    sweep = []
    for n in STEPS_SWEEP:
        xs, ys, secs = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234, steps=n)
        sweep.append({"steps_per_stage": n, "n": len(xs), "sample_seconds": secs, **ev.metrics(xs, ys)})
    r.update(steps_sweep=sweep, set=set_name, cpu=CPU, classifier_sha1=getattr(ev, "clf_sha1", None),
             detector_sha1=det.sha1, machine=MACHINE, torch=torch.__version__)
    if set_name not in ("curves", "curves_rerun", "curveslr"):  # the protocol: each model at its best
        r.update(best_guidance(s, cfg, ema, data, ev, det, ref, log))
    write_json(out, r)
    png = os.path.splitext(out)[0] + ".png"
    save_digits(x.view(10, -1, *x.shape[1:])[:, :10].reshape(-1, *x.shape[1:]), png)
    log(f"  final {name}: cfd {r['cfd']:.2f} acc {r['acc']:.3f} Inception FID {r['inception_fid']:.2f} (n {len(x)}); "
        f"steps sweep cfd {[round(v['cfd'], 1) for v in sweep]}")
    return paths + [out, png]


CFG_SWEEP, STEPS_OF_CFG_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0), (4, 8, 24)


@torch.no_grad()
def teacher_forced(ema, cfg, s, data, ev, cfg_scale, steps, n=200, seed=1234):
    """Where a chained sampler loses: for every stage k > 1, start it from the real held-out digits' D(x1^(k)),
    upsampled, plus sigma_k zeta (eq. 9), and (a) score stage k's own output ('alone', at its side) and (b) run the
    chain on to the last stage ('to_end', at 32 px). The chained sampler's per-stage outputs, with the same noise
    seed and labels, are the comparison; the floor is n real held-out digits at each side."""
    hx, hy = data[2][:n], data[3][:n]
    gen = torch.Generator().manual_seed(seed)
    field = cdc.guided_field(ema, hy, cfg_scale)
    chained = cdc.sample(field, cfg, n, channels=1, steps=steps, solver=s["solver"], generator=gen,
                         return_stages=True)
    out = {"chained": [dict(side=x.shape[-1], **ev.metrics(x, hy)) for x in chained],
           "floor": [dict(side=r, **ev.metrics(cdc.down(hx, cfg.levels_below_top(k)), hy))
                     for k, r in enumerate(cfg.resolutions)], "alone": [None], "to_end": [None]}
    for k in range(1, cfg.K):
        gen = torch.Generator().manual_seed(seed + k)
        prev = cdc.down(hx, cfg.levels_below_top(k - 1))
        x = cdc.up(prev, cfg.levels(k)) + cfg.sigma_k(k) * cdc.randn(
            (n, 1, cfg.resolutions[k], cfg.resolutions[k]), gen)
        x = cdc.integrate_stage(field, x, k, steps, cfg, s["solver"], generator=gen)
        out["alone"].append(dict(side=x.shape[-1], **ev.metrics(x, hy)))
        for j in range(k + 1, cfg.K):
            zeta = cdc.randn((n, 1, cfg.resolutions[j], cfg.resolutions[j]), gen)
            x = cdc.integrate_stage(field, cdc.up(x, cfg.levels(j)) + cfg.sigma_k(j) * zeta, j, steps, cfg,
                                    s["solver"], generator=gen)
        out["to_end"].append(dict(side=x.shape[-1], **ev.metrics(x, hy)))
    return out


def gradient_shares(ema, cfg, data, n_per_stage=64, seed=0):
    """Each stage's share of the training gradient at the final weights: the gradient norm of one stage's batch
    mean loss under 'mean', for n_per_stage training digits per stage; 'sum' and 'scaled-sum' scale stage k's by
    d_k and d_k / d_K exactly. share_k = ||g_k|| / sum_j ||g_j|| for each weighting."""
    net = deepcopy(ema).train().requires_grad_(True)
    torch.manual_seed(seed)
    x, y = data[0][:n_per_stage], data[1][:n_per_stage]
    norms = []
    for k in range(cfg.K):
        net.zero_grad()
        x1 = cdc.down(x, cfg.levels_below_top(k))
        cdc.stage_loss(net, x1, y, torch.rand(len(x)), k, cfg, "mean").mean().backward()
        norms.append(float(torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters() if p.grad is not None))))
    d = [r * r for r in cfg.resolutions]
    weights = {"mean": [1.0] * cfg.K, "sum": [float(v) for v in d], "scaled-sum": [v / d[-1] for v in d]}
    shares = {}
    for red, w in weights.items():
        g = [a * b for a, b in zip(norms, w)]
        shares[red] = [v / sum(g) for v in g]
    return {"grad_norm_mean": norms, "share": shares, "n_per_stage": n_per_stage}


def best_guidance(s, cfg, ema, data, ev, det, ref, log):
    """Each model at its best: classifier metrics over CFG_SWEEP x STEPS_OF_CFG_SWEEP (200 samples, the curves'
    noise); the Inception FID (FINAL_N samples, FINAL_SEED) at the lowest-cfd point and at S_cfg = 1 (its best
    steps); the teacher-forced diagnosis at both points; each stage's gradient share."""
    t0 = time.time()
    grid = []
    for S in CFG_SWEEP:
        for n in STEPS_OF_CFG_SWEEP:
            xs, ys, secs = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234, cfg_scale=S, steps=n)
            grid.append({"cfg": S, "steps_per_stage": n, "n": len(xs), "sample_seconds": secs, **ev.metrics(xs, ys)})
    best = min(grid, key=lambda g: g["cfd"])
    best1 = min((g for g in grid if g["cfg"] == 1.0), key=lambda g: g["cfd"])
    points = []
    for g in (best, best1) if best is not best1 else (best,):
        x, y, _ = draw(ema, cfg, FINAL_N // 10, s, seed=FINAL_SEED, cfg_scale=g["cfg"], steps=g["steps_per_stage"])
        points.append({"cfg": g["cfg"], "steps_per_stage": g["steps_per_stage"], "n": len(x), **ev.metrics(x, y),
                       "inception_fid": fid_of(det, x, ref),
                       "teacher_forced": teacher_forced(ema, cfg, s, data, ev, g["cfg"], g["steps_per_stage"])})
        log(f"  at S_cfg {g['cfg']:g}, {g['steps_per_stage']} steps: cfd {points[-1]['cfd']:.2f} "
            f"Inception FID {points[-1]['inception_fid']:.2f} (n {len(x)})")
    return {"guidance_grid": grid, "at_best": points[0], "at_cfg1": points[-1], "gradient": gradient_shares(ema, cfg, data),
            "best_guidance_seconds": time.time() - t0}


def fid_of(det, x, ref):
    import fid
    return fid.frechet_distance(*inception_stats(det, x), *ref)


INCEPTION_N, INCEPTION_REF = 100, 500


def cmd_inception(a):
    """The standard Inception FID (fid.py's packaged TF-Inception, the FID of published numbers) of the
    headline rows: each claim-1 EMA model's first INCEPTION_N final samples (10 per digit, the same noise and
    sampler as its cfd) against INCEPTION_REF held-out digits; floor: as many training digits. Tiny n (the
    CPU runs ~1 image/s through Inception at 299 px), so the numbers carry a large small-sample bias, the
    same for every row: read them against the floor."""
    import fid
    torch.set_num_threads(a.threads)
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731
    data = load_mnist(a.mnist)
    det = fid.load_detector(None, "cpu")
    out_dir = os.path.join(RESULTS, "inception")

    stats = functools.partial(inception_stats, det)

    ref_cache = os.path.join(CACHE, f"inception_ref{INCEPTION_REF}.npz")
    if not os.path.exists(ref_cache):
        mu, sigma = stats(data[2][:INCEPTION_REF])
        np.savez(ref_cache, mu=mu, sigma=sigma)
    with np.load(ref_cache) as f:
        ref = (f["mu"], f["sigma"])
    jobs = [("floor", None)] + [(run_name(spec(resolutions=res, lr=best_lr(res), seed=seed)), res)
                                for seed in HEADLINE_SEEDS for res in (K3, K1)]
    for name, res in jobs:
        path = os.path.join(out_dir, name + ".json")
        if os.path.exists(path):
            continue
        t0 = time.time()
        if res is None:
            x = data[0][:INCEPTION_N]
            meta = {"what": f"{INCEPTION_N} training digits (the floor)"}
        else:
            s, cfg, ema = load_ema(os.path.join(CACHE, "ema", f"claim1__{name}.pt"))
            x, _, _ = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234)
            x = x.view(10, -1, *x.shape[1:])[:, :INCEPTION_N // 10].reshape(-1, *x.shape[1:])  # 10 per digit
            meta = {"what": "claim-1 final EMA samples", "checkpoint_spec": s}
        d = fid.frechet_distance(*stats(x), *ref)
        write_json(path, {"kind": "inception", "fid": d, "n": len(x), "ref_n": INCEPTION_REF,
                          "ref": f"the first {INCEPTION_REF} held-out digits", "detector_sha1": det.sha1,
                          "seconds": time.time() - t0, "machine": MACHINE, "torch": torch.__version__, **meta})
        log(f"{path}: FID {d:.2f} ({time.time() - t0:.0f}s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run named experiment sets in order (finished runs are skipped)")
    r.add_argument("sets", nargs="+", choices=list(SETS) + list(SAMPLING_SETS))
    r.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "mnist"),
                   help="folder with mnist-t10k-{images-idx3,labels-idx1}-ubyte.gz")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--seeds", default=None,
                   help="comma-separated seeds of the ablations, claims 2-6 (default 0), claim3long (default 0,1) "
                   "and the curves (default 0,1,2)")
    r.add_argument("--max-pflop", type=float, default=None,
                   help="curves: stop each run after its last evaluation mark <= this (a later call continues)")
    r.add_argument("--commit", action="store_true",
                   help="curves: git-commit each run's JSON and sample grid (only those files) as they are written")
    f = sub.add_parser("final", help="final evaluation (1,000 samples, Inception FID, steps sweep) of the complete "
                       "curves runs whose EMA is in bench/cache")
    f.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--commit", action="store_true")
    i = sub.add_parser("inception", help="standard Inception FID of the claim-1 models (needs their cached EMA weights)")
    i.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    i.add_argument("--threads", type=int, default=1)
    rp = sub.add_parser("report", help="markdown tables and figures from bench/results")
    rp.add_argument("sections", nargs="*", metavar="curves|rechecks",
                    help="only the curves, or only the re-checks on learned models (default: everything)")
    a = p.parse_args(argv)
    global PROCESS_CODE
    PROCESS_CODE = code_version()
    if a.cmd == "run":
        cmd_run(a)
    elif a.cmd == "final":
        torch.set_num_threads(a.threads)
        log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731
        data = load_mnist(a.mnist)
        ev = Evaluator(data, get_classifier(data))
        ev.clf_sha1 = classifier_sha1()
        for set_name in FINAL_SETS:
            for s in SETS[set_name]():
                out = final_eval(set_name, s, data, ev, log)
                if a.commit and out:
                    git_commit(out, f"bench: {set_name} final evaluation of {run_name(s)}", log)
    elif a.cmd == "inception":
        cmd_inception(a)
    else:
        from bench_report import report  # noqa: E402  (bench/bench_report.py)
        if set(a.sections) - {"curves", "rechecks"}:
            p.error(f"report: unknown section(s) {sorted(set(a.sections) - {'curves', 'rechecks'})}; "
                    f"the sections are 'curves' and 'rechecks'")
        report(a.sections)


if __name__ == "__main__":
    main()
