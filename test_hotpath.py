"""The multi-GPU training step on the CPU: all-reduce overlap, host syncs, host-to-device copies, one resume
decision, gradient accumulation, compiled shapes, non-finite steps (gloo, DDP hooks, fake and meta tensors)."""

import dataclasses
import os
from copy import deepcopy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import cdc
import runs
import train
from conftest import TINY, HostToDevice, inf_backward, wake
from runs import ConfigError

CONFIG = cdc.CDCConfig(resolutions=(4, 8, 16))


def small(seed=0, **kw):
    torch.manual_seed(seed)
    return cdc.create_model("tiny", **{**dict(depth=4, width=64, heads=2, num_classes=4, patch_size=2,
                                              resolutions=CONFIG.resolutions), **kw})


def flags(*extra, **constants):
    """train.py's args for these flags, with Table 7's constants unless given (e.g. grad_clip=1e9)."""
    args = train.get_parser().parse_args(["--lr", "1e-3", "--precision", "fp32", *map(str, extra)])
    train.resolve_args(args, demo=True)
    vars(args).update(constants)
    return args


def gloo(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)


# --- 1. The all-reduce runs during the largest stage's backward -----------------------------------


def _ddp_worker(rank, world, store, out):
    """Rank r of 2 gloo processes: the backward and bucket events of 3 DDP steps of 6 images, then the
    buckets launched per step with --grad-accum 2 (micro-batches of 4: K = 3 does not divide 4)."""
    gloo(rank, world, store)
    model = small()
    ddp = torch.nn.parallel.DistributedDataParallel(
        train.Objective(model, CONFIG, 0.1, "mean", "stratified"), broadcast_buffers=False,
        gradient_as_bucket_view=True, bucket_cap_mb=0.05)  # ~20 buckets: when each launches is visible
    events = []
    ddp.register_comm_hook(None, lambda state, bucket: events.append(("bucket", bucket.index())) or allreduce_hook(None, bucket))

    def tag(name):  # the gradient reaches a stage's head first and its patch embedding last
        def hook(module, inputs, output):
            side = output.shape[-1] if name == "embed" else output.shape[1]  # grid side / tokens
            output.register_hook(lambda g: events.append((name, side)))
        return hook
    model.final_layer.register_forward_hook(tag("head"))
    model.x_embedder.register_forward_hook(tag("embed"))
    args = flags(grad_clip=1e9)
    ema, opt = deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)
    order, stage_counts = [], []
    for step in range(5):  # DDP rebuilds its buckets in gradient-ready order after the first step
        args.grad_accum, B = (1, 6) if step < 3 else (2, 8)
        events.clear()
        torch.manual_seed(train.step_seed(0, rank, step))
        res, _, _ = train.train_step(ddp, model, ema, opt, torch.randn(B, 3, 16, 16), torch.randint(0, 4, (B,)), None, step, args)
        order.append(list(events))
        stage_counts.append(res["stage_count"])
    gathered = [None] * world
    buckets = [sum(e[0] == "bucket" for e in ev) for ev in order]
    dist.all_gather_object(gathered, {"order": order[2], "buckets": buckets, "stage_counts": stage_counts})
    if rank == 0:
        torch.save(gathered, out)
    runs.end_distributed()  # not a plain destroy: see its docstring


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, str(d / "store"), str(d / "out.pt")), nprocs=2, join=True)
    return torch.load(d / "out.pt")


