"""Train CDC-FM (cdc.py) on one CPU, one GPU, or many GPUs on many nodes (docs/training.md).

    python train.py                                             # CPU demo: tiny DiT on built-in shapes
    torchrun --nnodes 4 --nproc_per_node 8 train.py --data-path /imagenet/train --resume auto   # Table 7
"""

import argparse
import dataclasses
import glob
import os
import resource
import sys
import time
from contextlib import nullcontext
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import cdc
from data import DataError, DataOrder, build_dataset, normalize, save_grid, save_stage_sheet
from runs import (ConfigError, die, end_distributed, list_checkpoints, load_checkpoint, prune_checkpoints,
                  save_checkpoint, setup_distributed)

# Table 7 values that are not flags. make_optimizer and train_step read them from `args` (resolve_args fills
# them in; a caller with its own namespace passes its own). Departure: the EMA warm-up (ema_decay_at).
TABLE7 = dict(beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True)
SAMPLE_STEPS = 24     # steps per stage of the EMA sample grids (as sample.py's default)
SHAPES_IMAGES = 20_000  # the built-in shapes (no --data-path): images per epoch, 4 classes
SHAPES_CLASSES = 4
PEAK_FLOPS = 989e12   # the MFU denominator: H100/H200 SXM dense bf16 (other GPUs: read TFLOP/s against theirs)

# --- Training step, EMA, seeding ------------------------------------------------------------------


class Objective(nn.Module):
    """The whole training loss as one module, so that DDP sees exactly one forward per backward even
    though cdc.training_losses calls the network once per stage."""

    def __init__(self, model, cdc_cfg, class_dropout, reduction, stage_sampling):
        super().__init__()
        self.model, self.cdc_cfg = model, cdc_cfg
        self.kw = dict(class_dropout=class_dropout, reduction=reduction, stage_sampling=stage_sampling)

    def forward(self, x, y, generator, step):
        return cdc.training_losses(self.model, x, y, self.cdc_cfg, generator=generator, step=step, **self.kw)


def make_optimizer(model, args):
    # fused: one kernel per step, and it honours `found_inf` (train_step) without a host sync
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                             weight_decay=args.weight_decay, fused=True)


@torch.no_grad()
def update_ema(ema, model, decay, apply):
    """ema = decay * ema + (1 - decay) * param where the 0-dim bool tensor `apply` is True."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    # a 0-dim tensor weight would take the Scalar overload, a host read per step; a weight list does not
    w = (1.0 - decay) * apply.to(ema_params[0].dtype)
    torch._foreach_lerp_(ema_params, params, [w] * len(ema_params))


def ema_decay_at(step, decay, warmup):
    """Table 7's 0.9999, after the usual warm-up min(decay, (1 + t) / (10 + t)) (a departure: docs/training.md)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def stage_sums(out):
    """(K,) per-stage loss sums (0 for an empty stage): Python ints times device scalars, no host copy."""
    sl = out["stage_loss"]
    return torch.stack([sl[s] * n if n else sl.new_zeros(()) for s, n in enumerate(out["stage_count"])])


def merge_micro_batches(outs):
    """One result for the whole step from equal-sized micro-batches: mean loss, per-stage means, counts."""
    if len(outs) == 1:
        return outs[0]
    counts = [sum(c) for c in zip(*(o["stage_count"] for o in outs))]
    sums = torch.stack([stage_sums(o) for o in outs]).sum(0)
    stage_loss = torch.stack([sums[s] / n if n else sums[s] * float("nan") for s, n in enumerate(counts)])
    return {"loss": torch.stack([o["loss"].detach() for o in outs]).mean(), "stage_loss": stage_loss,
            "stage_count": counts}


