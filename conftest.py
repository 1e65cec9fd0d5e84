# Shared test settings. Hypothesis deadlines are off: a loaded 2-core CI machine makes timings noisy,
# and speed is measured by the benchmarks, never by tests.
import contextlib
import dataclasses
import glob
import io
import os
import subprocess
import sys

import torch
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode

import cdc
import runs
import train

# The tests multiply many small tensors: one intra-op thread avoids OpenMP overhead and, on a busy 2-core
# runner, thread contention (measured here: 14 s instead of 71 s for the sampler and training checks).
torch.set_num_threads(1)

settings.register_profile("cdc", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("cdc")


# --- Helpers shared by the test files (they import them from here, never from each other) ---------

HERE = os.path.dirname(os.path.abspath(__file__))
# The tests' network and data: a DiT of a few thousand parameters (size "test") on 48 built-in images of
# 16 px in 3 stages, 6 steps of 8 images per epoch, sample grids of 2 steps per stage: a second per run.
cdc.PRESETS["test"] = dict(depth=1, width=32, heads=2, patch_size=2)
train.SHAPES_IMAGES, train.SAMPLE_STEPS = 48, 2
TINY = ["--model", "test", "--resolutions", "4,8,16", "--global-batch-size", "8", "--log-every", "2"]


def run(script, *args, cwd, torchrun=False):
    """`python script args` in a new process (or 2 under torchrun) by way of this file's __main__ (the test
    size), with one thread: bit-exact across processes, and train.py measures no thread count."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    return subprocess.run([*launcher, os.path.join(HERE, "conftest.py"), script, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def inproc(script, *args, cwd):
    """`run` without the interpreter start-up: the script's main() in this process and in `cwd`, output
    captured, SystemExit turned into a return code (an uncaught exception fails the test)."""
    import sample
    main = {"train.py": train.main, "sample.py": sample.main}[script]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


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


def wake(model):
    """Random weights where adaLN-Zero put zeros, so that outputs depend on every input."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
                m.weight.normal_(0, 0.05)
    return model


def initial_weights(argv):
    """The weights train.py starts from (rank 0 and every rank: seeded by --global-seed before the build)."""
    args = train.get_parser().parse_args(argv)
    train.resolve_args(args, demo=args.data_path is None)
    torch.manual_seed(args.global_seed)
    return train.build(args, train.SHAPES_CLASSES)[1].state_dict()


def make_checkpoint(path, config=cdc.CDCConfig(resolutions=(4, 8, 16))):
    """A checkpoint as train.py writes it, of a small network with random (non-zero) output layers."""
    torch.manual_seed(0)
    model = wake(cdc.create_model("test", num_classes=4, resolutions=config.resolutions))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    runs.save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": {}, "step": 0,
                          "config": {"model": dataclasses.asdict(model.config), "cdc": config.to_dict()}}, path)


def inf_backward(v):
    """v itself, whose gradient becomes inf: a finite loss with a non-finite gradient."""
    v.register_hook(lambda g: g * float("inf"))
    return v


class HostToDevice(TorchDispatchMode):
    """Counts ops that take a CPU tensor into a computation on another device (a host-to-device copy)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors) and any(t.device.type != "cpu" for t in tensors + outs):
            self.copies.append(str(func))
        return out


if __name__ == "__main__":  # python conftest.py train.py|sample.py ARGS: the script's main() with the test size
    import sample
    {"train.py": train.main, "sample.py": sample.main}[sys.argv[1]](sys.argv[2:])