def test_buckets_launch_while_the_largest_stage_is_still_in_backward(ddp_run):
    """Largest stage first in the forward, so its backward runs last and the buckets launch during it
    (smallest first: all 19 buckets launched after the smallest stage's backward). --grad-accum 2: each
    bucket launches once per step (no_sync in the first micro-batch), not twice."""
    for rank in ddp_run:
        ev, n = rank["order"], rank["buckets"][2]
        assert n >= 10, ev                                       # enough buckets for the order to mean something
        top = (16 // 2) ** 2                                     # tokens of the 16 px stage at patch 2
        start, end = ev.index(("head", top)), ev.index(("embed", 16 // 2))
        assert sum(e[0] == "bucket" for e in ev[start:end]) >= 0.8 * n, ev  # launched while the largest stage computes
        assert all(ev.index(("embed", s)) < start for s in (2, 4)), ev  # the small stages went first
        assert rank["buckets"][3:] == [n] * 2


def test_every_rank_carries_the_same_stage_mix_under_ddp(ddp_run):
    """Stratified quotas depend on (batch, step) only: both ranks train the same stage counts at every step,
    also when K = 3 does not divide the micro-batch of 4."""
    r0, r1 = (r["stage_counts"] for r in ddp_run)
    assert r0 == r1 and r0[:3] == [[2, 2, 2]] * 3 and [sum(c) for c in r0[3:]] == [8, 8]


# --- 2. No host synchronisation inside a step -----------------------------------------------------


@pytest.mark.parametrize("precision, accum", [("fp32", 2), ("bf16", 1)])
def test_a_training_step_reads_no_tensor_value_on_the_host(precision, accum):
    """train_step and Meter.add under fake tensors: any .item(), bool(tensor), .tolist() or a Scalar
    overload fed a tensor (a sync per step on a GPU) raises. (The default stratified step.)"""
    args = flags("--precision", precision, "--grad-accum", accum)
    with FakeTensorMode():
        model = small(depth=1, width=32)
        ema = small(depth=1, width=32).requires_grad_(False)
        ema.load_state_dict(model.state_dict())
        opt = train.make_optimizer(model, args)
        objective = train.Objective(model, CONFIG, 0.1, "mean", "stratified")
        meter = train.Meter(model, CONFIG, torch.device("cpu"))
        x, y = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 4, (10,))
        for step in range(3):
            out, gnorm, ok = train.train_step(objective, model, ema, opt, train.normalize(x), y, None, step, args)
            meter.add(out, gnorm, ok)
    assert sum(out["stage_count"]) == 10 and meter.host[0] == 3


def test_the_default_step_copies_nothing_from_the_host():
    """On the meta device the stratified step's forward, backward and log bookkeeping make no host-to-device
    copy (the 'iid' path, which sends its host-drawn t, shows that the check sees one)."""
    model = small(depth=1, width=32).to("meta")
    meter = train.Meter(model, CONFIG, torch.device("meta"))
    x, y = torch.empty(10, 3, 16, 16, device="meta"), torch.zeros(10, dtype=torch.long, device="meta")
    with HostToDevice() as seen:
        for step in range(3):
            out = cdc.training_losses(model, x, y, CONFIG, step=step)
            out["loss"].backward()
            meter.add(out, out["loss"].detach(), torch.ones((), dtype=torch.bool, device="meta"))
    assert seen.copies == []
    with HostToDevice() as seen:
        cdc.training_losses(model, x, y, CONFIG, stage_sampling="iid", generator=torch.Generator().manual_seed(0))
    assert seen.copies


# --- 3. One resume decision for all ranks ---------------------------------------------------------

def _run_parts(results_dir):
    args = train.get_parser().parse_args([*TINY, "--resume", "auto", "--results-dir", results_dir])
    train.resolve_args(args, demo=True)
    torch.manual_seed(0)
    cfg, model = train.build(args, 4)
    config = {"model": dataclasses.asdict(model.config), "cdc": cfg.to_dict()}
    return args, config, model, deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)


def _save_run(results_dir, step, bump):
    args, config, model, ema, opt = _run_parts(results_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(bump)
    path = os.path.join(results_dir, "000-test-16", "checkpoints", f"{step:07d}.pt")
    os.makedirs(os.path.dirname(path))
    runs.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": {},
                          "config": config, "step": step, "data": {"epoch": 0, "pos": 8 * step}, "world_size": 2}, path)


def _resume_worker(rank, world, store, dirs, out):
    """Both decisions in one pair of processes: as the ranks see their files, then with rank 1 unable to
    read any checkpoint."""
    gloo(rank, world, store)
    results = []
    for unreadable in (False, rank == 1):
        if unreadable:
            def broken(path):
                raise OSError("Input/output error")
            train.load_checkpoint = broken
        args, config, model, ema, opt = _run_parts(dirs[rank])  # each rank sees its own results directory
        try:
            run_dir, step, *_ = train.open_run(args, config, model, ema, opt, rank, world)
            results.append({"run_dir": os.path.abspath(run_dir), "step": step, "w": float(next(model.parameters()).sum())})
        except ConfigError as e:
            results.append({"error": str(e)})
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    runs.end_distributed()


