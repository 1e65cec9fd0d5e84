"""train.py, runs.py, data.py and sample.py end to end on the CPU: tiny networks, 16 px, a few steps each; main()
in this process (`inproc`) unless the process itself is checked (`run`: an exit code, torchrun)."""

import glob
import math
import os
import re
import subprocess
import sys
from argparse import Namespace
from copy import deepcopy

import numpy as np
import pytest
import torch
from PIL import Image

import cdc
import data
import runs
import train
from conftest import HERE, TINY, ckpts, inf_backward, inproc, make_checkpoint, ok, one_line_error, run, wake


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --- data -----------------------------------------------------------------------------------------


def test_procedural_shapes_deterministic_and_in_range():
    ds = data.ProceduralShapes(size=20, image_size=24, num_classes=5, seed=3)
    x, y = ds[7]
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8  # uint8 through the loader, normalised on the device
    v = data.normalize(x)
    assert v.dtype == torch.float32 and -1 <= v.min() and v.max() <= 1 and v.std() > 0.05  # not a blank image
    torch.testing.assert_close(v, x.double().mul(2 / 255).sub(1).float())
    assert 0 <= y < 5 and isinstance(y, int)
    assert torch.equal(x, data.ProceduralShapes(size=20, image_size=24, num_classes=5, seed=3)[7][0])
    assert not torch.equal(x, data.ProceduralShapes(size=20, image_size=24, num_classes=5, seed=4)[7][0])
    assert {ds[i][1] for i in range(20)} == set(range(5))  # every class appears
    assert ds.num_classes == 5 and data.build_dataset(None, 8, num_classes=2).num_classes == 2


