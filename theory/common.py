"""
Shared plumbing for the theory/ scripts: the data (through data.build_dataset, never a second loader),
the common CLI flags, plain-text tables and JSON output.

Also a converter for MNIST's idx files, so the README's MNIST numbers can be reproduced anywhere:

    python theory/common.py mnist-to-npz t10k-images-idx3-ubyte.gz mnist32.npz   # 10000 x 32 x 32 x 1

MNIST digits are 28 x 28; they are zero-padded by 2 pixels on every side to 32 x 32 (the background of
MNIST is 0, so padding adds background, not an artefact). The npz keeps one channel; train.py's loader
turns grayscale into RGB with three equal channels, so every script sees (3, 32, 32) images in [-1, 1].
"""

import argparse
import gzip
import json
import math
import os
import struct
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cdc  # noqa: E402,F401  (re-exported for the scripts)

# ------------------------------------------------------------------------------------------------
#                                              Data
# ------------------------------------------------------------------------------------------------


def load_images(data_path, image_size: int, n: int, seed: int = 0) -> torch.Tensor:
    """n images as a float64 (n, 3, image_size, image_size) tensor in [-1, 1].

    data_path None -> the project's built-in procedural shapes (items 0..n-1 of seed `seed`);
    an .npz (arr_0 uint8 NHWC) or an image folder -> a random subset of n images (all if fewer), viewed
    deterministically: shorter side resized to image_size, centre crop, no flip (train=False).
    """
    import data  # the project's data pipeline (imported lazily: it pulls in PIL and friends)

    if data_path is None:
        ds = data.build_dataset(None, image_size, train=False, seed=seed, size=n)
        idx = range(n)
    else:
        ds = data.build_dataset(data_path, image_size, train=False, seed=seed)
        total = len(ds)
        idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False)) if n < total else range(total)
    return data.normalize(torch.stack([ds[int(i)][0] for i in idx])).double()


def read_idx_images(path: str) -> np.ndarray:
    """An idx3-ubyte file (optionally .gz), as in the MNIST distribution -> uint8 (N, rows, cols)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 2051:
        raise ValueError(f"{path} is not an idx3-ubyte image file (magic {magic}, expected 2051)")
    return np.frombuffer(raw, dtype=np.uint8, count=n * rows * cols, offset=16).reshape(n, rows, cols)


def mnist_to_npz(idx_path: str, out_path: str, size: int = 32) -> tuple:
    """Pad MNIST digits with zeros to size x size and save as arr_0 uint8 (N, size, size, 1)."""
    imgs = read_idx_images(idx_path)
    ph, pw = size - imgs.shape[1], size - imgs.shape[2]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {imgs.shape[1:]} images to {size}")
    imgs = np.pad(imgs, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    np.savez(out_path, arr_0=imgs[..., None])
    return imgs.shape


# ------------------------------------------------------------------------------------------------
#                                        CLI and output
# ------------------------------------------------------------------------------------------------


def int_list(s: str) -> tuple:
    return tuple(int(v) for v in str(s).replace(" ", "").split(",") if v)


def add_common_args(p: argparse.ArgumentParser, n_images: int = 1000, data: bool = True,
                    threads: int = 0) -> argparse.ArgumentParser:
    if data:
        p.add_argument("--data-path", default=None,
                       help="an .npz (arr_0 uint8 NHWC) or an image folder; default: the built-in shapes")
        p.add_argument("--n-images", type=int, default=n_images, help="how many images to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=threads,
                   help="torch CPU threads (0: torch's default); small-matrix work runs best on 1")
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p


def apply_threads(args) -> None:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def jsonable(v):
    if isinstance(v, torch.Tensor):
        return jsonable(v.tolist())
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (np.floating, np.integer)):
        return jsonable(v.item())
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0:
            return "0"
        return f"{v:.4g}" if 1e-3 <= abs(v) < 1e6 else f"{v:.2e}"
    return str(v)


def table(headers, rows, title: str = None) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def emit(result: dict, as_json: bool, render) -> None:
    """Print `result` as JSON (machines) or through render(result) -> str (people)."""
    if as_json:
        print(json.dumps(jsonable(result), indent=1))
    else:
        print(render(result))


def main(argv=None):
    p = argparse.ArgumentParser(description="Helpers for theory/: convert MNIST idx images to an npz")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mnist-to-npz", help="idx3-ubyte(.gz) -> npz with arr_0 uint8 (N, size, size, 1)")
    m.add_argument("idx")
    m.add_argument("out")
    m.add_argument("--size", type=int, default=32, help="zero-pad the 28 px digits to this side")
    a = p.parse_args(argv)
    shape = mnist_to_npz(a.idx, a.out, a.size)
    print(f"wrote {a.out}: {shape[0]} images of {shape[1]}x{shape[2]}, 1 channel (read as RGB)")


if __name__ == "__main__":
    main()
