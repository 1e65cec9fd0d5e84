"""
Train CDC-FM (cdc.py) on one CPU, one GPU, or many GPUs on many nodes.

    python train.py                                            # CPU demo: tiny DiT on built-in shapes
    torchrun --nnodes 4 --nproc_per_node 8 train.py --data-path /imagenet/train --model XL --image-size 256

The script reads top to bottom like DiT's train.py: data, then the objective, then checkpoints and
logging, then main(). Every flag defaults to the paper's recipe (Table 7) except where the CPU demo has
to differ; those demo values are listed in DEMO_DEFAULTS and printed at start.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
import zipfile
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw

import cdc

# ------------------------------------------------------------------------------------------------
#                                             Data
# ------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A problem with --data-path that the user has to fix (reported as one line, no traceback)."""


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
EXPAND_RATIO = 1.125  # Table 7: resize the shorter side to 1.125 x image size, then crop


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK... -> RGB. Transparent pixels are composited onto white: a plain
    convert('RGB') would expose whatever colour the encoder left under alpha = 0 (often black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float32 (3, H, W) in [-1, 1] (Table 7: normalise with mean = std = 0.5)."""
    a = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], 3)
    return torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0)


def random_crop_arr(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Table 7: shorter side -> 1.125 x size (LANCZOS), then a uniformly random size x size crop."""
    target = round(size * EXPAND_RATIO)
    w, h = img.size
    s = target / min(w, h)
    img = img.resize((max(target, round(w * s)), max(target, round(h * s))), Image.LANCZOS)
    w, h = img.size
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return img.crop((x, y, x + size, y + size))


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (what DiT uses): halve with BOX while the image is >= 2x too large (cheap
    antialiasing), BICUBIC to the final scale, then crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), Image.BOX)
    s = size / min(img.size)
    img = img.resize(tuple(max(size, round(x * s)) for x in img.size), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_center(img: Image.Image, size: int) -> Image.Image:
    """Deterministic evaluation view: shorter side -> size (LANCZOS), centre crop."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


class _ImageDataset(torch.utils.data.Dataset):
    """Shared transform for folder and npz data.

    Augmentation randomness comes from a generator seeded by (seed, epoch, index), never from a
    global RNG: the same sample gets the same crop and flip whichever worker loads it, which is what
    makes a resumed run bit-identical to an uninterrupted one. Call set_epoch() like the sampler's.
    """

    def __init__(self, image_size, train, center_crop, seed):
        self.image_size, self.train, self.center_crop, self.seed = image_size, train, center_crop, seed
        self.epoch = 0
        # Shared memory, so that DataLoader workers' increments are visible to the main process.
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def num_skipped(self) -> int:
        """How many unreadable or truncated images were skipped so far (by this process's loaders)."""
        return int(self._skipped.item())

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def transform(self, img: Image.Image, index: int) -> torch.Tensor:
        img = to_rgb(img)
        if not self.train:
            return to_tensor(resize_center(img, self.image_size))
        rng = np.random.default_rng((self.seed, self.epoch, index))
        img = center_crop_arr(img, self.image_size) if self.center_crop else random_crop_arr(img, self.image_size, rng)
        if rng.random() < 0.5:  # Table 7: RandomHorizontalFlip
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)


class ImageFolderDataset(_ImageDataset):
    """ImageFolder layout: root/<class>/**/<image>; labels are the sorted class-directory names.
    A folder of images with no class sub-directories is one unlabelled class."""

    def __init__(self, root, image_size, train=True, center_crop=False, seed=0):
        super().__init__(image_size, train, center_crop, seed)
        self.root = root
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        self.samples = []
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                dirnames.sort()
                self.samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                                 if f.lower().endswith(IMG_EXTENSIONS)]
        self.classes = classes
        self.num_classes = len(classes)
        if not self.samples:  # no class directories with images: a flat folder, unconditional
            self.samples = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root))
                            if f.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(os.path.join(root, f))]
            self.classes, self.num_classes = [], 0  # label 0 is then the model's null class
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        # A broken file must not kill a multi-day run: count it and serve the next readable image.
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    img.load()  # decode now, so truncated files fail here and not later
                    return self.transform(img, index), label
            except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                self._skipped += 1
        raise DataError(f"no readable image in {self.root}")


