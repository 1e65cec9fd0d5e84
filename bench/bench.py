"""
CDC-FM's speed on one GPU: one run answers this project's GPU questions and writes one JSON file.

    python bench/bench.py                                  # CUDA when torch sees a GPU, else the CPU self-test
    python bench/bench.py --items train_eager,sampling --budget-s 120 --out FILE
    python bench/bench.py --device cpu --out /tmp/x.json   # tiny model, seconds: tests this file, not speed

Items, in the order they run (the most important first; XL @ 256 is Table 7's recipe per GPU: patch 4,
bf16, stages 32/64/128/256, the stratified equal mix, 8 images):

  load_balance                      E[FLOPs of the slowest rank's step] / mean over ranks, for Alg. 1's i.i.d.
                                    stage draws and for stratified quotas (XL on the meta device; any machine)
  train_eager                       XL @ 256: train.train_step's images/s, MFU, peak memory, the SDPA kernel
  train_compiled_default            the same, torch.compile (mode "default")
  sync_debug                        one train_step (eager, compiled) under torch.cuda.set_sync_debug_mode("error")
  sampling                          24 Euler steps per stage, CFG 3, a bf16 copy of the EMA, batch 32
  train_grad_ckpt_eager             train_eager with model.grad_checkpointing = True
  train_grad_ckpt_compiled_default  the same, compiled
  inception                         fid.pool_stats with fid.py's packaged Inception, 256 px uint8 images
  torchrun_resume                   torchrun train.py: N steps straight vs resumed from its step-N/2 checkpoint,
                                    every tensor of the two final checkpoints bit-exact or not
  stage_mix                         training images/s of the i.i.d. equal mix and of each stage alone
  attention_backends                training images/s under each SDPA backend (torch.nn.attention.sdpa_kernel)
  train_compiled_reduce_overhead    train_eager compiled with mode "reduce-overhead" (CUDA graphs)
  sampling_compiled                 sampling with the network compiled, as sample.py runs it on CUDA
  max_batch                         the largest per-GPU batch that fits (powers of two, eager step)

Each item fails alone (its error is recorded, the run goes on) and the JSON is rewritten after every item.
The budget (--budget-s, 450 s on CUDA) covers the whole run: an item that would not fit, or is still running
when its time is up (SIGALRM), is recorded as "skipped: time budget"; every item leaves the last one its
time, and a watchdog ends the process 30 s after the budget. On the CPU the items run on a tiny model in
seconds (compilation with torch.compile's "eager" backend; CUDA-only items answer "skipped: CUDA only").
Written for torch 2.11 on one H100/H200 and not yet run on a GPU: the CUDA paths are unmeasured.
"""

import time

T0 = time.time()  # the budget counts from here: importing torch and initialising CUDA are part of the run

import argparse  # noqa: E402
import contextlib
import gc
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from copy import deepcopy
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import cdc  # noqa: E402
import train  # noqa: E402

SCHEMA = "cdc-fm-bench/1"
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16; the H200 has the same tensor cores (the MFU denominator)
BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
            "_scaled_dot_product_efficient_attention": "efficient", "_scaled_dot_product_cudnn_attention": "cudnn"}

# CUDA: the paper's recipe (Table 7) per GPU. CPU: a tiny model, so that the whole run takes seconds.
# torchrun: train.py's own flags (the built-in shapes; a small model, no compilation, so that it is quick).
PROFILES = {
    "cuda": dict(model="XL", arch=dict(patch_size=4), resolutions=(32, 64, 128, 256), precision="bf16",
                 num_classes=1000, batch=8, warmup=3, steps=10, quick=(2, 5), compile_backend="inductor",
                 sample_batch=32, inception=(100, 2, 5), max_batch_cap=1024, budget_s=450.0, torchrun_steps=30,
                 torchrun=["--model", "B", "--patch-size", "4", "--resolutions", "32,64", "--global-batch-size", "16"]),
    "cpu": dict(model="tiny", arch=dict(depth=1, width=32, heads=2, patch_size=4), resolutions=(8, 16), precision="fp32",
                num_classes=10, batch=4, warmup=1, steps=2, quick=(1, 1), compile_backend="eager",
                sample_batch=4, inception=(2, 0, 1), max_batch_cap=8, budget_s=240.0, torchrun_steps=4,
                torchrun=["--model", "tiny", "--patch-size", "4", "--resolutions", "4,8,16", "--global-batch-size", "8",
                          "--cfg-scale", "1"]),
}

