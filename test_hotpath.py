"""
The multi-GPU training step, checked on the CPU: what only a GPU run would show (all-reduce overlap,
host syncs, host-to-device copies, one resume decision, gradient accumulation), made visible with gloo
processes, DDP communication hooks, autograd hooks, fake and meta tensors.
"""

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
from conftest import TINY, HostToDevice
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


# ------------------------------------------------------------------------------------------------
#                     1. The all-reduce runs during the largest stage's backward
# ------------------------------------------------------------------------------------------------


def _ddp_worker(rank, world, store, out):
    """Rank r of 2 gloo processes: (a) the order of backward and bucket events of one DDP step;
    (b) with --grad-accum 2: how many buckets each step launches, and the averaged gradient; (c) every
    step's stage counts (6 images, then micro-batches of 4: K = 3 does not divide 4)."""
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
    for step in range(3):  # DDP rebuilds its buckets in gradient-ready order after the first step
        events.clear()
        torch.manual_seed(train.step_seed(0, rank, step))
        res, _, _ = train.train_step(ddp, model, ema, opt, torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,)), None, step, args)
        order.append(list(events))
        stage_counts.append(res["stage_count"])

    args.grad_accum = 2
    counts, ref_model = [], small()
    for step in range(3, 5):
        events.clear()
        seed = train.step_seed(0, rank, step)
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
        ref_model.load_state_dict(model.state_dict())  # the weights this step's gradient is taken at
        torch.manual_seed(seed)
        res, _, _ = train.train_step(ddp, model, ema, opt, x, y, None, step, args)
        counts.append(sum(e[0] == "bucket" for e in events))
        stage_counts.append(res["stage_count"])
    grads = [p.grad.clone() for p in model.parameters()]
    # the reference: this rank's micro-batch losses, same draws, one backward of their mean; DDP averages ranks
    torch.manual_seed(seed)
    losses = [cdc.training_losses(ref_model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4], CONFIG, step=2 * step + i)["loss"]
              for i in range(2)]
    torch.stack(losses).mean().backward()
    ref = [p.grad for p in ref_model.parameters()]
    for g in ref:
        dist.all_reduce(g)
        g /= world
    gathered = [None] * world
    dist.all_gather_object(gathered, {"order": order, "accum_buckets": counts, "n_buckets": sum(e[0] == "bucket" for e in order[-1]),
                                      "stage_counts": stage_counts,
                                      "grad_err": max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(grads, ref))})
    if rank == 0:
        torch.save(gathered, out)
    runs.end_distributed()  # not a plain destroy: see its docstring


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, str(d / "store"), str(d / "out.pt")), nprocs=2, join=True)
    return torch.load(d / "out.pt")


