"""
The GPU questions of this project, answered by one run that writes one JSON file.

    bash bench/gpu_check.sh                       # CUDA if torch sees a GPU, else the CPU self-test
    python bench/gpu_check.py --device cuda [--out FILE] [--budget-s 450] [--items a,b,...]
    python bench/gpu_check.py --device cpu --out /tmp/x.json     # tiny model: tests this script, not speed

Items, in the order they run (the most important numbers first). Each is measured inside its own
try/except: a failure is recorded as an error string and the run goes on. The JSON is rewritten after
every item, so a run that is killed keeps what it measured.

  train_eager                       1  XL @ 256 (patch 4, bf16, stages 32/64/128/256, equal stratified mix,
                                       8 images per GPU): images/s, MFU, peak memory, SDPA kernel
  train_compiled_default            1  the same, train.compile_model(mode="default")
  sync_debug                        6  one train_step under torch.cuda.set_sync_debug_mode("error")
  sampling                          4  24 Euler steps per stage, CFG 3, bf16 EMA copy, batch 32 (eager)
  train_grad_ckpt_eager             2  item 1 with model.grad_checkpointing = True
  train_grad_ckpt_compiled_default  2  the same, compiled (default mode)
  inception                         5  feature extraction with fid.py's packaged Inception, 256 px uint8
  torchrun_resume                   7  torchrun (1 process) 15 steps + --resume auto to 30 vs 30 straight:
                                       bit-exact or not, wall times, the log's attention kernel
  attention_backends                3  runs.set_attention_backend(auto|flash|cudnn|efficient|math): training
                                       images/s of the eager step (see the item), or the error
  train_compiled_reduce_overhead    1  item 1 with mode="reduce-overhead" (CUDA graphs)
  sampling_compiled                 4  (extra) item 4 with the network compiled as sample.py does on CUDA;
                                       stops early enough to leave 30 s to max_batch
  max_batch                         1  the largest per-GPU batch that fits (powers of two, eager step)

The time budget (--budget-s, 450 s on CUDA) covers the whole run: an item that would not fit is
recorded as "skipped: time budget", and an item still running when the budget runs out is stopped
(SIGALRM) and recorded the same way. The data-parallel load-balance numbers are bench/speed.py's.

On the CPU (--device cpu) the same items run with a tiny model in a few tens of seconds, compile uses
torch.compile's "eager" backend (dynamo only, no inductor), sync-debug mode is skipped (CUDA only):
the numbers there test this script, not speed.

Written for torch 2.11 on one H100/H200; not yet run on a GPU (the project had none): the CUDA paths are
unmeasured, and the time each item takes there is an estimate until the first run.
"""

import time

T0 = time.time()  # the budget counts from here: the imports below (torch, CUDA) are part of the run

import argparse  # noqa: E402
import contextlib
import gc
import glob
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from copy import deepcopy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cdc  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

SCHEMA = "cdc-fm-gpu-check/1"
H100_PEAK = 989e12  # H100 SXM dense bf16; the H200 has the same tensor cores and the same 989 TFLOP/s
OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))

# What each device runs. CUDA: the paper's recipe (Table 7) per GPU. CPU: a tiny model, so that the
# whole script runs in CI in well under a minute; those numbers say nothing about speed.
PROFILES = {
    "cuda": dict(
        train_flags=["--model", "XL", "--image-size", "256", "--patch-size", "4", "--resolutions", "32,64,128,256",
                     "--precision", "bf16"],
        num_classes=1000, batch=8, warmup=3, steps=10, compile_backend="inductor",
        backend_warmup=2, backend_steps=5,
        sample_batch=32, sample_steps=24, cfg_scale=3.0,
        inception_batch=100, inception_warmup=2, inception_batches=5, inception_size=256,
        torchrun_flags=["--model", "B", "--patch-size", "4", "--image-size", "64", "--resolutions", "32,64",
                        "--global-batch-size", "16", "--dataset-size", "160", "--num-workers", "0",
                        "--sample-steps", "2", "--log-every", "15", "--no-compile"],
        torchrun_steps=30, max_batch_cap=1024, budget_s=450.0),
    "cpu": dict(
        train_flags=["--model", "tiny", "--depth", "2", "--width", "64", "--heads", "2", "--patch-size", "4",
                     "--image-size", "32", "--resolutions", "8,16,32", "--precision", "fp32"],
        num_classes=10, batch=6, warmup=1, steps=2, compile_backend="eager",
        backend_warmup=1, backend_steps=1,
        sample_batch=4, sample_steps=24, cfg_scale=3.0,
        inception_batch=2, inception_warmup=0, inception_batches=1, inception_size=256,
        torchrun_flags=["--model", "tiny", "--image-size", "16", "--resolutions", "4,8,16", "--patch-size", "2",
                        "--width", "32", "--depth", "1", "--heads", "2", "--global-batch-size", "8",
                        "--dataset-size", "48", "--num-workers", "0", "--sample-steps", "2", "--log-every", "15",
                        "--threads", "1"],
        torchrun_steps=30, max_batch_cap=12, budget_s=240.0),
}