def make_folder(root):
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        os.makedirs(os.path.join(root, c))
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, (25, 25), dtype=np.uint8)).save(os.path.join(root, "cats", "gray.png"))
    Image.fromarray(rng.integers(0, 256, (25, 25, 4), dtype=np.uint8)).save(os.path.join(root, "dogs", "rgba.png"))
    png = open(os.path.join(root, "cats", "0.png"), "rb").read()
    open(os.path.join(root, "cats", "broken.png"), "wb").write(png[: len(png) // 2])  # truncated
    open(os.path.join(root, "dogs", "junk.jpg"), "wb").write(b"not an image")


def test_npz_dataset_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 20, 18, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=imgs, labels=np.array([0, 2, 1, 2, 0]))
    ds = data.build_dataset(str(tmp_path / "d.npz"), 16)
    assert len(ds) == 5 and ds.num_classes == 3 and ds[1][1] == 2 and ds[1][0].shape == (3, 16, 16)
    # a 16x16 image at 16 px, evaluation view: exactly the stored pixels
    np.savez(tmp_path / "e.npz", arr_0=imgs[:, :16, :16])
    ev = data.build_dataset(str(tmp_path / "e.npz"), 16, train=False)
    assert ev.num_classes == 0
    assert torch.equal(ev[0][0].permute(1, 2, 0), torch.from_numpy(imgs[0, :16, :16]))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    for bad in ("missing", "bad.npz", "float.npz"):
        with pytest.raises(data.DataError):
            data.build_dataset(str(tmp_path / bad), 16)


def crop_positions(out, full, size):
    """The (x, y) at which `out` (size x size, HWC uint8) sits in `full`, and whether it is mirrored."""
    h, w = full.shape[:2]
    hits = [(x, y, flip) for y in range(h - size + 1) for x in range(w - size + 1) for flip in (False, True)
            if np.array_equal(out, full[y:y + size, x:x + size][:, ::-1] if flip else full[y:y + size, x:x + size])]
    assert len(hits) == 1, hits
    return hits[0]


def test_table7_crop_and_flip_are_a_function_of_seed_epoch_and_index(tmp_path):
    """Table 7's transform as train.py builds it: shorter side -> round(1.125 size), a uniform random crop
    (every position occurs), mirrored with probability 1/2 (never with --no-hflip), drawn from (seed, epoch,
    index) alone, in any loader worker and order (bit-exact resume); evaluation: the centre, no draw."""
    pic = np.random.default_rng(1).integers(0, 256, (36, 44, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(pic).resize((22, 18), Image.LANCZOS))     # 36 -> round(1.125 * 16) = 18
    where = lambda x: crop_positions(x.permute(1, 2, 0).numpy(), resized, 16)  # noqa: E731
    np.savez(tmp_path / "d.npz", arr_0=np.stack([pic] * 300))
    hits = {}
    for flag in (["--no-hflip"], []):
        args = train.get_parser().parse_args(["--data-path", str(tmp_path / "d.npz"), "--resolutions", "8,16",
                                              "--global-batch-size", "4", *flag])
        train.resolve_args(args, demo=False)
        ds = train.build_data(args, 1, 0)[0]
        hits[bool(flag)] = [where(ds[i][0]) for i in range(300)]
    assert {(x, y) for x, y, _ in hits[False]} == {(x, y) for x in range(7) for y in range(3)}
    assert abs(sum(f for _, _, f in hits[False]) - 150) < 4 * math.sqrt(300 / 4)  # Binomial(300, 1/2), 4 sd
    assert not any(f for _, _, f in hits[True])
    order = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6, 23, 12, 22, 13, 21, 14, 20, 15, 19, 16, 18, 17]

    def loaded():  # by 2 worker processes, in another order
        loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=order, num_workers=2)
        return {i: where(x[0]) for i, (x, _) in zip(order, loader)}
    ds.set_epoch(1)                                                                # a new epoch: new crops and flips
    assert sum(p != hits[False][i] for i, p in loaded().items()) >= 18
    ds.set_epoch(0)
    assert loaded() == {i: hits[False][i] for i in order}
    reseeded = data.build_dataset(str(tmp_path / "d.npz"), 16, seed=1)             # train.py's --global-seed is 0
    assert sum(where(reseeded[i][0]) != hits[False][i] for i in order) >= 18
    ev = data.build_dataset(str(tmp_path / "d.npz"), 16, train=False)              # evaluation: the resized centre
    centre = np.asarray(Image.fromarray(pic).resize((20, 16), Image.LANCZOS))
    ev.set_epoch(7)
    assert crop_positions(ev[0][0].permute(1, 2, 0).numpy(), centre, 16) == (2, 0, False) and torch.equal(ev[0][0], ev[4][0])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_data_order_splits_every_global_batch_and_continues_on_any_world_size(world):
    """Rank r's step-i batch is a share of global batch i of the one-process order (disjoint, together the
    batch), also resumed after 3 global batches on any world size; a new epoch is a new permutation."""
    size, G, seed = 50, 8, 3
    ref = {e: list(data.DataOrder(size, 1, 0, G, seed=seed)) for e in (0, 2)}
    one = data.DataOrder(size, 1, 0, G, seed=seed)
    one.set_position(2, 0)
    ref[2] = list(one)
    assert len(ref[0]) == 48 and len(set(ref[0])) == 48 and set(ref[0]) <= set(range(size))  # 6 whole global batches
    assert ref[2] != ref[0] and list(data.DataOrder(size, 1, 0, G, seed=seed + 1)) != ref[0]
    b = G // world
    for epoch, pos in ((0, 0), (2, 3 * G)):
        orders = [data.DataOrder(size, world, r, G, seed=seed) for r in range(world)]
        for o in orders:
            o.set_position(epoch, pos)
        streams = [list(o) for o in orders]
        assert all(len(s) == len(o) == (48 - pos) // world for s, o in zip(streams, orders))
        for i in range(6 - pos // G):
            shares = [s[i * b:(i + 1) * b] for s in streams]
            assert sorted(sum(shares, [])) == sorted(ref[epoch][pos + i * G:pos + (i + 1) * G]), (epoch, i)
        assert len(set(sum(streams, []))) == 48 - pos                                # no index on two ranks


# --- training step, EMA, precision ----------------------------------------------------------------


def test_ema_decay_warmup_schedule():
    """decay_t = min(decay, (1 + t) / (10 + t)): 0.5 at step 8, the cap from step 89,990 (and early for 0.5)."""
    assert train.ema_decay_at(8, 0.9999, True) == pytest.approx(0.5, abs=1e-15)
    assert train.ema_decay_at(1000, 0.9999, True) == pytest.approx(1001 / 1010, abs=1e-15)
    assert train.ema_decay_at(89_988, 0.9999, True) < 0.9999 == train.ema_decay_at(89_990, 0.9999, True)
    assert train.ema_decay_at(50, 0.5, True) == 0.5
    assert train.ema_decay_at(0, 0.9999, False) == train.ema_decay_at(7, 0.9999, False) == 0.9999


def test_bf16_autocast_training_step_and_sampler_match_fp32():
    """--precision bf16 (CPU autocast): one train_step and one cdc.sample are finite, close to fp32 and not
    equal to it (autocast took effect); fp32 is the plain computation bit for bit."""
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    torch.manual_seed(0)
    model = wake(cdc.create_model("tiny", depth=2, width=64, heads=2, num_classes=4, resolutions=config.resolutions))
    x, y = torch.randn(12, 3, 16, 16).clamp(-1, 1), torch.randint(0, 4, (12,))
    res = {}
    for precision in ("fp32", "bf16"):
        args, m = Namespace(precision=precision, lr=1e-3, **train.TABLE7), deepcopy(model)
        torch.manual_seed(1)
        out, gnorm, ok = train.train_step(train.Objective(m, config, 0.1, "mean", "stratified"), m, deepcopy(m).requires_grad_(False),
                                          train.make_optimizer(m, args), x, y, torch.Generator().manual_seed(1), 0, args)
        grad = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        assert bool(ok) and out["loss"].dtype == torch.float32 and torch.isfinite(out["stage_loss"]).all() and torch.isfinite(grad).all()
        res[precision] = out["loss"].item(), gnorm.item(), grad, torch.cat([p.detach().flatten() for p in m.parameters()])
    (l32, g32, d32, w32), (l16, g16, d16, w16) = res["fp32"], res["bf16"]
    torch.manual_seed(1)
    plain = cdc.training_losses(deepcopy(model), x, y, config, class_dropout=0.1, reduction="mean",
                                generator=torch.Generator().manual_seed(1), step=0)["loss"].item()
    assert l32 == plain and l16 != l32 and l16 == pytest.approx(l32, rel=2e-2)
    assert g16 == pytest.approx(g32, rel=5e-2)
    assert torch.nn.functional.cosine_similarity(d16, d32, dim=0) > 0.99
    assert (w16 - w32).abs().max() <= 2.5e-3                           # one AdamW step of lr 1e-3 each

    field = cdc.guided_field(model.eval(), torch.tensor([0, 1, 2, 3]), 3.0)
    draw = lambda: cdc.sample(field, config, 4, steps=3, generator=torch.Generator().manual_seed(0))  # noqa: E731
    s32 = draw()
    with torch.autocast("cpu", torch.bfloat16):
        s16 = draw()
    assert s16.shape == s32.shape == (4, 3, 16, 16) and s16.dtype == torch.float32 and torch.isfinite(s16).all()
    err = (s16 - s32).abs().max().item()
    assert 0 < err < 0.05 * s32.std().item(), err


# --- training runs, checkpoints, resume -----------------------------------------------------------


@pytest.mark.parametrize("accum, res", [(1, "4,8,16"), (2, "4,16")])
def test_train_runs_and_resume_is_bit_exact(tmp_path, accum, res):
    """8 steps straight == 4, resume, 4: model and EMA bit-identical across an epoch boundary, also with 2
    micro-batches on a 4x path (Table 6); every checkpoint has its grid and stage sheet."""
    flags = [*TINY, "--resolutions", res, "--grad-accum", accum, "--ckpt-every", 4]
    ok(inproc("train.py", *flags, "--max-steps", 8, "--results-dir", "a", cwd=tmp_path))
    ok(inproc("train.py", *flags, "--max-steps", 4, "--results-dir", "b", cwd=tmp_path))
    p = ok(inproc("train.py", *flags, "--max-steps", 8, "--results-dir", "b", "--resume", "auto", cwd=tmp_path))
    assert "resumed from" in p.stdout and f"{accum} micro-batch(es) of {8 // accum} per process" in p.stdout
    a, b = load(ckpts(tmp_path / "a")[-1]), load(ckpts(tmp_path / "b")[-1])
    assert a["step"] == b["step"] == 8 and a["data"] == b["data"] == {"epoch": 1, "pos": 16}
    assert ",".join(map(str, a["config"]["cdc"]["resolutions"])) == res
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["opt"]["state"][0]["step"] == 8 and any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])
    assert len(glob.glob(str(tmp_path / "a" / "*" / "samples" / "000000[48]*.png"))) == 4
    log = open(glob.glob(str(tmp_path / "a" / "*" / "log.txt"))[0]).read()
    assert "step 0000008 loss" in log and "img/s" in log and "4px" in log


