"""
Sample a trained CDC-FM model, and compute FID. Like DiT's sample_ddp.py: every process writes PNGs,
then rank 0 packs them into one .npz (arr_0: uint8 NHWC, the ADM evaluator's format).

    python sample.py --ckpt results/000-tiny-32/checkpoints/0001000.pt --num-fid-samples 64
    torchrun --nproc_per_node 8 sample.py --ckpt results/000-XL-256/checkpoints/1000000.pt \
        --num-fid-samples 50000 --fid-ref imagenet256_ref.npz --detector inception-2015-12-05.pkl
    python sample.py --make-ref /imagenet/train --image-size 256 --detector inception-2015-12-05.pkl \
        --ref-out imagenet256_ref.npz

FID: the detector is a file the user supplies (nothing is downloaded): a pickled TorchScript module
or a torch.jit.save'd one, called as detector(uint8 NCHW images, return_features=True) -> (N, D)
features, which is the Inception format EDM and StyleGAN3 use. Reference statistics are an .npz with
`mu` and `sigma`. Loading a pickle runs code from it: use detectors you trust.
"""

import argparse
import json
import math
import os
import pickle
import time

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
from PIL import Image

import cdc
from data import DataError, build_dataset, save_stage_sheet, to_uint8
from runs import ConfigError, die, list_checkpoints, load_checkpoint, setup_distributed
from train import compile_model

# ------------------------------------------------------------------------------------------------
#                                        FID
# ------------------------------------------------------------------------------------------------