class NpzDataset(_ImageDataset):
    """arr_0: uint8 (N, H, W, C) with C in {1, 3, 4} (the ADM / DiT sample format); optional labels."""

    def __init__(self, path, image_size, train=True, center_crop=False, seed=0):
        super().__init__(image_size, train, center_crop, seed)
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is not an .npz archive (expected np.savez output with arr_0)")
        try:
            with np.load(path) as f:
                if "arr_0" not in f.files:
                    raise DataError(f"{path} has no 'arr_0' array (found: {', '.join(f.files) or 'nothing'})")
                self.images = f["arr_0"]
                labels = f["labels"] if "labels" in f.files else None
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read {path} as an .npz file ({type(e).__name__}: {e})") from None
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] not in (1, 3, 4):
            raise DataError(f"{path}: arr_0 must be uint8 of shape (N, H, W, C) with C in 1, 3, 4; "
                            f"got {self.images.dtype} {self.images.shape}")
        if len(self.images) == 0:
            raise DataError(f"{path}: arr_0 holds no images")
        if labels is None:
            self.labels, self.num_classes = np.zeros(len(self.images), np.int64), 0  # 0 = null class
        else:
            self.labels = np.asarray(labels).astype(np.int64).reshape(-1)
            if len(self.labels) != len(self.images) or self.labels.min() < 0:
                raise DataError(f"{path}: 'labels' must hold one non-negative int per image "
                                f"({len(self.labels)} labels for {len(self.images)} images)")
            self.num_classes = int(self.labels.max()) + 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        a = self.images[index]
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        return self.transform(img, index), int(self.labels[index])


SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "bar")


def _polygon(cx, cy, radii, angle0):
    """Vertices of a star-shaped polygon: radii[j] at equally spaced angles starting at angle0."""
    n = len(radii)
    return [(cx + r * math.cos(angle0 + 2 * math.pi * j / n), cy + r * math.sin(angle0 + 2 * math.pi * j / n))
            for j, r in enumerate(radii)]