# (key, item number, what it measures, seconds it needs at least on CUDA). Most important first; an item
# that does not fit in what is left of the budget is skipped. sampling_compiled (an extra) stops early
# enough to leave RESERVE_FOR_LAST seconds to max_batch, which runs last.
ITEMS = [
    ("train_eager", "1", "training step, eager", 30),
    ("train_compiled_default", "1", "training step, torch.compile mode default", 60),
    ("sync_debug", "6", "one training step under torch.cuda.set_sync_debug_mode('error')", 10),
    ("sampling", "4", "sampling, eager", 40),
    ("train_grad_ckpt_eager", "2", "training step with gradient checkpointing, eager", 20),
    ("train_grad_ckpt_compiled_default", "2", "training step with gradient checkpointing, compiled (default)", 60),
    ("inception", "5", "Inception feature extraction (fid.py's packaged detector)", 15),
    ("torchrun_resume", "7", "torchrun 1 process: 15 steps + resume to 30 vs 30 straight", 60),
    ("attention_backends", "3", "training images/s per SDPA backend (eager step)", 40),
    ("train_compiled_reduce_overhead", "1", "training step, torch.compile mode reduce-overhead (CUDA graphs)", 90),
    ("sampling_compiled", "4", "(extra) sampling with the network compiled, as sample.py does on CUDA", 60),
    ("max_batch", "1", "largest per-GPU batch that fits (powers of two, eager step)", 20),
]
RESERVE_FOR_LAST = {"sampling_compiled": ("max_batch", 30)}


class OutOfTime(BaseException):
    """Raised by SIGALRM when the time budget is spent (BaseException: no item's `except Exception` eats it)."""


class Killed(BaseException):
    """SIGTERM (e.g. an outer `timeout`): stop, write what was measured."""


def error_string(e, limit=1500):
    s = f"{type(e).__name__}: {e}".strip()
    return s if len(s) <= limit else s[:limit] + " ..."


def traceback_tail(e, lines=12):
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).splitlines()[-lines:]


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def run_quiet(cmd, timeout=10):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.stdout.strip() if p.returncode == 0 else None
    except Exception:
        return None


