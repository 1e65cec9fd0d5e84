"""
Train CDC-FM (cdc.py) on one CPU, one GPU, or many GPUs on many nodes.

    python train.py                                            # CPU demo: tiny DiT on built-in shapes
    torchrun --nnodes 4 --nproc_per_node 8 train.py --data-path /imagenet/train --model XL --image-size 256

Reads top to bottom like DiT's train.py: the training step and EMA, the log meter, the flags, set-up
and resume, then train(): one loop. Every flag defaults to the paper's recipe (Table 7) except where
the CPU demo has to differ; those demo values are in DEMO_DEFAULTS and printed at start. Data sets and
transforms live in data.py; processes, errors, the log and checkpoints in runs.py; the speed benchmark
in bench/speed.py.
"""

import argparse
import dataclasses
import glob
import json
import os
import time
from contextlib import nullcontext
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import cdc
from runs import (ATTENTION_BACKENDS, ConfigError, Logger, attention_kernel, check_compatible, die, end_distributed,
                  find_resume, find_runs, list_checkpoints, load_checkpoint, peak_memory_gb, save_checkpoint,
                  set_attention_backend, setup_distributed)
from data import DataError, DataOrder, build_dataset, normalize, save_grid, save_stage_sheet

# ------------------------------------------------------------------------------------------------
#                                  Training step, EMA, seeding
# ------------------------------------------------------------------------------------------------


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
    """ema = decay * ema + (1 - decay) * param; where the 0-dim bool tensor `apply` is False, unchanged."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    # A 0-dim tensor weight would take the Scalar overload, which reads it on the host (a sync per step);
    # one weight tensor per parameter stays on the device.
    w = (1.0 - decay) * apply.to(ema_params[0].dtype)
    torch._foreach_lerp_(ema_params, params, [w] * len(ema_params))


def ema_decay_at(step, decay, warmup):
    """Table 7's EMA is 0.9999. Departure (--ema-warmup, on by default): decay_t = min(decay,
    (1 + t) / (10 + t)), the usual warm-up, so that a short run (the CPU demo: ~2000 steps, where a
    0.9999 EMA would still be 90% initial weights) has a usable EMA. It reaches 0.9999 at step 90k
    and changes nothing after, so a 1M-step ImageNet run is the paper's recipe."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def stage_sums(out):
    """(K,) per-stage loss sums of one training_losses result (0 where a stage got no sample). Python
    ints times device scalars: nothing is copied from the host."""
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
    """One update from args.grad_accum equal micro-batches of this rank's batch x. Returns (losses, grad
    norm, ok). The gradient is that of the mean loss over the whole (global) batch: each micro-batch's
    mean is divided by their number, DDP averages over ranks, and it all-reduces only in the last
    micro-batch (no_sync before). Micro-batch i of step s takes the stage quotas of quota step
    s * N + i, so shapes stay static and the long-run stage mix stays exact. ok (a device bool) is False
    when the loss or the gradient norm is not finite; then the weights, the optimiser state and the EMA
    do not move: fused AdamW skips the update on the device when found_inf = 1 (as under GradScaler).
    Nothing here reads a device value on the host (test_hotpath.py runs it under fake tensors)."""
    n = getattr(args, "grad_accum", 1)
    if getattr(args, "compile_mode", None) == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new iteration, outputs may be reused
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


