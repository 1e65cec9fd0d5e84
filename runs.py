"""
What every script of a run shares (train.py, sample.py, bench/): processes (torchrun or one), one-line
user errors, the log, and checkpoints: atomic saves, the newest loadable checkpoint of a run, and the
check that a checkpoint matches the flags. A checkpoint is {model, ema, opt, args, config, step, data,
rng} and loads with weights_only=True.
"""

import glob
import os
import re
import sys
import time

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


class Logger:
    def __init__(self, path, active):
        self.path, self.active = path, active

    def __call__(self, msg):
        if self.active:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
            print(line, flush=True)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(line + "\n")


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # CPU: peak resident set of this process (KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------------
#                                   Attention kernels (SDPA)
# ------------------------------------------------------------------------------------------------

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
_SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
             "_scaled_dot_product_efficient_attention": "efficient", "_scaled_dot_product_cudnn_attention": "cudnn"}


def set_attention_backend(name):
    """Allow exactly one SDPA kernel for the whole process ('auto': all, PyTorch picks). XL's head dim
    is 72: FlashAttention-2 has kernels for 32, 64, 96, 128 ..., so it pads to 96 and a quarter of its
    attention work is padding; cuDNN and the memory-efficient kernel may not. bench/gpu_check.sh
    measures them. The flags are global (they also govern the CPU's kernels)."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    on = {b: name in ("auto", b) for b in ATTENTION_BACKENDS[1:]}
    torch.backends.cuda.enable_flash_sdp(on["flash"])
    torch.backends.cuda.enable_cudnn_sdp(on["cudnn"])
    torch.backends.cuda.enable_mem_efficient_sdp(on["efficient"])
    torch.backends.cuda.enable_math_sdp(on["math"])


def attention_kernel(model, device, precision):
    """Which SDPA kernel runs for this model's heads on this device and precision: one small attention
    call, its fused kernel op seen by a dispatch mode ('math' when none ran: the math path decomposes
    into matmuls). A backend that cannot run here is a ConfigError."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    cfg = model.config
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q = torch.zeros(1, cfg.heads, (min(cfg.resolutions) // cfg.patch_size) ** 2, cfg.width // cfg.heads, device=device, dtype=dtype)
    try:
        with Seen() as seen:
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        raise ConfigError(f"the chosen --attention-backend cannot run here (head dim {q.shape[-1]}, {dtype}, "
                          f"{device.type}): {str(e).splitlines()[0]}") from None
    return next((_SDPA_OPS[op] for op in seen.ops if op in _SDPA_OPS), "math")


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


def find_runs(results_dir, run_suffix):
    return sorted(glob.glob(os.path.join(results_dir, f"[0-9][0-9][0-9]-{glob.escape(run_suffix)}")))


def find_resume(resume, results_dir, run_suffix):
    """--resume PATH (a checkpoint file or a run directory) or 'auto': the newest loadable checkpoint
    of the newest run named *-<run_suffix> under results_dir. Returns (checkpoint dict, path) or None.
    A damaged newest file (e.g. a disk that filled up) falls back to the one before, with a note."""
    if resume == "auto":
        candidates = [p for run in reversed(find_runs(results_dir, run_suffix)) for p in list_checkpoints(run)]
        if not candidates:
            return None
    elif os.path.isdir(resume):
        candidates = list_checkpoints(resume)
        if not candidates:
            raise ConfigError(f"--resume {resume}: no checkpoints/NNNNNNN.pt in that run directory")
    elif os.path.isfile(resume):
        candidates = [resume]
    else:
        raise ConfigError(f"--resume {resume}: no such file or directory")
    for path in candidates:
        try:
            return load_checkpoint(path), path
        except Exception as e:
            if len(candidates) == 1 or resume != "auto":
                raise ConfigError(f"cannot load checkpoint {path} ({type(e).__name__}: {e})") from None
            print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__})", file=sys.stderr)
    raise ConfigError(f"--resume auto: no loadable checkpoint among {len(candidates)} found")


def check_compatible(ckpt, config, path):
    """The checkpoint must describe the same network and interpolant as the flags."""
    diffs = []
    for section in ("model", "cdc"):
        old, new = ckpt["config"][section], config[section]
        for k in sorted(set(old) | set(new)):
            a, b = old.get(k), new.get(k)
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                a, b = list(a), list(b)
            if a != b:
                diffs.append(f"{k}={a} (checkpoint) vs {b} (flags)")
    if diffs:
        raise ConfigError(f"checkpoint {path} does not match the flags: {'; '.join(diffs)}. "
                          f"Pass the flags it was trained with, or start a new run without --resume")
