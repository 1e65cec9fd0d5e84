"""Tests of train.py and sample.py on the CPU: tiny networks, 16 px images, a few steps each.

The scripts run as the user runs them (subprocess, sys.executable), so the tests also check exit
codes, error lines and files on disk."""

import glob
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import data
import runs
import train  # noqa: F401  (the script under test)

HERE = os.path.dirname(os.path.abspath(__file__))
# A network of a few thousand parameters on 16 px images with 3 stages: seconds per run.
TINY = ["--image-size", "16", "--resolutions", "4,8,16", "--patch-size", "2", "--width", "32", "--depth", "1", "--heads", "2",
        "--global-batch-size", "8", "--dataset-size", "48", "--sample-steps", "2", "--num-workers", "0",
        "--log-every", "2"]


def run(script, *args, cwd, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def one_line_error(p, *words):
    """A user error: non-zero exit, exactly one line on stderr, no traceback, mentioning `words`."""
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def ckpts(results):
    return sorted(glob.glob(os.path.join(results, "*", "checkpoints", "*.pt")))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# data


def test_procedural_shapes_deterministic_and_in_range():
    ds = data.ProceduralShapes(size=20, image_size=24, num_classes=5, seed=3)
    x, y = ds[7]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.05  # not a blank image
    assert 0 <= y < 5 and isinstance(y, int)
    x2, y2 = data.ProceduralShapes(size=20, image_size=24, num_classes=5, seed=3)[7]
    assert torch.equal(x, x2) and y == y2
    assert not torch.equal(x, data.ProceduralShapes(size=20, image_size=24, num_classes=5, seed=4)[7][0])
    assert {ds[i][1] for i in range(20)} == set(range(5))  # every class appears
    assert ds.num_classes == 5 and data.build_dataset(None, 8, num_classes=2).num_classes == 2


def make_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        os.makedirs(os.path.join(root, c))
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, (25, 25), dtype=np.uint8)).save(os.path.join(root, "cats", "gray.png"))
    Image.fromarray(rng.integers(0, 256, (25, 25, 4), dtype=np.uint8)).save(os.path.join(root, "dogs", "rgba.png"))
    if corrupt:
        data = open(os.path.join(root, "cats", "0.png"), "rb").read()
        open(os.path.join(root, "cats", "broken.png"), "wb").write(data[: len(data) // 2])  # truncated
        open(os.path.join(root, "dogs", "junk.jpg"), "wb").write(b"not an image")


def test_image_folder_labels_modes_and_skips(tmp_path):
    make_folder(tmp_path / "data")
    ds = data.build_dataset(str(tmp_path / "data"), 16)
    assert len(ds) == 16 and ds.num_classes == 2
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 for x, _ in items)
    assert [y for _, y in items] == [0] * 8 + [1] * 8  # labels from the sorted class names
    assert ds.num_skipped == 2  # the truncated png and the junk jpg, each replaced by a readable image
    ev = data.build_dataset(str(tmp_path / "data"), 16, train=False)
    assert torch.equal(ev[3][0], ev[3][0])


def test_npz_dataset_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 20, 18, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=imgs, labels=np.array([0, 2, 1, 2, 0]))
    ds = data.build_dataset(str(tmp_path / "d.npz"), 16)
    assert len(ds) == 5 and ds.num_classes == 3 and ds[1][1] == 2 and ds[1][0].shape == (3, 16, 16)
    # a 16x16 image at 16 px, evaluation view: exactly the stored pixels
    np.savez(tmp_path / "e.npz", arr_0=imgs[:, :16, :16])
    ev = data.build_dataset(str(tmp_path / "e.npz"), 16, train=False)
    assert ev.num_classes == 0
    assert torch.equal(((ev[0][0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(imgs[0, :16, :16]))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    for bad in ("missing", "bad.npz", "float.npz"):
        with pytest.raises(data.DataError):
            data.build_dataset(str(tmp_path / bad), 16)


# ------------------------------------------------------------------------------------------------
# training runs


def test_train_runs_and_resume_is_bit_exact(tmp_path):
    """2N steps straight == N steps, resume, N steps: every model and EMA tensor bit-identical
    (the run crosses an epoch boundary: 48 images / 8 = 6 steps per epoch)."""
    ok(run("train.py", *TINY, "--max-steps", 8, "--ckpt-every", 4, "--results-dir", "a", cwd=tmp_path))
    ok(run("train.py", *TINY, "--max-steps", 4, "--ckpt-every", 4, "--results-dir", "b", cwd=tmp_path))
    p = ok(run("train.py", *TINY, "--max-steps", 8, "--ckpt-every", 4, "--results-dir", "b", "--resume", "auto", cwd=tmp_path))
    assert "resumed from" in p.stdout
    a, b = load(ckpts(tmp_path / "a")[-1]), load(ckpts(tmp_path / "b")[-1])
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["opt"]["state"][0]["step"] == 8
    # the EMA moved away from the weights and from the initialisation, and the run left a sample grid
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])
    assert glob.glob(str(tmp_path / "a" / "*" / "samples" / "0000008.png"))
    log = open(glob.glob(str(tmp_path / "a" / "*" / "log.txt"))[0]).read()
    assert "step 0000008 loss" in log and "img/s" in log and "4px" in log


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    good = str(tmp_path / "run" / "checkpoints" / "0000004.pt")
    runs.save_checkpoint({"step": 4, "w": torch.ones(3)}, good)

    def dying_save(obj, f):  # the process is killed half-way through writing
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint({"step": 8}, str(tmp_path / "run" / "checkpoints" / "0000008.pt"))
    monkeypatch.undo()
    assert runs.list_checkpoints(str(tmp_path / "run")) == [good]
    assert load(good)["step"] == 4
    # A SIGKILL leaves the temporary file behind (no finally runs): it is never taken for a checkpoint.
    (tmp_path / "run" / "checkpoints" / "0000012.pt.tmp999").write_bytes(b"partial")
    # A damaged newest checkpoint (e.g. full disk) is skipped by --resume auto, with a warning.
    (tmp_path / "run" / "checkpoints" / "0000016.pt").write_bytes(b"PK\x03\x04 partial")
    os.rename(tmp_path / "run", tmp_path / "000-tiny-16")
    ckpt, path = runs.find_resume("auto", str(tmp_path), "tiny-16")
    assert path.endswith("0000004.pt") and ckpt["step"] == 4


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(tmp_path):
    p = run("train.py", *TINY, "--max-steps", 20, "--ckpt-every", 1, "--results-dir", "r", "--lr", "1e30", cwd=tmp_path)
    one_line_error(p, "not finite", "last good checkpoint")
    saved = ckpts(tmp_path / "r")
    assert saved and not glob.glob(str(tmp_path / "r" / "*" / "checkpoints" / "*.tmp*"))
    for path in saved:
        c = load(path)
        assert all(torch.isfinite(v).all() for v in c["model"].values())


def test_bad_inputs_give_one_error_line(tmp_path):
    one_line_error(run("train.py", *TINY, "--data-path", tmp_path / "nope", cwd=tmp_path), "does not exist")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    one_line_error(run("train.py", *TINY, "--data-path", tmp_path / "bad.npz", cwd=tmp_path), "npz")
    one_line_error(run("train.py", *TINY, "--image-size", "24", cwd=tmp_path), "--image-size")
    one_line_error(run("train.py", *TINY, "--resolutions", "4,9,16", cwd=tmp_path), "power-of-two")
    one_line_error(run("train.py", *TINY[:4], "--patch-size", "3", *TINY[6:], cwd=tmp_path), "patch size")
    one_line_error(run("sample.py", "--ckpt", tmp_path / "none.pt", cwd=tmp_path), "does not exist")


def test_checkpoint_config_mismatch_is_a_clear_error(tmp_path):
    ok(run("train.py", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    before = {p: os.path.getmtime(p) for p in ckpts(tmp_path / "r")}
    args = [a if a != "32" else "64" for a in TINY]  # --width 64
    p = run("train.py", *args, "--max-steps", 4, "--results-dir", "r", "--resume", "auto", cwd=tmp_path)
    one_line_error(p, "does not match", "width=32")
    assert {p: os.path.getmtime(p) for p in ckpts(tmp_path / "r")} == before  # nothing touched


def test_image_folder_with_corrupt_files_trains(tmp_path):
    make_folder(tmp_path / "data")
    p = ok(run("train.py", *TINY, "--data-path", tmp_path / "data", "--model", "tiny", "--max-steps", 2,
               "--ckpt-every", 2, "--results-dir", "r", "--epochs", 1, cwd=tmp_path))
    assert "2 classes" in p.stdout and "skipped_images" in p.stdout


def test_torchrun_two_processes_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train.py"), *TINY, "--max-steps", "4", "--ckpt-every", "4", "--results-dir", "r"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 process(es)" in p.stdout and p.stdout.count("step 0000004 loss") == 1  # only rank 0 logs
    saved = ckpts(tmp_path / "r")
    assert len(saved) == 1 and load(saved[0])["step"] == 4
    assert len(glob.glob(str(tmp_path / "r" / "*"))) == 1  # one run directory, chosen by rank 0


# ------------------------------------------------------------------------------------------------
# sampling and FID


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert sample.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # A full covariance against itself, and a rotation of both (FID is rotation invariant).
    f = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    mu, s = sample.feature_stats(f)
    assert abs(sample.frechet_distance(mu, s, mu, s)) < 1e-8
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert sample.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-6)


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
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    path = tmp_path / "detector.pkl"
    path.write_bytes(pickle.dumps(_PickledTorchScript(buf.getvalue())))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: the detector format is TorchScript
def test_sample_npz_stages_and_fid(tmp_path):
    ok(run("train.py", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    ckpt = ckpts(tmp_path / "r")[-1]
    p = ok(run("sample.py", "--ckpt", ckpt, "--num-fid-samples", 10, "--per-proc-batch-size", 4, "--steps-per-stage", "1,2,1",
               "--class-labels", "1,3", "--save-stages", "--solver", "heun", "--sample-dir", "s", cwd=tmp_path))
    assert "images/s" in p.stdout
    (npz,) = glob.glob(str(tmp_path / "s" / "*.npz"))
    with np.load(npz) as f:
        assert f["arr_0"].shape == (10, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert list(f["labels"]) == [1, 3] * 5
    assert len(glob.glob(npz[:-4] + "/*.png")) == 10
    sheet = Image.open(npz[:-4] + "_stages.png")  # 4 samples x (3 stages + 2 details), upscaled x4
    assert sheet.size == (4 * (5 * 18 + 2), 4 * (4 * 18 + 2))

    # FID of the samples against reference statistics of themselves is ~0; against other data it is not.
    det = make_detector(tmp_path)
    ok(run("sample.py", "--make-ref", npz, "--image-size", 16, "--detector", det, "--ref-out", "ref.npz",
           "--num-workers", 0, cwd=tmp_path))
    p = ok(run("sample.py", "--images", npz, "--fid-ref", "ref.npz", "--detector", det, cwd=tmp_path))
    assert abs(float(p.stdout.split("FID ")[1].split()[0])) < 1e-6
    np.savez(tmp_path / "other.npz", arr_0=np.full((10, 16, 16, 3), 200, np.uint8) + np.arange(10, dtype=np.uint8)[:, None, None, None])
    p = ok(run("sample.py", "--images", "other.npz", "--fid-ref", "ref.npz", "--detector", det, cwd=tmp_path))
    assert float(p.stdout.split("FID ")[1].split()[0]) > 0.1
    one_line_error(run("sample.py", "--images", npz, "--fid-ref", "ref.npz", cwd=tmp_path), "--detector")
