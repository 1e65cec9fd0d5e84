"""
Sample a trained CDC-FM model. Like DiT's sample_ddp.py: every process writes PNGs, then rank 0 packs them
into one .npz (arr_0: uint8 NHWC, the ADM evaluator's format) and, with --fid-ref, evaluates it as
`python fid.py calc` does (FID / sFID / precision / recall, written to <npz name>_fid.json).

    python sample.py --ckpt results/000-tiny-16 --num-fid-samples 64
    torchrun --nproc_per_node 8 sample.py --ckpt results/000-XL-256 --num-fid-samples 50000 \
        --fid-ref VIRTUAL_imagenet256_labeled.npz       # ADM's reference batch, or one from `fid.py ref`
    python fid.py calc --images samples/NAME.npz --ref VIRTUAL_imagenet256_labeled.npz   # again, later
"""

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import cdc
import fid
from data import DataError, save_stage_sheet, to_uint8
from runs import ConfigError, die, end_distributed, list_checkpoints, load_checkpoint, setup_distributed
from train import compile_model, sampling_copy

# ------------------------------------------------------------------------------------------------
#                                        Sampling
# ------------------------------------------------------------------------------------------------


def load_model(path, use_ema=True):
    """(model, CDCConfig, checkpoint args) from a checkpoint file or a run directory (newest in it)."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise ConfigError(f"--ckpt {path}: no checkpoints/NNNNNNN.pt in that run directory")
        path = found[0]
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt {path} does not exist")
    try:
        ckpt = load_checkpoint(path)
        model = cdc.DiT(cdc.DiTConfig(**ckpt["config"]["model"]))
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
        cdc_cfg = cdc.CDCConfig(**ckpt["config"]["cdc"])
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {path} ({type(e).__name__}: {e})") from None
    return model.eval(), cdc_cfg, ckpt["args"], path


def parse_ints(text, name):
    try:
        return [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{name} must be an int or comma-separated ints, got {text!r}") from None


def batch_generator(seed, batch_index, device="cpu"):
    """The noise of global batch b depends only on (seed, b): the same images whatever the number of
    processes, and any batch can be regenerated alone. The generator lives on the sampling device, so
    noise is drawn where it is used (no host draw and blocking copy per stage); images from the same
    seed therefore depend on the device type (CPU vs CUDA), not on the number of processes."""
    s = int(np.random.SeedSequence((seed, batch_index)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(s)


def batch_labels(b, n, num_classes, class_labels, gen):
    if num_classes == 0:
        return None
    if class_labels:
        return torch.tensor([class_labels[(b * n + j) % len(class_labels)] for j in range(n)])
    return torch.randint(num_classes, (n,), generator=gen, device=gen.device)


def generate(args, rank, world, device, distributed):
    """Every process samples its batches to PNGs; rank 0 then packs them into one .npz and, with --fid-ref,
    evaluates it. Returns the .npz path (on rank 0; the other ranks exit). Right after sampling every rank
    leaves the process group, together (with NCCL that may be collective), and the ranks other than 0 exit:
    none waits in a collective while rank 0 packs 50k images and extracts their features (an NCCL
    collective would time out after 10 minutes)."""
    model, cdc_cfg, train_args, ckpt_path = load_model(args.ckpt, use_ema=not args.no_ema)
    model.to(device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    net = sampling_copy(model, precision)  # bf16 weights cast once, not at every network evaluation
    net = compile_model(net) if (device.type == "cuda" if args.compile is None else args.compile) else net
    steps = parse_ints(args.steps_per_stage, "--steps-per-stage")
    steps = steps[0] if len(steps) == 1 else steps
    try:
        cdc.steps_per_stage(steps, cdc_cfg.K)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    num_classes = model.config.num_classes
    class_labels = parse_ints(args.class_labels, "--class-labels") if args.class_labels else None
    if class_labels and (min(class_labels) < 0 or max(class_labels) >= max(num_classes, 1)):
        raise ConfigError(f"--class-labels must lie in [0, {num_classes})")
    if args.fid_ref:  # a reference that cannot be used stops the run (every rank) before sampling, not after
        fid.check_reference(fid.load_reference(args.fid_ref), cdc_cfg.resolutions[-1])

    name = (f"{os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))))}-"
            f"{os.path.splitext(os.path.basename(ckpt_path))[0]}-{'ema' if not args.no_ema else 'raw'}-"
            f"cfg{args.cfg_scale}-{args.solver}-steps{args.steps_per_stage.replace(',', '_')}-seed{args.seed}")
    folder = os.path.join(args.sample_dir, name)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        print(f"sampling {args.num_fid_samples} images from {ckpt_path} into {folder} "
              f"({world} process(es), {precision}, cfg {args.cfg_scale}, {args.solver}, steps {steps})", flush=True)
    if distributed:
        dist.barrier()

    n = args.per_proc_batch_size
    n_batches = math.ceil(args.num_fid_samples / n)
    mine = range(rank, n_batches, world)  # batch b holds images b*n ... b*n + n - 1
    progress = fid.Progress(args.num_fid_samples, f"sampled (rank 0 x {world})" if world > 1 else "sampled",
                            args.progress_every) if rank == 0 else None
    t0, made = time.time(), 0
    for j, b in enumerate(mine):
        gen = batch_generator(args.seed, b, device)
        y = batch_labels(b, n, num_classes, class_labels, gen)
        field = cdc.guided_field(net, None if y is None else y.to(device), args.cfg_scale)
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            out = cdc.sample(field, cdc_cfg, n, channels=model.config.in_channels, steps=steps, solver=args.solver,
                             sde_scale=args.sde_scale, generator=gen, device=device,
                             return_stages=args.save_stages and b == 0)
        if args.save_stages and b == 0:
            save_stage_sheet([s[:8].float().cpu() for s in out], folder + "_stages.png")
            out = out[-1]
        x = to_uint8(out).numpy()
        for j2 in range(n):
            i = b * n + j2
            if i < args.num_fid_samples:
                Image.fromarray(x[j2]).save(os.path.join(folder, f"{i:06d}.png"))
                made += 1
        if progress:  # rank 0's count times the number of processes: every rank runs at about its pace
            progress.update(0, done=min(made * world, args.num_fid_samples))
    dt = time.time() - t0
    if distributed:
        t = torch.tensor([made], dtype=torch.float64, device=device)
        dist.all_reduce(t)  # also: every rank has written all its PNGs
        made = int(t.item())
        if rank != 0:
            end_distributed()  # leaves the group and exits (not a plain destroy: see its docstring)
        dist.destroy_process_group()  # rank 0, with the others; it goes on alone
    print(f"{made} images in {dt:.1f}s: {made / dt:.2f} images/s", flush=True)

    # Pack the PNGs (what was actually written, exactly as an evaluator reads them) into one npz. The
    # array is allocated once and filled in place: one copy of 50k images in memory, not two.
    first = np.asarray(Image.open(os.path.join(folder, f"{0:06d}.png")).convert("RGB"))
    images = np.empty((args.num_fid_samples, *first.shape), np.uint8)
    packing = fid.Progress(args.num_fid_samples, "packed", args.progress_every)
    for i in range(args.num_fid_samples):
        with Image.open(os.path.join(folder, f"{i:06d}.png")) as im:
            images[i] = np.asarray(im.convert("RGB"))
        packing.update(1)
    extra = {}
    if num_classes:
        labels = [batch_labels(b, n, num_classes, class_labels, batch_generator(args.seed, b, device)).cpu().numpy()
                  for b in range(n_batches)]
        extra["labels"] = np.concatenate(labels)[:args.num_fid_samples]
    np.savez(folder + ".npz", arr_0=images, **extra)
    print(f"saved {folder}.npz: arr_0 {images.dtype} {images.shape}", flush=True)
    if args.fid_ref:
        fid.calc(images, args.fid_ref, folder + "_fid.json", device, args.fid_batch_size,
                 args.progress_every, extra={"images": os.path.abspath(folder + ".npz"), "ckpt": ckpt_path,
                                             "sampling_seconds": dt})
    return folder + ".npz"


def get_parser():
    p = argparse.ArgumentParser(description="Sample CDC-FM (and evaluate the samples, as fid.py calc does).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--ckpt", type=str, default=None, help="checkpoint file or run directory (newest checkpoint)")
    a("--no-ema", action="store_true", help="sample the raw weights instead of the EMA")
    a("--sample-dir", type=str, default="samples")
    a("--per-proc-batch-size", type=int, default=32)
    a("--num-fid-samples", type=int, default=50_000)
    a("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale S (1 = none)")
    a("--steps-per-stage", type=str, default="24", help="one int, or one per stage: 12,12,24,24")
    a("--solver", type=str, default="euler", choices=cdc.SOLVERS)
    a("--sde-scale", type=float, default=1.0, help="--solver sde: noise scale")
    a("--class-labels", type=str, default=None, help="comma-separated labels to cycle through (default: uniform)")
    a("--seed", type=int, default=0)
    a("--save-stages", action="store_true", help="also save a Fig. 9 sheet of every stage and its added detail")
    a("--precision", type=str, default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the network (static shapes: one graph per stage); default on with CUDA")
    a("--progress-every", type=float, default=30.0, help="seconds between progress lines (sampling, features)")
    # evaluation after sampling (fid.py calc evaluates any .npz or folder; fid.py ref makes references)
    a("--fid-ref", type=str, default=None, help="reference .npz: ADM's reference batch, or one made by `fid.py ref`")
    a("--fid-batch-size", type=int, default=100)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, device, distributed = setup_distributed()
    try:
        if args.fid_batch_size < 1 or args.progress_every <= 0 or args.sde_scale < 0:
            raise ConfigError("--fid-batch-size must be >= 1, --progress-every > 0 and --sde-scale >= 0")
        if not args.ckpt:
            raise ConfigError("nothing to do: pass --ckpt (to evaluate or make references: python fid.py calc / ref)")
        if args.per_proc_batch_size < 1 or args.num_fid_samples < 1:
            raise ConfigError("--per-proc-batch-size and --num-fid-samples must be >= 1")
        generate(args, rank, world, device, distributed)
    except (ConfigError, DataError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
