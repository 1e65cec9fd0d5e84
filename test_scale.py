"""Tests of training at scale and of Table 6's resolution paths.

Stratified stage quotas (the same expectation as Alg. 1, never more variance, the same mix on every
rank: test_hotpath.py), compiled static shapes, faults (a non-finite gradient, resume on another number of processes,
--resume auto before the first checkpoint), and paths whose sides grow by any power of two (64 -> 256)
through the coupling (App. E.2), the samplers, train.py and sample.py (the operators at 4x4 blocks, and
the levels of such a path, are test_cdc.py's and test_cdc_edges.py's).
"""

import glob
import math
import os
from copy import deepcopy

import pytest
import torch
from hypothesis import given, strategies as st

import cdc
import train
from conftest import HostToDevice, TINY, inproc, ok, run, wake
from theory.prior_equivalence import GaussianOracle, exact_chain_moments

f64 = torch.float64


def tiny_model(resolutions=(4, 8, 16), seed=0):
    torch.manual_seed(seed)
    return wake(cdc.create_model("tiny", depth=1, width=32, heads=2, num_classes=4, resolutions=resolutions))


# ------------------------------------------------------------------------------------------------
#                                  Stratified stage quotas
# ------------------------------------------------------------------------------------------------


@given(st.integers(1, 64), st.integers(1, 5), st.integers(0, 10_000))
def test_quotas_sum_to_the_batch_and_stay_within_one_of_the_proportional_share(B, K, step):
    config = cdc.CDCConfig(resolutions=tuple(2 ** (s + 2) for s in range(K)))
    counts = cdc.stage_quotas(config, B, step)
    assert sum(counts) == B and len(counts) == K
    assert all(math.floor(B / K) <= n <= math.ceil(B / K) for n in counts)


@pytest.mark.parametrize("windows, B, period", [(None, 8, 3), (None, 9, 1), ((0.2, 0.3, 0.5), 8, 5),
                                                 ((0.1, 0.6, 0.3), 7, 10), ((0.25, 0.75), 3, 4)])
def test_quotas_long_run_mix_is_exact(windows, B, period):
    """The remainder rotates with the step: over one period every stage got exactly B w_k per step."""
    config = cdc.CDCConfig(resolutions=(4, 8, 16)[:len(windows)] if windows else (4, 8, 16), windows=windows)
    w = config.widths()
    for start in range(40):  # every window of `period` consecutive steps, not only some
        counts = torch.tensor([cdc.stage_quotas(config, B, s) for s in range(start, start + period)], dtype=f64)
        torch.testing.assert_close(counts.mean(0), B * w, rtol=0, atol=1e-9)
    if period > 1:  # and it does rotate: not every step has the same counts
        assert len({tuple(cdc.stage_quotas(config, B, s)) for s in range(period)}) > 1


def test_quotas_for_windows_without_a_small_period_converge_to_the_mix():
    """Irrational windows have no period: the pointer follows the golden-ratio sequence, whose running
    mix approaches B w_k like (log N) / N, and every step still sums to B with floor/ceil counts."""
    w = (math.sqrt(2) - 1, 2 - math.sqrt(2))
    config = cdc.CDCConfig(resolutions=(4, 8), windows=w)
    assert cdc._quota_edges(config, 5)[1] is None  # no period below 10^4
    counts = torch.tensor([cdc.stage_quotas(config, 5, s) for s in range(2000)], dtype=f64)
    assert set(counts.sum(1).tolist()) == {5.0} and set(counts[:, 0].tolist()) == {2.0, 3.0}
    assert torch.all((counts.mean(0) - 5 * config.widths()).abs() < 0.005)  # i.i.d. coins: ~0.01


def test_quotas_without_a_step_are_unbiased_draws():
    config = cdc.CDCConfig(resolutions=(4, 8, 16), windows=(0.2, 0.3, 0.5))
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([cdc.stage_quotas(config, 7, None, g) for _ in range(4000)], dtype=f64)
    assert set(counts.sum(1).tolist()) == {7.0}
    # each count is floor or ceil of 7 w_k; the mean is 7 w_k within 5 standard errors (<= 0.5/sqrt(n))
    assert torch.all((counts.mean(0) - 7 * config.widths()).abs() < 5 * 0.5 / math.sqrt(4000))