def pick_threads(model, cdc_cfg, args, device, batch):
    """CPU: time a few training steps of a throwaway copy at 1 thread and at one per core, keep the
    faster. On an idle 2-core machine 2 threads were 1.5x faster than 1; with the other core busy, 2
    OpenMP threads fighting for one core were 3-6x slower. Returns (threads, what was measured)."""
    counts = sorted({1, torch.get_num_threads()})
    if len(counts) == 1:
        return 1, "1 core"
    m = deepcopy(model)
    ema, opt = deepcopy(m).requires_grad_(False), make_optimizer(m, args)
    objective = Objective(m, cdc_cfg, args.class_dropout, args.loss_reduction, args.stage_sampling)
    R, nc = cdc_cfg.resolutions[-1], m.config.num_classes
    x, y = torch.zeros(batch, m.config.in_channels, R, R, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    seconds = {}
    with torch.random.fork_rng():  # the run's own random stream is untouched
        for n in counts:
            torch.set_num_threads(n)
            for i in range(4):  # one warm-up step, three timed
                if i == 1:
                    t0 = time.perf_counter()
                train_step(objective, m, ema, opt, x, y if nc else None, None, i, args)
            seconds[n] = (time.perf_counter() - t0) / 3
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, ", ".join(f"{n} thread(s) {t * 1e3:.0f} ms/step" for n, t in seconds.items())


def step_seed(global_seed, rank, step, stream=0):
    """Seed of every random draw of one rank at one step (timesteps, coupling noise, label dropout).

    Re-seeding each step from (seed, rank, step) instead of carrying RNG state makes a resumed run
    bit-identical to an uninterrupted one by construction: nothing random depends on history."""
    key = (global_seed, rank, step) if stream == 0 else (global_seed, rank, step, stream)  # stream 0: as before
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compile_model(model, backend="inductor", mode="default"):
    """torch.compile with static shapes: each stage (one token count, one per-stage batch under
    stratified sampling) compiles once, train and no-grad separately, and never again. The default
    recompile limit (8) would silently fall back to eager beyond 2 stages x 2 modes x 2 batch sizes.
    mode 'reduce-overhead' adds CUDA graphs: the 32 and 64 px stages (128 and 512 tokens through 28
    blocks at patch 4) are bound by kernel launches, which a graph replays in one call."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    return torch.compile(model, dynamic=False, backend=backend, mode=None if mode == "default" else mode)


class Meter:
    """Running sums of the log, all-reduced once per log interval. What the device computed (loss, grad
    norm, non-finite steps, per-stage loss sums) stays on the device; what the host already knows
    (steps, stage counts, training FLOPs = 3 x the analytic forward FLOPs of the stage mix drawn) is
    counted in Python. So add() neither reads the device nor copies to it."""

    def __init__(self, model, cdc_cfg, device, distributed):
        self.res, self.device, self.distributed, K = cdc_cfg.resolutions, device, distributed, cdc_cfg.K
        self.flops_of = [3.0 * model.flops_per_sample(r) for r in self.res]
        self.world = dist.get_world_size() if distributed else 1
        self.sums = torch.zeros(3 + K, dtype=torch.float64, device=device)
        self.host = [0.0] * (2 + K)  # steps, flops, counts per stage

    def add(self, out, gnorm, ok):
        cnt = out["stage_count"]
        self.host = [a + b for a, b in zip(self.host, [1, sum(c * f for c, f in zip(cnt, self.flops_of)), *cnt])]
        self.sums += torch.cat([out["loss"].detach().double().view(1), gnorm.detach().double().view(1),
                                (~ok).double().view(1), stage_sums(out).detach().double()])

    def reduce(self):
        s = torch.cat([self.sums, torch.tensor(self.host, dtype=torch.float64, device=self.device)])
        if self.distributed:
            dist.all_reduce(s)
        s, K = s.tolist(), len(self.res)
        return dict(loss=s[0], gnorm=s[1], nonfinite=s[2], stage_loss=s[3:3 + K], steps=s[3 + K], flops=s[4 + K],
                    count=s[5 + K:])

    def reset(self):
        self.sums.zero_()
        self.host = [0.0] * len(self.host)

    def line(self, s, dt, args, skipped):
        if self.distributed:
            t = torch.tensor([skipped], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            skipped = int(t.item())
        steps = s["steps"] / self.world
        per_stage = " ".join(f"{r}px {l / n:.4f}" if n else f"{r}px -" for r, l, n in zip(self.res, s["stage_loss"], s["count"]))
        perf = (f"MFU {s['flops'] / dt / self.world / (args.peak_tflops * 1e12) * 100:.1f}%"
                if self.device.type == "cuda" else f"{s['flops'] / dt / 1e9:.1f} GFLOP/s")
        return (f"loss {s['loss'] / s['steps']:.4f} ({per_stage}) grad_norm {s['gnorm'] / s['steps']:.3f} "
                f"{steps / dt:.2f} steps/s {steps * args.global_batch_size / dt:.1f} img/s {perf} "
                f"mem {peak_memory_gb(self.device):.2f}GB" + (f" skipped_images {skipped}" if skipped else ""))


# ------------------------------------------------------------------------------------------------
#                                             Flags
# ------------------------------------------------------------------------------------------------

# One layer of defaults: --preset fills every flag below that the user did not give (printed at start
# and in --help). Without --data-path the preset is the CPU demo, with it Table 7's ImageNet 256 recipe.
# demo, measured on a 2-core CPU (8 minutes of training each, EMA grids looked at): patch 4 leaves a
# visible token grid at these sizes, patch 2 does not; 3 stages at 16 px (4, 8, 16) learn slower than 2
# (8, 16); 32 px (8, 16, 32) gets only ~900 steps, too few for recognisable shapes. So the demo is a
# 2-stage, 16 px, patch-2 model (Table 6 also trains a K = 2 hierarchy) with a small batch and a high
# learning rate; the time limit keeps it under 10 minutes.
# imagenet256: Table 7 (XL, patch 4, 32 GPUs x 8 = 256 images per step, lr 1e-4).
# imagenet512 and imagenet64 are this repository's choices (the paper gives no recipe): see
# docs/recipes.md. 512: five stages, patch 8, so every stage above 32 px has the token count of the
# 256 recipe's stage below it; 64: two stages at patch 2 (256 and 1024 tokens).
AUTO = "auto"  # num_workers: one per core of this process's share of the machine, at most 8, one core left
_RECIPE = dict(model="XL", global_batch_size=256, lr=1e-4, max_steps=None, log_every=100, ckpt_every=50_000,
               sample_every=10_000, num_workers=AUTO, time_limit=None)
TRAIN_PRESETS = {
    "demo": dict(model="tiny", patch_size=2, image_size=16, resolutions="8,16", global_batch_size=16, lr=2e-3,
                 max_steps=4000, log_every=100, ckpt_every=500, sample_every=0, num_workers=0, time_limit=7.5),
    "imagenet256": dict(_RECIPE, patch_size=4, image_size=256, resolutions="32,64,128,256"),
    "imagenet512": dict(_RECIPE, patch_size=8, image_size=512, resolutions="32,64,128,256,512"),
    "imagenet64": dict(_RECIPE, patch_size=2, image_size=64, resolutions="32,64"),
}
PEAK_FLOPS = 989e12  # H100 SXM dense bf16 (the MFU denominator; --peak-tflops for other hardware)


def parse_list(text, name, kind=int):
    try:
        return tuple(kind(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list such as 32,64,128,256, got {text!r}") from None


def parse_resolutions(text, image_size):
    if text is not None:
        return parse_list(text, "--resolutions")
    res = [image_size]  # halve down to 32 (4 stages at 256, Table 7); images <= 32 px are one stage
    while res[0] // 2 >= 32 and res[0] % 2 == 0:
        res.insert(0, res[0] // 2)
    return tuple(res)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, or the values --preset gives it; never 'None'."""

    def _get_help_string(self, action):
        preset = {n: v[action.dest] for n, v in TRAIN_PRESETS.items() if action.dest in v}
        if preset:
            shown = ", ".join(f"{n} {default_workers() if v == AUTO else 'unset' if v is None else v}" for n, v in preset.items())
            return f"{action.help} (--preset: {shown})"
        return action.help if action.default is None else super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(description="Train CDC-FM. With no --data-path: the CPU demo on built-in shapes.",
                                formatter_class=_Help)
    a = p.add_argument
    a("--preset", type=str, default=None, choices=list(TRAIN_PRESETS),
      help="fills the flags you do not give (default: demo without --data-path, else imagenet256)")
    # data
    a("--data-path", type=str, default=None, help="ImageFolder-style directory or .npz (arr_0 uint8 NHWC, optional labels); none = built-in shapes")
    a("--center-crop", action="store_true", help="ADM-style centre crop instead of Table 7's 1.125x random crop")
    a("--num-classes", type=int, default=None, help="default: from the data")
    a("--num-workers", type=_workers, default=None, help="data loader workers per process")
    a("--no-hflip", action="store_true", help="no random horizontal flip (Table 7 flips; digits and text must not be)")
    a("--unconditional", action="store_true", help="ignore the labels: one null class (no CFG)")
    a("--dataset-size", type=int, default=20_000, help="built-in shapes only: number of images")
    # model and interpolant
    a("--model", type=str, default=None, choices=list(cdc.PRESETS), help="DiT size (Peebles & Xie Table 1)")
    a("--depth", type=int, default=None, help="override the DiT size's")
    a("--width", type=int, default=None, help="override the DiT size's")
    a("--heads", type=int, default=None, help="override the DiT size's")
    a("--patch-size", type=int, default=None, help="patch side p (Table 7: 4)")
    a("--fusion", type=str, default="xattn", choices=cdc.FUSIONS, help="resolution fusion: eqs. 41-44 or addition (Table 4)")
    a("--image-size", type=int, default=None, help="side of the training images (the last stage)")
    a("--resolutions", type=str, default=None, help="stage sides, each a power-of-two multiple of the last, e.g. "
      "32,64,128,256 or Table 6's 64,256; with --image-size alone: halve down to 32")
    a("--windows", type=str, default=None, help="stage time-window widths summing to 1, e.g. 0.2,0.3,0.5 (default equal)")
    a("--sigma", type=float, default=1.0, help="stage-1 source std (eq. 8)")
    a("--gamma", type=float, default=2.0, help="diminish factor, sigma_k = gamma^-(k-1) sigma (eq. 20)")
    a("--interpolant", type=str, default="linear", choices=cdc.INTERPOLANTS, help="Table 5")
    a("--loss-reduction", type=str, default="mean", choices=cdc.REDUCTIONS, help="per-sample loss over a stage's pixels: mean (every stage alike), sum (Alg. 1: a stage-k sample weighs d_k), scaled-sum (sum / d_K: Alg. 1's weights at mean's scale)")
    a("--stage-sampling", type=str, default="stratified", choices=cdc.STAGE_SAMPLINGS,
      help="stratified: fixed per-stage quotas, the same on every rank; iid: t ~ U[0,1] per sample (Alg. 1)")
    a("--class-dropout", type=float, default=0.1, help="label -> null class probability (eq. 74)")
    # optimisation
    a("--global-batch-size", type=int, default=None, help="images per step over all processes")
    a("--lr", type=float, default=None, help="AdamW learning rate")
    a("--beta1", type=float, default=0.9, help="AdamW (Table 7)")
    a("--beta2", type=float, default=0.95, help="AdamW (Table 7)")
    a("--eps", type=float, default=1e-6, help="AdamW (Table 7)")
    a("--weight-decay", type=float, default=0.0, help="AdamW")
    a("--grad-clip", type=float, default=1.0, help="gradient norm clip (Table 7)")
    a("--ema-decay", type=float, default=0.9999, help="Table 7")
    a("--ema-warmup", action=argparse.BooleanOptionalAction, default=True, help="decay min(ema, (1+t)/(10+t))")
    a("--precision", type=str, default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the network (static shapes: one graph per stage); default on with CUDA, off on CPU")
    a("--compile-mode", type=str, default="default", choices=COMPILE_MODES,
      help="reduce-overhead: CUDA graphs for the launch-bound small stages")
    a("--attention-backend", type=str, default="auto", choices=ATTENTION_BACKENDS,
      help="SDPA kernel; the log names the one that ran. XL's head dim 72 is padded to 96 by flash")
    a("--grad-accum", type=int, default=1, help="micro-batches per step (the global batch is unchanged)")
    a("--bucket-mb", type=float, default=25.0, help="DDP gradient bucket size in MB (all-reduce granularity)")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--epochs", type=int, default=200, help="passes over the data unless --max-steps")
    a("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    a("--threads", type=int, default=None, help="CPU only: intra-op threads (default: measured, the faster of 1 and all cores)")
    a("--time-limit", type=float, default=None, help="stop training (checkpoint, grid) after this many minutes")
    a("--global-seed", type=int, default=0, help="weights, data order, every random draw")
    # bookkeeping
    a("--results-dir", type=str, default="results", help="runs go to RESULTS_DIR/NNN-MODEL-SIZE")
    a("--log-every", type=int, default=None, help="steps between log lines")
    a("--ckpt-every", type=int, default=None, help="steps between checkpoints")
    a("--sample-every", type=int, default=None, help="EMA sample grid every N steps (0 = only at the end)")
    a("--resume", type=str, default=None, help="'auto' (newest checkpoint of this model/size, or start fresh) or a checkpoint/run dir")
    a("--cfg-scale", type=float, default=3.0, help="CFG scale of the sample grids")
    a("--sample-steps", type=int, default=24, help="steps per stage of the sample grids")
    a("--peak-tflops", type=float, default=PEAK_FLOPS / 1e12, help="accelerator peak for MFU (H100 bf16 dense: 989)")
    return p


def _workers(text):
    return text if text == AUTO else int(text)


def default_workers():
    """One loader worker per core of this process's share of the machine (torchrun's local processes
    share it), one core left for the training process itself, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def resolve_args(args, demo):
    """Fill the flags the user left at None from --preset (default: demo, or imagenet256 with data); validate."""
    args.preset = getattr(args, "preset", None) or ("demo" if demo else "imagenet256")
    filled = []
    for k, v in TRAIN_PRESETS[args.preset].items():
        if k == "resolutions" and args.image_size is not None and args.image_size != TRAIN_PRESETS[args.preset]["image_size"]:
            continue  # --image-size alone: the stages halve down to 32 from it (parse_resolutions)
        if getattr(args, k) is None and v is not None:
            setattr(args, k, default_workers() if v == AUTO else v)
            filled.append(f"{k}={getattr(args, k)}")
    if args.num_workers == AUTO:
        args.num_workers = default_workers()
    args.resolutions = parse_resolutions(args.resolutions, args.image_size)
    args.windows = None if args.windows is None else parse_list(args.windows, "--windows", float)
    if args.image_size != args.resolutions[-1]:
        raise ConfigError(f"--image-size {args.image_size} must equal the last of --resolutions {args.resolutions}")
    for name in ("global_batch_size", "log_every", "ckpt_every", "epochs", "grad_accum"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    return f"--preset {args.preset}: " + ", ".join(filled)


def build_model(args, num_classes):
    overrides = dict(num_classes=num_classes, resolutions=args.resolutions, fusion=args.fusion)
    overrides.update({k: getattr(args, k) for k in ("depth", "width", "heads", "patch_size") if getattr(args, k) is not None})
    try:
        return cdc.create_model(args.model, **overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_cdc_config(args):
    try:
        return cdc.CDCConfig(resolutions=args.resolutions, sigma=args.sigma, gamma=args.gamma,
                             windows=args.windows, interpolant=args.interpolant)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _prim(v):
    """Flag values as JSON/weights_only-safe primitives."""
    return list(v) if isinstance(v, tuple) else v


# ------------------------------------------------------------------------------------------------
#                                             Set-up
# ------------------------------------------------------------------------------------------------


def build_data(args, world, rank):
    kw = dict(size=args.dataset_size, num_classes=args.num_classes or 4) if args.data_path is None else {"hflip": not args.no_hflip}
    dataset = build_dataset(args.data_path, args.image_size, center_crop=args.center_crop, seed=args.global_seed, **kw)
    num_classes = dataset.num_classes if args.num_classes is None else args.num_classes
    if num_classes < dataset.num_classes:
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {dataset.num_classes} classes in the data")
    if args.unconditional:
        num_classes = 0  # every label becomes 0, the null class of a model with no classes
    order = DataOrder(len(dataset), world, rank, args.global_batch_size, seed=args.global_seed)
    if order.steps_per_epoch == 0:
        raise ConfigError(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.global_batch_size // world, sampler=order, num_workers=args.num_workers,
        drop_last=True, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator())  # else every new iterator draws its seed from the global RNG
    return dataset, num_classes, order, loader


def open_run(args, config, model, ema, opt, rank, world, distributed):
    """Resume (weights, EMA, optimiser, step, data position) or choose a new numbered run directory
    (DiT's results/000-XL-256 layout). --resume auto with no checkpoint yet reuses the newest run
    if it has none either (a run killed before its first save), instead of leaving empty runs behind.

    Rank 0 alone decides (which checkpoint, which directory) and every rank follows: ranks that looked
    for themselves could see different newest files (a results directory that is not shared, a file
    that fails to read on one node) and would silently train from different steps and Adam states. A
    rank that cannot read rank 0's choice stops the whole job with one line."""
    suffix = f"{args.model}-{args.image_size}"
    decision, ckpt = {"path": None, "run_dir": None, "note": None, "error": None}, None
    if rank == 0:
        try:
            found = find_resume(args.resume, args.results_dir, suffix) if args.resume else None
        except ConfigError as e:
            found, decision["error"] = None, str(e)
        if found is not None:
            ckpt, decision["path"] = found
            decision["run_dir"] = os.path.dirname(os.path.dirname(os.path.abspath(decision["path"])))
        elif decision["error"] is None:
            runs = find_runs(args.results_dir, suffix)
            if args.resume == "auto" and runs and not list_checkpoints(runs[-1]):
                decision["run_dir"] = runs[-1]
                decision["note"] = f"--resume auto: no checkpoint yet; reusing the empty run {runs[-1]}"
            else:
                idx = max([int(os.path.basename(r)[:3]) for r in glob.glob(os.path.join(args.results_dir, "[0-9]" * 3 + "-*"))] + [-1]) + 1
                decision["run_dir"] = os.path.join(args.results_dir, f"{idx:03d}-{suffix}")
    if distributed:
        holder = [decision]
        dist.broadcast_object_list(holder, src=0)
        decision = holder[0]
    if decision["error"]:
        raise ConfigError(decision["error"])
    path, run_dir, notes, step, epoch, pos = decision["path"], decision["run_dir"], [], 0, 0, 0
    if decision["note"]:
        notes.append(decision["note"])
    if path is not None:
        failure = None
        if ckpt is None:
            try:
                ckpt = load_checkpoint(path)
            except Exception as e:
                failure = f"{type(e).__name__}: {e}"
        if distributed:
            failures = [None] * world
            dist.all_gather_object(failures, failure)
            bad = [(r, f) for r, f in enumerate(failures) if f]
            if bad:
                raise ConfigError(f"rank {bad[0][0]} cannot read the checkpoint {path} that rank 0 resumes from "
                                  f"({bad[0][1]}); every rank must see the same file (a shared results directory)")
        elif failure:
            raise ConfigError(f"cannot load checkpoint {path} ({failure})")
        check_compatible(ckpt, config, path)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["step"])
        epoch, pos = ckpt["data"]["epoch"], ckpt["data"]["pos"]
        old = ckpt["args"]
        changed = [f"{k}: {old[k]} -> {_prim(v)}" for k, v in vars(args).items()
                   if k in old and k not in ("resume", "max_steps", "epochs") and _prim(v) != old[k]]
        notes.append(f"resumed from {path} at step {step} (epoch {epoch}, image {pos} of the epoch)"
                     + (f"; changed flags: {', '.join(changed)}" if changed else ""))
        if ckpt["rng"]["world_size"] != world:
            notes.append(f"the checkpoint was written by {ckpt['rng']['world_size']} process(es), this run has {world}: "
                         f"the data continues where it stopped, but per-rank noise differs; bit-exact resume needs the same world size")
    if rank == 0:
        for sub in ("checkpoints", "samples"):
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    return run_dir, step, epoch, pos, notes


def checkpoint_state(model, ema, opt, args, config, step, epoch, pos, world):
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "args": {k: _prim(v) for k, v in vars(args).items()}, "config": config, "step": step,
            "data": {"epoch": epoch, "pos": pos},  # images of this epoch already consumed (all ranks)
            # No RNG state: every draw of step s on rank r is seeded by step_seed(seed, r, s).
            "rng": {"scheme": "step_seed", "global_seed": args.global_seed, "world_size": world}}


def sampling_copy(ema, precision):
    """The network sampling runs: under bf16, a bf16 copy of the EMA made once. Autocast would otherwise
    re-cast every fp32 weight at every network evaluation: its weight cache serves only weights that
    require grad, and the EMA does not."""
    if precision != "bf16":
        return ema
    net = deepcopy(ema)
    for p in net.parameters():  # parameters only: the fixed position tables stay fp32
        p.data = p.data.to(torch.bfloat16)
    return net


@torch.no_grad()
def sample_grid(ema, cdc_cfg, args, device, path, stages_path=None):
    """EMA samples, one row per class (ImageNet: DiT's favourite classes), the same noise every time so
    grids compare across steps; optionally the Fig. 9 stage sheet of the first two rows."""
    nc, per = ema.config.num_classes, 8
    classes = [207, 360, 387, 974, 88, 979, 417, 279] if nc == 1000 else list(range(min(nc, 8)))
    y = torch.tensor([c for c in classes for _ in range(per)], device=device) if nc else None
    gen = torch.Generator(device).manual_seed(args.global_seed)
    net = sampling_copy(ema, args.precision)
    with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        stages = cdc.sample(cdc.guided_field(net, y, args.cfg_scale), cdc_cfg, per * len(classes) if nc else 4 * per,
                            channels=ema.config.in_channels, steps=args.sample_steps, generator=gen, device=device,
                            return_stages=True)
    save_grid(stages[-1], path, per)
    if stages_path:
        save_stage_sheet([s[::per // 2][:8] for s in stages], stages_path)


# ------------------------------------------------------------------------------------------------
#                                            Training
# ------------------------------------------------------------------------------------------------


def train(args):
    rank, world, device, distributed = setup_distributed()
    log = Logger(None, rank == 0)
    note = resolve_args(args, demo=args.data_path is None)
    if args.global_batch_size % (world * args.grad_accum):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} process(es) x "
                          f"--grad-accum {args.grad_accum} (equal micro-batches keep every shape static)")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    set_attention_backend(args.attention_backend)
    dataset, num_classes, order, loader = build_data(args, world, rank)
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * order.steps_per_epoch

    torch.manual_seed(args.global_seed)  # identical initial weights on every rank
    cdc_cfg, model = build_cdc_config(args), build_model(args, num_classes)
    config = {"model": dataclasses.asdict(model.config), "cdc": cdc_cfg.to_dict()}
    model.to(device)
    ema = deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, args)
    run_dir, step, epoch, pos, notes = open_run(args, config, model, ema, opt, rank, world, distributed)
    log.path = os.path.join(run_dir, "log.txt")

    threads = ""
    if device.type == "cpu":
        if args.threads is None and world == 1:
            n, measured = pick_threads(model, cdc_cfg, args, device, args.global_batch_size // args.grad_accum)
            threads = f"; {n} CPU thread(s), the faster measured ({measured}; --threads to fix it)"
        else:
            threads = f"; {torch.get_num_threads()} CPU thread(s)"
    log(f"run directory {run_dir}; {world} process(es) on {device.type}{threads}; {note}")
    for n in notes:
        log(n)
    log(f"data: {args.data_path or 'built-in shapes'}: {len(dataset)} images, {num_classes} classes; "
        f"{order.steps_per_epoch} steps/epoch, {total_steps} steps")
    log(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{json.dumps(config['model'])}; stages {cdc_cfg.resolutions}, {args.stage_sampling} stage sampling; "
        f"precision {args.precision}; compile {args.compile}" + (f" ({args.compile_mode})" if args.compile else "")
        + f"; {args.grad_accum} micro-batch(es) of {args.global_batch_size // world // args.grad_accum} per process; "
        f"attention kernel {attention_kernel(model, device, args.precision)}")
    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({k: _prim(v) for k, v in vars(args).items()}, f, indent=1)

    # The network as it runs: compiled and/or checkpointed, inside the DDP-wrapped objective.
    model.grad_checkpointing = args.grad_checkpointing
    net = compile_model(model, mode=args.compile_mode) if args.compile else model
    objective = Objective(net, cdc_cfg, args.class_dropout, args.loss_reduction, args.stage_sampling)
    if distributed:  # buckets are views of the gradients (no copy, less memory); see cdc.training_losses
        objective = nn.parallel.DistributedDataParallel(  # on why they fill during the largest stage
            objective, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=args.bucket_mb,
            gradient_as_bucket_view=True, broadcast_buffers=False)  # the only buffers are fixed position tables
    model.train()
    gen = torch.Generator()  # CPU generator of training_losses (iid timesteps)

    meter = Meter(model, cdc_cfg, device, distributed)
    t_start = t_last = time.time()
    last_ckpt = None
    while step < total_steps:
        order.set_position(epoch, pos)
        dataset.set_epoch(epoch)
        for x, y in loader:
            seed = step_seed(args.global_seed, rank, step)
            torch.manual_seed(seed)  # coupling noise (global RNG, on the device)
            # the iid timesteps' CPU generator: another seed, else it would replay the global RNG's first
            # uniforms (on the CPU, t would then equal the label coins and correlate with zeta)
            gen.manual_seed(step_seed(args.global_seed, rank, step, stream=1))
            x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)  # uint8 over the bus
            if num_classes == 0:
                y = torch.zeros_like(y)
            out, gnorm, ok = train_step(objective, model, ema, opt, x, y, gen, step, args)
            meter.add(out, gnorm, ok)
            step, pos = step + 1, pos + args.global_batch_size

            # rank 0's clock decides for everyone: every step alone, at log steps under DDP (a broadcast)
            if args.time_limit and (step % args.log_every == 0 or not distributed):
                stop = time.time() - t_start > 60 * args.time_limit
                if distributed:
                    flag = torch.tensor([float(stop)], device=device)
                    dist.broadcast(flag, src=0)
                    stop = bool(flag.item())
                if stop and step < total_steps:
                    log(f"--time-limit {args.time_limit} min reached: stopping at step {step} of {total_steps}")
                    total_steps = step
            is_log = step % args.log_every == 0 or step == total_steps
            is_ckpt = step % args.ckpt_every == 0 or step == total_steps
            if is_log or is_ckpt:
                sums = meter.reduce()
                if sums["nonfinite"] > 0:  # checked before any save: a checkpoint never holds a diverged model
                    die(f"the loss or the gradient is not finite (NaN or inf) at or before step {step}; stopping. "
                        f"The last good checkpoint is {last_ckpt or 'none (no checkpoint was written)'}")
                if is_log:
                    log(f"step {step:07d} " + meter.line(sums, time.time() - t_last, args, dataset.num_skipped))
                    meter.reset()
                    t_last = time.time()
                if is_ckpt:
                    last_ckpt = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
                    if rank == 0:
                        save_checkpoint(checkpoint_state(model, ema, opt, args, config, step, epoch, pos, world), last_ckpt)
                        log(f"saved checkpoint {last_ckpt}")
                    if distributed:
                        dist.barrier()
            if args.sample_every and step % args.sample_every == 0 and step != total_steps and rank == 0:
                sample_grid(ema, cdc_cfg, args, device, os.path.join(run_dir, "samples", f"{step:07d}.png"))
            if step >= total_steps:
                break
        else:  # the epoch is exhausted
            epoch, pos = epoch + 1, 0

    if rank == 0:
        grid, sheet = (os.path.join(run_dir, "samples", f"{step:07d}{s}.png") for s in ("", "_stages"))
        t0 = time.time()
        sample_grid(ema, cdc_cfg, args, device, grid, sheet)
        log(f"EMA sample grid {grid}, Fig. 9 stage sheet {sheet} ({time.time() - t0:.1f}s); done at step {step}")
    if distributed:
        dist.barrier()
        end_distributed()


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        train(args)
    except (DataError, ConfigError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
