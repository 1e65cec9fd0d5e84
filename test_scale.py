"""Tests of training at scale and of Table 6's resolution paths.

Compiled static shapes, faults (a non-finite gradient, resume on another number of processes, --resume
auto before the first checkpoint, with --keep-last), and train.py and sample.py on a path whose sides grow
by 4x (the same stage mix on every DDP rank is test_hotpath.py's; the quota rule itself, and the coupling,
operators and samplers on such paths, are test_cdc.py's).
"""

import glob
import os
from copy import deepcopy

import pytest
import torch

import cdc
import train
from conftest import TINY, inproc, ok, run, wake


def tiny_model(resolutions=(4, 8, 16), seed=0):
    torch.manual_seed(seed)
    return wake(cdc.create_model("tiny", depth=1, width=32, heads=2, num_classes=4, resolutions=resolutions))


# ------------------------------------------------------------------------------------------------
#                                    Compiled, static shapes
# ------------------------------------------------------------------------------------------------


def test_compile_builds_each_stage_once_in_training_and_sampling():
    """dynamic=False: one graph per (stage, per-stage batch, grad mode), never rebuilt; no graph breaks.
    (The eager backend traces exactly as inductor would but skips code generation: seconds, not minutes.)"""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    net = train.compile_model(model, backend="eager")
    config = cdc.CDCConfig(resolutions=(4, 8, 16))

    def train_steps(B, steps):
        for step in steps:
            out = cdc.training_losses(net, torch.randn(B, 3, 16, 16), torch.randint(0, 4, (B,)), config,
                                      generator=torch.Generator().manual_seed(step), step=step)
            out["loss"].backward()
        return counters["stats"]["unique_graphs"]

    assert train_steps(6, range(4)) == 3            # 2 images per stage every step: 3 graphs
    assert train_steps(6, range(4, 8)) == 3         # ... and never again
    assert train_steps(7, range(6)) == 6            # 7 = 2+2+3 rotating: each stage also sees batch 3
    field = cdc.guided_field(net, torch.arange(4), 2.0)
    for _ in range(2):
        cdc.sample(field, config, 4, steps=2, generator=torch.Generator().manual_seed(0))
        assert counters["stats"]["unique_graphs"] == 9  # no-grad sampling: one graph per stage, once
    assert not counters["graph_break"], dict(counters["graph_break"])


# ------------------------------------------------------------------------------------------------
#                                            Faults
# ------------------------------------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), inf backward."""

    @staticmethod
    def forward(ctx, v):
        return v.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_a_non_finite_gradient_moves_neither_weights_nor_optimiser_nor_ema(monkeypatch):
    model = tiny_model()
    args = train.get_parser().parse_args(["--lr", "1e-2", "--precision", "fp32"])
    train.resolve_args(args, demo=True)
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    objective = train.Objective(model, config, 0.1, "mean", "stratified")
    ema, opt = deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    train.train_step(objective, model, ema, opt, x, y, torch.Generator().manual_seed(0), 0, args)  # a good step
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, ema)]
    opt_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    real = cdc.velocity_loss
    monkeypatch.setattr(cdc, "velocity_loss", lambda b, t, *a: _InfGrad.apply(real(b, t, *a)))
    out, gnorm, ok = train.train_step(objective, model, ema, opt, x, y, torch.Generator().manual_seed(1), 1, args)
    assert torch.isfinite(out["loss"]) and not torch.isfinite(gnorm) and not ok
    for m, b in zip((model, ema), before):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())
    assert all(torch.equal(v, opt_before[k]) for k, v in opt.state_dict()["state"][0].items())
    monkeypatch.undo()
    out, gnorm, ok = train.train_step(objective, model, ema, opt, x, y, torch.Generator().manual_seed(2), 2, args)
    assert ok and not torch.equal(model.state_dict()["final_layer.linear.bias"], before[0]["final_layer.linear.bias"])


