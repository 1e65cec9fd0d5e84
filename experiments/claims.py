"""
The paper's claims at small scale on real data (MNIST digits padded to 32 px), at equal training FLOPs.

    python experiments/claims.py run claim1            # one named set of runs (finished runs are skipped)
    python experiments/claims.py run claim1 --dry-run  # list its runs and which are done
    python experiments/claims.py run curves --max-pflop 0.064   # stop every run at a mark; a later call continues
    python experiments/claims.py final                 # final evaluation of the complete FINAL_SETS runs
    python experiments/claims.py fidcheck              # each final model at its method's best S_cfg, other noise
    python experiments/claims.py sheet curveslr        # Fig. 9-style stage sheets from the cached final EMAs
    python experiments/claims.py report                # tables (markdown) and figures from experiments/results/

Every run trains in-process with the project's own step (train.Objective, train.make_optimizer,
train.train_step, train.step_seed; cdc.sample, cdc.guided_field), so what is measured is what a user runs.
A run stops when its training FLOPs (3 x the analytic cdc.DiT.flops_per_sample of every sample's stage, as
drawn) reach its budget; its EMA is evaluated at spec['eval_pflop'] (PFLOP) or at n_evals evenly spaced
fractions of the budget. One loop (train_loop) trains every run: it checkpoints to experiments/cache/ckpt and
resumes bit-exactly (experiments/check_resume.py). Each run writes one JSON under experiments/results/<set>/,
rewritten at every evaluation ("complete": false until the last).

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
import glob
import gzip
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

from fid import frechet_distance  # noqa: E402  (results before fid.py landed used scipy's sqrtm; see CLAIMS.md)

EXP = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(EXP, "results")
CACHE = os.path.join(EXP, "cache")  # classifier, EMA weights, checkpoints, every mark's grid (not committed)
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


def log(s):
    print(time.strftime("%H:%M:%S"), s, flush=True)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
#                                   Data and the evaluation classifier
# ------------------------------------------------------------------------------------------------

N_HELDOUT = 2000


def load_mnist(mnist_dir):
    """(train_x, train_y, held_x, held_y): float32 (N, 1, 32, 32) in [-1, 1] and long labels."""
    imgs = read_idx_images(os.path.join(mnist_dir, "mnist-t10k-images-idx3-ubyte.gz"))
    with gzip.open(os.path.join(mnist_dir, "mnist-t10k-labels-idx1-ubyte.gz"), "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)))
    x = torch.from_numpy(imgs).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.from_numpy(labels)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    held, tr = perm[:N_HELDOUT], perm[N_HELDOUT:]
    return x[tr], y[tr], x[held], y[held]


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
        log(f"retrained the classifier (held-out accuracy {acc:.4f}); {info_path} is left as it is")
        return net
    write_json(info_path, {"heldout_accuracy": acc, "n_heldout": len(hx), "n_train": len(tx),
                           "train_seconds": time.time() - t0, "machine": MACHINE})
    return net


def classifier_sha1():
    with open(os.path.join(CACHE, "classifier.pt"), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


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

    def __init__(self, data, clf, clf_sha1=None):
        self.data, self.clf, self.clf_sha1 = data, clf, clf_sha1
        self.ref = {}

    def ref_stats(self, side):
        if side not in self.ref:
            L = int(math.log2(32 // side))
            self.ref[side] = gauss(feats_and_preds(self.clf, cdc.up(cdc.down(self.data[0], L), L))[0])
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


def evaluator(a):
    """(data, Evaluator) for a command with --mnist and --threads."""
    torch.set_num_threads(a.threads)
    data = load_mnist(a.mnist)
    clf = get_classifier(data)
    return data, Evaluator(data, clf, classifier_sha1())


# ------------------------------------------------------------------------------------------------
#                                      Runs, models and sampling
# ------------------------------------------------------------------------------------------------

# The scale (see CLAIMS.md for why): tiny DiT (width 192, depth 4, 3 heads) at patch 4, batch 32, the
# paper's AdamW betas (0.9, 0.95), grad clip 1, EMA 0.9999 with the train.py warm-up.
BASE = dict(width=192, depth=4, heads=3, patch=4, batch=32, sigma=1.0, gamma=2.0, interpolant="linear",
            fusion="xattn", reduction="mean", stage_sampling="stratified", resolutions=(8, 16, 32), lr=1e-3,
            budget_pflop=0.008, n_evals=4, seed=0, eval_n=200, cfg=3.0, steps=8, solver="euler",
            stage_specific=False)


def spec(**kw):
    s = dict(BASE)
    s.update(kw)
    s["resolutions"] = list(s["resolutions"])
    return s


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


def cdc_config(spec):
    return cdc.CDCConfig(resolutions=tuple(spec["resolutions"]), sigma=spec["sigma"], gamma=spec["gamma"],
                         interpolant=spec["interpolant"])


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


def build(spec, n_train):
    """The run's CDC config, optimiser arguments and lanes. A lane is one trained network with its own
    optimiser, data order and step counter: one lane trained on every stage (the method), or, for
    spec['stage_specific'], one per stage trained on that stage alone (claim 6's baseline; lane k's seed is
    seed * 100 + k and it gets stage k's share of every mark: the share the unified model spends on it)."""
    res, cfg = tuple(spec["resolutions"]), cdc_config(spec)
    args = SimpleNamespace(lr=spec["lr"], beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip=1.0,
                           ema_decay=0.9999, ema_warmup=True, precision="fp32")
    lanes = []
    for k in range(len(res)) if spec.get("stage_specific") else [None]:
        seed = spec["seed"] if k is None else spec["seed"] * 100 + k
        torch.manual_seed(seed)
        model = make_model(spec, res if k is None else (res[k],)).train()
        if k is None:
            objective = train.Objective(model, cfg, 0.1, spec["reduction"], spec["stage_sampling"])
            flops_of = [3.0 * model.flops_per_sample(r) for r in res]
        else:
            objective = StageObjective(model, cfg, k, spec["reduction"])
            flops_of = [3.0 * model.flops_per_sample(r) if j == k else 0.0 for j, r in enumerate(res)]
        order_gen = torch.Generator().manual_seed(seed)
        lanes.append(SimpleNamespace(seed=seed, model=model, ema=deepcopy(model).requires_grad_(False).eval(),
                                     opt=train.make_optimizer(model, args), objective=objective, flops_of=flops_of,
                                     order_gen=order_gen, perm=torch.randperm(n_train, generator=order_gen), pos=0,
                                     step=0, flops=0.0))
    field = lanes[0].ema if len(lanes) == 1 else StageRouter({r: ln.ema for r, ln in zip(res, lanes)}).eval()
    return cfg, args, lanes, field


@torch.no_grad()
def draw(field, cfg, n_per_class, spec, seed, return_stages=False, cfg_scale=None, steps=None):
    """n_per_class samples of each digit, fixed noise per seed; returns (images or stages, labels, seconds)."""
    y = torch.arange(10).repeat_interleave(n_per_class)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    out = cdc.sample(cdc.guided_field(field, y, spec["cfg"] if cfg_scale is None else cfg_scale), cfg, len(y),
                     channels=1, steps=spec["steps"] if steps is None else steps, solver=spec["solver"],
                     generator=gen, return_stages=return_stages)
    return out, y, time.time() - t0


def ema_path(set_name, s):
    return os.path.join(CACHE, "ema", f"{set_name}__{run_name(s)}.pt")


def load_ema(path):
    """(spec, CDC config, EMA field in eval mode) of a run's final EMA weights saved by train_loop."""
    saved = torch.load(path, weights_only=False)
    s = saved["spec"]
    cfg, _, _, field = build(s, 1)
    field.load_state_dict(saved["ema"])
    return s, cfg, field.eval()


def save_digits(x, path, nrow=10):
    from data import save_grid
    save_grid(x.float().repeat(1, 3, 1, 1), path, nrow)


def save_sheet(field, cfg, s, path):
    """Fig. 9's stage sheet: one digit of each class (FINAL_SEED noise), each stage's output (8 -> 16 -> 32
    px, upsampled) and the detail each stage added."""
    from data import save_stage_sheet
    stages, _, _ = draw(field, cfg, 1, s, seed=FINAL_SEED, return_stages=True)
    save_stage_sheet([x.float().repeat(1, 3, 1, 1) for x in stages], path)
    return path


# ------------------------------------------------------------------------------------------------
#                  Training: one loop for every set, stoppable and exactly resumable
# ------------------------------------------------------------------------------------------------

CKPT_EVERY_S = 180.0  # wall seconds between resume checkpoints (also one at every evaluation)


class Interrupted(Exception):
    """Raised by train_loop(interrupt_at_step=...): a simulated kill, for experiments/check_resume.py."""


def git_out(*cmd):
    try:
        r = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=None)
