"""
Data for CDC-FM: the data sets (ImageFolder, .npz, built-in shapes), Table 7's transforms, the data
order of a (resumable, distributed) run, and images back to PNG (sample grids, Fig. 9 stage sheets).

Every item is (uint8 (3, H, W), int label), mapped to [-1, 1] by `normalize` on the device; every data
set has .num_classes and .num_skipped. Problems with the data raise DataError, which the scripts print as one line.
"""

import math
import os
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw

import cdc

# ------------------------------------------------------------------------------------------------
#                                   Data sets and transforms (Table 7)
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
    """uint8 RGB image -> uint8 (3, H, W). Items stay uint8 through the loader workers, pinned memory
    and the bus (4x fewer bytes than float32); `normalize` maps them to [-1, 1] on the device."""
    a = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (Table 7: normalise with mean = std = 0.5)."""
    return x.float().div_(127.5).sub_(1.0)


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

    def __init__(self, image_size, train, seed, hflip=True):
        self.image_size, self.train, self.seed, self.hflip = image_size, train, seed, hflip
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
        img = random_crop_arr(img, self.image_size, rng)
        if rng.random() < 0.5 and self.hflip:  # Table 7: RandomHorizontalFlip (the coin is drawn either way)
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)


class ImageFolderDataset(_ImageDataset):
    """ImageFolder layout: root/<class>/**/<image>; labels are the sorted class-directory names.
    A folder of images with no class sub-directories is one unlabelled class."""

    def __init__(self, root, image_size, train=True, seed=0, hflip=True):
        super().__init__(image_size, train, seed, hflip)
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

    def __init__(self, path, image_size, train=True, seed=0, hflip=True):
        super().__init__(image_size, train, seed, hflip)
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


def build_dataset(data_path, image_size, *, train=True, seed=0, **kw):
    """data_path None -> ProceduralShapes (kw: size, num_classes); a directory -> ImageFolder-style;
    a .npz -> arr_0 uint8 NHWC (+ optional labels) (kw: hflip=False turns off Table 7's flip). Items are (uint8 (3, H, W), int label);
    every dataset has .num_classes and .num_skipped. Raises DataError with a readable message."""
    if data_path is None:
        return ProceduralShapes(image_size=image_size, seed=seed, **kw)
    if not os.path.exists(data_path):
        raise DataError(f"--data-path {data_path} does not exist")
    if os.path.isdir(data_path):
        return ImageFolderDataset(data_path, image_size, train=train, seed=seed, **kw)
    if data_path.endswith(".npz"):
        return NpzDataset(data_path, image_size, train=train, seed=seed, **kw)
    raise DataError(f"--data-path {data_path} is neither a directory of images nor an .npz file")



class DataOrder(torch.utils.data.Sampler):
    """This rank's indices for one epoch, from a global position in that epoch onwards.

    The epoch's order is one permutation seeded by (seed, epoch), the same on every rank, cut to whole
    global batches of G images; global batch i is perm[iG:(i+1)G] and rank r takes every world-th index
    of it. A run that stopped after `pos` images of the epoch continues with perm[pos:] whatever its new
    number of processes; with the same number every rank gets exactly the indices of an uninterrupted
    run (resume is bit-exact). Skipped indices are never loaded."""

    def __init__(self, size, world, rank, global_batch, seed=0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        self.size, self.world, self.rank, self.global_batch, self.seed = size, world, rank, global_batch, seed
        self.steps_per_epoch = size // global_batch
        self.epoch = self.pos = 0

    def set_position(self, epoch: int, pos: int):
        self.epoch, self.pos = int(epoch), int(pos)

    def _rest(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.size, generator=g)[:self.steps_per_epoch * self.global_batch]
        rest = perm[self.pos:]
        return rest[:len(rest) // self.global_batch * self.global_batch]  # whole global batches only

    def __iter__(self):
        return iter(self._rest()[self.rank::self.world].tolist())

    def __len__(self):
        return len(self._rest()) // self.world


# ------------------------------------------------------------------------------------------------
#                                          Images out
# ------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C): the inverse of normalize, as PNG and .npz store it."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images, path, nrow):
    """(N, 3, H, W) in [-1, 1] -> one PNG, nrow images per row, 2 px gaps."""
    x = to_uint8(images).permute(0, 3, 1, 2)
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




def save_stage_sheet(stages, path):
    """Fig. 9: one row per sample: every stage's output upsampled to full size, then the detail each
    stage added, x_k - U(x_{k-1}) (doubled; grey = nothing added). Works for any power-of-two steps."""
    full = stages[-1].shape[-1]
    lv = lambda a, b: int(math.log2(b // a))  # noqa: E731  levels between two sides
    cols = [cdc.up(s, lv(s.shape[-1], full)) for s in stages]
    details = [(cdc.up(b - cdc.up(a, lv(a.shape[-1], b.shape[-1])), lv(b.shape[-1], full)) * 2).clamp(-1, 1)
               for a, b in zip(stages, stages[1:])]
    tiles = torch.stack(cols + details, dim=1)  # (n, 2K-1, C, H, W)
    save_grid(tiles.flatten(0, 1), path, nrow=tiles.shape[1])
