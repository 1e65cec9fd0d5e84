"""Flags of train.py and sample.py that change what is computed: each test fails when the code ignores its
flag or inverts it. Flags go through the script's own parser and main() (two recorded 2-step training runs,
run_a and run_b) or the functions the script calls; sample.py's images are compared with images drawn by hand."""

import contextlib
import dataclasses
import glob
import io
import os
from argparse import Namespace
from copy import deepcopy

import numpy as np
import pytest
import torch

import cdc
import data
import runs
import sample
import train
from conftest import TINY, initial_weights, inproc, ok, wake

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # as runs.setup_distributed
EAGER = ["--no-compile"] if DEVICE.type == "cuda" else []  # the scripts compile by default on CUDA only
RES = (4, 8, 16)   # TINY's stages
NULL = 4           # TINY's built-in shapes: 4 classes, label 4 is the null class


# --- Two recorded train.py runs (main() in this process) ------------------------------------------

# Run A: stratified stage sampling (the default) with everything else away from its default.
FLAGS_A = ["--lr", "3e-3", "--fusion", "add", "--windows", "0.25,0.25,0.5", "--sigma", "0.7", "--gamma", "3",
           "--interpolant", "trigonometric", "--class-dropout", "1", "--loss-reduction", "sum", "--precision", "bf16",
           "--no-ema-warmup"]
CDC_A = cdc.CDCConfig(resolutions=RES, sigma=0.7, gamma=3.0, windows=(0.25, 0.25, 0.5), interpolant="trigonometric")
# Run B: Alg. 1's i.i.d. stage sampling and the other value of each two-valued flag.
FLAGS_B = ["--stage-sampling", "iid", "--class-dropout", "0", "--precision", "fp32", "--sigma", "1.3", "--gamma", "1.5",
           "--interpolant", "score"]
CDC_B = cdc.CDCConfig(resolutions=RES, sigma=1.3, gamma=1.5, interpolant="score")
SETTINGS = {"a": dict(flags=FLAGS_A, cdc=CDC_A, class_dropout=1.0, reduction="sum", stage_sampling="stratified"),
            "b": dict(flags=FLAGS_B, cdc=CDC_B, class_dropout=0.0, reduction="mean", stage_sampling="iid")}


def recorded_run(root, name):
    """train.main on TINY for 2 steps (a checkpoint after each) with run `name`'s flags, recording each
    training_losses call (inputs, seeds, output, labels the network saw) and each velocity_loss call."""
    rec = {"steps": [], "losses": []}
    real_losses, real_velocity = cdc.training_losses, cdc.velocity_loss

    def training_losses(model, x, y, cdc_cfg, **kw):
        seen = []
        hook = model.register_forward_pre_hook(lambda m, a: seen.append(a[2].clone()))
        seeds = torch.initial_seed(), kw["generator"].initial_seed()  # train.py seeds both before every step
        try:
            out = real_losses(model, x, y, cdc_cfg, **kw)
        finally:
            hook.remove()
        rec["steps"].append(dict(x=x.detach().clone(), y=y.clone(), seeds=seeds, step=kw["step"], cdc=cdc_cfg,
                                 labels_seen=torch.cat(seen), loss=out["loss"].item(), counts=list(out["stage_count"])))
        return out

    def velocity_loss(b, I_dot, reduction="mean", top_pixels=None):
        value = real_velocity(b, I_dot, reduction, top_pixels)
        rec["losses"].append(dict(dtype=b.dtype, b=b.detach().float(), I_dot=I_dot.detach().float(), value=value.detach()))
        return value

    argv = [*TINY, *EAGER, "--max-steps", "2", "--ckpt-every", "1", "--results-dir", str(root), *SETTINGS[name]["flags"]]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(cdc, "training_losses", training_losses)
        mp.setattr(cdc, "velocity_loss", velocity_loss)
        train.main(argv)
    rec["argv"], rec["name"] = argv, name
    rec["ckpts"] = [torch.load(p, map_location="cpu", weights_only=True)
                    for p in sorted(glob.glob(os.path.join(root, "*", "checkpoints", "*.pt")))]
    assert [c["step"] for c in rec["ckpts"]] == [1, 2] and len(rec["steps"]) == 2
    return rec


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    return recorded_run(tmp_path_factory.mktemp("run_a"), "a")


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    return recorded_run(tmp_path_factory.mktemp("run_b"), "b")