def feature_stats(features):
    """Mean and covariance (unbiased, as in the ADM and StyleGAN evaluators) of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product (fewer samples than dimensions): regularise
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical noise makes tiny imaginary parts
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_detector(path, device):
    """A TorchScript archive (torch.jit.save) or a pickle that unpickles to a callable module."""
    if not os.path.isfile(path):
        raise ConfigError(f"--detector {path} does not exist (download the Inception pickle yourself; "
                          f"this code never downloads)")
    try:
        with open(path, "rb") as f:
            is_archive = f.read(4) == b"PK\x03\x04"  # torch.jit.save writes a zip; a pickle may embed one
        if is_archive:
            det = torch.jit.load(path, map_location=device)
        else:
            with open(path, "rb") as f:
                det = pickle.load(f)
        return det.to(device).eval()
    except Exception as e:
        raise ConfigError(f"cannot load detector {path} ({type(e).__name__}: {e})") from None


@torch.no_grad()
def detector_features(detector, batches, device):
    """Features of uint8 NHWC numpy batches -> (N, D) float64."""
    out = []
    for b in batches:
        x = torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2).to(device)
        try:
            f = detector(x, return_features=True)
        except (TypeError, RuntimeError):
            f = detector(x)
        out.append(f.reshape(len(b), -1).double().cpu().numpy())
    return np.concatenate(out)


def npz_batches(images, batch_size):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def load_ref(path):
    try:
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    except Exception as e:
        raise ConfigError(f"cannot read reference statistics {path}: it must be an .npz with mu and sigma "
                          f"({type(e).__name__}: {e})") from None


def make_reference(args, device):
    """Statistics of a data set (ImageFolder or .npz), seen as the model sees it at evaluation:
    shorter side resized to --image-size and centre-cropped, no flip."""
    detector = load_detector(args.detector, device)
    ds = build_dataset(args.make_ref, args.image_size, train=False)
    n = len(ds) if args.num_ref is None else min(args.num_ref, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=args.fid_batch_size,
                                         num_workers=args.num_workers)
    to_uint8 = (((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy() for x, _ in loader)
    mu, sigma = feature_stats(detector_features(detector, to_uint8, device))
    np.savez(args.ref_out, mu=mu, sigma=sigma)
    print(f"reference statistics of {n} images of {args.make_ref} -> {args.ref_out} "
          f"(skipped unreadable: {ds.num_skipped})")


def fid_of_images(images, args, device):
    mu_ref, sigma_ref = load_ref(args.fid_ref)
    detector = load_detector(args.detector, device)
    mu, sigma = feature_stats(detector_features(detector, npz_batches(images, args.fid_batch_size), device))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


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
    model, cdc_cfg, train_args, ckpt_path = load_model(args.ckpt, use_ema=not args.no_ema)
    model.to(device)
    net = compile_model(model) if args.compile else model
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
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")

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
    t0, made = time.time(), 0
    for b in range(rank, n_batches, world):  # batch b holds images b*n ... b*n + n - 1
        gen = batch_generator(args.seed, b, device)
        y = batch_labels(b, n, num_classes, class_labels, gen)
        field = cdc.guided_field(net, None if y is None else y.to(device), args.cfg_scale)
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            out = cdc.sample(field, cdc_cfg, n, channels=model.config.in_channels, steps=steps, solver=args.solver,
                             sde_scale=args.sde_scale, generator=gen, device=device, return_stages=args.save_stages and b == 0)
        if args.save_stages and b == 0:
            save_stage_sheet([s[:8].float().cpu() for s in out], folder + "_stages.png")
            out = out[-1]
        x = to_uint8(out).numpy()
        for j in range(n):
            i = b * n + j
            if i < args.num_fid_samples:
                Image.fromarray(x[j]).save(os.path.join(folder, f"{i:06d}.png"))
                made += 1
    dt = time.time() - t0
    if distributed:
        t = torch.tensor([made], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        made = int(t.item())
        dist.barrier()
    if rank != 0:
        return
    print(f"{made} images in {dt:.1f}s: {made / dt:.2f} images/s", flush=True)

    # Pack the PNGs (what was actually written, exactly as an evaluator will read them) into one npz.
    images = np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB"))
                       for i in range(args.num_fid_samples)])
    extra = {}
    if num_classes:
        extra["labels"] = np.concatenate([batch_labels(b, n, num_classes, class_labels, batch_generator(args.seed, b, device)).cpu().numpy()
                                          for b in range(n_batches)])[:args.num_fid_samples]
    np.savez(folder + ".npz", arr_0=images, **extra)
    print(f"saved {folder}.npz: arr_0 {images.dtype} {images.shape}", flush=True)
    if args.fid_ref:
        fid = fid_of_images(images, args, device)
        print(f"FID {fid:.4f} ({len(images)} samples vs {args.fid_ref})", flush=True)
        with open(folder + "_fid.json", "w") as f:
            json.dump({"fid": fid, "num_samples": len(images), "ref": args.fid_ref, "ckpt": ckpt_path}, f)


def get_parser():
    p = argparse.ArgumentParser(description="Sample CDC-FM and compute FID.",
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
    a("--compile", action="store_true", help="torch.compile the network (static shapes: one graph per stage)")
    # FID
    a("--fid-ref", type=str, default=None, help="reference statistics .npz (mu, sigma)")
    a("--detector", type=str, default=None, help="feature detector: pickled or saved TorchScript (e.g. Inception)")
    a("--fid-batch-size", type=int, default=100)
    a("--images", type=str, default=None, help="FID of an existing .npz of samples (arr_0) instead of sampling")
    a("--make-ref", type=str, default=None, help="compute reference statistics of this data set (folder or .npz)")
    a("--ref-out", type=str, default="fid_ref.npz")
    a("--image-size", type=int, default=256, help="--make-ref: resize/crop size")
    a("--num-ref", type=int, default=None, help="--make-ref: use only the first N images")
    a("--num-workers", type=int, default=4)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, device, distributed = setup_distributed()
    try:
        if args.fid_ref and not args.detector or args.make_ref and not args.detector:
            raise ConfigError("FID needs --detector (a feature network file you supply)")
        if args.make_ref:
            if rank == 0:
                make_reference(args, device)
        elif args.images:
            if not args.fid_ref:
                raise ConfigError("--images needs --fid-ref and --detector")
            if rank == 0:
                try:
                    with np.load(args.images) as f:
                        images = f["arr_0"]
                except Exception as e:
                    raise DataError(f"cannot read arr_0 of {args.images} ({type(e).__name__}: {e})") from None
                print(f"FID {fid_of_images(images, args, device):.4f} ({len(images)} samples of {args.images} vs {args.fid_ref})")
        elif args.ckpt:
            if args.per_proc_batch_size < 1 or args.num_fid_samples < 1:
                raise ConfigError("--per-proc-batch-size and --num-fid-samples must be >= 1")
            generate(args, rank, world, device, distributed)
        else:
            raise ConfigError("nothing to do: pass --ckpt (sample), --images (FID of samples) or --make-ref")
    except (ConfigError, DataError) as e:
        die(str(e))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