def test_a_run_with_an_inf_gradient_stops_before_saving(tmp_path, monkeypatch, capsys):
    """Step 3's gradient is inf (its loss finite): the run stops at the next check with one line naming
    the last good checkpoint, and none after step 2 exists."""
    real, calls = cdc.velocity_loss, []

    def loss(b, t, *a):
        calls.append(1)
        return inf_backward(real(b, t, *a)) if len(calls) > 2 * 3 else real(b, t, *a)  # 3 stages per step

    monkeypatch.setattr(cdc, "velocity_loss", loss)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--max-steps", "8", "--ckpt-every", "2", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "not finite" in err[0] and "0000002.pt" in err[0], err
    assert [os.path.basename(p) for p in ckpts(tmp_path / "r")] == ["0000002.pt"]
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in load(ckpts(tmp_path / "r")[0])[part].values())


def test_time_limit_stops_between_log_steps_and_saves(tmp_path):
    """The limit is checked every step in one process, not only at log steps; the stop saves a checkpoint
    and the sample grid (the CPU demo's under-10-minutes guarantee)."""
    p = ok(inproc("train.py", *TINY, "--log-every", 1000, "--ckpt-every", 1000, "--max-steps", 300,
                  "--time-limit", 0.002, "--results-dir", "r", cwd=tmp_path))
    stopped = int(p.stdout.split("stopping at step ")[1].split()[0])
    assert 0 < stopped < 300
    assert [os.path.basename(c) for c in ckpts(tmp_path / "r")] == [f"{stopped:07d}.pt"]
    assert glob.glob(str(tmp_path / "r" / "*" / "samples" / f"{stopped:07d}_stages.png"))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """A save killed half-way leaves the previous checkpoint and no partial file; a leftover temporary or
    damaged newest file is skipped by --resume auto (with a warning), never a silent fresh start."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    good = str(tmp_path / "run" / "checkpoints" / "0000004.pt")
    runs.save_checkpoint({"step": 4, "w": torch.ones(3)}, good)

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint({"step": 8}, str(tmp_path / "run" / "checkpoints" / "0000008.pt"))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000004.pt"] and load(good)["step"] == 4
    (tmp_path / "run" / "checkpoints" / "0000012.pt.tmp999").write_bytes(b"partial")  # left by a SIGKILL
    (tmp_path / "run" / "checkpoints" / "0000016.pt").write_bytes(b"PK\x03\x04 partial")  # e.g. a full disk
    os.rename(tmp_path / "run", tmp_path / "000-test-16")
    run_dir = str(tmp_path / "000-test-16")
    assert [os.path.basename(p) for p in runs.list_checkpoints(run_dir)] == ["0000016.pt", "0000004.pt"]  # newest first
    assert choose(tmp_path, "auto") == (run_dir, os.path.join(run_dir, "checkpoints", "0000004.pt"), None)
    assert "warning: skipping unreadable checkpoint" in capsys.readouterr().err
    (tmp_path / "000-test-16" / "checkpoints" / "0000004.pt").write_bytes(b"PK\x03\x04 partial")
    with pytest.raises(runs.ConfigError, match="no loadable checkpoint among 2"):
        choose(tmp_path, "auto")


def test_save_checkpoint_is_durable_before_and_after_the_rename(tmp_path, monkeypatch):
    """Survives a power cut: the temporary file written and fsync'ed, then os.replace, then the directory fsync'ed."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync-dir", target) if os.path.isdir(target) else ("fsync-file", os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.getsize(a)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = str(tmp_path / "0000001.pt")
    fds = len(os.listdir("/proc/self/fd"))
    runs.save_checkpoint({"w": torch.arange(1000.0), "step": 1}, path)
    size = os.path.getsize(path)
    assert events == [("fsync-file", size), ("replace", size), ("fsync-dir", str(tmp_path))], events
    assert len(os.listdir("/proc/self/fd")) == fds                     # no descriptor left open
    assert load(path)["step"] == 1 and os.listdir(tmp_path) == ["0000001.pt"]


def choose(results, resume):
    args = train.get_parser().parse_args([*TINY, "--results-dir", str(results), *(["--resume", resume] if resume else [])])
    train.resolve_args(args, demo=True)
    return train.choose_run(args)


def test_choose_run_and_check_compatible(tmp_path):
    """A new run takes the next free number; --resume auto the newest checkpoint of the newest run of this
    model and size; --resume RUN_DIR its newest; --resume FILE that file; anything else is one clear error."""
    assert choose(tmp_path, None) == (str(tmp_path / "000-test-16"), None, None)
    (tmp_path / "003-XL-256").mkdir()
    for run_dir, step in (("001-test-16", 3), ("001-test-16", 7), ("002-test-16", 2), ("004-test-8", 9)):
        (tmp_path / run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        runs.save_checkpoint({"step": step}, str(tmp_path / run_dir / "checkpoints" / f"{step:07d}.pt"))
    assert choose(tmp_path, None)[0] == str(tmp_path / "005-test-16")
    newest = str(tmp_path / "002-test-16" / "checkpoints" / "0000002.pt")
    assert choose(tmp_path, "auto") == (str(tmp_path / "002-test-16"), newest, None)
    assert choose(tmp_path, str(tmp_path / "001-test-16"))[1].endswith("0000007.pt")
    assert choose(tmp_path, newest)[:2] == (str(tmp_path / "002-test-16"), newest)
    for bad in (tmp_path / "003-XL-256", tmp_path / "nope"):
        with pytest.raises(runs.ConfigError, match="no such checkpoint file"):
            choose(tmp_path, str(bad))
    config = {"model": {"width": 32, "resolutions": (4, 8)}, "cdc": {"sigma": 1.0, "windows": None}}
    train.check_compatible({"config": config}, config, "c.pt")
    for old, words in (({"model": {"width": 64, "resolutions": (4, 8)}, "cdc": {"sigma": 1.0, "windows": None}}, "width=64"),
                       ({"model": {"width": 32, "resolutions": (4, 8)}, "cdc": {"sigma": 1.0, "windows": (0.5, 0.5)}},
                        "windows=(0.5, 0.5) (checkpoint) vs None (flags)"),
                       ({"model": {"resolutions": (4, 8)}, "cdc": {"sigma": 1.0, "windows": None}}, "width=None (checkpoint) vs 32")):
        with pytest.raises(runs.ConfigError, match=re.escape(words)):
            train.check_compatible({"config": old}, config, "c.pt")


class NotATensor:
    """Anything a plain pickle would run code for: weights_only loading must refuse it."""


def test_resume_refuses_what_it_cannot_load_or_that_does_not_match(tmp_path):
    """Resuming another network's checkpoint, or a file weights_only refuses: one line, nothing saved touched."""
    ok(inproc("train.py", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    before = {p: os.path.getmtime(p) for p in ckpts(tmp_path / "r")}
    p = inproc("train.py", *TINY, "--patch-size", "4", "--max-steps", 4, "--results-dir", "r", "--resume", "auto", cwd=tmp_path)
    one_line_error(p, "does not match", "patch_size=2 (checkpoint) vs 4 (flags)")
    runs.save_checkpoint({"step": 9, "x": NotATensor()}, str(tmp_path / "0000009.pt"))
    one_line_error(inproc("train.py", *TINY, "--resume", tmp_path / "0000009.pt", cwd=tmp_path), "cannot load checkpoint")
    assert {p: os.path.getmtime(p) for p in ckpts(tmp_path / "r")} == before


def test_keep_last_keeps_the_newest_the_marked_and_never_a_newer_one(tmp_path):
    """--keep-last N after saving step s: of the checkpoints up to s the newest N and those marked
    NNNNNNN.keep stay, a newer one (another timeline, perhaps --resume auto's) is never deleted; 0 keeps all."""
    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    names = lambda: sorted(os.listdir(d))  # noqa: E731

    def save(step, keep):
        runs.save_checkpoint({"step": step}, str(d / f"{step:07d}.pt"))
        runs.prune_checkpoints(str(tmp_path / "run"), keep, str(d / f"{step:07d}.pt"))
    for step in (2, 4, 6, 20):
        save(step, 0)
    assert names() == ["0000002.pt", "0000004.pt", "0000006.pt", "0000020.pt"]
    (d / "0000002.keep").touch()
    save(8, 2)
    assert names() == ["0000002.keep", "0000002.pt", "0000006.pt", "0000008.pt", "0000020.pt"]
    save(10, 1)
    assert names() == ["0000002.keep", "0000002.pt", "0000010.pt", "0000020.pt"]


def test_resume_auto_before_the_first_checkpoint_reuses_the_empty_run(tmp_path):
    """--resume auto reuses a run directory left without checkpoints (killed before its first save); train.py
    prunes with --keep-last 2, keeping the step the user marked (0000001.keep)."""
    (tmp_path / "r" / "000-test-16" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "000-test-16" / "checkpoints" / "0000001.keep").touch()
    out = ok(inproc("train.py", *TINY, "--max-steps", 5, "--ckpt-every", 1, "--keep-last", 2, "--results-dir", "r",
                    "--resume", "auto", cwd=tmp_path)).stdout
    assert "reusing the empty run" in out and os.listdir(tmp_path / "r") == ["000-test-16"]
    assert sorted(os.listdir(tmp_path / "r" / "000-test-16" / "checkpoints")) == [
        "0000001.keep", "0000001.pt", "0000004.pt", "0000005.pt"]
    ok(inproc("train.py", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    assert sorted(os.listdir(tmp_path / "r")) == ["000-test-16", "001-test-16"]


def test_bad_inputs_give_one_error_line(tmp_path):
    one_line_error(run("train.py", *TINY, "--data-path", tmp_path / "nope", cwd=tmp_path), "does not exist")  # a real process
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    one_line_error(inproc("train.py", *TINY, "--data-path", tmp_path / "bad.npz", cwd=tmp_path), "npz")
    one_line_error(inproc("train.py", *TINY, "--resolutions", "4,9,16", cwd=tmp_path), "power-of-two")
    one_line_error(inproc("train.py", *TINY, "--patch-size", "3", cwd=tmp_path), "patch size")
    one_line_error(inproc("train.py", *TINY, "--keep-last", "-1", cwd=tmp_path), "--keep-last")
    one_line_error(inproc("train.py", *TINY, "--class-dropout", "1.5", cwd=tmp_path), "--class-dropout")
    one_line_error(inproc("sample.py", "--ckpt", tmp_path / "none.pt", "--sde-scale", "-1", cwd=tmp_path), "--sde-scale")
    one_line_error(inproc("train.py", "--max-steps", 1, "--global-batch-size", 6, "--grad-accum", 4, cwd=tmp_path),
                   "--grad-accum 4")
    one_line_error(inproc("sample.py", "--ckpt", tmp_path / "none.pt", cwd=tmp_path), "does not exist")


def test_image_folder_with_corrupt_files_trains_and_unconditional_ignores_labels(tmp_path):
    """A folder of 2 classes (labels from the sorted names, grey and RGBA made RGB) with 2 unreadable files
    trains a 2-class model and logs the skips; --unconditional on labelled data: a model without classes."""
    make_folder(tmp_path / "data")
    ds = data.build_dataset(str(tmp_path / "data"), 16)
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 16 and ds.classes == ["cats", "dogs"] and [y for _, y in items] == [0] * 8 + [1] * 8
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x, _ in items) and ds.num_skipped == 2
    p = ok(inproc("train.py", *TINY, "--data-path", tmp_path / "data", "--max-steps", 2, "--ckpt-every", 2,
                  "--results-dir", "c", cwd=tmp_path))
    assert "2 classes" in p.stdout and "skipped_images" in p.stdout
    assert load(ckpts(tmp_path / "c")[-1])["config"]["model"]["num_classes"] == 2
    imgs = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=imgs, labels=np.arange(16) % 3)
    ok(inproc("train.py", *TINY, "--data-path", tmp_path / "d.npz", "--max-steps", 2, "--ckpt-every", 2,
              "--unconditional", "--results-dir", "u", cwd=tmp_path))
    assert load(ckpts(tmp_path / "u")[-1])["config"]["model"]["num_classes"] == 0


# What each rank of a torchrun run did, recorded (in the launched processes only) by wrapping the data
# set's __getitem__, cdc.randn (the coupling noise) and train.train_step.
DDP_DRIVER = """
import os, sys
import torch
sys.path.insert(0, {here!r})
import conftest, cdc, data, train  # conftest: the test size
rec = {{"indices": [], "noise": [], "weights": [], "seeds": []}}
get, randn, step, end = data.ProceduralShapes.__getitem__, cdc.randn, train.train_step, train.end_distributed
def getitem(self, i):
    rec["indices"].append(int(i))
    return get(self, i)
def recording_randn(*a, **k):
    rec["noise"].append(randn(*a, **k))
    return rec["noise"][-1].clone()
def recording_step(objective, model, ema, opt, x, y, gen, s, args):
    rec["seeds"].append((torch.initial_seed(), gen.initial_seed()))
    out = step(objective, model, ema, opt, x, y, gen, s, args)
    rec["weights"].append({{k: v.detach().clone() for k, v in model.state_dict().items()}})
    return out
def save_then_end():  # train() ends a distributed run with os._exit: save what was recorded first
    torch.save(rec, "rank%s.pt" % os.environ["RANK"])
    end()
data.ProceduralShapes.__getitem__, cdc.randn, train.train_step = getitem, recording_randn, recording_step
train.end_distributed = save_then_end
train.main(sys.argv[1:])
"""


def test_torchrun_two_processes_gloo_ranks_agree_and_split_the_data(tmp_path):
    """4 steps in 1 process, then 4 more resumed under torchrun (2 gloo processes): after every step both
    ranks hold identical weights, rank r read its share of each global batch of the 1-process order, the
    ranks drew different noise from their own seeds, and rank 0 alone logs and saves."""
    ok(inproc("train.py", *TINY, "--max-steps", 4, "--ckpt-every", 4, "--results-dir", "r", cwd=tmp_path))
    (tmp_path / "driver.py").write_text(DDP_DRIVER.format(here=HERE))
    p = ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           tmp_path / "driver.py", *map(str, TINY), "--max-steps", "8", "--ckpt-every", "4",
                           "--results-dir", "r", "--resume", "auto"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600))
    assert "2 process(es)" in p.stdout and p.stdout.count("step 0000008 loss") == 1  # only rank 0 logs
    assert "(epoch 0, image 32 of the epoch)" in p.stdout and "bit-exact resume needs the same world size" in p.stdout
    saved = ckpts(tmp_path / "r")                     # one run directory, chosen by rank 0
    last = load(saved[-1])
    assert len(saved) == 2 and last["step"] == 8 and last["data"] == {"epoch": 1, "pos": 16} and last["world_size"] == 2
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(r0["weights"]) == len(r1["weights"]) == 4
    for s, (w0, w1) in enumerate(zip(r0["weights"], r1["weights"])):
        assert all(torch.equal(w0[k], w1[k]) for k in w0), f"ranks disagree after step {s + 5}"
    assert any(not torch.equal(r0["weights"][0][k], r0["weights"][-1][k]) for k in w0)  # and they trained
    assert all(torch.equal(last["model"][k], r1["weights"][-1][k]) for k in w0)
    epoch1 = data.DataOrder(48, 1, 0, 8, seed=0)
    epoch1.set_position(1, 0)
    ref = list(data.DataOrder(48, 1, 0, 8, seed=0))[32:] + list(epoch1)    # global batches 4-7 of 1 process
    assert len(r0["indices"]) == len(r1["indices"]) == 16
    for s in range(4):
        a, b = r0["indices"][4 * s:4 * s + 4], r1["indices"][4 * s:4 * s + 4]
        assert not set(a) & set(b) and sorted(a + b) == sorted(ref[8 * s:8 * s + 8]), s
    assert len(r1["noise"]) > 0 and all(not torch.equal(u, v) for u, v in zip(r0["noise"], r1["noise"]))  # rank 0 also samples
    assert len({seed for r in (r0, r1) for pair in r["seeds"] for seed in pair}) == 16  # (rank, step, stream)


def test_sample_npz_is_the_same_for_one_and_two_processes(tmp_path):
    """sample.py on a 4x path: global batch b's noise and labels depend on (seed, b) only, so 1 process and
    2 (torchrun, gloo; batches 0 and 2 on rank 0, 1 on rank 1) write the same .npz and stage sheets."""
    make_checkpoint(str(tmp_path / "000-tiny-16" / "checkpoints" / "0000000.pt"), cdc.CDCConfig(resolutions=(4, 16)))
    flags = ["--ckpt", tmp_path / "000-tiny-16", "--num-fid-samples", 10, "--per-proc-batch-size", 4,
             "--steps-per-stage", 2, "--solver", "sde", "--seed", 3, "--save-stages"]
    ok(inproc("sample.py", *flags, "--sample-dir", "one", cwd=tmp_path))
    ok(run("sample.py", *flags, "--sample-dir", "two", cwd=tmp_path, torchrun=True))
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*.npz")), glob.glob(str(tmp_path / "two" / "*.npz"))
    assert glob.glob(str(tmp_path / "one" / "*_stages.png"))
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (10, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["labels"], b["labels"]) and len(set(a["labels"].tolist())) > 1
        assert len({x.tobytes() for x in a["arr_0"]}) == 10  # ten different images, not one repeated


# --- presets and automatic settings ---------------------------------------------------------------


def test_presets_fill_the_flags_not_given_and_help_shows_their_values():
    """--preset fills what the user left out, never what was given; --help prints every preset's value."""
    args = train.get_parser().parse_args(["--preset", "imagenet512", "--data-path", "x", "--lr", "3e-4"])
    note = train.resolve_args(args, demo=False)
    assert (args.model, args.patch_size, args.resolutions, args.lr) == ("XL", 8, (32, 64, 128, 256, 512), 3e-4)
    assert note.startswith("--preset imagenet512") and "lr=" not in note
    text = " ".join(train.get_parser().format_help().split())
    assert "imagenet512 32,64,128,256,512" in text and "imagenet64 2" in text and "None" not in text


def test_with_data_every_default_is_table7():
    """train.py --data-path DIR alone is Table 7's recipe, read off what train() builds: XL/4 (Table 1's 677M),
    the CDCConfig, the AdamW, the EMA, batch, clip, dropout, fusion, epochs, the grids' S_cfg = 3."""
    args = train.get_parser().parse_args(["--data-path", "x"])
    train.resolve_args(args, demo=False)
    with torch.device("meta"):
        cfg, model = train.build(args, 1000)
    assert (model.config.depth, model.config.width, model.config.patch_size) == (28, 1152, 4)
    assert sum(p.numel() for p in model.parameters()) == 676_846_128
    assert cfg == cdc.CDCConfig(resolutions=(32, 64, 128, 256), sigma=1.0, gamma=2.0, windows=None, interpolant="linear")
    assert model.config.resolutions == cfg.resolutions
    (group,) = train.make_optimizer(torch.nn.Linear(2, 2), args).param_groups
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-4, (0.9, 0.95), 1e-6, 0.0)
    assert train.ema_decay_at(10 ** 6, args.ema_decay, args.ema_warmup) == 0.9999
    assert (args.global_batch_size, args.grad_clip, args.class_dropout, args.fusion, args.epochs) == (256, 1.0, 0.1, "xattn", 200)
    assert args.precision is None and args.compile is None and args.cfg_scale == 3.0  # precision, compile: per device
    assert args.loss_reduction == "scaled-sum"  # Alg. 1's stage weights d_k, divided by d_K


@pytest.mark.parametrize("cores, local_world, workers", [(64, 1, 8), (16, 8, 1), (4, 1, 3), (2, 2, 0)])
def test_default_loader_workers_share_the_cores(monkeypatch, cores, local_world, workers):
    """One loader worker per core of this process's share (LOCAL_WORLD_SIZE), one core left, at most 8."""
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert train.default_workers() == workers


@pytest.mark.parametrize("faster", [1, 2])
def test_cpu_threads_are_the_faster_measured(monkeypatch, faster):
    """pick_threads keeps the faster of 1 thread and one per core (a fake clock), on a copy of the model."""
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock) * (1 if torch.get_num_threads() == faster else 5))
    torch.set_num_threads(2)
    try:
        args = train.get_parser().parse_args(["--lr", "1e-3", "--precision", "fp32"])
        train.resolve_args(args, demo=True)
        torch.manual_seed(0)
        model = cdc.create_model("test", num_classes=4, resolutions=(4, 8))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        n, measured = train.pick_threads(model, cdc.CDCConfig(resolutions=(4, 8)), args, 4)
        assert n == faster == torch.get_num_threads() and "1 thread(s)" in measured and "2 thread(s)" in measured
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        torch.set_num_threads(1)