@pytest.fixture
def recorded(request):
    return request.getfixturevalue(f"run_{request.param}")


class ZeroField(torch.nn.Module):
    """The DiT at initialisation outputs exactly 0 (adaLN-Zero): the first step's loss depends on the data,
    the draws and the interpolant alone, and this field recomputes it under any configuration."""

    null_class = NULL

    def forward(self, I, tau, y):
        return torch.zeros_like(I)


def recompute(step, cdc_cfg, class_dropout, reduction, stage_sampling):
    """cdc.training_losses on a recorded step's batch and seeds, with the zero field."""
    torch.manual_seed(step["seeds"][0])
    return cdc.training_losses(ZeroField(), step["x"], step["y"], cdc_cfg, class_dropout=class_dropout,
                               reduction=reduction, generator=torch.Generator().manual_seed(step["seeds"][1]),
                               stage_sampling=stage_sampling, step=step["step"])


# --- Table 7's optimiser and EMA (constants read from args: the research code passes its own) -------


@pytest.mark.parametrize("recorded, lr", [("a", 3e-3), ("b", train.TRAIN_PRESETS["demo"]["lr"])], indirect=["recorded"])
def test_lr_flag_and_table7_constants_are_the_adamw_the_run_saved(recorded, lr):
    """The AdamW the run saved has --lr and Table 7's betas, eps and weight decay, all read from `args` by
    make_optimizer. Catches --lr ignored and a constant hard-coded, e.g. betas=(args.beta1, 0.95)."""
    want = dict(lr=lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
    for c in recorded["ckpts"]:
        (group,) = c["opt"]["param_groups"]
        assert {k: tuple(group[k]) if k == "betas" else group[k] for k in want} == pytest.approx(want, rel=1e-12)
        assert c["opt"]["state"][0]["step"] == c["step"]
    other = Namespace(lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-5, weight_decay=0.05)
    (group,) = train.make_optimizer(torch.nn.Linear(2, 2), other).param_groups
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-2, (0.8, 0.9), 1e-5, 0.05)