def test_buckets_launch_while_the_largest_stage_is_still_in_backward(ddp_run):
    """Largest stage first in the forward, so its backward runs last: a parameter's gradient is complete
    (its bucket ready) once the largest stage has passed it, and the buckets launch one by one while that
    backward continues. Smallest first, every bucket waits for the end of the smallest stage's backward
    (the order of cdc.training_losses before this test: all 19 buckets launched after it)."""
    for rank in ddp_run:
        ev = rank["order"][-1]
        n = rank["n_buckets"]
        assert n >= 10, ev                                       # enough buckets for the order to mean something
        top = (16 // 2) ** 2                                     # tokens of the 16 px stage at patch 2
        start, end = ev.index(("head", top)), ev.index(("embed", 16 // 2))
        during = sum(e[0] == "bucket" for e in ev[start:end])
        assert during >= 0.8 * n, ev                             # launched while the largest stage computes
        assert all(ev.index(("embed", s)) < start for s in (2, 4)), ev  # the small stages went first


def test_grad_accumulation_all_reduces_once_and_averages_the_global_batch(ddp_run):
    """--grad-accum 2 under DDP: every bucket launches once per step (no_sync in the first micro-batch;
    without it each would launch twice), and the gradient is the mean over both ranks' 2 x 4 images of
    the per-micro-batch losses with the same draws."""
    for rank in ddp_run:
        assert rank["accum_buckets"] == [rank["n_buckets"]] * 2
        assert rank["grad_err"] < 1e-5


def test_every_rank_carries_the_same_stage_mix_under_ddp(ddp_run):
    """Stratified quotas depend on (batch, step) only: both ranks train the same stage counts at every step,
    so no rank waits for another's larger stage; also when K = 3 does not divide the micro-batch of 4."""
    r0, r1 = (r["stage_counts"] for r in ddp_run)
    assert r0 == r1 and r0[:3] == [[2, 2, 2]] * 3 and [sum(c) for c in r0[3:]] == [8, 8]


# ------------------------------------------------------------------------------------------------
#                             2. No host synchronisation inside a step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, accum", [("fp32", 2), ("bf16", 1)])
def test_a_training_step_reads_no_tensor_value_on_the_host(precision, accum):
    """A whole train_step (forward per stage, backward, clip, fused AdamW with found_inf, EMA) and the
    log's Meter.add, under fake tensors: any .item(), bool(tensor), .tolist() or a Scalar overload fed a
    tensor (the EMA's lerp weight did) raises DataDependentOutputException. On a GPU each would be a sync.
    (The default stratified step; 'iid' reads the host's own draws of t to group the batch.)"""
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
    """The model and the data on the meta device: the stratified step's forward, backward and log
    bookkeeping make no host-to-device copy (tau and the label coins are drawn on the device, the stage
    counts are Python ints). A pageable copy waits for the GPU; a per-step pinned one is still a copy."""
    model = small(depth=1, width=32).to("meta")
    meter = train.Meter(model, CONFIG, torch.device("meta"))
    x, y = torch.empty(10, 3, 16, 16, device="meta"), torch.zeros(10, dtype=torch.long, device="meta")
    with HostToDevice() as seen:
        for step in range(3):
            out = cdc.training_losses(model, x, y, CONFIG, step=step)
            out["loss"].backward()
            meter.add(out, out["loss"].detach(), torch.ones((), dtype=torch.bool, device="meta"))
    assert seen.copies == []
    with HostToDevice() as seen:  # the check can see a copy: the 'iid' path sends its host-drawn t
        cdc.training_losses(model, x, y, CONFIG, stage_sampling="iid", generator=torch.Generator().manual_seed(0))
    assert seen.copies


# ------------------------------------------------------------------------------------------------
#                                 3. One resume decision for all ranks
# ------------------------------------------------------------------------------------------------

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
    runs.end_distributed()  # not a plain destroy: see its docstring


def test_rank_0_decides_the_resume_and_every_rank_follows(tmp_path):
    """Rank 0 sees a run at step 4, rank 1 (a results directory that is not shared) one at step 2:
    both ranks resume rank 0's checkpoint (same directory, step, weights). Where rank 1 cannot read that
    file, every rank stops with the same one-line error naming rank 1, instead of a silent divergence."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _save_run(a, 4, 0.5)
    _save_run(b, 2, -0.5)
    out = str(tmp_path / "out.pt")
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "store"), [a, b], out), nprocs=2, join=True)
    (r0, e0), (r1, e1) = torch.load(out)
    assert r0 == r1 and r0["step"] == 4 and r0["run_dir"] == os.path.join(a, "000-test-16")
    assert e0 == e1 and "rank 1 cannot read the checkpoint" in e0["error"] and "\n" not in e0["error"]


# ------------------------------------------------------------------------------------------------
#                                    4. Gradient accumulation
# ------------------------------------------------------------------------------------------------


def test_two_micro_batches_of_b_give_the_gradient_of_one_batch_of_2b():
    """One process, --grad-accum 2 on 2B images == the gradient of the mean loss over all 2B per-sample
    losses with the same images, stage mix and noise (each micro-batch's stratified quotas, quota steps
    2s and 2s + 1), to float tolerance; the logged loss and per-stage losses are those of the 2B batch."""
    B, step = 5, 3
    model, args = small(), flags("--grad-accum", 2, grad_clip=1e9)
    ema, opt = deepcopy(model).requires_grad_(False), train.make_optimizer(model, args)
    x, y = torch.randn(2 * B, 3, 16, 16), torch.randint(0, 4, (2 * B,))
    ref_model = deepcopy(model)
    torch.manual_seed(7)
    out, _, _ = train.train_step(train.Objective(model, CONFIG, 0.1, "mean", "stratified"), model, ema, opt, x, y, None, step, args)
    torch.manual_seed(7)
    parts = [cdc.training_losses(ref_model, x[i * B:(i + 1) * B], y[i * B:(i + 1) * B], CONFIG, step=2 * step + i) for i in range(2)]
    per_stage = [sum(p["stage_loss"][s] * p["stage_count"][s] for p in parts) / sum(p["stage_count"][s] for p in parts) for s in range(3)]
    (sum(p["loss"] * B for p in parts) / (2 * B)).backward()
    assert [a + b for a, b in zip(*(p["stage_count"] for p in parts))] == out["stage_count"]
    assert parts[0]["stage_count"] != parts[1]["stage_count"]   # B = 5: the quotas rotate between micro-batches
    torch.testing.assert_close(out["loss"], (parts[0]["loss"] + parts[1]["loss"]).detach() / 2)
    torch.testing.assert_close(out["stage_loss"], torch.stack(per_stage).detach())
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)