def test_stratified_estimator_has_alg1_mean_and_no_more_variance():
    """On a fixed network, the stratified batch loss and Alg. 1's i.i.d. batch loss have the same mean
    over many draws (within 4 Monte-Carlo standard errors of the difference), and the stratified one's
    variance is smaller: stage 1 (pure noise source) has a far larger loss than the later stages, and
    stratification removes that between-stage part of the variance."""
    model = tiny_model().eval()
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    losses = {s: [] for s in cdc.STAGE_SAMPLINGS}
    with torch.no_grad():
        for i in range(300):
            for s in cdc.STAGE_SAMPLINGS:
                torch.manual_seed(i)
                out = cdc.training_losses(model, x, y, config, class_dropout=0.0, stage_sampling=s, step=i,
                                          generator=torch.Generator().manual_seed(i))
                losses[s].append(out["loss"].item())
    a, b = torch.tensor(losses["stratified"], dtype=f64), torch.tensor(losses["iid"], dtype=f64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    assert a.var() < b.var(), (a.var(), b.var())


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


def test_one_network_evaluation_per_step_without_guidance():
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    for y, scale, per_call in ((torch.arange(4), 1.0, 4), (None, 3.0, 4), (torch.arange(4), 3.0, 8)):
        calls.clear()
        cdc.sample(cdc.guided_field(model, y, scale), config, 4, steps=2, generator=torch.Generator().manual_seed(0))
        assert calls == [per_call] * 6, (scale, calls)   # 3 stages x 2 steps


def test_sampling_noise_is_drawn_on_the_sampling_device():
    """No host draw per stage: sampling on the meta device with no generator (the device's own RNG) makes
    no host-to-device copy at all, while a CPU generator feeding the same device does copy (so the count
    can see one). A host draw plus a copy per stage fails the first assertion."""
    config = cdc.CDCConfig(resolutions=(4, 8, 16))
    zero = lambda x, t, s: torch.zeros_like(x)  # noqa: E731  outputs are then the sampler's own noise
    for solver in ("euler", "sde"):
        with HostToDevice() as seen:
            out = cdc.sample(zero, config, 3, steps=2, solver=solver, device="meta")
        assert seen.copies == [] and out.device.type == "meta" and out.shape == (3, 3, 16, 16)
    with HostToDevice() as seen:
        cdc.sample(zero, config, 3, steps=1, generator=torch.Generator("cpu").manual_seed(5), device="meta")
    assert seen.copies


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

PATHS = [(2, 8), (2, 4, 16), (4, 16, 32)]


@pytest.mark.parametrize("res", PATHS)
@given(seed=st.integers(0, 2 ** 16), sigma=st.floats(0.1, 2.0), gamma=st.floats(1.0, 4.0))
def test_training_source_equals_inference_prior_on_power_of_two_paths(res, seed, sigma, gamma):
    """App. E.2 on 2x and 4x steps: U_L(D_L(x1^(k))) + sigma_k zeta == U_L(x1^(k-1)) + sigma_k zeta for the
    same zeta (L = cfg.levels(k): so also D_L x1^(k) = x1^(k-1), the pyramid's transitivity with the path's
    levels), and sigma_k is eq. 20's gamma^-(k-1) sigma whatever the factor."""
    config = cdc.CDCConfig(resolutions=res, sigma=sigma, gamma=gamma)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, res[-1], res[-1], dtype=f64, generator=g)
    for s in range(1, config.K):
        zeta = torch.randn(3, 3, res[s], res[s], dtype=f64, generator=g)
        x1, x1_prev = (cdc.down(x, config.levels_below_top(k)) for k in (s, s - 1))
        train_x0 = cdc.coupling_source(x1, s, config, zeta=zeta)
        infer_x0 = cdc.up(x1_prev, config.levels(s)) + config.sigma_k(s) * zeta
        torch.testing.assert_close(train_x0, infer_x0, rtol=0, atol=1e-12)
        assert config.sigma_k(s) == pytest.approx(gamma ** -s * sigma)


@pytest.mark.parametrize("kind", ["linear", "score"])
def test_ode_chain_reaches_every_stage_marginal_on_a_4x_path(kind):
    """eq. 16 end to end on Table 6's kind of path (2 -> 8, a 4x step), no Monte-Carlo noise: the exact
    field through cdc's Heun sampler ends at N(D mu, D Sigma D^T) at both stages."""
    g = torch.Generator().manual_seed(0)
    d = 64
    L = torch.randn(d, d, generator=g, dtype=f64) * 0.15
    mu, Sigma = torch.randn(1, 8, 8, generator=g, dtype=f64) * 0.5, L @ L.T + 0.05 * torch.eye(d, dtype=f64)
    config = cdc.CDCConfig(resolutions=(2, 8), interpolant=kind)
    oracle = GaussianOracle(mu, Sigma, config)
    for s, (mean, cov) in enumerate(exact_chain_moments(oracle, 40, "heun")):
        m, S = oracle.marginal(s)
        scale = S.diag().max().sqrt()
        assert (mean - m).abs().max() < 0.02 * scale, (s, (mean - m).abs().max())
        assert (cov - S).abs().max() < 0.02 * scale ** 2, (s, (cov - S).abs().max())


def test_sampler_prior_on_a_4x_path_is_the_upsampled_output_plus_sigma_k_noise():
    config = cdc.CDCConfig(resolutions=(2, 8), sigma=1.0, gamma=2.0)
    outs = cdc.sample(lambda x, t, s: torch.zeros_like(x), config, 20000, channels=1, steps=1,
                      generator=torch.Generator().manual_seed(0), return_stages=True)
    residual = outs[1] - cdc.up(outs[0], 2)
    assert residual.std().item() == pytest.approx(config.sigma_k(1), rel=0.02)
    assert cdc.down(residual, 2).std().item() == pytest.approx(config.sigma_k(1) / 4, rel=0.03)  # mean of 16


def test_train_and_sample_scripts_on_a_4x_path(tmp_path):
    args = [*TINY, "--resolutions", "4,16"]
    ok(inproc("train.py", *args, "--max-steps", 2, "--ckpt-every", 2, "--results-dir", "r", cwd=tmp_path))
    ckpt = glob.glob(str(tmp_path / "r" / "*" / "checkpoints" / "0000002.pt"))[0]
    assert list(torch.load(ckpt, weights_only=True)["config"]["cdc"]["resolutions"]) == [4, 16]
    ok(inproc("sample.py", "--ckpt", ckpt, "--num-fid-samples", 4, "--per-proc-batch-size", 4, "--steps-per-stage", 2,
              "--save-stages", "--sample-dir", "s", cwd=tmp_path))
    assert glob.glob(str(tmp_path / "s" / "*_stages.png")) and glob.glob(str(tmp_path / "s" / "*.npz"))