def test_train_step_clips_to_args_grad_clip_and_averages_with_args_ema_decay():
    """grad_clip 1e-7: AdamW steps on the gradient rescaled to norm 1e-7 (not the raw one, nor clipped at 1.0);
    ema_decay 0.3 without warm-up: EMA = 0.3 ema + 0.7 weights (catches a swapped lerp weight)."""
    args = train.get_parser().parse_args(["--precision", "fp32"])
    train.resolve_args(args, demo=True)
    args.grad_clip, args.ema_decay, args.ema_warmup = 1e-7, 0.3, False
    model, config = woken_model(0).train(), cdc.CDCConfig(resolutions=RES)
    x, y = torch.randn(6, 3, 16, 16).clamp(-1, 1), torch.randint(0, 4, (6,))
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    ref, m = deepcopy(model), deepcopy(model)
    torch.manual_seed(1)                                               # the raw gradient of the same draws
    train.Objective(ref, config, 0.1, "mean", "stratified")(x, y, torch.Generator().manual_seed(1), 0)["loss"].backward()
    raw = torch.cat([p.grad.flatten() for p in ref.parameters()])
    ema, opt = woken_model(5).requires_grad_(False), train.make_optimizer(m, args)  # an EMA away from the weights
    ema0 = {k: v.clone() for k, v in ema.state_dict().items()}
    torch.manual_seed(1)
    _, gnorm, ok_ = train.train_step(train.Objective(m, config, 0.1, "mean", "stratified"), m, ema, opt, x, y,
                                     torch.Generator().manual_seed(1), 0, args)
    assert bool(ok_) and raw.norm() > 1e-3
    torch.testing.assert_close(gnorm, raw.norm(), rtol=1e-5, atol=0)  # the norm before clipping is logged
    adam = lambda g: -args.lr * g / (g.abs() + args.eps)  # noqa: E731  (AdamW's first step, no weight decay)
    delta = flat(m) - flat(model)
    torch.testing.assert_close(delta, adam(raw * (1e-7 / raw.norm())), rtol=1e-4, atol=1e-7)
    for other in (raw, raw * min(1.0, 1.0 / raw.norm())):             # unclipped; clipped at 1.0
        assert (delta - adam(other)).abs().max() > 0.5 * args.lr
    weights = m.state_dict()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.3 * ema0[k] + 0.7 * weights[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any((ema0[k] - weights[k]).abs().max() > 1e-2 for k in ema0)  # so another decay gives another EMA


@pytest.mark.parametrize("recorded", ["a", "b"], indirect=True)
def test_the_saved_ema_is_the_warmed_up_average(recorded):
    """Saved EMA = d_s ema + (1 - d_s) weights with d_s = 0.1, 2/11 (warm-up, on by default: run B) or 0.9999
    (--no-ema-warmup: run A). Catches the warm-up off by default, the flag ignored, a decay of step s + 1."""
    ema = initial_weights(recorded["argv"])
    for d, c in zip((0.9999, 0.9999) if recorded["name"] == "a" else (0.1, 2 / 11), recorded["ckpts"]):
        ema = {k: d * ema[k] + (1 - d) * c["model"][k] for k in ema}
        for k in ema:
            torch.testing.assert_close(c["ema"][k], ema[k], rtol=1e-5, atol=1e-7, msg=f"step {c['step']}, {k}")


# --- the interpolant and the loss -----------------------------------------------------------------


@pytest.mark.parametrize("recorded, field", [("a", "sigma"), ("a", "gamma"), ("a", "interpolant"), ("a", "windows"),
                                             ("b", "sigma"), ("b", "gamma"), ("b", "interpolant")],
                         indirect=["recorded"])
def test_interpolant_flags_are_what_the_first_step_trained_on(recorded, field):
    """--sigma, --gamma, --interpolant, --windows: the first step's loss is the one under the flags' CDCConfig,
    not with this field at its default; every step and checkpoint gets that config."""
    s = SETTINGS[recorded["name"]]
    want = s["cdc"]
    assert all(step["cdc"] == want for step in recorded["steps"])
    assert all(cdc.CDCConfig(**c["config"]["cdc"]) == want for c in recorded["ckpts"])
    first = recorded["steps"][0]
    kw = {k: s[k] for k in ("class_dropout", "reduction", "stage_sampling")}
    assert first["loss"] == pytest.approx(recompute(first, want, **kw)["loss"].item(), rel=1e-6)
    default = dataclasses.replace(want, **{field: getattr(cdc.CDCConfig(), field)})
    assert default != want
    assert abs(recompute(first, default, **kw)["loss"].item() / first["loss"] - 1) > 1e-3


def test_windows_and_stage_sampling_set_the_stage_counts(run_a, run_b):
    """Stratified --windows 0.25,0.25,0.5 with 8 images: 2, 2, 4 every step (equal windows: 3, 3, 2 rotating);
    --stage-sampling iid: the counts of Alg. 1's i.i.d. draws from the step's seeds, not the quotas."""
    assert [step["counts"] for step in run_a["steps"]] == [[2, 2, 4], [2, 2, 4]]
    iid = [recompute(step, CDC_B, 0.0, "mean", "iid")["stage_count"] for step in run_b["steps"]]
    stratified = [recompute(step, CDC_B, 0.0, "mean", "stratified")["stage_count"] for step in run_b["steps"]]
    assert [step["counts"] for step in run_b["steps"]] == iid != stratified, (iid, stratified)


@pytest.mark.parametrize("recorded", ["a", "b"], indirect=True)
def test_loss_reduction_is_the_per_sample_loss_the_run_trained_on(recorded):
    """--loss-reduction: every per-sample loss is the sum (run A) or the mean (run B, the default) of its
    squared errors over C x H x W, and so is the first step's loss."""
    s = SETTINGS[recorded["name"]]
    reduction = s["reduction"]
    # one call per stage that got samples, both steps (an i.i.d. draw may leave a stage empty)
    assert len(recorded["losses"]) == sum(n > 0 for step in recorded["steps"] for n in step["counts"]) >= 2 * len(RES) - 2
    for call in recorded["losses"]:
        sq = (call["b"] - call["I_dot"]).pow(2).flatten(1)
        torch.testing.assert_close(call["value"].float(), sq.sum(1) if reduction == "sum" else sq.mean(1))
    first = recorded["steps"][0]
    loss = {r: recompute(first, s["cdc"], s["class_dropout"], r, s["stage_sampling"])["loss"].item() for r in cdc.REDUCTIONS}
    assert first["loss"] == pytest.approx(loss[reduction], rel=1e-6)
    assert first["loss"] != pytest.approx(loss[{"sum": "mean", "mean": "sum"}[reduction]], rel=1e-3)


def test_class_dropout_fusion_and_precision_flags(run_a, run_b):
    """Run A / run B: --class-dropout 1 / 0: the network saw only the null class / only the data's labels;
    --fusion add / xattn: the saved network adds (Table 4), without / with cross-attention maps; --precision
    bf16 / fp32: every training forward's output has that dtype, whatever the device's default."""
    for step in run_a["steps"]:
        assert len(step["labels_seen"]) == 8 and torch.all(step["labels_seen"] == NULL), step["labels_seen"]
    for step in run_b["steps"]:
        assert torch.equal(step["labels_seen"].sort().values, step["y"].sort().values)
    for c in run_a["ckpts"]:
        assert c["config"]["model"]["fusion"] == "add" and not any(".W_" in k for k in c["model"])
    for c in run_b["ckpts"]:
        assert c["config"]["model"]["fusion"] == "xattn"
        assert {"fusion.W_q.weight", "fusion.W_k.weight", "fusion.W_v.weight", "fusion.W_o.weight"} <= set(c["model"])
    args = train.get_parser().parse_args([*TINY, "--fusion", "add"])
    train.resolve_args(args, demo=True)
    g, e = torch.randn(3, 32), torch.randn(1, 32)
    torch.testing.assert_close(train.build(args, 4)[1].fusion(g, e), g + e, rtol=0, atol=0)
    assert {call["dtype"] for call in run_a["losses"]} == {torch.bfloat16}
    assert {call["dtype"] for call in run_b["losses"]} == {torch.float32}


# --- train.py's sample grids ---------------------------------------------------------------------


def woken_model(seed):
    """A tiny network whose samples depend on its weights, labels and guidance."""
    torch.manual_seed(seed)
    return wake(cdc.create_model("test", num_classes=4, resolutions=RES)).eval()


@pytest.mark.parametrize("flags, scale", [(["--cfg-scale", "1"], 1.0), (["--cfg-scale", "2"], 2.0)])
def test_train_sample_grid_uses_cfg_scale(monkeypatch, flags, scale):
    """train.py's EMA grid is cdc.sample of b_null + S (b_c - b_null) (S = 1: b_c itself) with SAMPLE_STEPS
    steps per stage, not the grid of the default S = 3. Catches the flag or the constant ignored."""
    args = train.get_parser().parse_args([*flags, "--precision", "fp32"])
    train.resolve_args(args, demo=True)
    ema, config = woken_model(3), cdc.CDCConfig(resolutions=RES)
    grids = []
    monkeypatch.setattr(train, "save_grid", lambda images, path, nrow: grids.append(images))
    monkeypatch.setattr(train, "save_stage_sheet", lambda stages, path: None)
    monkeypatch.setattr(train, "SAMPLE_STEPS", 3)
    train.sample_grid(ema, config, args, torch.device("cpu"), "unused.png")
    y = torch.arange(4).repeat_interleave(8)
    with torch.no_grad():
        b_c = lambda x, t, s: ema(x, t, y).float()  # noqa: E731
        b_null = lambda x, t, s: ema(x, t, None).float()  # noqa: E731
        field = b_c if scale == 1 else (lambda x, t, s: b_null(x, t, s) + scale * (b_c(x, t, s) - b_null(x, t, s)))
        draw = lambda f, n: cdc.sample(f, config, 32, steps=n, generator=torch.Generator().manual_seed(0))  # noqa: E731
        want = draw(field, 3)
        default_scale = draw(cdc.guided_field(ema, y, 3.0), 3)
    (got,) = grids
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - default_scale).abs().max() > 1e-2 and (got - draw(field, 2)).abs().max() > 1e-2