def render_shape(shape: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image: a `shape` in a random colour, near the centre, on a random plain background.
    Shapes keep one orientation and stay near the centre so that each class is one silhouette: a model
    small enough for the CPU demo learns it in minutes, while colours (the varied part) and sizes still
    make a distribution. Drawn at 4x (2x above 64 px) and LANCZOS-downsampled: antialiased at any size."""
    ss = 4 if image_size <= 64 else 2
    S = image_size * ss
    fg = rng.uniform(0, 255, 3)
    for _ in range(100):  # a background far enough from the shape colour to stay readable
        bg = rng.uniform(0, 255, 3)
        if np.linalg.norm(fg - bg) > 140:
            break
    img = Image.new("RGB", (S, S), tuple(int(c) for c in bg))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.28, 0.36) * S
    cx, cy = S / 2 + rng.uniform(-0.06, 0.06, 2) * S
    rot = {"square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2}.get(shape, 0.0)  # upright
    color = tuple(int(c) for c in fg)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(1, int(0.35 * r)))
    elif shape == "square":
        d.polygon(_polygon(cx, cy, [r] * 4, rot), fill=color)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, [r * 1.1] * 3, rot), fill=color)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, [r * 1.1, r * 0.6] * 2, rot), fill=color)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, [r * 1.1, r * 0.45] * 5, rot), fill=color)
    elif shape == "cross":  # two bars: 12 vertices
        w = 0.33 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(rot), math.sin(rot)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=color)
    elif shape == "bar":
        w = 0.3 * r
        pts = [(r, w), (r, -w), (-r, -w), (-r, w)]
        c, s = math.cos(rot), math.sin(rot)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img.resize((image_size, image_size), Image.LANCZOS)


class ProceduralShapes(torch.utils.data.Dataset):
    """Built-in class-conditional data: class c is SHAPES[c] (circle, square, triangle, cross, ...),
    drawn in random colours and sizes, upright and near the centre, on random plain backgrounds.

    Item i is a pure function of (seed, i): no files, no download, the same on every machine, at
    any resolution. Items are drawn on the fly (about a millisecond each at 32 px)."""

    def __init__(self, size=50_000, image_size=32, num_classes=4, seed=0):
        if not 1 <= num_classes <= len(SHAPES):
            raise DataError(f"the built-in shapes data has 1 to {len(SHAPES)} classes, got {num_classes}")
        self.size, self.image_size, self.num_classes, self.seed = int(size), int(image_size), int(num_classes), int(seed)
        self.classes = list(SHAPES[:num_classes])
        self.num_skipped = 0

    def __len__(self):
        return self.size

    def set_epoch(self, epoch: int):
        pass  # no augmentation: the data set is already random

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, 0x5A9E5, index))
        label = int(rng.integers(self.num_classes))
        return to_tensor(render_shape(SHAPES[label], self.image_size, rng)), label


def build_dataset(data_path, image_size, *, train=True, center_crop=False, seed=0, **kw):
    """data_path None -> ProceduralShapes (kw: size, num_classes); a directory -> ImageFolder-style;
    a .npz -> arr_0 uint8 NHWC (+ optional labels). Items are (float32 (3, H, W) in [-1, 1], int label);
    every dataset has .num_classes and .num_skipped. Raises DataError with a readable message."""
    if data_path is None:
        return ProceduralShapes(image_size=image_size, seed=seed, **kw)
    if not os.path.exists(data_path):
        raise DataError(f"--data-path {data_path} does not exist")
    if os.path.isdir(data_path):
        return ImageFolderDataset(data_path, image_size, train=train, center_crop=center_crop, seed=seed)
    if data_path.endswith(".npz"):
        return NpzDataset(data_path, image_size, train=train, center_crop=center_crop, seed=seed)
    raise DataError(f"--data-path {data_path} is neither a directory of images nor an .npz file")



class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start part-way into an epoch: a resumed run skips the batches the
    interrupted run already consumed (by index, without loading them) and sees the same data order."""

    start = 0  # number of this rank's indices to skip in the current epoch

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


# ------------------------------------------------------------------------------------------------
#                                 Objective, EMA, distributed set-up
# ------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """Inconsistent flags, or flags that disagree with a checkpoint (one line, no traceback)."""


class Objective(nn.Module):
    """The whole training loss as one module, so that DDP sees exactly one forward per backward even
    though cdc.training_losses calls the network once per non-empty stage."""

    def __init__(self, model, cdc_cfg, class_dropout, reduction):
        super().__init__()
        self.model, self.cdc_cfg, self.class_dropout, self.reduction = model, cdc_cfg, class_dropout, reduction

    def forward(self, x, y, generator):
        return cdc.training_losses(self.model, x, y, self.cdc_cfg, class_dropout=self.class_dropout,
                                   reduction=self.reduction, generator=generator)


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema = decay * ema + (1 - decay) * param


def ema_decay_at(step, decay, warmup):
    """Table 7's EMA is 0.9999. Departure (--ema-warmup, on by default): decay_t = min(decay,
    (1 + t) / (10 + t)), the usual warm-up, so that a short run (the CPU demo: ~2000 steps, where a
    0.9999 EMA would still be 90% initial weights) has a usable EMA. It reaches 0.9999 at step 90k
    and changes nothing after, so a 1M-step ImageNet run is the paper's recipe."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def step_seed(global_seed, rank, step):
    """Seed of every random draw of one rank at one step (timesteps, coupling noise, label dropout).

    Re-seeding each step from (seed, rank, step) instead of carrying RNG state makes a resumed run
    bit-identical to an uninterrupted one by construction: nothing random depends on history."""
    return int(np.random.SeedSequence((global_seed, rank, step)).generate_state(1, np.uint64)[0] >> 1)


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` is one process.
    The device comes from LOCAL_RANK (the rank on this node), which is what multi-node needs."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl")
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return rank, world, device, True
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return 0, 1, device, False


def die(msg, code=1):
    """A user error: one line on stderr, no traceback, non-zero exit. Nothing already saved is touched."""
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank stops, rank 0 says why
        print(f"error: {msg}", file=sys.stderr, flush=True)
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    sys.exit(code)


# ------------------------------------------------------------------------------------------------
#                                       Checkpoints
# ------------------------------------------------------------------------------------------------

CKPT_RE = re.compile(r"^(\d+)\.pt$")


def save_checkpoint(obj, path):
    """Atomic: write a temporary file in the same directory, fsync, then os.replace. A kill at any
    instant leaves either the old set of checkpoints or the old set plus this complete one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, newest (highest step) first. Temporary files never match."""
    d = os.path.join(run_dir, "checkpoints")
    found = [(int(m.group(1)), os.path.join(d, n)) for n in (os.listdir(d) if os.path.isdir(d) else [])
             if (m := CKPT_RE.match(n))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path):
    # mmap: 8 processes resuming an XL run do not each read the ~10 GB file into memory first
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def find_resume(resume, results_dir, run_suffix):
    """--resume PATH (a checkpoint file or a run directory) or 'auto': the newest loadable checkpoint
    of the newest run named *-<run_suffix> under results_dir. Returns (checkpoint dict, path) or None.
    A damaged newest file (e.g. a disk that filled up) falls back to the one before, with a note."""
    if resume == "auto":
        runs = sorted(glob.glob(os.path.join(results_dir, f"[0-9][0-9][0-9]-{glob.escape(run_suffix)}")))
        candidates = [p for run in reversed(runs) for p in list_checkpoints(run)]
        if not candidates:
            return None
    elif os.path.isdir(resume):
        candidates = list_checkpoints(resume)
        if not candidates:
            raise ConfigError(f"--resume {resume}: no checkpoints/NNNNNNN.pt in that run directory")
    elif os.path.isfile(resume):
        candidates = [resume]
    else:
        raise ConfigError(f"--resume {resume}: no such file or directory")
    for path in candidates:
        try:
            return load_checkpoint(path), path
        except Exception as e:
            if len(candidates) == 1 or resume != "auto":
                raise ConfigError(f"cannot load checkpoint {path} ({type(e).__name__}: {e})") from None
            print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__})", file=sys.stderr)
    raise ConfigError(f"--resume auto: no loadable checkpoint among {len(candidates)} found")


def check_compatible(ckpt, config, path):
    """The checkpoint must describe the same network and interpolant as the flags."""
    diffs = []
    for section in ("model", "cdc"):
        old, new = ckpt["config"][section], config[section]
        for k in sorted(set(old) | set(new)):
            a, b = old.get(k), new.get(k)
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                a, b = list(a), list(b)
            if a != b:
                diffs.append(f"{k}={a} (checkpoint) vs {b} (flags)")
    if diffs:
        raise ConfigError(f"checkpoint {path} does not match the flags: {'; '.join(diffs)}. "
                          f"Pass the flags it was trained with, or start a new run without --resume")


# ------------------------------------------------------------------------------------------------
#                                        Arguments
# ------------------------------------------------------------------------------------------------

# Without --data-path, train.py is the CPU demo: these replace the paper's values for the flags the
# user did not give (printed at start). Everything else stays Table 7. What we measured on a 2-core CPU
# (8 minutes of training each, EMA grids looked at): patch 4 leaves a visible token grid at these sizes,
# patch 2 does not; 3 stages at 16 px (4, 8, 16) learn slower than 2 (8, 16); 32 px (8, 16, 32) gets only
# ~900 steps, too few for recognisable shapes. So the demo is a 2-stage, 16 px, patch-2 model (Table 6
# also trains a K = 2 hierarchy) with a small batch and a high learning rate: ~2000 updates in 8 minutes.
DEMO_DEFAULTS = dict(model="tiny", patch_size=2, image_size=16, resolutions="8,16", global_batch_size=16, lr=2e-3,
                     max_steps=4000, log_every=100, ckpt_every=500, sample_every=0, num_workers=0, time_limit=8.0,
                     threads=None)
# The time limit keeps the demo under 10 minutes on any 2-core machine, loaded or idle (it stops at
# whichever of max_steps and the limit comes first, then writes a checkpoint and the grid). Threads: on an
# idle 2-core machine torch's default (2) ran the demo 1.54x faster than 1 thread (6.2 vs 4.0 steps/s);
# on a machine whose other core is busy, 2 OpenMP threads ran 3-6x *slower* (each op waits for the thread
# whose core is taken): pass --threads 1 there.
# With --data-path: the paper's ImageNet 256 recipe (Table 7; 32 GPUs x 8 = 256 images per step).
RECIPE_DEFAULTS = dict(model="XL", patch_size=None, image_size=256, resolutions=None, global_batch_size=256, lr=1e-4,
                       max_steps=None, log_every=100, ckpt_every=50_000, sample_every=10_000, num_workers=8,
                       time_limit=None, threads=None)
# Flags that define the network or the interpolant; the rest may change on resume.
PEAK_FLOPS = 989e12  # H100 SXM dense bf16 (the MFU denominator; --peak-tflops for other hardware)


def parse_resolutions(text, image_size):
    if text is None:  # halve down to 32 (4 stages at 256, Table 7); images <= 32 px are one stage
        res = [image_size]
        while res[0] // 2 >= 32 and res[0] % 2 == 0:
            res.insert(0, res[0] // 2)
        return tuple(res)
    try:
        return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(f"--resolutions must be comma-separated ints such as 32,64,128,256, got {text!r}") from None


def get_parser():
    p = argparse.ArgumentParser(description="Train CDC-FM. With no --data-path: the CPU demo on built-in shapes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--data-path", type=str, default=None, help="ImageFolder-style directory or .npz (arr_0 uint8 NHWC, optional labels); none = built-in shapes")
    a("--center-crop", action="store_true", help="ADM-style centre crop instead of Table 7's 1.125x random crop")
    a("--num-classes", type=int, default=None, help="default: from the data")
    a("--num-workers", type=int, default=None, help="data loader workers per process (demo 0, recipe 8)")
    a("--dataset-size", type=int, default=20_000, help="built-in shapes only: number of images")
    # model and interpolant
    a("--model", type=str, default=None, choices=list(cdc.PRESETS), help="demo tiny, recipe XL")
    a("--depth", type=int, default=None, help="override the preset")
    a("--width", type=int, default=None, help="override the preset")
    a("--heads", type=int, default=None, help="override the preset")
    a("--patch-size", type=int, default=None, help="default: the preset's (4 as in Table 7; tiny 2)")
    a("--fusion", type=str, default="xattn", choices=cdc.FUSIONS)
    a("--image-size", type=int, default=None, help="demo 16, recipe 256")
    a("--resolutions", type=str, default=None, help="stage sides, e.g. 32,64,128,256 (default: halve down to 32; demo 8,16)")
    a("--sigma", type=float, default=1.0)
    a("--gamma", type=float, default=2.0)
    a("--interpolant", type=str, default="linear", choices=cdc.INTERPOLANTS)
    a("--loss-reduction", type=str, default="mean", choices=cdc.REDUCTIONS)
    a("--class-dropout", type=float, default=0.1)
    # optimisation
    a("--global-batch-size", type=int, default=None, help="demo 16, recipe 256")
    a("--lr", type=float, default=None, help="demo 2e-3, recipe 1e-4")
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--eps", type=float, default=1e-6)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--ema-decay", type=float, default=0.9999)
    a("--ema-warmup", action=argparse.BooleanOptionalAction, default=True, help="decay min(ema, (1+t)/(10+t))")
    a("--precision", type=str, default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the network")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--epochs", type=int, default=200)
    a("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs; demo 4000, or the time limit)")
    a("--threads", type=int, default=None, help="CPU only: intra-op threads (default: torch's, one per core; 1 on a busy machine)")
    a("--time-limit", type=float, default=None, help="stop training (checkpoint, grid) after this many minutes (demo 8)")
    a("--global-seed", type=int, default=0)
    # bookkeeping
    a("--results-dir", type=str, default="results")
    a("--log-every", type=int, default=None)
    a("--ckpt-every", type=int, default=None)
    a("--sample-every", type=int, default=None, help="EMA sample grid every N steps (0 = only at the end)")
    a("--resume", type=str, default=None, help="'auto' (newest checkpoint of this model/size, or start fresh) or a checkpoint/run dir")
    a("--cfg-scale", type=float, default=3.0, help="CFG scale of the sample grids")
    a("--sample-steps", type=int, default=24, help="steps per stage of the sample grids")
    a("--peak-tflops", type=float, default=PEAK_FLOPS / 1e12, help="accelerator peak for MFU (H100 bf16 dense: 989)")
    a("--benchmark", action="store_true", help="time training and sampling on synthetic data and exit")
    a("--benchmark-steps", type=int, default=10)
    return p


def resolve_args(args):
    """Fill the flags the user left at None from the demo or the recipe defaults; validate."""
    demo = args.data_path is None and not args.benchmark
    defaults = DEMO_DEFAULTS if demo else RECIPE_DEFAULTS
    filled = []
    for k, v in defaults.items():
        if getattr(args, k) is None and v is not None:
            setattr(args, k, v)
            filled.append(f"{k}={v}")
    args.resolutions = parse_resolutions(args.resolutions, args.image_size)
    if args.image_size != args.resolutions[-1]:
        raise ConfigError(f"--image-size {args.image_size} must equal the last of --resolutions {args.resolutions}")
    for name in ("global_batch_size", "log_every", "ckpt_every", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    return ("demo defaults (no --data-path): " if demo else "recipe defaults: ") + ", ".join(filled)


def build_model(args, num_classes):
    overrides = dict(num_classes=num_classes, resolutions=args.resolutions, fusion=args.fusion)
    for k in ("depth", "width", "heads", "patch_size"):
        if getattr(args, k) is not None:
            overrides[k] = getattr(args, k)
    try:
        return cdc.create_model(args.model, **overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_cdc_config(args):
    try:
        return cdc.CDCConfig(resolutions=args.resolutions, sigma=args.sigma, gamma=args.gamma, interpolant=args.interpolant)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run_config(model, cdc_cfg):
    return {"model": dataclasses.asdict(model.config), "cdc": cdc_cfg.to_dict()}


# ------------------------------------------------------------------------------------------------
#                                          Sampling
# ------------------------------------------------------------------------------------------------


def grid_labels(num_classes, per_class=8, max_classes=8):
    """Labels of a sample grid: one row per class (ImageNet: DiT's favourite classes)."""
    if num_classes == 0:
        return None, per_class * 4
    classes = [207, 360, 387, 974, 88, 979, 417, 279] if num_classes == 1000 else list(range(min(num_classes, max_classes)))
    return torch.tensor([c for c in classes for _ in range(per_class)]), per_class


def save_grid(images, path, nrow):
    """(N, 3, H, W) in [-1, 1] -> one PNG, nrow images per row, 2 px gaps."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = x[i]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if h < 64:  # upscale tiny grids so that they can be looked at
        img = img.resize((img.width * (64 // h), img.height * (64 // h)), Image.NEAREST)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)


@torch.no_grad()
def sample_grid(ema, cdc_cfg, args, device, path):
    y, nrow = grid_labels(ema.config.num_classes)
    n = len(y) if y is not None else nrow
    gen = torch.Generator().manual_seed(args.global_seed)  # the same noise every time: grids compare across steps
    field = cdc.guided_field(ema, None if y is None else y.to(device), args.cfg_scale)
    with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        images = cdc.sample(field, cdc_cfg, n, channels=ema.config.in_channels, steps=args.sample_steps,
                            generator=gen, device=device)
    save_grid(images, path, nrow)


# ------------------------------------------------------------------------------------------------
#                                          Training
# ------------------------------------------------------------------------------------------------


class Logger:
    def __init__(self, path, active):
        self.path, self.active = path, active

    def __call__(self, msg):
        if not self.active:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # CPU: peak resident set of this process (KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(args):
    rank, world, device, distributed = setup_distributed()
    log = Logger(None, rank == 0)
    try:
        note = resolve_args(args)
        if args.global_batch_size % world:
            raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
        local_batch = args.global_batch_size // world
        if args.threads and device.type == "cpu":
            torch.set_num_threads(args.threads)
        if args.precision is None:
            args.precision = "bf16" if device.type == "cuda" else "fp32"
        if args.benchmark:
            return benchmark(args, device, log)

        # ---- data
        kw = dict(size=args.dataset_size, num_classes=args.num_classes or 4) if args.data_path is None else {}
        dataset = build_dataset(args.data_path, args.image_size, center_crop=args.center_crop, seed=args.global_seed, **kw)
        num_classes = dataset.num_classes if args.num_classes is None else args.num_classes
        if num_classes < dataset.num_classes:
            raise ConfigError(f"--num-classes {num_classes} is smaller than the {dataset.num_classes} classes in the data")
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.global_seed, drop_last=True)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=False,
            generator=torch.Generator(),  # else every new iterator draws its seed from the global RNG
        )
        steps_per_epoch = len(dataset) // world // local_batch
        if steps_per_epoch == 0:
            raise ConfigError(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
        total_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch

        # ---- model, EMA, optimiser
        torch.manual_seed(args.global_seed)  # identical initial weights on every rank
        cdc_cfg = build_cdc_config(args)
        model = build_model(args, num_classes)
        config = run_config(model, cdc_cfg)
        model.to(device)
        ema = deepcopy(model).requires_grad_(False).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                                weight_decay=args.weight_decay, fused=device.type == "cuda")

        # ---- resume, or a new numbered run directory (DiT's results/000-XL-256 layout)
        run_suffix = f"{args.model}-{args.image_size}"
        found = find_resume(args.resume, args.results_dir, run_suffix) if args.resume else None
        step = 0
        if found is not None:
            ckpt, ckpt_path = found
            check_compatible(ckpt, config, ckpt_path)
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            step = int(ckpt["step"])
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
            old = ckpt["args"]
            changed = [f"{k}: {old[k]} -> {v}" for k, v in vars(args).items()
                       if k in old and k not in ("resume", "max_steps", "epochs") and _prim(v) != old[k]]
            del ckpt
        else:
            if rank == 0:
                os.makedirs(args.results_dir, exist_ok=True)
                idx = len(glob.glob(os.path.join(args.results_dir, "[0-9][0-9][0-9]-*")))
                run_dir = os.path.join(args.results_dir, f"{idx:03d}-{run_suffix}")
            else:
                run_dir = None
            if distributed:  # every rank needs rank 0's choice of directory
                holder = [run_dir]
                dist.broadcast_object_list(holder, src=0)
                run_dir = holder[0]
            changed = []
        if rank == 0:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        log.path = os.path.join(run_dir, "log.txt")
    except (DataError, ConfigError) as e:
        die(str(e))

    log(f"run directory {run_dir}; {world} process(es) on {device.type}; {note}")
    if found is not None:
        log(f"resumed from {ckpt_path} at step {step}" + (f"; changed flags: {', '.join(changed)}" if changed else ""))
    log(f"data: {args.data_path or 'built-in shapes'}: {len(dataset)} images, {num_classes} classes; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps")
    log(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{json.dumps(config['model'])}; stages {cdc_cfg.resolutions}; precision {args.precision}")
    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({k: _prim(v) for k, v in vars(args).items()}, f, indent=1)

    # ---- the network as it runs: compiled and/or checkpointed, inside the DDP-wrapped objective
    model.grad_checkpointing = args.grad_checkpointing
    net = torch.compile(model) if args.compile else model
    objective = Objective(net, cdc_cfg, args.class_dropout, args.loss_reduction)
    if distributed:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the only buffers are fixed position tables
    model.train()
    gen = torch.Generator()  # CPU generator of training_losses (timesteps, label dropout)
    flops_of = {r: model.flops_per_sample(r) for r in cdc_cfg.resolutions}
    K = cdc_cfg.K

    def checkpoint(step):
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        if rank == 0:
            save_checkpoint({
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": {k: _prim(v) for k, v in vars(args).items()}, "config": config, "step": step,
                # No RNG state: every draw of step s is seeded by step_seed(seed, rank, s), and the data
                # order by (seed, epoch) plus the position in the epoch, which is step itself.
                "rng": {"scheme": "step_seed", "global_seed": args.global_seed, "world_size": world},
            }, path)
            log(f"saved checkpoint {path}")
        if distributed:
            dist.barrier()
        return path

    # ---- loop
    # Running sums stay on the device; one all-reduce and one host sync per log interval.
    stats = torch.zeros(4 + 2 * K, dtype=torch.float64, device=device)  # loss, gnorm, steps, nonfinite, stage sums, counts
    flops, t_last, step_last = 0.0, time.time(), step
    t_start = t_last
    last_ckpt = None
    epoch = step // steps_per_epoch
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = skip * local_batch
        dataset.set_epoch(epoch)
        for x, y in loader:
            seed = step_seed(args.global_seed, rank, step)
            torch.manual_seed(seed)  # coupling noise (global RNG, on the device)
            gen.manual_seed(seed)    # timesteps and label dropout
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                out = objective(x, y, gen)
            loss = out["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            update_ema(ema, model, ema_decay_at(step, args.ema_decay, args.ema_warmup))
            step += 1

            counts = out["stage_count"]
            flops += 3 * sum(n * flops_of[r] for n, r in zip(counts, cdc_cfg.resolutions))
            # non_blocking: a pageable host-to-device copy would otherwise wait for the GPU every step
            cnt = torch.tensor([1.0] + counts, dtype=torch.float64).to(device, non_blocking=True)
            sl = out["stage_loss"].detach().double().nan_to_num(0.0)
            stats += torch.cat([torch.stack([loss.detach().double(), gnorm.detach().double()]), cnt[:1],
                                (~torch.isfinite(loss.detach())).double().view(1), sl * cnt[1:], cnt[1:]])

            if args.time_limit and step % args.log_every == 0:  # rank 0's clock decides for everyone
                stop = torch.tensor([float(time.time() - t_start > 60 * args.time_limit)], device=device)
                if distributed:
                    dist.broadcast(stop, src=0)
                if stop.item() and step < total_steps:
                    log(f"--time-limit {args.time_limit} min reached: stopping at step {step} of {total_steps}")
                    total_steps = step
            is_log = step % args.log_every == 0 or step == total_steps
            is_ckpt = step % args.ckpt_every == 0 or step == total_steps
            if is_log or is_ckpt:
                s = stats.clone()
                if distributed:
                    dist.all_reduce(s)
                s = s.tolist()
                if s[3] > 0:  # checked before any save: a checkpoint never holds a diverged model
                    die(f"the loss is not finite (NaN or inf) at or before step {step}; stopping. "
                        f"The last good checkpoint is {last_ckpt or 'none (no checkpoint was written)'}")
                if is_log:
                    dt = time.time() - t_last
                    steps_done = step - step_last
                    n_img = steps_done * args.global_batch_size
                    tot_flops = torch.tensor(flops, dtype=torch.float64)
                    if distributed:
                        tot_flops = tot_flops.to(device)
                        dist.all_reduce(tot_flops)
                    tot_flops = float(tot_flops)
                    per_stage = " ".join(f"{r}px {s[4 + k] / s[4 + K + k]:.4f}" if s[4 + K + k] else f"{r}px -"
                                         for k, r in enumerate(cdc_cfg.resolutions))
                    perf = (f"MFU {tot_flops / dt / world / (args.peak_tflops * 1e12) * 100:.1f}%"
                            if device.type == "cuda" else f"{tot_flops / dt / 1e9:.1f} GFLOP/s")
                    skipped = dataset.num_skipped
                    if distributed:
                        t = torch.tensor([skipped], dtype=torch.float64, device=device)
                        dist.all_reduce(t)
                        skipped = int(t.item())
                    log(f"step {step:07d} loss {s[0] / s[2]:.4f} ({per_stage}) grad_norm {s[1] / s[2]:.3f} "
                        f"{steps_done / dt:.2f} steps/s {n_img / dt:.1f} img/s {perf} "
                        f"mem {peak_memory_gb(device):.2f}GB" + (f" skipped_images {skipped}" if skipped else ""))
                    stats.zero_()
                    flops, t_last, step_last = 0.0, time.time(), step
                if is_ckpt:
                    last_ckpt = checkpoint(step)
            if args.sample_every and step % args.sample_every == 0 and step != total_steps and rank == 0:
                sample_grid(ema, cdc_cfg, args, device, os.path.join(run_dir, "samples", f"{step:07d}.png"))
            if step >= total_steps:
                break

    if rank == 0:
        path = os.path.join(run_dir, "samples", f"{step:07d}.png")
        t0 = time.time()
        sample_grid(ema, cdc_cfg, args, device, path)
        log(f"EMA sample grid {path} ({time.time() - t0:.1f}s); done at step {step}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def _prim(v):
    """Flag values as JSON/weights_only-safe primitives."""
    return list(v) if isinstance(v, tuple) else v


def benchmark(args, device, log):
    """--benchmark: training images/s, MFU (CUDA) and peak memory for the flags' model, per stage mix
    (the equal mix of training, then each resolution alone), then sampling images/s. Synthetic data,
    one process, --global-batch-size images per step (e.g. 8 = Table 7's batch per GPU)."""
    cdc_cfg = build_cdc_config(args)
    num_classes = 1000 if args.num_classes is None else args.num_classes
    torch.manual_seed(args.global_seed)
    model = build_model(args, num_classes).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    B, peak = args.global_batch_size, args.peak_tflops * 1e12
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    log(f"benchmark: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
        f"{B} images/step, {args.precision}, compile={args.compile}, grad_checkpointing={args.grad_checkpointing}, "
        f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else f"benchmark on {torch.cuda.get_device_name(device)}")
    mixes = [("equal mix " + "/".join(map(str, cdc_cfg.resolutions)), cdc_cfg)]
    mixes += [(f"{r}px only", dataclasses.replace(cdc_cfg, resolutions=(r,), windows=None)) for r in cdc_cfg.resolutions]
    gen = torch.Generator().manual_seed(args.global_seed)
    for name, cfg in mixes:
        R = cfg.resolutions[-1]
        x = torch.rand(B, 3, R, R, device=device) * 2 - 1
        y = torch.randint(0, max(num_classes, 1), (B,), device=device)
        objective = Objective(net, cfg, args.class_dropout, args.loss_reduction)
        flops = 0.0
        for i in range(args.benchmark_steps + 2):  # 2 warm-up steps (allocator, kernels, compilation)
            if i == 2:
                sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0, flops = time.time(), 0.0
            with torch.autocast(**amp):
                out = objective(x, y, gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            flops += 3 * sum(n * model.flops_per_sample(r) for n, r in zip(out["stage_count"], cfg.resolutions))
        sync()
        dt = time.time() - t0
        perf = f"MFU {flops / dt / peak * 100:.1f}%" if device.type == "cuda" else f"{flops / dt / 1e9:.1f} GFLOP/s"
        log(f"train  {name:>22}: {args.benchmark_steps * B / dt:8.2f} img/s  {perf}  "
            f"peak mem {peak_memory_gb(device):.2f} GB")
    model.eval()
    n = B
    yv = torch.randint(0, max(num_classes, 1), (n,), device=device) if num_classes else None
    field = cdc.guided_field(model, yv, args.cfg_scale)
    with torch.autocast(**amp):
        cdc.sample(field, cdc_cfg, n, steps=1, generator=gen, device=device)  # warm-up
        sync()
        t0 = time.time()
        cdc.sample(field, cdc_cfg, n, steps=args.sample_steps, generator=gen, device=device)
        sync()
    dt = time.time() - t0
    log(f"sample {n} images, {args.sample_steps} Euler steps/stage, CFG {args.cfg_scale} (2 NFE/step): "
        f"{n / dt:.2f} img/s, peak mem {peak_memory_gb(device):.2f} GB")


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        train(args)
    except (DataError, ConfigError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