class Check:
    def __init__(self, opts):
        self.opts = opts
        self.device = torch.device("cuda", 0) if opts.device == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.p = dict(PROFILES[opts.device])
        if opts.budget_s is not None:
            self.p["budget_s"] = opts.budget_s
        self.t_start = T0
        self.deadline = self.t_start + self.p["budget_s"]
        self.peak = opts.peak_tflops * 1e12
        self.machine = self.machine_info()
        self.short_machine = {k: self.machine.get(k) for k in ("gpu", "torch", "cuda")}
        self.command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join([sys.executable, *sys.argv])
        self.python_command = shlex.join([sys.executable, *sys.argv])
        self.out = opts.out or os.path.join(
            ROOT, "bench", "results", "gpu",
            f"{slug(self.machine.get('gpu') or 'cpu')}-{time.strftime('%Y%m%d-%H%M', time.localtime(self.t_start))}.json")
        self.doc = {
            "schema": SCHEMA, "command": self.command, "python_command": self.python_command,
            "machine": self.machine, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t_start)),
            "budget_s": self.p["budget_s"], "elapsed_s": 0.0, "complete": False, "profile": self.p,
            "peak_flops": self.peak if self.cuda else None,
            "peak_flops_note": self.peak_note(),
            "notes": self.notes(), "items": {},
        }
        # the model, its EMA and optimiser are shared by the training items (built on first use)
        self._model, self._model_error, self.compiled, self.step = None, None, {}, 0

    # ---------------------------------------------------------------------------------- bookkeeping

    def machine_info(self):
        m = {"device": self.device.type, "gpu": None, "torch": torch.__version__, "cuda": torch.version.cuda,
             "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
             "torch_threads": torch.get_num_threads()}
        try:
            m["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        except Exception as e:
            m["cudnn"] = error_string(e)
        if self.cuda:
            try:
                props = torch.cuda.get_device_properties(self.device)
                m.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                         gpu_memory_gb=round(props.total_memory / 2**30, 2))
            except Exception as e:
                m["gpu"] = f"unknown ({error_string(e)})"
            try:
                m["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception as e:
                m["nccl"] = error_string(e)
            m["nvidia_smi"] = run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,"
                                         "clocks.max.sm", "--format=csv,noheader"])
        else:
            try:
                with open("/proc/cpuinfo") as f:
                    m["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
            except OSError:
                m["cpu_model"] = platform.processor() or None
        commit = run_quiet(["git", "-C", ROOT, "rev-parse", "HEAD"])
        dirty = run_quiet(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
        m["git_commit"] = commit
        m["git_dirty"] = None if commit is None else bool(dirty)
        m["env"] = {k: v for k, v in os.environ.items()
                    if k.startswith(("TORCH", "CUDA_VISIBLE", "NCCL", "OMP_", "PYTORCH"))}
        return m

    def peak_note(self):
        if not self.cuda:
            return "CPU: no MFU (GFLOP/s only)"
        name = self.machine.get("gpu") or ""
        note = f"MFU = analytic training FLOPs / {self.peak / 1e12:g} TFLOP/s"
        if self.opts.peak_tflops == H100_PEAK / 1e12:
            note += " (H100 SXM bf16 dense; the H200 has the same 989 TFLOP/s)"
            if not re.search(r"H100|H200", name) or "PCIe" in name:
                note += f"; this GPU ({name}) is not an H100/H200 SXM: pass --peak-tflops with its bf16 dense peak"
        return note + f"; GPU: {name}"

    def notes(self):
        n = ["load balance of 4-node data-parallel training: bench/speed.py --load-balance (not measured here)"]
        if not self.cuda:
            n.append("CPU run: tiny model; compile uses torch.compile's 'eager' backend (dynamo only, no inductor); "
                     "sync-debug mode is CUDA only and skipped; these numbers test the script, not speed")
        return n

    def elapsed(self):
        return time.time() - self.t_start

    def remaining(self):
        return self.deadline - time.time()

    def save(self):
        self.doc["elapsed_s"] = round(self.elapsed(), 2)
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = f"{self.out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, self.out)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def mem_gb(self):
        return round(runs.peak_memory_gb(self.device), 3)

    # ---------------------------------------------------------------------------------- shared set-up

    def train_args(self, extra=()):
        """The flags train.py would parse for this run, resolved with the recipe defaults (lr, betas, ...)."""
        flags = [*self.p["train_flags"], *extra]
        args = train.get_parser().parse_args(flags)
        train.resolve_args(args, demo=False)
        return args, flags

    def model(self):
        """(model, ema, opt, cdc config, analytic forward FLOPs per image of each stage); built once."""
        if self._model_error:
            raise RuntimeError(f"the model could not be built: {self._model_error}")
        if self._model is None:
            try:
                t = time.perf_counter()
                args, _ = self.train_args()
                cfg = train.build_cdc_config(args)
                torch.manual_seed(0)
                with torch.device(self.device):  # initialised where it runs (XL on the CPU would take ~10 s)
                    model = train.build_model(args, self.p["num_classes"])
                model.to(self.device).train()
                ema = deepcopy(model).requires_grad_(False).eval()
                opt = train.make_optimizer(model, args)
                fps = {r: model.flops_per_sample(r) for r in cfg.resolutions}
                self._model = (model, ema, opt, cfg, fps)
                self.doc["model"] = {
                    "flags": self.p["train_flags"], "parameters": sum(q.numel() for q in model.parameters()),
                    "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(model.config).items()},
                    "training_tflop_per_image": {str(r): 3 * f / 1e12 for r, f in fps.items()},
                    "build_seconds": round(time.perf_counter() - t, 2), "shared": "one model, EMA and fused AdamW serve "
                    "every training item (weights move between items; speed and memory do not depend on them)"}
            except Exception as e:
                self._model_error = error_string(e)
                raise
        return self._model

    def batch(self, n):
        model, _, _, cfg, _ = self.model()
        g = torch.Generator(self.device).manual_seed(1234 + n)
        R = cfg.resolutions[-1]
        x = torch.rand(n, model.config.in_channels, R, R, device=self.device, generator=g) * 2 - 1
        y = torch.randint(0, max(model.config.num_classes, 1), (n,), device=self.device, generator=g)
        return x, y

    def compile(self, net, mode):
        return train.compile_model(net, backend=self.p["compile_backend"], mode=mode)

    def dynamo_counters(self):
        try:
            from torch._dynamo.utils import counters
            breaks = dict(counters.get("graph_break", {}))
            return {"graph_breaks": int(sum(breaks.values())),
                    "graph_break_reasons": {str(k)[:200]: int(v) for k, v in list(breaks.items())[:10]},
                    "unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
                    "cudagraph_skips": int(counters.get("inductor", {}).get("cudagraph_skips", 0))}
        except Exception as e:
            return {"error": error_string(e)}

    def time_train(self, net, extra, batch, warmup, steps, grad_ckpt=False):
        """images/s, MFU, peak memory of train.train_step, the exact step train.py runs, on this process's
        batch of random images (x in [-1, 1], random labels); `warmup` untimed steps first."""
        model, ema, opt, cfg, fps = self.model()
        args, flags = self.train_args([*extra, "--grad-checkpointing"] if grad_ckpt else extra)
        model.grad_checkpointing = grad_ckpt  # what train.py does with --grad-checkpointing
        try:
            objective = train.Objective(net, cfg, args.class_dropout, args.loss_reduction, args.stage_sampling)
            x, y = self.batch(batch)
            warm = []
            for _ in range(warmup):  # allocator, cuBLAS/cuDNN handles, lazy init, compilation
                t = time.perf_counter()
                train.train_step(objective, model, ema, opt, x, y, None, self.step, args)
                self.step += 1
                self.sync()
                warm.append(round(time.perf_counter() - t, 4))
            self.sync()
            self.reset_peak()
            flops, t0 = 0.0, time.perf_counter()
            for _ in range(steps):
                out, gnorm, ok = train.train_step(objective, model, ema, opt, x, y, None, self.step, args)
                self.step += 1
                flops += 3.0 * sum(n * fps[r] for n, r in zip(out["stage_count"], cfg.resolutions))
            self.sync()
            dt = time.perf_counter() - t0
            r = {"images_per_s": steps * batch / dt, "seconds_per_step": dt / steps, "batch": batch,
                 "warmup_steps": warmup, "timed_steps": steps, "warmup_step_seconds": warm,
                 "stage_count": list(out["stage_count"]), "resolutions": list(cfg.resolutions),
                 "training_tflop_per_step": flops / steps / 1e12, "achieved_tflops": flops / dt / 1e12,
                 "mfu": flops / dt / self.peak if self.cuda else None, "peak_memory_gb": self.mem_gb(),
                 "loss": float(out["loss"].detach()), "step_ok": bool(ok), "grad_norm": float(gnorm),
                 "train_flags": flags, "grad_checkpointing": grad_ckpt,
                 "call": "train.train_step(objective, model, ema, opt, x, y, None, step, args), "
                         "args = train.get_parser().parse_args(train_flags) + train.resolve_args(args, demo=False)"}
            return r
        finally:
            model.grad_checkpointing = False

    # ---------------------------------------------------------------------------------- items

    def item_train_eager(self):
        model = self.model()[0]
        r = self.time_train(model, ["--no-compile"], self.p["batch"], self.p["warmup"], self.p["steps"])
        r["attention_kernel"] = runs.attention_kernel(model, self.device, self.precision())
        r["compiled"] = False
        return r

    def precision(self):
        return "bf16" if "bf16" in self.p["train_flags"] else "fp32"

    def train_compiled(self, mode, grad_ckpt=False):
        model = self.model()[0]
        if mode not in self.compiled:
            self.compiled[mode] = self.compile(model, mode)
        extra = ["--compile", "--compile-mode", mode]
        r = self.time_train(self.compiled[mode], extra, self.p["batch"], self.p["warmup"], self.p["steps"], grad_ckpt)
        r.update(compiled=True, compile_mode=mode, compile_backend=self.p["compile_backend"],
                 first_step_seconds_incl_compile=r["warmup_step_seconds"][0] if r["warmup_step_seconds"] else None,
                 dynamo=self.dynamo_counters(),
                 attention_kernel=runs.attention_kernel(model, self.device, self.precision()),
                 call_compile=f"train.compile_model(model, backend={self.p['compile_backend']!r}, mode={mode!r})")
        return r

    def item_train_compiled_default(self):
        return self.train_compiled("default")

    GC_NOTE = ("MFU counts 3x the forward FLOPs (model FLOPs), as in item 1; the forward that checkpointing "
               "recomputes in the backward is not counted")

    def item_train_grad_ckpt_eager(self):
        model = self.model()[0]
        r = self.time_train(model, ["--no-compile"], self.p["batch"], self.p["warmup"], self.p["steps"], grad_ckpt=True)
        r.update(compiled=False, note=self.GC_NOTE)
        return r

    def item_train_grad_ckpt_compiled_default(self):
        r = self.train_compiled("default", grad_ckpt=True)
        r["note"] = self.GC_NOTE
        return r

    def item_train_compiled_reduce_overhead(self):
        self.reset_dynamo()  # start clean: the default-mode graphs are not needed any more
        try:
            r = self.train_compiled("reduce-overhead")
        finally:
            self.compiled.pop("reduce-overhead", None)
        if not self.cuda:
            r["note"] = "CPU: the eager backend ignores mode='reduce-overhead' (no CUDA graphs); this runs the code path only"
        return r

    def item_sync_debug(self):
        if not self.cuda:
            return {"skipped": "skipped: CUDA only (torch.cuda.set_sync_debug_mode)"}
        model, ema, opt, cfg, _ = self.model()
        res = {"call": "torch.cuda.set_sync_debug_mode('error'); train.train_step(...); set_sync_debug_mode(0) "
                       "(after one untimed warm-up step of the same net)"}
        nets = [("eager", model, ["--no-compile"])]
        if "default" in self.compiled:
            nets.append(("compiled_default", self.compiled["default"], ["--compile", "--compile-mode", "default"]))
        else:
            res["compiled_default"] = "skipped: the compiled network of item train_compiled_default is not available"
        for label, net, extra in nets:
            try:
                args, _ = self.train_args(extra)
                objective = train.Objective(net, cfg, args.class_dropout, args.loss_reduction, args.stage_sampling)
                x, y = self.batch(self.p["batch"])
                train.train_step(objective, model, ema, opt, x, y, None, self.step, args)  # warm-up: lazy init done
                self.step += 1
                torch.cuda.synchronize(self.device)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    train.train_step(objective, model, ema, opt, x, y, None, self.step, args)
                    self.step += 1
                    res[label] = "ok"
                except Exception as e:
                    res[label] = f"error (a host sync inside the step?): {error_string(e)}"
                    res[label + "_traceback"] = traceback_tail(e)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize(self.device)
            except Exception as e:
                res[label] = f"error (outside the checked step): {error_string(e)}"
        return res

    def time_sampling(self, compiled):
        model, ema, opt, cfg, fps = self.model()
        precision = self.precision()
        net = train.sampling_copy(ema, precision).eval()
        net = self.compile(net, "default") if compiled else net
        n, steps, S = self.p["sample_batch"], self.p["sample_steps"], self.p["cfg_scale"]
        nc = model.config.num_classes
        g = torch.Generator(self.device).manual_seed(0)
        y = torch.randint(0, max(nc, 1), (n,), device=self.device, generator=g) if nc else None
        nfe = 1 if y is None or S == 1 else 2
        field = cdc.guided_field(net, y, S)
        try:
            with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=precision == "bf16"):
                t = time.perf_counter()
                cdc.sample(field, cfg, n, steps=1, generator=g, device=self.device)  # warm-up (and compilation)
                self.sync()
                warm = time.perf_counter() - t
                self.reset_peak()
                t0 = time.perf_counter()
                imgs = cdc.sample(field, cfg, n, steps=steps, generator=g, device=self.device)
                self.sync()
                dt = time.perf_counter() - t0
            flops = sum(steps * nfe * n * fps[r] for r in cfg.resolutions)
            return {"images_per_s": n / dt, "seconds": dt, "batch": n, "steps_per_stage": steps, "cfg_scale": S,
                    "nfe_per_step": nfe, "solver": "euler", "precision": precision, "compiled": compiled,
                    "warmup_seconds": warm, "forward_tflop": flops / 1e12, "achieved_tflops": flops / dt / 1e12,
                    "mfu": flops / dt / self.peak if self.cuda else None, "peak_memory_gb": self.mem_gb(),
                    "finite": bool(torch.isfinite(imgs).all()),
                    "call": f"cdc.sample(cdc.guided_field(net, y, {S}), cfg, {n}, steps={steps}) under "
                            f"torch.autocast(bf16={precision == 'bf16'}), net = train.sampling_copy(ema, {precision!r})"
                            + (f" compiled by train.compile_model(backend={self.p['compile_backend']!r})" if compiled else "")}
        finally:
            del net, field
            self.free()

    def item_sampling(self):
        r = self.time_sampling(compiled=False)
        r["note"] = "eager network; sample.py compiles it on CUDA by default: see sampling_compiled"
        return r

    def item_sampling_compiled(self):
        self.reset_dynamo()
        return self.time_sampling(compiled=True)

    def reset_dynamo(self):
        """Drop compiled graphs and CUDA-graph pools of earlier items (their memory, their cache entries)."""
        self.compiled.clear()
        torch._dynamo.reset()  # also resets the CUDA-graph trees
        self.free()

    def item_inception(self):
        import fid
        r = {"call": "fid.load_detector(None, device); fid.extract(detector, uint8 NHWC batches, device, keep=0)"}
        t = time.perf_counter()
        r["path"] = fid.packaged_inception_path()  # a ConfigError naming the package when it is not installed
        det = fid.load_detector(None, self.device)
        self.sync()
        r.update(detector=det.name, sha1=det.sha1, load_seconds=time.perf_counter() - t)
        b, w, k, side = (self.p[s] for s in ("inception_batch", "inception_warmup", "inception_batches", "inception_size"))
        rng = np.random.default_rng(0)
        imgs = rng.integers(0, 256, ((w + k) * b, side, side, 3), dtype=np.uint8)
        batches = [imgs[i * b:(i + 1) * b] for i in range(w + k)]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            if w:
                fid.extract(det, batches[:w], self.device, keep=0, every=math.inf)
            self.sync()
            self.reset_peak()
            t0 = time.perf_counter()
            out = fid.extract(det, batches[w:], self.device, keep=0, every=math.inf)
            self.sync()
            dt = time.perf_counter() - t0
        r.update(images_per_s=out["n"] / dt, seconds=dt, images=out["n"], batch=b, warmup_batches=w, image_size=side,
                 peak_memory_gb=self.mem_gb(), note="fp32 (fid.full_fp32: TF32 off), resize to 299 inside; "
                 "host uint8 batches copied to the device are included in the time", extract_log=log.getvalue().strip())
        del det
        self.free()
        return r

    def item_torchrun_resume(self):
        steps = self.p["torchrun_steps"]
        half = steps // 2
        tmp = tempfile.mkdtemp(prefix="gpu_check_torchrun_")
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                os.path.join(ROOT, "train.py"), *self.p["torchrun_flags"], "--ckpt-every", str(half)]
        plan = [("first_half", ["--max-steps", str(half), "--results-dir", os.path.join(tmp, "resumed")]),
                ("resume", ["--max-steps", str(steps), "--results-dir", os.path.join(tmp, "resumed"), "--resume", "auto"]),
                ("straight", ["--max-steps", str(steps), "--results-dir", os.path.join(tmp, "straight")])]
        r = {"backend": "nccl" if self.cuda else "gloo", "steps": steps, "resume_at": half, "runs": {},
             "note": "torchrun = python -m torch.distributed.run; no --data-path: the built-in shapes"
                     + ("; --no-compile so that it is quick (eager bf16)" if self.cuda else "")}
        try:
            for name, extra in plan:
                cmd = base + extra
                t = time.perf_counter()
                rc, outtxt = self.subprocess(cmd, cwd=tmp)
                run = {"command": shlex.join(cmd), "returncode": rc, "wall_s": round(time.perf_counter() - t, 2)}
                m = re.search(r"attention kernel ([^\n;]+)", outtxt)
                run["attention_kernel"] = m.group(1).strip() if m else None
                run["attention_kernel_line"] = next((ln for ln in outtxt.splitlines() if "attention kernel" in ln), None)
                run["resumed_line"] = next((ln for ln in outtxt.splitlines() if "resumed from" in ln), None)
                run["last_step_line"] = next((ln for ln in reversed(outtxt.splitlines()) if re.search(r"step \d+ loss", ln)), None)
                if rc != 0:
                    run["output_tail"] = outtxt.splitlines()[-25:]
                r["runs"][name] = run
                self.save_partial("torchrun_resume", r)
                if rc != 0:
                    raise RuntimeError(f"{name} run exited with {rc}: {' | '.join(outtxt.strip().splitlines()[-3:])}")
            final = f"{steps:07d}.pt"
            a = glob.glob(os.path.join(tmp, "straight", "*", "checkpoints", final))
            b = glob.glob(os.path.join(tmp, "resumed", "*", "checkpoints", final))
            if len(a) != 1 or len(b) != 1:
                raise RuntimeError(f"final checkpoints not found (straight {a}, resumed {b})")
            A = torch.load(a[0], map_location="cpu", weights_only=True)
            B = torch.load(b[0], map_location="cpu", weights_only=True)
            cmp = {part: compare(A[part], B[part]) for part in ("model", "ema", "opt")}
            r.update(compare=cmp, bit_exact=all(c["equal"] for c in cmp.values()),
                     steps_in_checkpoints=[int(A["step"]), int(B["step"])],
                     resumed_from_step=half if r["runs"]["resume"]["resumed_line"] else None)
            del A, B
            # Before any resume: do the two runs already differ at the step-`half` checkpoint? If so, a
            # difference at the end comes from non-deterministic kernels, not from the resume.
            mid = f"{half:07d}.pt"
            a = glob.glob(os.path.join(tmp, "straight", "*", "checkpoints", mid))
            b = glob.glob(os.path.join(tmp, "resumed", "*", "checkpoints", mid))
            if len(a) == 1 and len(b) == 1:
                A = torch.load(a[0], map_location="cpu", weights_only=True)
                B = torch.load(b[0], map_location="cpu", weights_only=True)
                r["before_resume"] = {"step": half, "bit_exact": all(compare(A[p], B[p])["equal"] for p in ("model", "ema", "opt")),
                                      "model": compare(A["model"], B["model"])}
                del A, B
            if r["runs"]["resume"]["resumed_line"] is None:
                r["bit_exact"] = False
                r["error"] = "the second run did not resume (no 'resumed from' line in its log)"
            return r
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_partial(self, key, r):
        self.doc["items"].setdefault(key, {}).update(partial=r)
        self.save()

    def subprocess(self, cmd, cwd):
        """Run cmd in its own process group (torchrun's worker goes too), bounded by the time budget."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
        try:
            out, _ = p.communicate(timeout=max(self.remaining(), 1) + 5)  # the budget alarm comes first
            return p.returncode, out
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise

    def item_attention_backends(self):
        model = self.model()[0]
        res = {"compiled": False, "why_eager": "compiling once per backend would take 1-3 minutes each (5 backends); "
               "inductor calls the same aten SDPA kernel as eager, so the backends' difference shows in the eager step",
               "head_dim": model.config.width // model.config.heads, "backends": {}}
        try:
            for name in runs.ATTENTION_BACKENDS:
                entry = {}
                try:
                    runs.set_attention_backend(name)
                    entry["kernel"] = runs.attention_kernel(model, self.device, self.precision())
                    r = self.time_train(model, ["--no-compile", "--attention-backend", name], self.p["batch"],
                                        self.p["backend_warmup"], self.p["backend_steps"])
                    entry.update({k: v for k, v in r.items() if k not in ("call", "resolutions", "grad_checkpointing")})
                except Exception as e:
                    entry["error"] = error_string(e)
                    self.free()
                res["backends"][name] = entry
                self.save_partial("attention_backends", res)
        finally:
            runs.set_attention_backend("auto")
        res["restored"] = "auto"
        return res

    def item_max_batch(self):
        self.reset_dynamo()  # CUDA-graph pools of reduce-overhead hold memory
        model = self.model()[0]
        start, cap = self.p["batch"], self.p["max_batch_cap"]
        res = {"method": f"eager train_step, batch doubled from {start} until out of memory, the cap {cap} or the "
                         f"time budget; 1 warm-up + 1 timed step each (the compiled step may fit more)",
               "attempts": [], "largest_that_fits": None}
        prior = self.doc["items"].get("train_eager", {})
        if prior.get("status") == "ok":
            res["largest_that_fits"] = start
            res["attempts"].append({"batch": start, "fits": True, "from": "train_eager"})
            b = 2 * start
        else:
            b = start
        last_s = 5.0
        while b <= cap:
            if self.remaining() < 3 * last_s + 10:
                res["stopped"] = f"skipped: time budget (before batch {b})"
                break
            t = time.perf_counter()
            failed = oom = None
            try:
                r = self.time_train(model, ["--no-compile"], b, 1, 1)
                res["attempts"].append({"batch": b, "fits": True, "images_per_s": r["images_per_s"],
                                        "peak_memory_gb": r["peak_memory_gb"], "mfu": r["mfu"]})
                res["largest_that_fits"] = b
            except Exception as e:  # torch.OutOfMemoryError; near the limit also e.g. a cuBLAS allocation failure
                failed, oom = error_string(e, 400), isinstance(e, OOM) or "out of memory" in str(e)
            if failed is not None:  # (the exception and its frames are gone here, so their memory can be freed)
                self.model()[2].zero_grad(set_to_none=True)
                self.free()
                res["attempts"].append({"batch": b, "fits": False, "out_of_memory": oom, "error": failed})
                res["stopped"] = f"{'out of memory' if oom else 'failed'} at batch {b}"
                break
            self.save_partial("max_batch", res)
            last_s = time.perf_counter() - t
            b *= 2
        else:
            res["stopped"] = f"the cap {cap} was reached"
        self.free()
        return res

    # ---------------------------------------------------------------------------------- driver

    def run(self):
        def on_alarm(signum, frame):
            raise OutOfTime()

        def on_term(signum, frame):
            raise Killed()

        old = signal.signal(signal.SIGALRM, on_alarm), signal.signal(signal.SIGTERM, on_term)
        try:
            return self._run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old[0])
            signal.signal(signal.SIGTERM, old[1])

    def _run(self):
        selected = [k.strip() for k in self.opts.items.split(",") if k.strip()] if self.opts.items else [k for k, *_ in ITEMS]
        unknown = set(selected) - {k for k, *_ in ITEMS}
        if unknown:
            raise SystemExit(f"error: unknown item(s) {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(k for k, *_ in ITEMS)}")
        for key, number, title, need in ITEMS:
            self.doc["items"][key] = {"item": number, "title": title, "status": "pending", "command": self.command,
                                      "machine": self.short_machine}
            if key not in selected:
                self.doc["items"][key].update(status="skipped", skipped="skipped: not selected (--items)")
        self.save()
        stop = None
        for key, number, title, need in ITEMS:
            if key not in selected:
                continue
            rec = self.doc["items"][key]
            need = need if self.cuda else 1
            later, reserve = RESERVE_FOR_LAST.get(key, (None, 0))
            reserve = reserve if self.cuda and later in selected else 0
            if stop is not None or self.remaining() < need + reserve:
                rec.update(status="skipped", skipped=stop or f"skipped: time budget ({self.remaining():.0f} s left, "
                           f"the item needs about {need} s" + (f" and leaves {reserve} s to {later}" if reserve else "") + ")")
                self.save()
                continue
            print(f"[gpu_check {self.elapsed():6.1f}s] {key} ...", flush=True)
            t = time.time()
            signal.setitimer(signal.ITIMER_REAL, max(self.remaining() - reserve, 0.01))
            try:
                result = getattr(self, f"item_{key}")()
                signal.setitimer(signal.ITIMER_REAL, 0)
                if isinstance(result, dict) and "skipped" in result and len(result) == 1:
                    rec.update(status="skipped", skipped=result["skipped"])
                else:
                    rec.update(status="ok", result=result)
            except OutOfTime:
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec.update(status="skipped", skipped=f"skipped: time budget (interrupted after {time.time() - t:.0f} s"
                           + (f", leaving {reserve} s to {later})" if reserve else ")"))
                if reserve and self.remaining() > 1:  # only this item's share ran out: go on to the last one
                    with contextlib.suppress(Exception):
                        self.reset_dynamo()
                else:
                    stop = f"skipped: time budget (the {self.p['budget_s']:g} s budget ran out during {key})"
            except (Killed, KeyboardInterrupt) as e:
                signal.setitimer(signal.ITIMER_REAL, 0)
                how = "SIGTERM" if isinstance(e, Killed) else "SIGINT"
                self.doc["terminated"] = True
                stop = f"skipped: the run was terminated ({how}) during {key}"
                rec.update(status="skipped", skipped=f"skipped: terminated ({how}) while running")
            except Exception as e:
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec.update(status="error", error=error_string(e), traceback=traceback_tail(e))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec["seconds"] = round(time.time() - t, 2)
                if rec.get("status") == "ok":
                    rec.pop("partial", None)
                with contextlib.suppress(Exception):
                    if self.cuda:
                        torch.cuda.set_sync_debug_mode(0)
                    runs.set_attention_backend("auto")
                    if self._model is not None:
                        self._model[0].grad_checkpointing = False
                    self.free()
                self.save()
            status = rec["status"]
            summary = rec.get("error") or rec.get("skipped") or ""
            print(f"[gpu_check {self.elapsed():6.1f}s] {key}: {status} {summary[:200]}", flush=True)
        self.doc["complete"] = stop is None  # every selected item was attempted
        self.save()
        print(f"gpu_check: {sum(r['status'] == 'ok' for r in self.doc['items'].values())}/{len(ITEMS)} items ok "
              f"in {self.elapsed():.1f} s; JSON: {self.out}", flush=True)
        print(self.out, flush=True)
        return stop


def compare(a, b, key=""):
    """Bit-exact comparison of nested checkpoint parts: {equal, tensors, differing, max_abs_diff, first_diff}."""
    res = {"equal": True, "tensors": 0, "differing": 0, "max_abs_diff": 0.0, "first_diff": None}

    def walk(x, y, k):
        if isinstance(x, torch.Tensor):
            res["tensors"] += 1
            same = isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
            if not same:
                res["equal"], res["differing"] = False, res["differing"] + 1
                res["first_diff"] = res["first_diff"] or k
                if isinstance(y, torch.Tensor) and x.shape == y.shape:
                    d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
                    res["max_abs_diff"] = max(res["max_abs_diff"], d)
        elif isinstance(x, dict):
            if not isinstance(y, dict) or x.keys() != y.keys():
                res["equal"], res["first_diff"] = False, res["first_diff"] or f"{k} (keys)"
                return
            for kk in x:
                walk(x[kk], y[kk], f"{k}.{kk}")
        elif isinstance(x, (list, tuple)):
            if not isinstance(y, (list, tuple)) or len(x) != len(y):
                res["equal"], res["first_diff"] = False, res["first_diff"] or f"{k} (length)"
                return
            for i, (xx, yy) in enumerate(zip(x, y)):
                walk(xx, yy, f"{k}[{i}]")
        elif x != y:
            res["equal"], res["first_diff"] = False, res["first_diff"] or k

    walk(a, b, key)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees a GPU")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu/<device>-<YYYYMMDD-HHMM>.json)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget of the whole run (CUDA 450, CPU 240)")
    p.add_argument("--peak-tflops", type=float, default=H100_PEAK / 1e12,
                   help="MFU denominator: bf16 dense peak of the GPU (H100/H200 SXM: 989)")
    p.add_argument("--items", default=None, help="comma-separated subset: " + ",".join(k for k, *_ in ITEMS))
    opts = p.parse_args(argv)
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    check = Check(opts)
    stop = None
    try:
        stop = check.run()
    except (OutOfTime, Killed, KeyboardInterrupt) as e:  # between items: the JSON of the last item is already written
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop = check.doc["interrupted"] = type(e).__name__
        check.doc["terminated"] = not isinstance(e, OutOfTime)
        check.save()
        print(check.out, flush=True)
    rc = 143 if check.doc.get("terminated") else 0  # errors and budget skips are results, not failures
    if stop is not None:  # an item was cut off mid-way (e.g. inside a compilation): everything is written;
        sys.stdout.flush()  # do not wait for half-finished compile workers or CUDA teardown
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