# --- sample.py on a known checkpoint --------------------------------------------------------------

# Non-default sigma, gamma and interpolant: sample.py must sample with the checkpoint's CDCConfig.
CKPT_CDC = cdc.CDCConfig(resolutions=RES, sigma=0.8, gamma=3.0, interpolant="trigonometric")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as train.py writes it whose 'model' and 'ema' entries are different networks."""
    path = tmp_path_factory.mktemp("ckpt") / "000-tiny-16" / "checkpoints" / "0000000.pt"
    os.makedirs(path.parent)
    raw, ema = woken_model(1), woken_model(2)
    runs.save_checkpoint({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": {}, "step": 0,
                          "config": {"model": dataclasses.asdict(raw.config), "cdc": CKPT_CDC.to_dict()}}, str(path))
    return path


def by_hand(ckpt, entry="ema", scale=3.0, steps=2, solver="euler", sde_scale=1.0, precision="fp32", seed=0, labels=None):
    """Global batch 0's 4 images drawn here from the checkpoint's `entry`, uint8 NHWC (scale 1: b_c itself)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = cdc.DiT(cdc.DiTConfig(**state["config"]["model"]))
    model.load_state_dict(state[entry])
    model.eval().to(DEVICE)
    gen = sample.batch_generator(seed, 0, DEVICE)
    y = sample.batch_labels(0, 4, 4, labels, gen).to(DEVICE)
    field = (lambda x, t, s: model(x, t, y).float()) if scale == 1 else cdc.guided_field(model, y, scale)
    with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16, enabled=precision == "bf16"):
        out = cdc.sample(field, CKPT_CDC, 4, steps=steps, solver=solver, sde_scale=sde_scale, generator=gen, device=DEVICE)
    return data.to_uint8(out).numpy()