def train_step(objective, model, ema, opt, x, y, gen, step, args):
    """One update from args.grad_accum equal micro-batches (all-reduced in the last one only; micro-batch i
    of step s takes the quotas of quota step s * N + i) -> (losses, grad norm, ok). Where ok (a device bool)
    is False, fused AdamW skips the step on the device (found_inf) and the EMA does not move. No host sync."""
    n = getattr(args, "grad_accum", 1)
    opt.zero_grad(set_to_none=True)
    outs = []
    for i, (xi, yi) in enumerate(zip(x.chunk(n), y.chunk(n) if y is not None else [None] * n)):
        last = i == n - 1
        with nullcontext() if last or not hasattr(objective, "no_sync") else objective.no_sync():
            with torch.autocast(x.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                out = objective(xi, yi, gen, step * n + i)
            (out["loss"] / n if n > 1 else out["loss"]).backward()
        outs.append(out)
    out = merge_micro_batches(outs)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    ok = torch.isfinite(out["loss"].detach()) & torch.isfinite(gnorm)
    opt.found_inf = (~ok).float()
    opt.step()
    update_ema(ema, model, ema_decay_at(step, args.ema_decay, args.ema_warmup), ok)
    return out, gnorm, ok


def step_seed(global_seed, rank, step, stream=0):
    """Seed of every random draw of one rank at one step: a resumed run is bit-identical by construction."""
    key = (global_seed, rank, step) if stream == 0 else (global_seed, rank, step, stream)  # stream 0: as before
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)