# (key, seconds it needs at least on CUDA). An item that does not fit in what is left is skipped.
ITEMS = [("load_balance", 5), ("train_eager", 30), ("train_compiled_default", 60), ("sync_debug", 10),
         ("sampling", 40), ("train_grad_ckpt_eager", 20), ("train_grad_ckpt_compiled_default", 60), ("inception", 15),
         ("torchrun_resume", 60), ("stage_mix", 30), ("attention_backends", 40),
         ("train_compiled_reduce_overhead", 90), ("sampling_compiled", 60), ("max_batch", 30)]


class OutOfTime(BaseException):
    """SIGALRM: the item's time is up (a BaseException: no item's `except Exception` eats it)."""


class Killed(BaseException):
    """SIGTERM (e.g. an outer `timeout`): stop, keep what was measured."""


def error_string(e, limit=1500):
    s = f"{type(e).__name__}: {e}".strip()
    return s if len(s) <= limit else s[:limit] + " ..."


def quiet(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    except Exception:
        return None


def tensors(x, key=""):
    """Every tensor of a nested checkpoint, by its key path."""
    if isinstance(x, torch.Tensor):
        return {key: x}
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
    return {k: t for kk, v in items for k, t in tensors(v, f"{key}.{kk}").items()}


def recipe(precision):
    """What train.make_optimizer and train.train_step read: Table 7's values."""
    return SimpleNamespace(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.0, grad_clip=1.0,
                           ema_decay=0.9999, ema_warmup=True, precision=precision, grad_accum=1)


class Bench:
    def __init__(self, opts):
        self.device = torch.device("cuda", 0) if opts.device == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.p = dict(PROFILES[opts.device], budget_s=opts.budget_s or PROFILES[opts.device]["budget_s"])
        self.items = opts.items.split(",") if opts.items else [k for k, _ in ITEMS]
        unknown = set(self.items) - {k for k, _ in ITEMS}
        if unknown:
            raise SystemExit(f"error: unknown item(s) {', '.join(sorted(unknown))}; choose from {', '.join(k for k, _ in ITEMS)}")
        self.deadline, self.peak = T0 + self.p["budget_s"], opts.peak_tflops * 1e12
        self.args = recipe(self.p["precision"])
        m = self.machine()
        self.out = opts.out or os.path.join(ROOT, "bench", "gpu", re.sub(r"[^a-z0-9]+", "-", (m.get("gpu") or "cpu").lower())
                                            + time.strftime("-%Y%m%d-%H%M.json", time.localtime(T0)))
        self.doc = {"schema": SCHEMA, "command": shlex.join([sys.executable, *sys.argv]), "machine": m,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(T0)), "budget_s": self.p["budget_s"],
                    "elapsed_s": 0.0, "complete": False, "profile": self.p,
                    "peak_flops": self.peak if self.cuda else None, "items": {}}
        self.built, self.compiled, self.step = None, {}, 0

    # ------------------------------------------------------------------------------ bookkeeping

    def machine(self):
        m = {"device": self.device.type, "gpu": None, "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "git_commit": quiet(["git", "-C", ROOT, "rev-parse", "HEAD"]),
             "git_dirty": bool(quiet(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])),
             "env": {k: v for k, v in os.environ.items() if k.startswith(("TORCH", "CUDA_VISIBLE", "NCCL", "OMP_", "PYTORCH"))}}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            m.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gb=round(props.total_memory / 2**30, 2),
                     nvidia_smi=quiet(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm", "--format=csv,noheader"]))
        return m

    def save(self):
        self.doc["elapsed_s"] = round(time.time() - T0, 2)
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(f"{self.out}.tmp", "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
        os.replace(f"{self.out}.tmp", self.out)  # a reader never sees half a file

    def save_partial(self, key, r):
        self.doc["items"][key]["partial"] = r
        self.save()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def mem_gb(self):
        """Peak memory since the last reset_peak: CUDA allocations, or this process's peak resident set on the CPU."""
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_dynamo(self):
        """Drop the compiled graphs and CUDA-graph pools of earlier items (their memory and cache entries)."""
        self.compiled.clear()
        torch._dynamo.reset()
        self.free()

    # ------------------------------------------------------------------------------ the model and the step

    def build(self):
        """(model, ema, fused AdamW, CDC config, forward FLOPs per image of each stage), built once on the
        device and shared by every item: speed and memory do not depend on the weights."""
        if self.built is None:
            cfg = cdc.CDCConfig(resolutions=self.p["resolutions"])
            torch.manual_seed(0)
            with torch.device(self.device):  # initialised where it runs (XL on the CPU would take ~10 s)
                model = cdc.create_model(self.p["model"], resolutions=cfg.resolutions, num_classes=self.p["num_classes"],
                                         **self.p["arch"]).train()
            ema = deepcopy(model).requires_grad_(False).eval()
            self.built = (model, ema, train.make_optimizer(model, self.args), cfg,
                          {r: model.flops_per_sample(r) for r in cfg.resolutions})
            self.doc["model"] = {"name": self.p["model"], "parameters": sum(q.numel() for q in model.parameters()),
                                 "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(model.config).items()},
                                 "training_tflop_per_image": {str(r): 3 * f / 1e12 for r, f in self.built[4].items()}}
        return self.built

    def compile(self, net, mode):
        """torch.compile with static shapes: one graph per stage (token count, per-stage batch), compiled once."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return torch.compile(net, dynamic=False, backend=self.p["compile_backend"], mode=None if mode == "default" else mode)

    def kernel(self):
        """The SDPA kernel that runs for this model's heads here (under the sdpa_kernel context in force): one
        small attention call, its fused op seen by a dispatch mode; 'math' when none ran (it decomposes)."""
        ops, cfg = [], self.build()[0].config

        class Seen(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.append(func.__name__.split(".")[0])
                return func(*args, **(kwargs or {}))

        dtype = torch.bfloat16 if self.args.precision == "bf16" else torch.float32
        q = torch.zeros(1, cfg.heads, (min(self.p["resolutions"]) // cfg.patch_size) ** 2, cfg.width // cfg.heads,
                        device=self.device, dtype=dtype)
        with Seen():
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return next((SDPA_OPS[op] for op in ops if op in SDPA_OPS), "math")

    def time_train(self, net, batch, warmup=None, steps=None, cfg=None, sampling="stratified", cuda_graphs=False):
        """images/s, MFU and peak memory of train.train_step (the step train.py runs) on random images in
        [-1, 1] with random labels; `warmup` untimed steps first (allocator, kernels, compilation). MFU
        counts 3x the forward FLOPs of the stage mix actually drawn (model FLOPs: a checkpointed forward
        recomputed in the backward is not counted)."""
        model, ema, opt, cfg0, fps = self.build()
        cfg, warmup, steps = cfg or cfg0, self.p["warmup"] if warmup is None else warmup, steps or self.p["steps"]
        objective = train.Objective(net, cfg, 0.1, "mean", sampling)
        g, R = torch.Generator(self.device).manual_seed(batch), cfg.resolutions[-1]
        x = torch.rand(batch, model.config.in_channels, R, R, device=self.device, generator=g) * 2 - 1
        y = torch.randint(0, self.p["num_classes"], (batch,), device=self.device, generator=g)
        gen, warm, flops = torch.Generator().manual_seed(0), [], 0.0
        for i in range(warmup + steps):
            if i == warmup:
                self.sync()
                self.reset_peak()
                t0 = time.perf_counter()
            t = time.perf_counter()
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the graph's outputs may be reused
            out, gnorm, ok = train.train_step(objective, model, ema, opt, x, y, gen, self.step, self.args)
            self.step += 1
            if i < warmup:
                self.sync()
                warm.append(round(time.perf_counter() - t, 3))
            else:
                flops += 3.0 * sum(n * fps[r] for n, r in zip(out["stage_count"], cfg.resolutions))
        self.sync()
        dt = time.perf_counter() - t0
        return {"images_per_s": steps * batch / dt, "seconds_per_step": dt / steps, "batch": batch, "timed_steps": steps,
                "warmup_step_seconds": warm, "stage_count": list(out["stage_count"]), "resolutions": list(cfg.resolutions),
                "training_tflop_per_step": flops / steps / 1e12, "achieved_tflops": flops / dt / 1e12,
                "mfu": flops / dt / self.peak if self.cuda else None, "peak_memory_gb": self.mem_gb(),
                "loss": float(out["loss"].detach()), "step_ok": bool(ok), "grad_norm": float(gnorm),
                "grad_checkpointing": model.grad_checkpointing}

    # ------------------------------------------------------------------------------ items

    def item_load_balance(self):
        """DDP waits for the slowest rank: E[max over ranks of a step's FLOPs] / E[one rank's FLOPs] over
        2,000 simulated steps, i.e. a step's time relative to a balanced one if time follows FLOPs (1.0:
        no rank ever waits). Stratified quotas are the same on every rank. XL on the meta device: no memory."""
        res = {}
        for stages, patch in (((32, 64, 128, 256), 4), ((64, 256), 4), ((32, 64, 128, 256, 512), 8)):
            cfg = cdc.CDCConfig(resolutions=stages)  # Table 7; Table 6's K = 2; this repository's 512 recipe
            with torch.device("meta"):
                xl = cdc.create_model("XL", resolutions=stages, patch_size=patch)
            f, w = np.array([float(xl.flops_per_sample(r)) for r in stages]), cfg.widths().numpy()
            r = res[f"{'/'.join(map(str, stages))}, patch {patch}"] = {"training_tflop_per_image": list(3 * f / 1e12)}
            for world, batch in ((32, 8), (8, 32)):  # Table 7's 32 GPUs x 8 images; 8 GPUs x 32
                mean = batch * float(w @ f)
                iid = np.random.default_rng(0).multinomial(batch, w, size=(2000, world)) @ f
                strat = np.array([cdc.stage_quotas(cfg, batch, s) for s in range(2000)]) @ f
                r[f"{world} ranks x {batch} images"] = {"iid": iid.max(1).mean() / mean, "stratified": strat.mean() / mean}
        return res

    def item_train_eager(self):
        return dict(self.time_train(self.build()[0], self.p["batch"]), compiled=False, attention_kernel=self.kernel())

    def train_compiled(self, mode, grad_ckpt=False):
        model = self.build()[0]
        model.grad_checkpointing = grad_ckpt  # read while tracing: the checkpointed graph is another graph
        if mode not in self.compiled:
            self.compiled[mode] = self.compile(model, mode)
        net = self.compiled[mode]
        r = self.time_train(net, self.p["batch"], cuda_graphs=mode == "reduce-overhead")
        try:
            from torch._dynamo.utils import counters
            dynamo = {"graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"]}
        except Exception as e:
            dynamo = error_string(e)
        return dict(r, compiled=True, compile_mode=mode, compile_backend=self.p["compile_backend"], dynamo=dynamo,
                    first_step_seconds_incl_compile=r["warmup_step_seconds"][0], attention_kernel=self.kernel())

    def item_train_compiled_default(self):
        return self.train_compiled("default")

    def item_train_grad_ckpt_eager(self):
        model = self.build()[0]
        model.grad_checkpointing = True
        return dict(self.time_train(model, self.p["batch"]), compiled=False)

    def item_train_grad_ckpt_compiled_default(self):
        return self.train_compiled("default", grad_ckpt=True)

    def item_train_compiled_reduce_overhead(self):
        if not self.cuda:
            return {"skipped": "skipped: CUDA only (CUDA graphs)"}
        self.reset_dynamo()  # start clean: the default-mode graphs are not needed any more
        return self.train_compiled("reduce-overhead")

    def item_sync_debug(self):
        """A host sync inside the step raises under sync-debug mode 'error'; one untimed step first (lazy init)."""
        if not self.cuda:
            return {"skipped": "skipped: CUDA only (torch.cuda.set_sync_debug_mode)"}
        model, ema, opt, cfg, _ = self.build()
        R, b = cfg.resolutions[-1], self.p["batch"]
        x, y = torch.rand(b, 3, R, R, device=self.device), torch.zeros(b, dtype=torch.long, device=self.device)
        res = {}
        for name, net in (("eager", model), ("compiled_default", self.compiled.get("default"))):
            if net is None:
                res[name] = "skipped: the compiled network of train_compiled_default is not available"
                continue
            objective = train.Objective(net, cfg, 0.1, "mean", "stratified")
            try:
                for debug in (0, "error"):
                    torch.cuda.synchronize(self.device)
                    torch.cuda.set_sync_debug_mode(debug)
                    train.train_step(objective, model, ema, opt, x, y, None, self.step, self.args)
                    self.step += 1
                res[name] = "ok"
            except Exception as e:
                res[name] = f"error{' (a host sync inside the step?)' if debug else ''}: {error_string(e)}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return res

    def time_sampling(self, compiled):
        model, ema, _, cfg, fps = self.build()
        bf16 = self.args.precision == "bf16"
        net = deepcopy(ema).eval()
        if bf16:  # as sample.py: the weights cast once, not by autocast at every network evaluation
            for q in net.parameters():
                q.data = q.data.to(torch.bfloat16)
        net = self.compile(net, "default") if compiled else net
        n, steps, S = self.p["sample_batch"], 24, 3.0
        g = torch.Generator(self.device).manual_seed(0)
        y = torch.randint(0, self.p["num_classes"], (n,), device=self.device, generator=g)
        field = cdc.guided_field(net, y, S)
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
            t = time.perf_counter()
            cdc.sample(field, cfg, n, steps=1, generator=g, device=self.device)  # warm-up (and compilation)
            self.sync()
            warm = time.perf_counter() - t
            self.reset_peak()
            t0 = time.perf_counter()
            imgs = cdc.sample(field, cfg, n, steps=steps, generator=g, device=self.device)
            self.sync()
            dt = time.perf_counter() - t0
        flops = sum(steps * 2 * n * fps[r] for r in cfg.resolutions)  # CFG: 2 network evaluations per step
        return {"images_per_s": n / dt, "seconds": dt, "batch": n, "steps_per_stage": steps, "cfg_scale": S,
                "solver": "euler", "precision": self.args.precision, "compiled": compiled, "warmup_seconds": warm,
                "achieved_tflops": flops / dt / 1e12, "mfu": flops / dt / self.peak if self.cuda else None,
                "peak_memory_gb": self.mem_gb(), "finite": bool(torch.isfinite(imgs).all())}

    def item_sampling(self):
        return self.time_sampling(compiled=False)

    def item_sampling_compiled(self):
        self.reset_dynamo()
        return self.time_sampling(compiled=True)

    def item_inception(self):
        import fid
        b, w, k = self.p["inception"]  # batch, warm-up batches, timed batches
        t = time.perf_counter()
        det = fid.load_detector(None, self.device)  # names the package to install when it is missing
        self.sync()
        load_s = time.perf_counter() - t
        imgs = np.random.default_rng(0).integers(0, 256, ((w + k) * b, 256, 256, 3), dtype=np.uint8)
        if w:
            fid.pool_stats(det, imgs[:w * b], self.device, b)
        self.sync()
        self.reset_peak()
        t0 = time.perf_counter()
        mu, sigma = fid.pool_stats(det, imgs[w * b:], self.device, b)
        self.sync()
        dt = time.perf_counter() - t0
        return {"images_per_s": k * b / dt, "seconds": dt, "images": k * b, "batch": b, "image_size": 256,
                "load_seconds": load_s, "sha1": det.sha1, "peak_memory_gb": self.mem_gb(),
                "finite": bool(np.isfinite(mu).all() and np.isfinite(sigma).all()),
                "note": "host uint8 batches copied to the device are included in the time"}

    def launch(self, cmd, cwd):
        """(exit code, output, seconds) of cmd in its own process group (torchrun's worker goes with it)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({} if self.cuda else {"OMP_NUM_THREADS": "1"})}
        t = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
        try:
            out, _ = p.communicate(timeout=max(self.deadline - time.time(), 1) + 5)  # the budget alarm comes first
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        return p.returncode, out, round(time.perf_counter() - t, 2)

    def item_torchrun_resume(self):
        n = self.p["torchrun_steps"]
        tmp = tempfile.mkdtemp(prefix="bench_torchrun_")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(ROOT, "train.py"), *self.p["torchrun"], "--no-compile", "--max-steps", str(n),
               "--ckpt-every", str(n // 2), "--log-every", str(n // 2)]
        r = {"backend": "nccl" if self.cuda else "gloo", "steps": n, "resume_at": n // 2, "runs": {},
             "note": "a difference can also come from a non-deterministic CUDA kernel, not only from the resume"}

        def run(name, extra):
            rc, out, s = self.launch(cmd + extra, tmp)
            r["runs"][name] = {"command": shlex.join(cmd + extra), "returncode": rc, "wall_s": s,
                               "resumed_line": next((ln for ln in out.splitlines() if "resumed from" in ln), None)}
            self.save_partial("torchrun_resume", r)
            if rc != 0:
                raise RuntimeError(f"the {name} run exited with {rc}: {' | '.join(out.strip().splitlines()[-5:])}")

        try:
            run("straight", ["--results-dir", os.path.join(tmp, "straight")])
            straight = sorted(glob.glob(os.path.join(tmp, "straight", "**", "*.pt"), recursive=True))  # by step
            if len(straight) != 2:
                raise RuntimeError(f"expected the straight run's checkpoints at steps {n // 2} and {n}, found {straight}")
            # resumed from a copy of the straight run's middle checkpoint, in a run directory of its own
            os.makedirs(os.path.join(tmp, "resumed", "run", "checkpoints"))
            start = shutil.copy(straight[0], os.path.join(tmp, "resumed", "run", "checkpoints"))
            run("resume", ["--results-dir", os.path.join(tmp, "resumed"), "--resume", start])
            resumed = sorted(glob.glob(os.path.join(tmp, "resumed", "**", "*.pt"), recursive=True))
            if len(resumed) != 2 or r["runs"]["resume"]["resumed_line"] is None:
                raise RuntimeError(f"the second run did not resume from {start} (no 'resumed from' line) or did not "
                                   f"write its step-{n} checkpoint beside it: {resumed}")
            A, B = (tensors(torch.load(f, map_location="cpu", weights_only=True)) for f in (straight[1], resumed[1]))
            differ = sorted(k for k in A.keys() | B.keys() if k not in A or k not in B or A[k].shape != B[k].shape
                            or A[k].dtype != B[k].dtype or not torch.equal(A[k], B[k]))
            same_shape = [k for k in differ if k in A and k in B and A[k].shape == B[k].shape]
            r.update(final_checkpoints=[os.path.relpath(f, tmp) for f in (straight[1], resumed[1])], tensors=len(A),
                     differing=differ[:10], bit_exact=bool(A) and not differ,
                     max_abs_diff=max([(A[k].double() - B[k].double()).abs().max().item() for k in same_shape], default=0.0))
            return r
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def item_stage_mix(self):
        model, _, _, cfg, _ = self.build()
        res = {"equal mix, iid": self.time_train(model, self.p["batch"], sampling="iid")}
        for r in cfg.resolutions:
            res[f"{r}px only"] = self.time_train(model, self.p["batch"], cfg=cdc.CDCConfig(resolutions=(r,)))
        return res

    def item_attention_backends(self):
        """Eager only: inductor calls the same aten SDPA kernels, and compiling once per backend would take minutes."""
        model = self.build()[0]
        res = {"compiled": False, "head_dim": model.config.width // model.config.heads, "backends": {}}
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                    entry = {"kernel": self.kernel()}
                    entry.update(self.time_train(model, self.p["batch"], *self.p["quick"]))
            except Exception as e:  # e.g. no kernel of this backend for this head dim, dtype or device
                entry = {"error": error_string(e, 400)}
                self.free()
            res["backends"][name] = entry
            self.save_partial("attention_backends", res)
        return res

    def item_max_batch(self):
        self.reset_dynamo()  # CUDA-graph pools of reduce-overhead hold memory
        model, _, opt, _, _ = self.build()
        b, cap = self.p["batch"], self.p["max_batch_cap"]
        res = {"method": f"eager train_step, batch doubled from {b} until out of memory or {cap}; 1 warm-up + 1 timed "
                         "step each (the compiled step may fit more)", "attempts": [], "largest_that_fits": None}
        last_s = 5.0
        while b <= cap:
            if self.deadline - time.time() < 3 * last_s + 10:
                res["stopped"] = f"skipped: time budget (before batch {b})"
                break
            t, failed = time.perf_counter(), None
            try:
                r = self.time_train(model, b, 1, 1)
                res["attempts"].append({"batch": b, "fits": True, **{k: r[k] for k in ("images_per_s", "peak_memory_gb", "mfu")}})
                res["largest_that_fits"] = b
            except Exception as e:  # torch.OutOfMemoryError; near the limit also e.g. a cuBLAS allocation failure
                failed = error_string(e, 400)
            if failed:  # (the exception and its frames are gone here, so their memory can be freed)
                opt.zero_grad(set_to_none=True)
                self.free()
                res["attempts"].append({"batch": b, "fits": False, "error": failed})
                res["stopped"] = f"failed at batch {b}" + (" (out of memory)" if "out of memory" in failed else "")
                break
            self.save_partial("max_batch", res)
            last_s, b = time.perf_counter() - t, 2 * b
        else:
            res["stopped"] = f"the cap {cap} was reached"
        return res

    # ------------------------------------------------------------------------------ driver

    def run(self):
        def raise_(e):
            def handler(signum, frame):
                raise e()
            return handler

        old = signal.signal(signal.SIGALRM, raise_(OutOfTime)), signal.signal(signal.SIGTERM, raise_(Killed))
        try:
            return self._run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old[0])
            signal.signal(signal.SIGTERM, old[1])

    def _run(self):
        """Returns whether an item was cut off (then compile workers may hang: the caller exits hard)."""
        for key, _ in ITEMS:
            self.doc["items"][key] = ({"status": "pending"} if key in self.items else
                                      {"status": "skipped", "skipped": "skipped: not selected (--items)"})
        self.save()
        last, stop, cut = ITEMS[-1], None, False
        for key, need in ITEMS:
            if key not in self.items:
                continue
            rec, t = self.doc["items"][key], time.time()
            # every item leaves the last one its time (on the CPU everything takes seconds)
            reserve = last[1] if self.cuda and key != last[0] and last[0] in self.items else 0
            need = need if self.cuda else 1
            if stop or self.deadline - t < need + reserve:
                rec.update(status="skipped", skipped=stop or f"skipped: time budget ({self.deadline - t:.0f} s left, "
                           f"the item needs about {need} s and leaves {reserve} s to {last[0]})")
                self.save()
                continue
            print(f"[bench {t - T0:6.1f}s] {key} ...", flush=True)
            signal.setitimer(signal.ITIMER_REAL, max(self.deadline - t - reserve, 0.01))
            try:
                result = getattr(self, f"item_{key}")()
                signal.setitimer(signal.ITIMER_REAL, 0)
                if list(result) == ["skipped"]:
                    rec.update(status="skipped", skipped=result["skipped"])
                else:
                    rec.update(status="ok", result=result)
            except OutOfTime:
                rec.update(status="skipped", skipped=f"skipped: time budget (interrupted after {time.time() - t:.0f} s)")
                cut = True
            except (Killed, KeyboardInterrupt) as e:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self.doc["terminated"] = cut = True
                stop = f"skipped: the run was terminated ({type(e).__name__}) during {key}"
                rec.update(status="skipped", skipped=stop)
            except Exception as e:
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec.update(status="error", error=error_string(e),
                           traceback="".join(traceback.format_exception(e)).splitlines()[-12:])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec["seconds"] = round(time.time() - t, 2)
                if rec["status"] == "ok":
                    rec.pop("partial", None)
                with contextlib.suppress(Exception):
                    if self.cuda:
                        torch.cuda.set_sync_debug_mode(0)
                    if self.built:
                        self.built[0].grad_checkpointing = False
                    if rec["status"] == "skipped" and "interrupted" in rec["skipped"]:
                        self.reset_dynamo()  # a compilation cut off half-way
                    self.free()
                self.save()
            print(f"[bench {time.time() - T0:6.1f}s] {key}: {rec['status']} {(rec.get('error') or rec.get('skipped') or '')[:200]}",
                  flush=True)
        self.doc["complete"] = stop is None
        self.save()
        ok = sum(r["status"] == "ok" for r in self.doc["items"].values())
        print(f"bench: {ok}/{len(ITEMS)} items ok in {time.time() - T0:.1f} s; JSON:\n{self.out}", flush=True)
        return cut


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees a GPU")
    p.add_argument("--out", default=None, help="the JSON file (default bench/gpu/<gpu>-<YYYYMMDD-HHMM>.json)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget of the whole run (default: CUDA 450, CPU 240)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="MFU denominator: the GPU's dense bf16 peak")
    p.add_argument("--items", default=None, help="a comma-separated subset of: " + ",".join(k for k, _ in ITEMS))
    opts = p.parse_args(argv)
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.exit(1, "error: --device cuda, but torch sees no GPU\n")
    bench = Bench(opts)
    # a hang inside C++ (a compilation, a kernel) is beyond SIGALRM's reach: the JSON of the last item stays
    watchdog = threading.Timer(bench.deadline + 30 - time.time(), os._exit, (124,))
    watchdog.daemon = True
    watchdog.start()
    cut = bench.run()
    rc = 143 if bench.doc.get("terminated") else 0  # errors and budget skips are results, not failures
    if cut:  # an item was cut off (e.g. inside a compilation): do not wait for its workers or CUDA teardown
        sys.stdout.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