def sampled(ckpt, tmp_path, *flags):
    """sample.py --ckpt ckpt on 4 images, fp32 with 2 steps per stage unless flags say otherwise: its .npz."""
    out = tmp_path / f"s{len(os.listdir(tmp_path))}"
    ok(inproc("sample.py", "--ckpt", ckpt, "--num-fid-samples", 4, "--per-proc-batch-size", 4, "--precision", "fp32",
              "--steps-per-stage", 2, "--sample-dir", out, *EAGER, *flags, cwd=tmp_path))
    (npz,) = glob.glob(str(out / "*.npz"))
    with np.load(npz) as f:
        return f["arr_0"]


@pytest.mark.parametrize("flags, want, others", [
    ([], dict(), [dict(entry="model")]),
    (["--no-ema"], dict(entry="model"), [dict()]),
    (["--cfg-scale", "1"], dict(scale=1.0), [dict()]),
    (["--cfg-scale", "2"], dict(scale=2.0), [dict()]),
    (["--solver", "heun"], dict(solver="heun"), [dict()]),
    (["--solver", "sde", "--sde-scale", "0.5"], dict(solver="sde", sde_scale=0.5), [dict(), dict(solver="sde")]),
    (["--steps-per-stage", "1,3,2"], dict(steps=[1, 3, 2]), [dict(), dict(steps=24)]),
    (["--steps-per-stage", "3"], dict(steps=3), [dict(), dict(steps=24)]),
    (["--precision", "bf16"], dict(precision="bf16"), [dict(precision="fp32")]),
    (["--precision", "fp32"], dict(precision="fp32"), [dict(precision="bf16")]),
    (["--seed", "5", "--class-labels", "2"], dict(seed=5, labels=[2]), [dict(), dict(seed=5)]),
], ids=["ema", "no-ema", "cfg1", "cfg2", "heun", "sde", "steps-list", "steps-int", "bf16", "fp32", "seed-labels"])
def test_sample_flags_give_the_images_drawn_by_hand(checkpoint, tmp_path, flags, want, others):
    """sample.py writes exactly the images drawn here with these settings from the checkpoint's 'ema' (or
    'model' under --no-ema) and CDCConfig (bf16: within rounding), not those of the flag's default."""
    got = sampled(checkpoint, tmp_path, *flags)
    assert got.shape == (4, 16, 16, 3)
    if want.get("precision") == "bf16":  # sample.py may round the weights to bf16 once, autocast per use:
        diff = np.abs(got.astype(int) - by_hand(checkpoint, **want).astype(int))  # a level or two apart
        assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())
    else:
        np.testing.assert_array_equal(got, by_hand(checkpoint, **want))
    for other in others:
        assert not np.array_equal(got, by_hand(checkpoint, **other)), other
