"""
Speed of CDC-FM training and sampling on synthetic data, with train.py's flags and training step.

    python bench/speed.py --model XL --image-size 256 --batch 8 --precision bf16 [--compile]   # Table 7, per GPU
    python bench/speed.py --model tiny --patch-size 4 --image-size 32 --resolutions 8,16,32 --batch 32 --num-classes 4
    python bench/speed.py --world-size 2 --model tiny --image-size 32 --resolutions 8,16,32 --batch 8   # DDP, gloo

Prints, for one process:
  1. load balance of data-parallel training: the expected slowest-rank / mean FLOPs of one step over
     --world-size ranks of --batch images each, for i.i.d. stage draws (Alg. 1) and stratified quotas;
  2. training images/s, MFU (CUDA, from the analytic FLOPs of the stage mix actually drawn) and peak
     memory: the equal stage mix (stratified, then i.i.d.), then each resolution alone;
  3. sampling images/s (Euler, --sample-steps per stage, CFG --cfg-scale);
  4. with --max-batch on CUDA: the largest per-GPU batch of the stratified mix that fits in memory.

With --world-size N > 1 it instead times data-parallel steps of N processes on this machine (gloo on the
CPU, nccl on N GPUs), communication included: the DDP step, the same step without communication
(no_sync), the all-reduce of the whole gradient alone, hence how much of the all-reduce stays exposed
after the compute, for the stage order of cdc.forward_order (largest first) and for smallest first.
"""

import dataclasses
import os
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cdc  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from runs import ConfigError, die, peak_memory_gb  # noqa: E402


def load_balance(cdc_cfg, flops_of, world, batch, steps=2000, seed=0):
    """E[max over ranks of a step's FLOPs] / E[FLOPs of one rank's step], by simulating `steps` steps.
    DDP waits for the slowest rank, so this is the time a step takes relative to a perfectly balanced
    one (if time is proportional to FLOPs); 1.0 = no rank ever waits."""
    rng = np.random.default_rng(seed)
    w, f = cdc_cfg.widths().numpy(), np.asarray(flops_of, dtype=np.float64)
    mean_load = batch * float(w @ f)
    iid = rng.multinomial(batch, w, size=(steps, world)) @ f                       # (steps, world)
    strat = np.array([cdc.stage_quotas(cdc_cfg, batch, s) for s in range(steps)]) @ f  # same on every rank
    return iid.max(1).mean() / mean_load, strat.mean() / mean_load


def time_training(model, cdc_cfg, args, device, sampling, batch):
    """Images/s, FLOP/s and peak memory of train.train_step (the exact step train.py runs)."""
    net = train.compile_model(model) if args.compile else model
    objective = train.Objective(net, cdc_cfg, args.class_dropout, args.loss_reduction, sampling)
    ema, opt = deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)
    R, nc = cdc_cfg.resolutions[-1], model.config.num_classes
    x = torch.rand(batch, model.config.in_channels, R, R, device=device) * 2 - 1
    y = torch.randint(0, max(nc, 1), (batch,), device=device)
    gen, flops = torch.Generator().manual_seed(args.global_seed), 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.benchmark_steps + args.warmup_steps):  # warm-up: allocator, kernels, compilation
        if i == args.warmup_steps:
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, flops = time.time(), 0.0
        out, _, _ = train.train_step(objective, model, ema, opt, x, y, gen, i, args)
        flops += 3 * sum(n * model.flops_per_sample(r) for n, r in zip(out["stage_count"], cdc_cfg.resolutions))
    sync()
    dt = time.time() - t0
    return args.benchmark_steps * batch / dt, flops / dt, peak_memory_gb(device)