def test_rank_0_decides_the_resume_and_every_rank_follows(tmp_path):
    """Rank 0 sees a run at step 4, rank 1 (a results directory that is not shared) one at step 2: both
    resume rank 0's. Where rank 1 cannot read that file, every rank stops with one line naming rank 1."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _save_run(a, 4, 0.5)
    _save_run(b, 2, -0.5)
    out = str(tmp_path / "out.pt")
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "store"), [a, b], out), nprocs=2, join=True)
    (r0, e0), (r1, e1) = torch.load(out)
    assert r0 == r1 and r0["step"] == 4 and r0["run_dir"] == os.path.join(a, "000-test-16")
    assert e0 == e1 and "rank 1 cannot read the checkpoint" in e0["error"] and "\n" not in e0["error"]


# --- 4. Gradient accumulation, non-finite steps ---------------------------------------------------


def test_two_micro_batches_of_b_give_the_gradient_of_one_batch_of_2b():
    """--grad-accum 2 on 2B images == the gradient of the mean of all 2B per-sample losses with the same
    draws (quota steps 2s and 2s + 1); the logged loss and per-stage losses are those of the 2B batch."""
    B, step = 5, 3
    model, args = small(), flags("--grad-accum", 2, grad_clip=1e9)
    ema, opt = deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)
    x, y = torch.randn(2 * B, 3, 16, 16), torch.randint(0, 4, (2 * B,))
    ref_model = deepcopy(model)
    torch.manual_seed(7)
    out, _, _ = train.train_step(train.Objective(model, CONFIG, 0.1, "mean", "stratified"), model, ema, opt, x, y, None, step, args)
    torch.manual_seed(7)
    parts = [cdc.training_losses(ref_model, x[i * B:(i + 1) * B], y[i * B:(i + 1) * B], CONFIG, reduction="mean",
                               step=2 * step + i) for i in range(2)]
    per_stage = [sum(p["stage_loss"][s] * p["stage_count"][s] for p in parts) / sum(p["stage_count"][s] for p in parts) for s in range(3)]
    (sum(p["loss"] * B for p in parts) / (2 * B)).backward()
    assert [a + b for a, b in zip(*(p["stage_count"] for p in parts))] == out["stage_count"]
    assert parts[0]["stage_count"] != parts[1]["stage_count"]   # B = 5: the quotas rotate between micro-batches
    torch.testing.assert_close(out["loss"], (parts[0]["loss"] + parts[1]["loss"]).detach() / 2)
    torch.testing.assert_close(out["stage_loss"], torch.stack(per_stage).detach())
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)


def test_a_non_finite_gradient_moves_neither_weights_nor_optimiser_nor_ema(monkeypatch):
    torch.manual_seed(0)
    model, args = wake(small(depth=1, width=32)), flags("--lr", "1e-2")
    objective = train.Objective(model, CONFIG, 0.1, "mean", "stratified")
    ema, opt = deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    train.train_step(objective, model, ema, opt, x, y, torch.Generator().manual_seed(0), 0, args)  # a good step
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, ema)]
    opt_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    real = cdc.velocity_loss
    monkeypatch.setattr(cdc, "velocity_loss", lambda b, t, *a: inf_backward(real(b, t, *a)))
    out, gnorm, ok = train.train_step(objective, model, ema, opt, x, y, torch.Generator().manual_seed(1), 1, args)
    assert torch.isfinite(out["loss"]) and not torch.isfinite(gnorm) and not ok
    for m, b in zip((model, ema), before):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())
    assert all(torch.equal(v, opt_before[k]) for k, v in opt.state_dict()["state"][0].items())
    monkeypatch.undo()
    out, gnorm, ok = train.train_step(objective, model, ema, opt, x, y, torch.Generator().manual_seed(2), 2, args)
    assert ok and not torch.equal(model.state_dict()["final_layer.linear.bias"], before[0]["final_layer.linear.bias"])


def test_compile_builds_each_stage_once_in_training_and_sampling():
    """dynamic=False: one graph per (stage, per-stage batch, grad mode), never rebuilt, no graph break
    (the eager backend traces as inductor would, without code generation)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    net = train.compile_model(wake(small(depth=1, width=32)), backend="eager")

    def train_steps(B, steps):
        for step in steps:
            out = cdc.training_losses(net, torch.randn(B, 3, 16, 16), torch.randint(0, 4, (B,)), CONFIG,
                                      generator=torch.Generator().manual_seed(step), step=step)
            out["loss"].backward()
        return counters["stats"]["unique_graphs"]

    assert train_steps(6, range(4)) == 3            # 2 images per stage every step: 3 graphs
    assert train_steps(6, range(4, 8)) == 3         # ... and never again
    assert train_steps(7, range(6)) == 6            # 7 = 2+2+3 rotating: each stage also sees batch 3
    field = cdc.guided_field(net, torch.arange(4), 2.0)
    for _ in range(2):
        cdc.sample(field, CONFIG, 4, steps=2, generator=torch.Generator().manual_seed(0))
        assert counters["stats"]["unique_graphs"] == 9  # no-grad sampling: one graph per stage, once
    assert not counters["graph_break"], dict(counters["graph_break"])