def compile_model(model, **kw):
    """Static shapes: one graph per (stage, per-stage batch, grad mode), never rebuilt. The default recompile
    limit (8) would silently fall back to eager beyond 2 stages x 2 modes x 2 batch sizes."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=False, **kw)


def pick_threads(model, cdc_cfg, args, batch):
    """CPU: time three steps (after a warm-up) of a copy at 1 thread and at one per core, keep the faster
    (docs/training.md). Returns (threads, what was measured)."""
    m, R, seconds = deepcopy(model), cdc_cfg.resolutions[-1], {}
    ema, opt = deepcopy(m).requires_grad_(False), make_optimizer(m, args)
    objective = Objective(m, cdc_cfg, args.class_dropout, args.loss_reduction, args.stage_sampling)
    x, y = torch.zeros(batch, m.config.in_channels, R, R), torch.zeros(batch, dtype=torch.long)
    with torch.random.fork_rng():  # the run's own random stream is untouched
        for n in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(n)
            for i in range(4):
                if i == 1:
                    t0 = time.perf_counter()
                train_step(objective, m, ema, opt, x, y if m.config.num_classes else None, None, i, args)
            seconds[n] = (time.perf_counter() - t0) / 3
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, ", ".join(f"{n} thread(s) {t * 1e3:.0f} ms/step" for n, t in seconds.items())


class Meter:
    """The log's running sums, all-reduced once per log line: device values stay on the device, what the host
    knows (steps, stage counts, FLOPs = 3 x the forward's) is counted in Python. add() never syncs."""

    def __init__(self, model, cdc_cfg, device):
        self.res, self.device = cdc_cfg.resolutions, device
        self.flops_of = [3.0 * model.flops_per_sample(r) for r in self.res]
        self.reset()

    def reset(self):  # device: loss, gnorm, non-finite, stage sums; host: steps, flops, stage counts
        self.sums, self.host = torch.zeros(3 + len(self.res), dtype=torch.float64, device=self.device), [0.0] * (2 + len(self.res))

    def add(self, out, gnorm, ok):
        cnt = out["stage_count"]
        self.host = [a + b for a, b in zip(self.host, [1, sum(c * f for c, f in zip(cnt, self.flops_of)), *cnt])]
        self.sums += torch.cat([out["loss"].detach().double().view(1), gnorm.detach().double().view(1),
                                (~ok).double().view(1), stage_sums(out).detach().double()])

    def reduce(self, skipped):
        """Sums over every rank: loss, gnorm, nonfinite, stage_loss, steps, flops, count, skipped (images)."""
        s = torch.cat([self.sums, torch.tensor([*self.host, skipped], dtype=torch.float64, device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(s)
        s, K = s.tolist(), len(self.res)
        return dict(loss=s[0], gnorm=s[1], nonfinite=s[2], stage_loss=s[3:3 + K], steps=s[3 + K], flops=s[4 + K],
                    count=s[5 + K:5 + 2 * K], skipped=int(s[-1]))

    def line(self, s, dt, global_batch, world):
        steps = s["steps"] / world
        per_stage = " ".join(f"{r}px {l / n:.4f}" if n else f"{r}px -" for r, l, n in zip(self.res, s["stage_loss"], s["count"]))
        mem = (torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # CPU: peak resident set (KiB)
        return (f"loss {s['loss'] / s['steps']:.4f} ({per_stage}) grad_norm {s['gnorm'] / s['steps']:.3f} "
                f"{steps / dt:.2f} steps/s {steps * global_batch / dt:.1f} img/s "
                f"{s['flops'] / dt / world / 1e12:.3g} TFLOP/s per process"
                + (f" MFU {s['flops'] / dt / world / PEAK_FLOPS:.1%}" if self.device.type == "cuda" else "")
                + f" mem {mem:.2f}GB"
                + (f" skipped_images {s['skipped']}" if s["skipped"] else ""))


# --- Flags -----------------------------------------------------------------------------------------

# --preset fills every flag below that the user did not give: the CPU demo without --data-path, else Table 7's
# ImageNet 256 recipe. The demo's values and the 512 / 64 recipes (this repository's): docs/training.md.
# loss_reduction: Alg. 1's stage weights (at mean's gradient scale) for the recipes; the demo lives in the early
# regime, where weighing every stage alike learns 2.5x sooner (README: the loss weighting of Alg. 1).
_RECIPE = dict(model="XL", global_batch_size=256, lr=1e-4, log_every=100, ckpt_every=50_000, loss_reduction="scaled-sum")
TRAIN_PRESETS = {
    "demo": dict(model="tiny", patch_size=2, resolutions="8,16", global_batch_size=16, lr=2e-3, log_every=100,
                 ckpt_every=1000, max_steps=4000, time_limit=7.5, loss_reduction="mean"),
    "imagenet256": dict(_RECIPE, patch_size=4, resolutions="32,64,128,256"),
    "imagenet512": dict(_RECIPE, patch_size=8, resolutions="32,64,128,256,512"),
    "imagenet64": dict(_RECIPE, patch_size=2, resolutions="32,64"),
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, or the values --preset gives it; never 'None'."""

    def _get_help_string(self, action):
        preset = ", ".join(f"{n} {v[action.dest]}" for n, v in TRAIN_PRESETS.items() if action.dest in v)
        if preset:
            return f"{action.help} (--preset: {preset})"
        return action.help if action.default is None else super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(description="Train CDC-FM. With no --data-path: the CPU demo on built-in shapes.",
                                formatter_class=_Help)
    a = p.add_argument
    a("--preset", choices=list(TRAIN_PRESETS), help="fills the flags you do not give "
      "(default: demo without --data-path, else imagenet256)")
    # data
    a("--data-path", help="ImageFolder-style directory or .npz (arr_0 uint8 NHWC, optional labels); none = built-in shapes")
    a("--no-hflip", action="store_true", help="no random horizontal flip (Table 7 flips; digits and text must not be)")
    a("--unconditional", action="store_true", help="ignore the labels: one null class (no CFG)")
    # model and interpolant
    a("--model", choices=list(cdc.PRESETS), help="DiT size (Peebles & Xie Table 1)")
    a("--patch-size", type=int, help="patch side p (Table 7: 4)")
    a("--resolutions", help="stage sides, coarse to fine, each a power-of-two multiple of the one before "
      "(Table 6's 64,256 too); the last is the image size")
    a("--windows", help="stage time-window widths summing to 1, e.g. 0.2,0.3,0.5 (default equal)")
    a("--sigma", type=float, default=1.0, help="stage-1 source std (eq. 8)")
    a("--gamma", type=float, default=2.0, help="diminish factor, sigma_k = gamma^-(k-1) sigma (eq. 20)")
    a("--interpolant", default="linear", choices=cdc.INTERPOLANTS, help="Table 5")
    a("--fusion", default="xattn", choices=cdc.FUSIONS, help="resolution fusion: eqs. 41-44 or addition (Table 4)")
    a("--loss-reduction", choices=cdc.REDUCTIONS, help="per-sample loss over a stage's pixels: sum (Alg. 1: a "
      "stage-k sample weighs d_k), scaled-sum (that / d_K: Alg. 1's weights at mean's scale), mean (stages alike)")
    a("--stage-sampling", default="stratified", choices=cdc.STAGE_SAMPLINGS,
      help="stratified: fixed per-stage quotas, the same on every rank; iid: t ~ U[0,1] per sample (Alg. 1)")
    a("--class-dropout", type=float, default=0.1, help="label -> null class probability (eq. 74)")
    # optimisation (AdamW betas, eps, weight decay, clip and EMA: TABLE7 above)
    a("--global-batch-size", type=int, help="images per step over all processes")
    a("--grad-accum", type=int, default=1, help="micro-batches per step (the global batch is unchanged)")
    a("--lr", type=float, help="AdamW learning rate")
    a("--precision", choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction,
      help="torch.compile the network (static shapes: one graph per stage); default on with CUDA, off on CPU")
    a("--epochs", type=int, default=200, help="passes over the data unless --max-steps")
    a("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    a("--time-limit", type=float, help="stop training (checkpoint, grid) after this many minutes")
    a("--global-seed", type=int, default=0, help="weights, data order, every random draw")
    # the run
    a("--results-dir", default="results", help="runs go to RESULTS_DIR/NNN-MODEL-SIZE")
    a("--resume", help="'auto' (newest checkpoint of this model and size, or start) or a checkpoint / run directory")
    a("--log-every", type=int, help="steps between log lines")
    a("--ckpt-every", type=int, help="steps between checkpoints (each with an EMA sample grid)")
    a("--keep-last", type=int, default=0, help="keep the newest N checkpoints and those marked NNNNNNN.keep (0: all)")
    a("--cfg-scale", type=float, default=3.0, help="CFG scale of the sample grids")
    a("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
      help="EMA decay min(0.9999, (1+t)/(10+t)), a departure; --no-ema-warmup is Table 7's constant 0.9999")
    return p


def parse_list(text, name, kind=int):
    try:
        return tuple(kind(v) for v in (text.replace(" ", "").split(",") if isinstance(text, str) else text) if v != "")
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list such as 32,64,128,256, got {text!r}") from None


def resolve_args(args, demo):
    """Fill the flags left at None from --preset and TABLE7; parse and check. Returns the log's note."""
    args.preset = args.preset or ("demo" if demo else "imagenet256")
    filled = []
    for k, v in TRAIN_PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
            filled.append(f"{k}={v}")
    for k, v in TABLE7.items():
        vars(args).setdefault(k, v)
    args.resolutions = parse_list(args.resolutions, "--resolutions")
    args.windows = None if args.windows is None else parse_list(args.windows, "--windows", float)
    for name in ("global_batch_size", "log_every", "ckpt_every", "epochs", "grad_accum", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.class_dropout <= 1:
        raise ConfigError(f"--class-dropout is a probability in [0, 1], got {args.class_dropout}")
    if args.keep_last < 0:
        raise ConfigError("--keep-last must be >= 0 (0 keeps every checkpoint)")
    return f"--preset {args.preset}: " + ", ".join(filled)


def build(args, num_classes):
    """The interpolant of the flags, and the network, which accepts exactly the CDC config's stage sides."""
    try:
        cfg = cdc.CDCConfig(resolutions=args.resolutions, sigma=args.sigma, gamma=args.gamma, windows=args.windows,
                            interpolant=args.interpolant)
        return cfg, cdc.create_model(args.model, num_classes=num_classes, patch_size=args.patch_size,
                                     fusion=args.fusion, resolutions=cfg.resolutions)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --- Data and the run ------------------------------------------------------------------------------


def default_workers():
    """One loader worker per core of this process's share (LOCAL_WORLD_SIZE), one core left, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def build_data(args, world, rank):
    """(data set, classes, this rank's DataOrder, loader). The built-in shapes need no workers (~1 ms an image)."""
    shapes = args.data_path is None
    kw = dict(size=SHAPES_IMAGES, num_classes=SHAPES_CLASSES) if shapes else dict(hflip=not args.no_hflip)
    dataset = build_dataset(args.data_path, args.resolutions[-1], seed=args.global_seed, **kw)
    order = DataOrder(len(dataset), world, rank, args.global_batch_size, seed=args.global_seed)
    if order.steps_per_epoch == 0:
        raise ConfigError(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.global_batch_size // world, sampler=order, num_workers=0 if shapes else default_workers(),
        drop_last=True, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator())  # else every new iterator draws its seed from the global RNG
    return dataset, 0 if args.unconditional else dataset.num_classes, order, loader


def choose_run(args):
    """Rank 0's (run directory, checkpoint or None, note). --resume auto: the newest loadable checkpoint of
    the newest run of this model and size; with none, the newest run if it is empty, else a new run."""
    suffix = f"{args.model}-{args.resolutions[-1]}"
    mine = sorted(glob.glob(os.path.join(args.results_dir, f"[0-9][0-9][0-9]-{glob.escape(suffix)}")))
    run_of = lambda path: os.path.dirname(os.path.dirname(os.path.abspath(path)))  # noqa: E731
    if args.resume == "auto":
        found = [p for r in reversed(mine) for p in list_checkpoints(r)]
        for path in found:
            try:
                load_checkpoint(path)
                return run_of(path), path, None
            except Exception as e:
                print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__})", file=sys.stderr)
        if found:
            raise ConfigError(f"--resume auto: no loadable checkpoint among {len(found)} found")
        if mine:
            return mine[-1], None, f"--resume auto: no checkpoint yet; reusing the empty run {mine[-1]}"
    elif args.resume:
        found = list_checkpoints(args.resume) if os.path.isdir(args.resume) else [args.resume]
        if not found or not os.path.isfile(found[0]):
            raise ConfigError(f"--resume {args.resume}: no such checkpoint file, nor a run directory with checkpoints/NNNNNNN.pt")
        return run_of(found[0]), found[0], None
    taken = [int(os.path.basename(r)[:3]) for r in glob.glob(os.path.join(args.results_dir, "[0-9]" * 3 + "-*"))]
    return os.path.join(args.results_dir, f"{max(taken, default=-1) + 1:03d}-{suffix}"), None, None


def check_compatible(ckpt, config, path):
    """The checkpoint must describe the same network and interpolant as the flags."""
    diffs = [f"{k}={a} (checkpoint) vs {b} (flags)" for part in ("model", "cdc")
             for k in sorted(set(ckpt["config"][part]) | set(config[part]))
             if (a := ckpt["config"][part].get(k)) != (b := config[part].get(k))]
    if diffs:
        raise ConfigError(f"checkpoint {path} does not match the flags: {'; '.join(diffs)}. "
                          f"Pass the flags it was trained with, or start a new run without --resume")


def open_run(args, config, model, ema, opt, rank, world):
    """(run_dir, step, epoch, pos, notes), the state resumed into model, ema and opt. Rank 0 decides and every
    rank follows (ranks could see different newest files); a rank that cannot read the file stops the job."""
    decision = [None, None, None, None]  # run_dir, checkpoint, note, error
    if rank == 0:
        try:
            decision[:3] = choose_run(args)
        except ConfigError as e:
            decision[3] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    run_dir, path, note, error = decision
    if error:
        raise ConfigError(error)
    notes, step, epoch, pos = [note] if note else [], 0, 0, 0
    if path:
        try:
            ckpt, failure = load_checkpoint(path), None
        except Exception as e:
            ckpt, failure = None, f"{type(e).__name__}: {e}".splitlines()[0]  # the error: one line
        failures = [failure]
        if dist.is_initialized():
            failures = [None] * world
            dist.all_gather_object(failures, failure)
        bad = [(r, f) for r, f in enumerate(failures) if f]
        if bad:
            raise ConfigError(f"rank {bad[0][0]} cannot read the checkpoint {path} that rank 0 resumes from ({bad[0][1]}); "
                              f"every rank must see the same file (a shared results directory)" if world > 1
                              else f"cannot load checkpoint {path} ({bad[0][1]})")
        check_compatible(ckpt, config, path)
        for part, module in (("model", model), ("ema", ema), ("opt", opt)):
            module.load_state_dict(ckpt[part])
        step, epoch, pos = int(ckpt["step"]), ckpt["data"]["epoch"], ckpt["data"]["pos"]
        notes.append(f"resumed from {path} at step {step} (epoch {epoch}, image {pos} of the epoch)")
        if ckpt["world_size"] != world:
            notes.append(f"the checkpoint was written by {ckpt['world_size']} process(es), this run has {world}: the data "
                         f"continues where it stopped, but per-rank noise differs; bit-exact resume needs the same world size")
    if rank == 0:
        for sub in ("checkpoints", "samples"):
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    return run_dir, step, epoch, pos, notes


def sampling_copy(ema, precision):
    """Under bf16 a bf16 copy of the EMA, made once (autocast caches casts only of weights that require grad)."""
    if precision != "bf16":
        return ema
    net = deepcopy(ema)
    for p in net.parameters():  # parameters only: the fixed position tables stay fp32
        p.data = p.data.to(torch.bfloat16)
    return net


@torch.no_grad()
def sample_grid(ema, cdc_cfg, args, device, path):
    """EMA samples, a row per class (ImageNet: DiT's classes), the same noise every time, and the Fig. 9 stage
    sheet of the first two rows (PATH_stages.png)."""
    nc, per = ema.config.num_classes, 8
    classes = [207, 360, 387, 974, 88, 979, 417, 279] if nc == 1000 else list(range(min(nc, 8)))
    y = torch.tensor([c for c in classes for _ in range(per)], device=device) if nc else None
    gen = torch.Generator(device).manual_seed(args.global_seed)
    net = sampling_copy(ema, args.precision)
    with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        stages = cdc.sample(cdc.guided_field(net, y, args.cfg_scale), cdc_cfg, per * len(classes) if nc else 4 * per,
                            channels=ema.config.in_channels, steps=SAMPLE_STEPS, generator=gen, device=device,
                            return_stages=True)
    save_grid(stages[-1], path, per)
    save_stage_sheet([s[::per // 2][:8] for s in stages], path[:-4] + "_stages.png")


# --- Training ----------------------------------------------------------------------------------------


def train(args):
    rank, world, device, distributed = setup_distributed()
    note = resolve_args(args, demo=args.data_path is None)
    if args.global_batch_size % (world * args.grad_accum):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} process(es) x "
                          f"--grad-accum {args.grad_accum} (equal micro-batches keep every shape static)")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    dataset, num_classes, order, loader = build_data(args, world, rank)
    total_steps = args.max_steps or args.epochs * order.steps_per_epoch

    torch.manual_seed(args.global_seed)  # identical initial weights on every rank
    cdc_cfg, model = build(args, num_classes)
    config = {"model": dataclasses.asdict(model.config), "cdc": cdc_cfg.to_dict()}
    ema, opt = deepcopy(model.to(device)).requires_grad_(False).eval(), make_optimizer(model, args)
    run_dir, step, epoch, pos, notes = open_run(args, config, model, ema, opt, rank, world)

    def log(msg):
        if rank == 0:
            print(line := f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)
            with open(os.path.join(run_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    threads = f"{torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    if device.type == "cpu" and world == 1 and torch.get_num_threads() > 1:
        threads = "{} CPU thread(s), the faster measured ({}; OMP_NUM_THREADS=N fixes N)".format(
            *pick_threads(model, cdc_cfg, args, args.global_batch_size // args.grad_accum))
    for line in [f"run directory {run_dir}; {world} process(es) on {device.type} {threads}; {note}", *notes]:
        log(line)
    log(f"data: {args.data_path or 'built-in shapes'}: {len(dataset)} images, {num_classes} classes; "
        f"{order.steps_per_epoch} steps/epoch, {total_steps} steps")
    log(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config['model']}; "
        f"stages {cdc_cfg.resolutions}, {args.stage_sampling} stage sampling; precision {args.precision}; compile "
        f"{args.compile}; {args.grad_accum} micro-batch(es) of {args.global_batch_size // world // args.grad_accum} per process")

    objective = Objective(compile_model(model) if args.compile else model, cdc_cfg, args.class_dropout,
                          args.loss_reduction, args.stage_sampling)
    if distributed:  # buckets: views of the gradients (no copy); why they fill in the largest stage: cdc.training_losses
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                                        gradient_as_bucket_view=True, broadcast_buffers=False)  # buffers: fixed tables
    model.train()
    gen, meter = torch.Generator(), Meter(model, cdc_cfg, device)  # gen: the CPU generator of the iid timesteps
    t_start, t_last, last_ckpt = time.time(), time.time(), None
    while step < total_steps:
        order.set_position(epoch, pos)
        dataset.set_epoch(epoch)
        for x, y in loader:
            torch.manual_seed(step_seed(args.global_seed, rank, step))  # coupling noise, label coins (device)
            gen.manual_seed(step_seed(args.global_seed, rank, step, stream=1))  # iid t: another stream, else t = the coins
            x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)  # uint8 over the bus
            out, gnorm, ok = train_step(objective, model, ema, opt, x, y if num_classes else torch.zeros_like(y),
                                        gen, step, args)
            meter.add(out, gnorm, ok)
            step, pos = step + 1, pos + args.global_batch_size

            # rank 0's clock decides for everyone: every step alone, at log steps under DDP (a broadcast)
            if args.time_limit and (step % args.log_every == 0 or not distributed) and step < total_steps:
                stop = [time.time() - t_start > 60 * args.time_limit]
                if distributed:
                    dist.broadcast_object_list(stop, src=0)
                if stop[0]:
                    log(f"--time-limit {args.time_limit} min reached: stopping at step {step} of {total_steps}")
                    total_steps = step
            is_log = step % args.log_every == 0 or step == total_steps
            is_ckpt = step % args.ckpt_every == 0 or step == total_steps
            if is_log or is_ckpt:
                sums = meter.reduce(dataset.num_skipped)
                if sums["nonfinite"] > 0:  # checked before any save: a checkpoint never holds a diverged model
                    die(f"the loss or the gradient is not finite (NaN or inf) at or before step {step}; stopping. "
                        f"The last good checkpoint is {last_ckpt or 'none (no checkpoint was written)'}")
                if is_log:
                    log(f"step {step:07d} " + meter.line(sums, time.time() - t_last, args.global_batch_size, world))
                    meter.reset()
                    t_last = time.time()
                if is_ckpt:
                    last_ckpt = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
                    if rank == 0:  # no RNG state: every draw of step s on rank r is seeded by step_seed(seed, r, s)
                        save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                         "args": vars(args), "config": config, "step": step,
                                         "data": {"epoch": epoch, "pos": pos}, "world_size": world}, last_ckpt)
                        prune_checkpoints(run_dir, args.keep_last, last_ckpt)
                        grid = os.path.join(run_dir, "samples", f"{step:07d}.png")
                        sample_grid(ema, cdc_cfg, args, device, grid)
                        log(f"saved checkpoint {last_ckpt}, EMA sample grid {grid} and its Fig. 9 stage sheet")
                    if distributed:
                        dist.barrier()
            if step >= total_steps:
                break
        else:  # the epoch is exhausted
            epoch, pos = epoch + 1, 0
    if distributed:
        end_distributed()


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        train(args)
    except (DataError, ConfigError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