def code_version():
    """The code this process runs (read once, at its start): HEAD, and the .py files that differ from it,
    with a sha1 of that diff (the diff is kept in cache/code/, so that the code can be rebuilt)."""
    dirty = git_out("diff", "--name-only", "HEAD", "--", "*.py")
    diff = git_out("diff", "HEAD", "--", "*.py") or ""
    sha = hashlib.sha1(diff.encode()).hexdigest() if dirty else None
    if sha and not os.path.exists(path := os.path.join(CACHE, "code", sha + ".diff")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(diff + "\n")
    return {"commit": git_out("rev-parse", "HEAD"), "dirty_py": dirty.split() if dirty else [], "dirty_diff_sha1": sha}


def marks_of(spec):
    """The evaluation marks: (PFLOP labels, FLOP thresholds): spec['eval_pflop'], or n_evals evenly spaced
    fractions of the budget (each threshold computed as it always was, so that a mark falls on the same step)."""
    if "eval_pflop" in spec:
        return list(spec["eval_pflop"]), [m * 1e15 for m in spec["eval_pflop"]]
    n, budget = spec["n_evals"], spec["budget_pflop"] * 1e15
    return [spec["budget_pflop"] * (i + 1) / n for i in range(n)], [budget * (i + 1) / n for i in range(n)]


LANE_STATE = ("order_gen", "perm", "pos", "step", "flops")


def train_loop(spec, data, ev, out_path, log=log, max_pflop=None, ckpt_path=None, ckpt_every_s=CKPT_EVERY_S,
          interrupt_at_step=None, ema_dir=os.path.join(CACHE, "ema")):
    """Train one run to its last mark <= max_pflop (default: the whole budget), evaluating the EMA at every
    mark; returns the run's record, also written to out_path ("complete": false until the last mark).

    Each step of a lane: the next batch of its data order (a permutation from its own generator, redrawn
    when it runs out), every random draw re-seeded from (lane seed, step) (train.step_seed), then
    train.train_step. Evaluation draws its own noise (seed 1234) and never touches the training RNG, so
    stopping, resuming or evaluating more often leaves the training unchanged. Every ckpt_every_s wall
    seconds and at every evaluation the whole state (weights, EMA, optimiser, data order, steps, FLOPs, the
    loss window, the evaluations so far) goes to ckpt_path; a call that finds it continues from it, bit for
    bit (experiments/check_resume.py). "code" lists the code version at the start and at every resume. A
    complete run leaves its final EMA in ema_dir/<set>__<name>.pt; a non-finite step ends it as diverged."""
    tx, ty = data[0], data[1]
    cfg, args, lanes, field = build(spec, len(tx))
    labels, marks = marks_of(spec)
    one = len(lanes) == 1
    if one:  # a mark is reached by a step, then evaluated: no two marks may fall within one step
        big = spec["batch"] * max(lanes[0].flops_of)
        assert all(b - a > big for a, b in zip([0.0] + marks, marks)), "marks closer than one step's FLOPs"
    total_f = sum(sum(ln.flops_of) for ln in lanes)
    stop = spec["budget_pflop"] if max_pflop is None else max_pflop
    n_target = sum(1 for m in labels if m <= stop * (1 + 1e-9))
    st = dict(train_seconds=0.0, loss_sum=0.0, loss_n=0, counts=[0] * cfg.K, evals=[], code=[])
    event = "start"
    if ckpt_path and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["spec"] != spec:
            raise SystemExit(f"error: {ckpt_path} holds another spec: move it away to start afresh")
        if "lanes" not in ck:  # written by the earlier loop of one network: the same state, laid out flat
            ck["lanes"] = [dict(ck, step=ck["state"].pop("step"), flops=ck["state"].pop("flops"))]
        st = ck["state"]
        for ln, c in zip(lanes, ck["lanes"]):
            ln.model.load_state_dict(c["model"])
            ln.ema.load_state_dict(c["ema"])
            ln.opt.load_state_dict(c["opt"])
            ln.order_gen.set_state(c["order_gen"])
            ln.perm, ln.pos, ln.step, ln.flops = c["perm"], c["pos"], c["step"], c["flops"]
        event = "resume"
        log(f"  resumed from {os.path.relpath(ckpt_path, ROOT)}: steps {[ln.step for ln in lanes]}, "
            f"{sum(ln.flops for ln in lanes) / 1e15:.5f} PFLOP, {len(st['evals'])} evaluations")
    flops = lambda: sum(ln.flops for ln in lanes)  # noqa: E731
    st["code"].append({"event": event, "step": sum(ln.step for ln in lanes), "pflop": flops() / 1e15,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S"), **code_version()})
    name = os.path.splitext(os.path.basename(out_path))[0]
    set_name = os.path.basename(os.path.dirname(out_path))
    png = os.path.join(os.path.dirname(out_path), name + ".png")

    def result(**extra):
        r = {"kind": "train", "spec": spec, "cdc": cfg.to_dict(), "steps": sum(ln.step for ln in lanes),
             "pflop": flops() / 1e15, "train_seconds": st["train_seconds"], "stage_count_total": st["counts"],
             "params": sum(p.numel() for ln in lanes for p in ln.model.parameters()),
             "complete": len(st["evals"]) >= len(marks), "n_marks": len(marks), "evals": st["evals"],
             "final": st["evals"][-1] if st["evals"] else None, "code": st["code"], "classifier_sha1": ev.clf_sha1,
             "machine": MACHINE, "cpu": CPU, "torch": torch.__version__, **extra}
        if not one:
            r["steps_per_stage_model"] = [ln.step for ln in lanes]
        return r

    def ckpt():
        if ckpt_path:
            os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
            lane_states = [dict(model=ln.model.state_dict(), ema=ln.ema.state_dict(), opt=ln.opt.state_dict(),
                                **{k: getattr(ln, k) for k in LANE_STATE}) for ln in lanes]
            for c, ln in zip(lane_states, lanes):
                c["order_gen"] = ln.order_gen.get_state()
            torch.save({"spec": spec, "lanes": lane_states, "state": st}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)

    gen, last_ckpt = torch.Generator(), time.time()
    while len(st["evals"]) < n_target:
        i = len(st["evals"])
        for ln in lanes:
            while ln.flops < (marks[i] if one else marks[i] * sum(ln.flops_of) / total_f):
                if interrupt_at_step is not None and sum(x.step for x in lanes) == interrupt_at_step:
                    raise Interrupted(interrupt_at_step)  # steps counted over all lanes
                t0 = time.time()
                if ln.pos + spec["batch"] > len(tx):
                    ln.perm, ln.pos = torch.randperm(len(tx), generator=ln.order_gen), 0
                idx = ln.perm[ln.pos:ln.pos + spec["batch"]]
                ln.pos += spec["batch"]
                seed = train.step_seed(ln.seed, 0, ln.step)
                torch.manual_seed(seed)
                gen.manual_seed(seed)
                out, _, ok = train.train_step(ln.objective, ln.model, ln.ema, ln.opt, tx[idx], ty[idx], gen,
                                              ln.step, args)
                if not bool(ok):  # terminal: recorded, never resumed; best_lr and final_cfd never pick it
                    log(f"  non-finite loss or gradient at step {ln.step} (lane seed {ln.seed}): diverged")
                    r = result(diverged_at_step=ln.step, complete=True)
                    write_json(out_path, r)
                    return r
                ln.step += 1
                ln.flops += sum(c * f for c, f in zip(out["stage_count"], ln.flops_of))
                st["counts"] = [a + b for a, b in zip(st["counts"], out["stage_count"])]
                st["loss_sum"], st["loss_n"] = st["loss_sum"] + float(out["loss"].detach()), st["loss_n"] + 1
                st["train_seconds"] += time.time() - t0
                if time.time() - last_ckpt >= ckpt_every_s:
                    ckpt()
                    last_ckpt = time.time()
        x, y, sample_s = draw(field, cfg, spec["eval_n"] // 10, spec, seed=1234)
        m = ev.metrics(x, y)
        loss = st["loss_sum"] / max(st["loss_n"], 1)
        st["evals"].append({"mark_pflop": labels[i], "step": lanes[0].step if one else [ln.step for ln in lanes],
                            "pflop": flops() / 1e15, "train_seconds": st["train_seconds"], "sample_seconds": sample_s,
                            "loss_recent": loss, **m})
        log(f"  steps {[ln.step for ln in lanes]} {flops() / 1e15:.5f} PFLOP train {st['train_seconds']:.0f}s "
            f"loss {loss:.4f} cfd {m['cfd']:.2f} acc {m['acc']:.3f} (sampling {sample_s:.1f}s)")
        st["loss_sum"], st["loss_n"] = 0.0, 0
        ckpt()
        last_ckpt = time.time()
        grid = x[::max(1, len(x) // 100)][:100]
        save_digits(grid, png)
        save_digits(grid, os.path.join(CACHE, "grids", f"{set_name}__{name}__{labels[i]:g}.png"))  # every mark's
        write_json(out_path, result())
    r = result()
    if r["complete"]:
        os.makedirs(ema_dir, exist_ok=True)
        torch.save({"ema": field.state_dict(), "spec": spec}, os.path.join(ema_dir, f"{set_name}__{name}.pt"))
    if not os.path.exists(out_path) or read_json(out_path)["evals"] != r["evals"]:
        write_json(out_path, r)  # resumed past the stop already (a smaller max_pflop than before)
    return r


def m_label(r):
    last = r["evals"][-1]["mark_pflop"] if r["evals"] else 0.0
    return f"{last:g} PFLOP ({len(r['evals'])}/{r['n_marks']} evals, {'complete' if r['complete'] else 'partial'})"


# ------------------------------------------------------------------------------------------------
#                                       Experiment sets
# ------------------------------------------------------------------------------------------------

K1, K3 = (32,), (8, 16, 32)
LR_GRID = (1e-3, 2e-3, 4e-3)
GRID_BUDGET = 0.003
HEADLINE_SEEDS = (0, 1, 2)
ABLATION_SEEDS = (0,)  # claims 2-6; `run --seeds 0,1,2` adds seeds (claim 7 always runs the headline seeds)
LONG_SEEDS = (0, 1)  # claim3long
CURVE_SEEDS = HEADLINE_SEEDS  # `run curves --seeds 2` runs only seed 2


def needs(set_name):
    raise SystemExit(f"error: this set needs {set_name} first: python experiments/claims.py run {set_name}")


def best_lr(resolutions):
    """The learning rate with the lowest final cfd in the lr grid."""
    best = None
    for lr in LR_GRID:
        p = os.path.join(RESULTS, "lrgrid", run_name(spec(resolutions=resolutions, lr=lr, seed=100,
                                                          budget_pflop=GRID_BUDGET, n_evals=1)) + ".json")
        if not os.path.exists(p):
            needs("lrgrid")
        r = read_json(p)
        if r.get("diverged_at_step") is None and (best is None or r["final"]["cfd"] < best[0]):
            best = (r["final"]["cfd"], lr)
    if best is None:
        raise SystemExit(f"error: every lr of the grid diverged for {resolutions}")
    return best[1]


def set_lrgrid():
    return [spec(resolutions=res, lr=lr, seed=100, budget_pflop=GRID_BUDGET, n_evals=1)
            for res in (K1, K3) for lr in LR_GRID]


def set_claim1():
    return [spec(resolutions=res, lr=best_lr(res), seed=seed) for seed in HEADLINE_SEEDS for res in (K3, K1)]


# The ablations (claims 2-7) evaluate once, at the end of the budget: evaluation draws its own noise
# (seed 1234) and never touches the training RNG, so the final numbers equal those of a 4-point run
# (claim 1's K = 3 row, their baseline) and each run saves ~2 minutes of sampling on the CPU.
def ablation(**kw):
    return spec(**{"lr": best_lr(K3), "n_evals": 1, **kw})


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


def curve(res, lr, seed, **kw):
    marks = curve_marks()
    return spec(resolutions=res, lr=lr, seed=seed, budget_pflop=CURVE_BUDGET, n_evals=len(marks), eval_pflop=marks, **kw)


def set_curves():
    """Claim 1's pair (K = 1 and K = 3 at their grid learning rates, the same network, batch and optimiser)
    trained to CURVE_BUDGET, evaluated (200 samples) at curve_marks(); K = 1 before K = 3, seed by seed."""
    return [curve(res, best_lr(res), seed) for seed in CURVE_SEEDS for res in (K1, K3)]


# Re-checks on models that have learned (the curves' lrs came from a grid at 0.003 PFLOP, claim 3's gamma
# sweep and claim 4's score row were at 0.008, where single-stage FM had not learned).
LONG_MARKS = [0.004, 0.008, 0.016, 0.032]  # curve marks: these evaluations equal the curves' at those points
LONG_SEED = 100  # the lr grid's seed, not a headline seed


def final_cfd(set_name, s):
    """A finished run's final cfd (inf if it diverged), None while it is missing or partial."""
    p = os.path.join(RESULTS, set_name, run_name(s) + ".json")
    if not os.path.exists(p):
        return None
    r = read_json(p)
    if r.get("diverged_at_step") is not None:
        return math.inf
    return r["final"]["cfd"] if r.get("complete", True) else None


def lr_ladder(set_name, mk, lrs):
    """Runs mk(lr) for lrs widened by factors of 2 until the lowest final cfd is interior."""
    lrs = sorted(lrs)
    while True:
        finals = [final_cfd(set_name, mk(lr)) for lr in lrs]
        if any(f is None for f in finals):
            return [mk(lr) for lr in lrs]
        best = min(range(len(lrs)), key=lambda i: finals[i])
        if 0 < best < len(lrs) - 1:
            return [mk(lr) for lr in lrs]
        lrs = [lrs[0] / 2] + lrs if best == 0 else lrs + [lrs[-1] * 2]


def ladder_best(set_name, runs):
    """The lr of a finished ladder's lowest final cfd."""
    cfds = [final_cfd(set_name, s) for s in runs]
    if None in cfds:
        needs(set_name)
    return min(zip(cfds, [s["lr"] for s in runs]))[1]


def long_run(res, lr, **kw):
    return spec(resolutions=res, lr=lr, seed=LONG_SEED, budget_pflop=LONG_MARKS[-1], n_evals=len(LONG_MARKS),
                eval_pflop=LONG_MARKS, **kw)


def set_lrlong():
    """Both methods' lr at 0.032 PFLOP (seed 100, evaluated at LONG_MARKS): x1/2, x1, x2 the curves' lr,
    widened until the optimum is interior."""
    out = []
    for res in (K3, K1):
        base = best_lr(res)
        out += lr_ladder("lrlong", functools.partial(long_run, res), [base / 2, base, base * 2])
    return out


def set_claim3long():
    """gamma in {1, 4, 6} at 0.032 PFLOP, where CDC's curve has flattened, seeds 0 and 1; gamma 2 is the
    curves' K = 3 run at its 0.032 mark (the same evaluation noise and n)."""
    return [spec(resolutions=K3, lr=best_lr(K3), gamma=g, seed=seed, budget_pflop=LONG_MARKS[-1], n_evals=3,
                 eval_pflop=LONG_MARKS[1:]) for seed in LONG_SEEDS for g in (1.0, 4.0, 6.0)]


def set_claim4lr():
    """The score interpolant at its own lr (claim 4's budget 0.008 PFLOP, seed 0): x1/4..x2 CDC's lr,
    widened until the optimum is interior (the lr 4e-3 run repeats claim 4's row)."""
    base = best_lr(K3)
    return lr_ladder("claim4lr", lambda lr: ablation(interpolant="score", seed=0, lr=lr),
                     [base / 4, base / 2, base, base * 2])


def set_curves_rerun():
    """The curves' runs whose final evaluation is missing (their EMA weights were lost with a machine's
    cache), trained again from step 0 under the same specs, for that final evaluation. On another CPU the
    floats round differently: a re-run is then another sample of the same training (same seed, data order
    and noise), not a bit-identical copy, and the classifier retrains to other weights (its sha1 is in each
    JSON), so its curve is a replication, kept apart from the record in results/curves_rerun/."""
    return [s for s in set_curves() if not os.path.exists(final_path("curves", run_name(s)))]


def set_curveslr():
    """K = 3's curve at its long-budget lr: lrlong's lowest cfd at 0.032 PFLOP (1e-3; the curves' 4e-3 came
    from the grid at 0.003 PFLOP and is too high there). K = 1's long-budget optimum is its curves' lr, so
    its curves stand; same seeds, marks, budget and evaluation as the curves."""
    lr = ladder_best("lrlong", [s for s in set_lrlong() if s["resolutions"] == list(K3)])
    return [curve(K3, lr, seed) for seed in CURVE_SEEDS]


# The paper's loss weighting at convergence. Alg. 1 line 17 sums over a stage's d_k pixels, so a stage-k sample
# weighs d_k (1 : 4 : 16 here); 'scaled-sum' is that sum / d_K (the same relative weights at the gradient scale
# of 'mean'), 'sum' the literal form. Each gets its own lr from a ladder at the long budget (as lrlong did for
# 'mean'), then the curves' seeds, marks and budget, and the final evaluation with the guidance sweep.
WEIGHTINGS = ("scaled-sum", "sum")
LR_SETS = {"scaled-sum": "lrweight", "sum": "lrsum"}  # the ladder of each weighting, in its own results folder


def lr_ladder_of(red):
    """K = 3 under weighting `red` at 0.032 PFLOP (seed 100, LONG_MARKS): lr x1/2, x1, x2 of 'mean''s long-budget
    optimum (1e-3), widened until the optimum is interior."""
    return lr_ladder(LR_SETS[red], lambda lr: long_run(K3, lr, reduction=red), [5e-4, 1e-3, 2e-3])


def set_weighting():
    """K = 3 under the paper's weights (scaled-sum) at its lrweight optimum, to CURVE_BUDGET with the curves'
    marks, seed by seed; compared with K = 1 and K = 3 'mean' at their own best guidance."""
    return [curve(K3, ladder_best(LR_SETS[red], lr_ladder_of(red)), seed, reduction=red)
            for red in WEIGHTINGS[:1] for seed in CURVE_SEEDS]


def set_atbest():
    """The comparators of the weighting set under its final protocol (each model at its best guidance): K = 1 at
    its long-budget lr (2e-3) and K = 3 'mean' at its (curveslr's 1e-3), the same specs as curves_rerun's and
    curveslr's runs (their EMA weights were not kept, so they are trained again), K = 1 first, seed by seed."""
    return [curve(res, lr, seed) for seed in CURVE_SEEDS
            for res, lr in ((K1, best_lr(K1)), (K3, set_curveslr()[0]["lr"]))]


SETS = {"lrgrid": set_lrgrid, "claim1": set_claim1, "claim2": set_claim2, "claim3": set_claim3,
        "claim4": set_claim4, "claim5": set_claim5, "claim6": set_claim6, "claim7": set_claim7,
        "curves": set_curves, "lrlong": set_lrlong, "claim3long": set_claim3long, "claim4lr": set_claim4lr,
        "curves_rerun": set_curves_rerun, "curveslr": set_curveslr,
        "lrweight": functools.partial(lr_ladder_of, "scaled-sum"), "lrsum": functools.partial(lr_ladder_of, "sum"),
        "weighting": set_weighting, "atbest": set_atbest}
SAMPLING_SETS = ("claim8", "claim9")  # sampling only, on the claim-1 EMA models
FINAL_SETS = ("curves", "curves_rerun", "curveslr", "weighting", "atbest")  # their complete runs get the final evaluation


def sampling_sweep(set_name, ev, seeds=HEADLINE_SEEDS):
    """claim8: per-stage quality against S_cfg; claim9: quality against steps per stage (and time)."""
    lr3, lr1 = best_lr(K3), best_lr(K1)
    jobs = []
    for seed in seeds:
        if set_name == "claim8":
            jobs += [(K3, lr3, seed, dict(cfg_scale=s), f"cfg{s}") for s in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]
        else:
            jobs += [(res, lr, seed, dict(steps=n), f"steps{n}") for n in (2, 4, 8, 16, 24)
                     for res, lr in ((K3, lr3), (K1, lr1))]
    for res, lr, seed, kw, tag in jobs:
        base = spec(resolutions=res, lr=lr, seed=seed)
        path = os.path.join(RESULTS, set_name, f"{run_name(base)}_{tag}.json")
        if os.path.exists(path):
            continue
        if not os.path.exists(ck := ema_path("claim1", base)):
            log(f"skip {path}: no checkpoint {ck} (run claim1 first)")
            continue
        s, cfg, ema = load_ema(ck)
        stages, y, secs = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234, return_stages=True, **kw)
        per_stage = [dict(side=x.shape[-1], **ev.metrics(x, y)) for x in stages]
        write_json(path, {"kind": "sampling", "set": set_name, "checkpoint_spec": s,
                          "sampler": {**kw, "solver": s["solver"]}, "sample_seconds": secs, "n": len(y),
                          "per_stage": per_stage, "final": per_stage[-1], "machine": MACHINE, "torch": torch.__version__})
        log(f"{path}: {json.dumps(per_stage)} ({secs:.1f}s)")


# ------------------------------------------------------------------------------------------------
#                                        Running the sets
# ------------------------------------------------------------------------------------------------

CURVES_FLOOR = os.path.join(RESULTS, "curves_floor.json")


def curves_floor(name, ev):
    """The floor of a set with eval_pflop marks, measured with the classifier it is scored by
    (cache/classifier.pt, identified by its sha1): the metrics of 200 held-out real digits (3 draws) and of
    all 2,000 at 32 px. The curves, lrlong and claim3long share results/curves_floor.json; later sets have
    their own. A set whose floor names another classifier stops here: its evaluations so far would not
    compare with new ones (the classifier retrains to other weights on another CPU). results/floor.json
    belongs to claims 1-9."""
    path = CURVES_FLOOR if name in ("curves", "lrlong", "claim3long") else os.path.join(RESULTS, name, "floor.json")
    if os.path.exists(path):
        old = read_json(path)["classifier"]["sha1"]
        if old == ev.clf_sha1:
            return
        raise SystemExit(f"error: {name} is scored with classifier {old[:7]}, cache/classifier.pt is "
                         f"{ev.clf_sha1[:7]}: new evaluations would not compare (run curves_rerun instead)")
    hx, hy = ev.data[2], ev.data[3]
    with torch.no_grad():
        acc = float((ev.clf(hx).argmax(1) == hy).float().mean())
    fl = {"classifier": {"sha1": ev.clf_sha1, "heldout_accuracy": acc, "n_heldout": len(hx)},
          "n": BASE["eval_n"], "per_side": {"32": [ev.floor(BASE["eval_n"], 32, seed) for seed in range(3)]},
          "full_heldout_32": ev.floor(N_HELDOUT, 32), "machine": MACHINE, "cpu": CPU}
    write_json(path, fl)
    log(f"{name} floor: {json.dumps(fl)}")


def run_one(name, s, data, ev, a):
    """One run of a set, up to its last mark <= --max-pflop; skipped when its JSON has that mark already."""
    path = os.path.join(RESULTS, name, run_name(s) + ".json")
    labels, _ = marks_of(s)
    stop = s["budget_pflop"] if a.max_pflop is None else a.max_pflop
    n_target = sum(1 for m in labels if m <= stop * (1 + 1e-9))
    ckpt_path = os.path.join(CACHE, "ckpt", f"{name}__{run_name(s)}.pt")
    if os.path.exists(path):
        r = read_json(path)
        if r.get("complete", True) or len(r["evals"]) >= n_target:
            log(f"done already: {path}")
            return
        if not os.path.exists(ckpt_path):
            log(f"  {path} is partial but {ckpt_path} is missing: the run starts again from step 0")
    if "eval_pflop" in s:
        curves_floor(name, ev)
    if a.dry_run:
        log(f"to run (to the mark {labels[n_target - 1]:g} PFLOP): {path}")
        return
    if not claim(ckpt_path + ".lock"):
        log(f"skip {path}: another process is running it")
        return
    try:
        log(f"run {path} (to {stop:g} PFLOP)")
        r = train_loop(s, data, ev, path, max_pflop=a.max_pflop, ckpt_path=ckpt_path)
        log(f"wrote {path}: {m_label(r)}")
        if name in FINAL_SETS and r["complete"]:
            final_eval(name, s, data, ev)
    finally:
        os.remove(ckpt_path + ".lock")


def claim(lock):
    """Take a run for this process (two processes share a set's runs this way, one thread each): a lock file
    holding the owner's pid; a lock whose process is gone is taken over."""
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    for _ in range(2):
        try:
            with open(lock, "x") as f:
                f.write(str(os.getpid()))
            return True
        except FileExistsError:
            pid = open(lock).read().strip()
            try:
                if pid.isdigit() and int(pid) > 0:
                    os.kill(int(pid), 0)
                    return False
            except ProcessLookupError:
                pass
            os.remove(lock)  # stale: its process died
    return False


def cmd_run(a):
    global ABLATION_SEEDS, LONG_SEEDS, CURVE_SEEDS
    if a.seeds is not None:  # only these seeds (two processes can share a set's runs this way)
        try:
            ABLATION_SEEDS = LONG_SEEDS = CURVE_SEEDS = tuple(int(v) for v in a.seeds.split(","))
        except ValueError:
            raise SystemExit(f"error: --seeds takes comma-separated integers, got {a.seeds!r}") from None
    data, ev = evaluator(a)
    floor_path = os.path.join(RESULTS, "floor.json")
    if not os.path.exists(floor_path):
        fl = {"n": BASE["eval_n"], "per_side": {s: [ev.floor(BASE["eval_n"], s, seed) for seed in range(3)]
                                                for s in (8, 16, 32)},
              "full_heldout_32": ev.floor(N_HELDOUT, 32), "machine": MACHINE}
        write_json(floor_path, fl)
        log(f"floors: {json.dumps(fl)}")
    for name in a.sets:
        seen = set()
        while name in SETS and (todo := [s for s in SETS[name]() if run_name(s) not in seen]):  # a ladder may widen
            seen.add(run_name(todo[0]))
            run_one(name, todo[0], data, ev, a)
    sweeps = [n for n in a.sets if n in SAMPLING_SETS]
    if sweeps and not a.dry_run:  # seed 0 of every sweep first, then the other seeds
        for seeds in ((HEADLINE_SEEDS[0],), HEADLINE_SEEDS):
            for name in sweeps:
                sampling_sweep(name, ev, seeds)


# ------------------------------------------------------------------------------------------------
#             The final models: 1,000 samples, classifier metrics and the Inception FID
# ------------------------------------------------------------------------------------------------

FINAL = os.path.join(RESULTS, "curves_final")
FINAL_N, FINAL_SEED = 1000, 4321  # 100 per digit; noise unlike the curves' (seed 1234, 200 samples)
STEPS_SWEEP = (2, 4, 8, 16, 24)  # claim 9 again, on the learned models (200 samples, the curves' noise)
CFG_SWEEP, STEPS_OF_CFG_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0), (4, 8, 24)


def final_path(set_name, stem):
    """results/curves_final/<stem>.json for the curves, <set>__<stem>.json for the later sets."""
    return os.path.join(FINAL, ("" if set_name == "curves" else set_name + "__") + stem + ".json")


def sheet_path(set_name, name):
    """The stage sheet beside the run's final grid (the final evaluation's, else the run's own)."""
    p = final_path(set_name, name) if set_name in FINAL_SETS else os.path.join(RESULTS, set_name, name + ".json")
    return os.path.splitext(p)[0] + "_stages.png"


def inception_stats(det, x):
    """Mean and covariance of the standard Inception's pool features of digits in [-1, 1] (N, 1, 32, 32),
    as fid.py sees samples: uint8, grey replicated to RGB, the TF graph's resize to 299."""
    import fid
    from data import to_uint8
    u8 = to_uint8(x.float().repeat(1, 3, 1, 1)).numpy()  # to_uint8 clamps to [-1, 1]
    return fid.pool_stats(det, u8, "cpu", 50)


def fid_of(det, x, ref):
    return frechet_distance(*inception_stats(det, x), *ref)


def heldout_inception(data):
    """The Inception detector and its statistics of the N_HELDOUT held-out digits: what every final FID is against."""
    import fid
    det = fid.load_detector(None, "cpu")
    return det, inception_ref(det, data, N_HELDOUT, f"inception_heldout{N_HELDOUT}_{det.sha1[:12]}")


def inception_ref(det, data, n, name):
    """Inception statistics of the first n held-out digits, cached in cache/<name>.npz."""
    path = os.path.join(CACHE, name + ".npz")
    if not os.path.exists(path):
        t0 = time.time()
        mu, sigma = inception_stats(det, data[2][:n])
        os.makedirs(CACHE, exist_ok=True)
        np.savez(path, mu=mu, sigma=sigma)
        log(f"  Inception statistics of {n} held-out digits ({time.time() - t0:.0f}s)")
    with np.load(path) as f:
        return f["mu"], f["sigma"]


class Pieces:
    """A final evaluation's finished pieces, kept beside the run's EMA (cache/ema/<run>.pieces.json) as each one
    ends, so an evaluation that is stopped (an hour for K = 3 on one core) resumes where it stopped; every
    piece draws its own seeded noise, so which pieces ran before does not change any. Pieces of other weights
    (another `ema` sha1: the run was trained again) are dropped. Without a path: no memo."""

    def __init__(self, path=None, ema=None):
        self.path, self.done = path, (read_json(path) if path and os.path.exists(path) else {})
        if self.done.get("ema_sha1") != ema:
            self.done = {"ema_sha1": ema}
        elif len(self.done) > 1:
            log(f"  resuming from {len(self.done) - 1} finished pieces of {path}")

    def __call__(self, key, fn):
        if key not in self.done:
            self.done[key] = json.loads(json.dumps(fn()))  # as it will be read back
            if self.path:
                write_json(self.path, self.done)
        return self.done[key]


def final_eval(set_name, s, data, ev):
    """FINAL_N samples of a complete run's final EMA (cache/ema): classifier cfd / acc, the Inception FID
    against the 2,000 held-out digits, the steps-per-stage sweep, the stage sheet; for the later sets also
    each model at its best guidance (best_guidance). Skipped when done or when the EMA is not cached."""
    name = run_name(s)
    out, ck = final_path(set_name, name), ema_path(set_name, s)
    if os.path.exists(out) or not os.path.exists(ck):
        return
    det, ref = heldout_inception(data)
    floor_path = final_path(set_name, "floor")
    if os.path.exists(floor_path) and read_json(floor_path)["classifier_sha1"] != ev.clf_sha1:
        raise SystemExit(f"error: {floor_path} was measured with another classifier than cache/classifier.pt")
    if not os.path.exists(floor_path):
        t0 = time.time()
        fl = {"inception_fid": fid_of(det, data[0][:FINAL_N], ref),
              "inception_what": f"the first {FINAL_N} training digits against the {N_HELDOUT} held-out digits",
              "classifier": ev.floor(FINAL_N, 32), "classifier_what": f"{FINAL_N} held-out digits (seed 0)",
              "classifier_sha1": ev.clf_sha1, "detector_sha1": det.sha1,
              "seconds": time.time() - t0, "machine": MACHINE, "cpu": CPU}
        write_json(floor_path, fl)
        log(f"  final floor: {json.dumps(fl)}")
    s, cfg, ema = load_ema(ck)
    with open(ck, "rb") as f:
        pieces = Pieces(os.path.splitext(ck)[0] + ".pieces.json", hashlib.sha1(f.read()).hexdigest())
    x, y, sample_s = draw(ema, cfg, FINAL_N // 10, s, seed=FINAL_SEED)  # drawn again on a resume: kept for the PNG
    t0 = time.time()
    r = {"kind": "final", "spec": s, "n": len(x), "seed": FINAL_SEED, "sample_seconds": sample_s, **ev.metrics(x, y),
         "inception_fid": pieces("final_fid", lambda: fid_of(det, x, ref)), "inception_ref_n": N_HELDOUT}
    r["inception_seconds"] = time.time() - t0

    def sweep_point(n):
        xs, ys, secs = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234, steps=n)
        return {"steps_per_stage": n, "n": len(xs), "sample_seconds": secs, **ev.metrics(xs, ys)}
    sweep = [pieces(f"steps {n}", lambda: sweep_point(n)) for n in STEPS_SWEEP]
    r.update(steps_sweep=sweep, set=set_name, cpu=CPU, classifier_sha1=ev.clf_sha1,
             detector_sha1=det.sha1, machine=MACHINE, torch=torch.__version__)
    if set_name not in ("curves", "curves_rerun", "curveslr"):  # each model at its best
        r.update(best_guidance(s, cfg, ema, data, ev, det, ref, final=r, pieces=pieces))
    write_json(out, r)
    if os.path.exists(pieces.path):
        os.remove(pieces.path)
    save_digits(x.view(10, -1, *x.shape[1:])[:, :10].reshape(-1, *x.shape[1:]), os.path.splitext(out)[0] + ".png")
    save_sheet(ema, cfg, s, sheet_path(set_name, name))
    log(f"  final {name}: cfd {r['cfd']:.2f} acc {r['acc']:.3f} Inception FID {r['inception_fid']:.2f} (n {len(x)}); "
        f"steps sweep cfd {[round(v['cfd'], 1) for v in sweep]}")


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


def best_guidance(s, cfg, ema, data, ev, det, ref, final=None, pieces=None):
    """Each model at its best: classifier metrics over CFG_SWEEP x STEPS_OF_CFG_SWEEP (200 samples, the curves'
    noise); the Inception FID (FINAL_N samples, FINAL_SEED) at the lowest-cfd point and at S_cfg = 1 (its best
    steps); the teacher-forced diagnosis at both points; each stage's gradient share; the Inception FID against
    S_cfg (fid_grid; final: the final evaluation's point, at the spec's S_cfg and steps). pieces: Pieces."""
    t0, pieces = time.time(), pieces or Pieces()

    def grid_point(S, n):
        xs, ys, secs = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234, cfg_scale=S, steps=n)
        return {"cfg": S, "steps_per_stage": n, "n": len(xs), "sample_seconds": secs, **ev.metrics(xs, ys)}

    def point(S, n):
        x, y, _ = draw(ema, cfg, FINAL_N // 10, s, seed=FINAL_SEED, cfg_scale=S, steps=n)
        p = {"cfg": S, "steps_per_stage": n, "n": len(x), **ev.metrics(x, y), "inception_fid": fid_of(det, x, ref),
             "teacher_forced": teacher_forced(ema, cfg, s, data, ev, S, n)}
        log(f"  at S_cfg {S:g}, {n} steps: cfd {p['cfd']:.2f} Inception FID {p['inception_fid']:.2f} (n {len(x)})")
        return p

    grid = [pieces(f"grid {S:g} {n}", lambda: grid_point(S, n)) for S in CFG_SWEEP for n in STEPS_OF_CFG_SWEEP]
    best = min(grid, key=lambda g: g["cfd"])
    best1 = min((g for g in grid if g["cfg"] == 1.0), key=lambda g: g["cfd"])
    points = [pieces(f"point {g['cfg']:g} {g['steps_per_stage']}", lambda: point(g["cfg"], g["steps_per_stage"]))
              for g in ((best, best1) if best is not best1 else (best,))]
    known = points + ([final_point(s, final)] if final else [])
    return {"guidance_grid": grid, "at_best": points[0], "at_cfg1": points[-1],
            "gradient": pieces("gradient", lambda: gradient_shares(ema, cfg, data)),
            "fid_grid": fid_grid(s, cfg, ema, ev, det, ref, known, pieces), "best_guidance_seconds": time.time() - t0}


FID_STEPS = 8  # the curves' sampler


def final_point(s, r):
    """The final evaluation's point (the spec's S_cfg and steps) in the form of best_guidance's points."""
    return {"cfg": s["cfg"], "steps_per_stage": s["steps"], **{k: r[k] for k in ("n", "cfd", "acc", "inception_fid")}}


def fid_grid(s, cfg, ema, ev, det, ref, known=(), pieces=None):
    """The Inception FID (FINAL_N samples, FINAL_SEED) at every S_cfg of CFG_SWEEP and FID_STEPS steps per stage
    (points already measured with the same noise are taken from `known`): the classifier's features and
    Inception's can disagree on a model's best guidance."""
    def fid_point(S):
        x, y, _ = draw(ema, cfg, FINAL_N // 10, s, seed=FINAL_SEED, cfg_scale=S, steps=FID_STEPS)
        p = {"n": len(x), **ev.metrics(x, y), "inception_fid": fid_of(det, x, ref)}
        log(f"  S_cfg {S:g}, {FID_STEPS} steps: cfd {p['cfd']:.2f} Inception FID {p['inception_fid']:.2f} (n {len(x)})")
        return p

    out, pieces = [], pieces or Pieces()
    for S in CFG_SWEEP:
        p = next((k for k in known if k["cfg"] == S and k["steps_per_stage"] == FID_STEPS), None)
        p = p or pieces(f"fid {S:g}", lambda: fid_point(S))
        out.append({"cfg": S, "steps_per_stage": FID_STEPS, **{k: p[k] for k in ("n", "cfd", "acc", "inception_fid")}})
    return out


def cmd_fidgrid(a):
    """fid_grid for the final models evaluated before it existed (their final JSON lacks it), from the cached EMA."""
    data, ev = evaluator(a)
    det, ref = heldout_inception(data)
    for set_name in FINAL_SETS:  # only the finals with a guidance_grid qualify
        for p in sorted(glob.glob(os.path.join(FINAL, f"{set_name}__*.json"))):
            r = read_json(p)
            if ("guidance_grid" not in r or "fid_grid" in r or not os.path.exists(ck := ema_path(set_name, r["spec"]))
                    or (a.only and a.only not in p)):
                continue
            s, cfg, ema = load_ema(ck)
            assert json.loads(json.dumps(s)) == r["spec"], f"{ck} is not the model of {p}"
            known = [final_point(s, r), r["at_best"], r["at_cfg1"]]
            log(f"fid_grid of {p}")
            r["fid_grid"] = fid_grid(s, cfg, ema, ev, det, ref, known)
            write_json(p, r)


CHECK_SEED = 8765  # noise unlike FINAL_SEED's


def cmd_fidcheck(a):
    """Each method's lowest Inception FID over S_cfg, without the selection bias: the lowest of a model's
    fid_grid is picked on the noise that measures it. Here each method's S_cfg is the one with the lowest FID
    averaged over its seeds' fid_grid, and every model is drawn again there with other noise (CHECK_SEED)."""
    data, ev = evaluator(a)
    det, ref = heldout_inception(data)
    groups = {}
    for p in sorted(glob.glob(os.path.join(FINAL, "*__*.json"))):
        if "fid_grid" in (r := read_json(p)):
            s = r["spec"]
            groups.setdefault((tuple(s["resolutions"]), s.get("reduction", "mean"), s["lr"]), []).append((p, r))
    for runs in groups.values():
        S = min(CFG_SWEEP, key=lambda S: np.mean([c["inception_fid"] for _, r in runs for c in r["fid_grid"]
                                                  if c["cfg"] == S]))
        for p, r in runs:
            if (r.get("fid_check", {}).get("cfg") == S or not os.path.exists(ck := ema_path(r["set"], r["spec"]))
                    or (a.only and a.only not in p)):
                continue
            s, cfg, ema = load_ema(ck)
            x, y, _ = draw(ema, cfg, FINAL_N // 10, s, seed=CHECK_SEED, cfg_scale=S, steps=FID_STEPS)
            r["fid_check"] = {"cfg": S, "steps_per_stage": FID_STEPS, "seed": CHECK_SEED, "n": len(x),
                              **ev.metrics(x, y), "inception_fid": fid_of(det, x, ref)}
            log(f"fid_check of {p}: S_cfg {S:g}, Inception FID {r['fid_check']['inception_fid']:.2f}")
            write_json(p, r)


INCEPTION_N, INCEPTION_REF = 100, 500


def cmd_inception(a):
    """The standard Inception FID (fid.py's packaged TF-Inception, the FID of published numbers) of the
    headline rows: each claim-1 EMA model's first INCEPTION_N final samples (10 per digit, the same noise and
    sampler as its cfd) against INCEPTION_REF held-out digits; floor: as many training digits. Tiny n (the
    CPU runs ~1 image/s through Inception at 299 px), so the numbers carry a large small-sample bias, the
    same for every row: read them against the floor."""
    import fid
    torch.set_num_threads(a.threads)
    data = load_mnist(a.mnist)
    det = fid.load_detector(None, "cpu")
    ref = inception_ref(det, data, INCEPTION_REF, f"inception_ref{INCEPTION_REF}")
    for s in [None] + set_claim1():
        path = os.path.join(RESULTS, "inception", ("floor" if s is None else run_name(s)) + ".json")
        if os.path.exists(path):
            continue
        t0 = time.time()
        if s is None:
            x = data[0][:INCEPTION_N]
            meta = {"what": f"{INCEPTION_N} training digits (the floor)"}
        else:
            s, cfg, ema = load_ema(ema_path("claim1", s))
            x, _, _ = draw(ema, cfg, s["eval_n"] // 10, s, seed=1234)
            x = x.view(10, -1, *x.shape[1:])[:, :INCEPTION_N // 10].reshape(-1, *x.shape[1:])  # 10 per digit
            meta = {"what": "claim-1 final EMA samples", "checkpoint_spec": s}
        d = fid_of(det, x, ref)
        write_json(path, {"kind": "inception", "fid": d, "n": len(x), "ref_n": INCEPTION_REF,
                          "ref": f"the first {INCEPTION_REF} held-out digits", "detector_sha1": det.sha1,
                          "seconds": time.time() - t0, "machine": MACHINE, "torch": torch.__version__, **meta})
        log(f"{path}: FID {d:.2f} ({time.time() - t0:.0f}s)")


def cmd_sheet(a):
    """The stage sheet of every run of a set whose final EMA is cached (no data needed)."""
    paths = sorted(glob.glob(os.path.join(CACHE, "ema", f"{a.set}__*.pt")))
    if not paths:
        raise SystemExit(f"error: no cached final EMA of {a.set} in {os.path.join(CACHE, 'ema')} (train the set first)")
    for p in paths:
        s, cfg, ema = load_ema(p)
        log(f"wrote {save_sheet(ema, cfg, s, sheet_path(a.set, run_name(s)))}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    mnist = os.path.join(ROOT, "..", "shared", "data", "mnist")
    r = sub.add_parser("run", help="run named sets in order (finished runs are skipped, partial ones resumed)")
    f = sub.add_parser("final", help="final evaluation of the complete runs of " + ", ".join(FINAL_SETS))
    i = sub.add_parser("inception", help="standard Inception FID of the claim-1 models (needs their cached EMA)")
    fg = sub.add_parser("fidgrid", help="the Inception FID against S_cfg of final models evaluated without it")
    fc = sub.add_parser("fidcheck", help="each final model's Inception FID at its method's best S_cfg, other noise")
    for q in (f, fg, fc):
        q.add_argument("--only", help="only the final models whose JSON path contains this")
    for q in (r, f, i, fg, fc):
        q.add_argument("--mnist", default=mnist, help="folder with mnist-t10k-{images-idx3,labels-idx1}-ubyte.gz")
        q.add_argument("--threads", type=int, default=1)
    r.add_argument("sets", nargs="+", choices=list(SETS) + list(SAMPLING_SETS))
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--seeds", default=None,
                   help="comma-separated seeds of the ablations, claims 2-6 (default 0), claim3long (default 0,1) "
                   "and the curve sets (default 0,1,2)")
    r.add_argument("--max-pflop", type=float, default=None,
                   help="stop each run after its last evaluation mark <= this (a later call continues)")
    sh = sub.add_parser("sheet", help="stage sheets (Fig. 9) of a set's runs from their cached final EMA")
    sh.add_argument("set", choices=list(SETS))
    rp = sub.add_parser("report", help="markdown tables and figures from experiments/results")
    rp.add_argument("sections", nargs="*", metavar="curves|rechecks",
                    help="only the curves, or only the re-checks on learned models (default: everything)")
    a = p.parse_args(argv)
    code_version()  # the code this process started with
    if a.cmd == "run":
        cmd_run(a)
    elif a.cmd == "final":
        data, ev = evaluator(a)
        for set_name in FINAL_SETS:
            for s in SETS[set_name]():
                if not a.only or a.only in final_path(set_name, run_name(s)):
                    final_eval(set_name, s, data, ev)
    elif a.cmd == "inception":
        cmd_inception(a)
    elif a.cmd == "fidgrid":
        cmd_fidgrid(a)
    elif a.cmd == "fidcheck":
        cmd_fidcheck(a)
    elif a.cmd == "sheet":
        cmd_sheet(a)
    else:
        if set(a.sections) - {"curves", "rechecks"}:
            p.error(f"report: the sections are 'curves' and 'rechecks', got {a.sections}")
        from report import report  # noqa: E402  (experiments/report.py)
        report(a.sections)


if __name__ == "__main__":
    main()