def test_a_run_with_an_inf_gradient_stops_before_saving(tmp_path, monkeypatch, capsys):
    """Steps 1-2 are fine and saved; step 3's loss is finite but its gradient is inf: the run stops at
    the next check with one line, and no checkpoint after step 2 exists."""
    real, calls = cdc.velocity_loss, []

    def loss(b, t, *a):
        calls.append(1)
        return _InfGrad.apply(real(b, t, *a)) if len(calls) > 2 * 3 else real(b, t, *a)  # 3 stages per step

    monkeypatch.setattr(cdc, "velocity_loss", loss)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--max-steps", "8", "--ckpt-every", "2", "--results-dir", str(tmp_path / "r")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite" in err[0] and "0000002.pt" in err[0], err
    saved = sorted(glob.glob(str(tmp_path / "r" / "*" / "checkpoints" / "*.pt")))
    assert [os.path.basename(p) for p in saved] == ["0000002.pt"]
    state = torch.load(saved[0], weights_only=True)
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values())


def test_time_limit_stops_between_log_steps_and_saves(tmp_path):
    """The demo's guarantee (under 10 minutes on any machine): the limit is checked every step in one
    process, not only at log steps, and the stop writes a checkpoint and the sample grid."""
    p = ok(inproc("train.py", *TINY, "--log-every", 1000, "--ckpt-every", 1000, "--max-steps", 300,
                  "--time-limit", 0.002, "--results-dir", "r", cwd=tmp_path))
    assert "stopping at step " in p.stdout, p.stdout
    stopped = int(p.stdout.split("stopping at step ")[1].split()[0])
    assert 0 < stopped < 300
    assert [os.path.basename(c) for c in glob.glob(str(tmp_path / "r" / "*" / "checkpoints" / "*.pt"))] == [f"{stopped:07d}.pt"]
    assert glob.glob(str(tmp_path / "r" / "*" / "samples" / f"{stopped:07d}_stages.png"))


def test_resume_on_another_number_of_processes(tmp_path):
    ok(inproc("train.py", *TINY, "--max-steps", 4, "--ckpt-every", 4, "--results-dir", "r", cwd=tmp_path))
    p = ok(run("train.py", *TINY, "--max-steps", 8, "--ckpt-every", 4, "--results-dir", "r", "--resume", "auto",
               cwd=tmp_path, torchrun=True))
    assert "(epoch 0, image 32 of the epoch)" in p.stdout
    assert "bit-exact resume needs the same world size" in p.stdout
    last = torch.load(sorted(glob.glob(str(tmp_path / "r" / "*" / "checkpoints" / "*.pt")))[-1], weights_only=True)
    assert last["step"] == 8 and last["data"] == {"epoch": 1, "pos": 16} and last["world_size"] == 2


def test_resume_auto_before_the_first_checkpoint_reuses_the_empty_run(tmp_path):
    """A run killed before its first save leaves a run directory without checkpoints: --resume auto reuses
    it rather than leaving it empty beside a new one. Here the user also marked step 1 to keep
    (0000001.keep): with --keep-last 2 the run ends with that one and the newest two."""
    (tmp_path / "r" / "000-test-16" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "000-test-16" / "checkpoints" / "0000001.keep").touch()
    out = ok(inproc("train.py", *TINY, "--max-steps", 5, "--ckpt-every", 1, "--keep-last", 2, "--results-dir", "r",
                    "--resume", "auto", cwd=tmp_path)).stdout
    assert "reusing the empty run" in out
    assert os.listdir(tmp_path / "r") == ["000-test-16"]
    assert sorted(os.listdir(tmp_path / "r" / "000-test-16" / "checkpoints")) == [
        "0000001.keep", "0000001.pt", "0000004.pt", "0000005.pt"]
    ok(inproc("train.py", *TINY, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    assert sorted(os.listdir(tmp_path / "r")) == ["000-test-16", "001-test-16"]


# ------------------------------------------------------------------------------------------------
#                         Table 6: sides that grow by any power of two
# ------------------------------------------------------------------------------------------------

def test_train_and_sample_scripts_on_a_4x_path(tmp_path):
    args = [*TINY, "--resolutions", "4,16"]
    ok(inproc("train.py", *args, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    ckpt = glob.glob(str(tmp_path / "r" / "*" / "checkpoints" / "0000002.pt"))[0]
    assert list(torch.load(ckpt, weights_only=True)["config"]["cdc"]["resolutions"]) == [4, 16]
    ok(inproc("sample.py", "--ckpt", ckpt, "--num-fid-samples", 4, "--per-proc-batch-size", 4, "--steps-per-stage", 2,
              "--save-stages", "--sample-dir", "s", cwd=tmp_path))
    assert glob.glob(str(tmp_path / "s" / "*_stages.png")) and glob.glob(str(tmp_path / "s" / "*.npz"))
