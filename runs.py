"""
Processes and checkpoint files, shared by train.py, sample.py and fid.py: torchrun or one process, one-line
user errors, and checkpoints written atomically, listed newest first, loaded safely and pruned (--keep-last).
A checkpoint is results/NNN-MODEL-SIZE/checkpoints/NNNNNNN.pt = {model, ema, opt, args, config, step, data,
world_size}, loaded with weights_only=True.
"""

import os
import re
import sys

import torch
import torch.distributed as dist


class ConfigError(ValueError):
    """Inconsistent flags, or flags that disagree with a checkpoint (one line, no traceback)."""


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` is one process.
    The device comes from LOCAL_RANK (the rank on this node), which is what multi-node needs."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return rank, world, device, True
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return 0, 1, device, False


def end_distributed():
    """Leave the process group, then exit at once. With torch 2.13 on the CPU, a process that had used a gloo
    group and imported torch._dynamo (torch.optim and torch.compile do) aborted at interpreter teardown in
    about 1 run in 5 here ("terminate called without an active exception", SIGABRT, after everything was
    saved), which turns a finished torchrun job into a failed one. os._exit skips the static destructors."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def die(msg, code=1):
    """A user error: one line on stderr, no traceback, non-zero exit. Nothing already saved is touched."""
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank stops, rank 0 says why
        print(f"error: {msg}", file=sys.stderr, flush=True)
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    sys.exit(code)


# ------------------------------------------------------------------------------------------------
#                                          Checkpoints
# ------------------------------------------------------------------------------------------------

CKPT_RE = re.compile(r"^(\d+)\.pt$")


def save_checkpoint(obj, path):
    """Atomic: write a temporary file in the same directory, fsync, then os.replace. A kill at any
    instant leaves either the old set of checkpoints or the old set plus this complete one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, newest (highest step) first. Temporary files never match."""
    d = os.path.join(run_dir, "checkpoints")
    found = [(int(m.group(1)), os.path.join(d, n)) for n in (os.listdir(d) if os.path.isdir(d) else [])
             if (m := CKPT_RE.match(n))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path):
    # mmap: 8 processes resuming an XL run do not each read the ~10 GB file into memory first
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def prune_checkpoints(run_dir, keep, saved):
    """--keep-last N, right after `saved` was written: of the checkpoints up to `saved`'s step, keep the
    newest N (`saved` first) and delete the others, except those the user marked with a file NNNNNNN.keep
    beside them. A checkpoint with a higher step than `saved` (another timeline of the run) is never
    touched, so the newest loadable checkpoint, the one --resume auto takes, is never deleted. keep=0: all."""
    if not keep:
        return
    step = int(CKPT_RE.match(os.path.basename(saved)).group(1))
    older = [p for p in list_checkpoints(run_dir) if int(os.path.basename(p)[:-3]) <= step]
    for p in older[keep:]:
        if not os.path.exists(p[:-3] + ".keep"):
            os.remove(p)