def _ddp_worker(rank, world, args, store):
    """One rank: per stage order, seconds per step with DDP, without communication, and of the
    all-reduce alone (the gradient as one flat tensor, which is what the buckets add up to)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or 1)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    cdc_cfg = train.build_cdc_config(args)
    torch.manual_seed(args.global_seed)
    model = train.build_model(args, 1000 if args.num_classes is None else args.num_classes).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    net = train.compile_model(model, mode=args.compile_mode) if args.compile else model
    ddp = torch.nn.parallel.DistributedDataParallel(
        train.Objective(net, cdc_cfg, args.class_dropout, args.loss_reduction, args.stage_sampling),
        device_ids=[rank] if cuda else None, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True,
        broadcast_buffers=False)
    ema, opt = deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)
    R, nc = cdc_cfg.resolutions[-1], model.config.num_classes
    x = torch.rand(args.batch, model.config.in_channels, R, R, device=device) * 2 - 1
    y = torch.randint(0, max(nc, 1), (args.batch,), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # When each bucket is launched: before or after the largest stage's backward has passed its patch
    # embedding (the last layer the gradient reaches in that stage)
    marks, n_buckets = [], 0

    def on_bucket(state, bucket):
        marks.append(("bucket", bucket.buffer().numel()))
        return default_hooks.allreduce_hook(None, bucket)
    ddp.register_comm_hook(None, on_bucket)

    def top_stage_done(module, inputs, out):
        if inputs[0].shape[-1] == R:
            out.register_hook(lambda g: marks.append(("top done", 0)))
    model.x_embedder.register_forward_hook(top_stage_done)

    def backward_starts(module, inputs, out):  # the loss's gradient is the first one computed
        out["loss"].register_hook(lambda g: marks.append(("start", 0)))
    ddp.register_forward_hook(backward_starts)

    def early_share():
        """Share of the gradient (elements) whose all-reduce launches before the largest stage's backward ends."""
        nonlocal n_buckets
        early = total = 0
        starts = [i for i, (kind, _) in enumerate(marks) if kind == "start"] + [len(marks)]
        for lo, hi in zip(starts, starts[1:]):
            step = marks[lo:hi]
            end = next(i for i, (kind, _) in enumerate(step) if kind == "top done")
            early += sum(n for i, (kind, n) in enumerate(step) if kind == "bucket" and i < end)
            total += sum(n for kind, n in step if kind == "bucket")
            n_buckets = sum(kind == "bucket" for kind, _ in step)
        return early / max(total, 1)

    def seconds_per_step(communicate):
        for i in range(args.warmup_steps + args.benchmark_steps):
            if i == args.warmup_steps:
                sync()
                dist.barrier()
                t0 = time.perf_counter()
            if communicate:
                train.train_step(ddp, model, ema, opt, x, y, None, i, args)
            else:
                with ddp.no_sync():
                    train.train_step(ddp, model, ema, opt, x, y, None, i, args)
        sync()
        return (time.perf_counter() - t0) / args.benchmark_steps

    flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
    for _ in range(args.warmup_steps):
        dist.all_reduce(flat)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.benchmark_steps):
        dist.all_reduce(flat)
    sync()
    comm = (time.perf_counter() - t0) / args.benchmark_steps
    results, order = {}, cdc.forward_order
    for name, fn in (("largest first", order), ("smallest first", lambda K: range(K))):
        cdc.forward_order = fn
        marks.clear()
        ddp_s = seconds_per_step(True)
        share = early_share()
        results[name] = (ddp_s, seconds_per_step(False), share)
    cdc.forward_order = order
    times = torch.tensor([[comm] + [v for r in results.values() for v in r[:2]]], dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
    if rank == 0:
        t = times[0].tolist()
        comm = t[0]
        where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} thread(s) per process"
        print(f"{world} processes ({'nccl' if cuda else 'gloo'}; {where}), {args.batch} images per process, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n_buckets} buckets of <= {args.bucket_mb} MB; "
              f"all-reduce of the whole gradient alone: {comm * 1e3:.1f} ms")
        for i, name in enumerate(results):
            ddp_s, compute_s = t[1 + 2 * i], t[2 + 2 * i]
            exposed = max(ddp_s - compute_s, 0.0)
            print(f"stages {name:>14}: {results[name][2] * 100:5.1f}% of the gradient launches its all-reduce before the "
                  f"largest stage's backward ends; DDP step {ddp_s * 1e3:7.1f} ms, without communication {compute_s * 1e3:7.1f} ms: "
                  f"exposed communication {exposed * 1e3:6.1f} ms = {exposed / comm * 100:5.1f}% of the all-reduce alone", flush=True)
    runs.end_distributed()  # not a plain destroy: see its docstring


def main():
    p = train.get_parser()
    p.description = "Speed of training and sampling (synthetic data, one process)."
    p.add_argument("--batch", type=int, default=8, help="images per step of this process (Table 7: 8 per GPU)")
    p.add_argument("--world-size", type=int, default=1, help="> 1: time DDP steps of this many processes, communication included")
    p.add_argument("--balance-ranks", type=int, default=32, help="ranks for the load-balance estimate (Table 7: 32)")
    p.add_argument("--benchmark-steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--max-batch", action="store_true", help="CUDA: also find the largest per-GPU batch that fits")
    p.add_argument("--load-balance", action="store_true", help="only the load-balance simulation (any model on any machine)")
    args = p.parse_args()
    try:
        train.resolve_args(args, demo=False)
        cdc_cfg = train.build_cdc_config(args)
        with torch.device("meta" if args.load_balance else "cpu"):  # meta: shapes and FLOPs, no memory
            model = train.build_model(args, 1000 if args.num_classes is None else args.num_classes)
    except ConfigError as e:
        die(str(e))
    flops_of = [model.flops_per_sample(r) for r in cdc_cfg.resolutions]
    if args.load_balance:
        print(f"{args.model}, stages {cdc_cfg.resolutions}, windows {cdc_cfg.widths().tolist()}: training TFLOP per image "
              f"{', '.join(f'{3 * f / 1e12:.3g}' for f in flops_of)}")
        for world, batch in sorted({(args.balance_ranks, args.batch), (32, 8), (8, 32)}):
            iid, strat = load_balance(cdc_cfg, flops_of, world, batch)
            print(f"load balance {world:>3} ranks x {batch:>3} images: slowest rank / mean FLOPs per step: "
                  f"iid {iid:.2f}x, stratified {strat:.2f}x")
        return
    if args.world_size > 1:
        if torch.cuda.is_available() and torch.cuda.device_count() < args.world_size:
            die(f"--world-size {args.world_size} needs as many GPUs; {torch.cuda.device_count()} found")
        args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
        args.compile = torch.cuda.is_available() if args.compile is None else args.compile
        with __import__("tempfile").TemporaryDirectory() as d:
            mp.spawn(_ddp_worker, args=(args.world_size, args, os.path.join(d, "store")), nprocs=args.world_size, join=True)
        return
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    torch.manual_seed(args.global_seed)
    model.to(device).grad_checkpointing = args.grad_checkpointing
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}: {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters, stages "
          f"{cdc_cfg.resolutions}, training GFLOP per image {', '.join(f'{3 * f / 1e9:.2f}' for f in flops_of)}; "
          f"{args.batch} images/step, {args.precision}, compile={args.compile}, "
          f"grad_checkpointing={args.grad_checkpointing}; {where}")

    for world, batch in sorted({(args.balance_ranks, args.batch), (32, 8), (8, 32)}):
        iid, strat = load_balance(cdc_cfg, flops_of, world, batch)
        print(f"load balance {world:>3} ranks x {batch:>3} images: slowest rank / mean FLOPs per step: "
              f"iid {iid:.2f}x, stratified {strat:.2f}x")

    mixes = [(f"equal mix {'/'.join(map(str, cdc_cfg.resolutions))}, {s}", cdc_cfg, s) for s in cdc.STAGE_SAMPLINGS]
    mixes += [(f"{r}px only", dataclasses.replace(cdc_cfg, resolutions=(r,), windows=None), "stratified")
              for r in cdc_cfg.resolutions]
    peak = args.peak_tflops * 1e12
    for name, cfg, sampling in mixes:
        img_s, flop_s, mem = time_training(model, cfg, args, device, sampling, args.batch)
        perf = f"MFU {flop_s / peak * 100:5.1f}%" if device.type == "cuda" else f"{flop_s / 1e9:7.1f} GFLOP/s"
        print(f"train  {name:>34}: {img_s:8.2f} img/s  {perf}  peak mem {mem:.2f} GB", flush=True)

    model.eval()
    n, nc = args.batch, model.config.num_classes
    y = torch.randint(0, max(nc, 1), (n,), device=device) if nc else None
    net = train.compile_model(model) if args.compile else model
    field, gen = cdc.guided_field(net, y, args.cfg_scale), torch.Generator(device).manual_seed(0)
    nfe = 1 if y is None or args.cfg_scale == 1 else 2
    with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        cdc.sample(field, cdc_cfg, n, steps=1, generator=gen, device=device)  # warm-up
        t0 = time.time()
        cdc.sample(field, cdc_cfg, n, steps=args.sample_steps, generator=gen, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    dt = time.time() - t0
    print(f"sample {n} images, {args.sample_steps} Euler steps/stage, CFG {args.cfg_scale} ({nfe} NFE/step): "
          f"{n / dt:.2f} img/s, peak mem {peak_memory_gb(device):.2f} GB")

    if args.max_batch and device.type == "cuda":
        model.train()
        fits, b = args.batch, args.batch
        while True:
            b *= 2
            try:
                time_training(model, cdc_cfg, args, device, "stratified", b)
                fits = b
            except torch.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        print(f"largest per-GPU batch (powers of two from {args.batch}) that fits: {fits}")


if __name__ == "__main__":
    main()
