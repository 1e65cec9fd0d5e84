"""
Theorem 3 (App. G.2) and Fig. 2: wall-clock of multi-stage against single-stage sampling, and sampling
time against output resolution.

    python theory/inference_time.py                                   # CPU: tiny DiT, 8..64 px, batch 1
    python theory/inference_time.py --device cuda --model XL --image-size 256 --resolutions 32,64,128,256 \
        --steps-per-stage 25 --batch-size 16 --scaling-patch-size 4 --json

The DiT has random weights: time does not depend on them. Both samplers are cdc.sample with the Euler
solver; single-stage is the same DiT on a one-stage CDCConfig at the top resolution, run (i) with the
same steps as one stage (equal steps per stage) and (ii) with K times as many (equal total NFE). Beside
the measured speed-ups: the analytic FLOP ratio (DiT.flops_per_sample, attention's n^2 terms included)
and Theorem 3's cost model (cost per evaluation proportional to d_k, no quadratic term).
Then the multi-stage sampler is timed at the output sizes --sizes (K stages ending at each size) and
log time is fitted against log pixel count: exponent 1 is "linear in image size" (Fig. 2).
Benchmarks: warm-up calls, then the median of --repeats timed rounds, the samplers of a table interleaved\nwithin each round so that drifting machine load hits them alike. Never a timed test.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from theory import common  # noqa: E402
from theory.common import cdc  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(fns: dict, device="cpu", warmup: int = 1, repeats: int = 3) -> dict:
    """Wall-clock seconds of each fn() in `fns` (name -> callable): `warmup` untimed calls each, then
    `repeats` rounds that time every fn once, interleaved, so a change of machine load during the run
    hits all of them alike. Returns name -> {median, min, max, repeats}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": repeats} for k, v in times.items()}


def make_model(name: str, resolutions, patch_size=None, device="cpu"):
    overrides = dict(in_channels=3, num_classes=0, resolutions=tuple(resolutions))
    if patch_size:
        overrides["patch_size"] = patch_size
    return cdc.create_model(name, **overrides).to(device).eval()


def sampler(model, config, batch: int, steps, device, seed: int = 0):
    """A closure running cdc.sample once (Euler, unconditional) for `batch` images."""
    field = cdc.guided_field(model, None)
    return lambda: cdc.sample(field, config, batch, channels=3, steps=steps, solver="euler",
                              generator=torch.Generator().manual_seed(seed), device=device)


def fit_exponent(pixels, times) -> float:
    """Least-squares slope of log time against log pixel count."""
    return float(np.polyfit(np.log(np.asarray(pixels, float)), np.log(np.asarray(times, float)), 1)[0])


def speedups(model_name="tiny", resolutions=(8, 16, 32, 64), steps=4, batch=1, device="cpu", patch_size=None,
             warmup=1, repeats=3, seed=0) -> dict:
    """Part 1: multi-stage vs single-stage at the top resolution, same DiT, measured and analytic."""
    config = cdc.CDCConfig(resolutions=resolutions)
    K, R = config.K, config.resolutions[-1]
    model = make_model(model_name, config.resolutions, patch_size, device)
    single = cdc.CDCConfig(resolutions=(R,))
    t = benchmark({"multi": sampler(model, config, batch, steps, device, seed),
                   "single_equal_steps": sampler(model, single, batch, steps, device, seed),
                   "single_equal_nfe": sampler(model, single, batch, K * steps, device, seed)}, device, warmup, repeats)
    t_multi, t_eq_steps, t_eq_nfe = t["multi"], t["single_equal_steps"], t["single_equal_nfe"]
    F = [model.flops_per_sample(r) for r in config.resolutions]
    d = [3 * r * r for r in config.resolutions]
    return {
        "model": model_name, "patch_size": model.config.patch_size, "resolutions": list(config.resolutions),
        "steps_per_stage": steps, "batch_size": batch, "device": str(device),
        "time_multi": t_multi["median"], "time_single_equal_steps": t_eq_steps["median"],
        "time_single_equal_nfe": t_eq_nfe["median"], "timings": {"multi": t_multi, "single_equal_steps": t_eq_steps,
                                                                  "single_equal_nfe": t_eq_nfe},
        "speedup_equal_steps": t_eq_steps["median"] / t_multi["median"],
        "speedup_equal_nfe": t_eq_nfe["median"] / t_multi["median"],
        "flops_per_stage": F,
        "analytic_speedup_equal_steps": F[-1] / sum(F), "analytic_speedup_equal_nfe": K * F[-1] / sum(F),
        "linear_model_speedup_equal_steps": d[-1] / sum(d), "linear_model_speedup_equal_nfe": K * d[-1] / sum(d),
    }


def scaling(model_name="tiny", sizes=(64, 128, 256, 512), stages=4, steps=1, batch=1, device="cpu",
            patch_size=8, warmup=1, repeats=3, seed=0) -> dict:
    """Part 2 (Fig. 2): multi-stage sampling time against output size, K stages ending at each size."""
    fns, rows = {}, []
    for R in sizes:
        res = tuple(R >> (stages - 1 - s) for s in range(stages))
        model = make_model(model_name, res, patch_size, device)
        fns[R] = sampler(model, cdc.CDCConfig(resolutions=res), batch, steps, device, seed)
        rows.append({"size": R, "resolutions": list(res), "pixels": R * R, "tokens_top": (R // model.config.patch_size) ** 2,
                     "flops": steps * sum(model.flops_per_sample(r) for r in res)})
    t = benchmark(fns, device, warmup, repeats)
    for row in rows:
        tr = t[row["size"]]
        row.update(time=tr["median"], time_min=tr["min"], time_max=tr["max"])
    px = [r["pixels"] for r in rows]
    return {"model": model_name, "patch_size": patch_size, "stages": stages, "steps_per_stage": steps,
            "batch_size": batch, "rows": rows,
            "exponent": fit_exponent(px, [r["time"] for r in rows]) if len(rows) > 1 else float("nan"),
            "exponent_min": fit_exponent(px, [r["time_min"] for r in rows]) if len(rows) > 1 else float("nan"),
            "exponent_flops": fit_exponent(px, [r["flops"] for r in rows]) if len(rows) > 1 else float("nan")}


def render(r: dict) -> str:
    s = r["speedup"]
    out = [f"DiT-{s['model']} (patch {s['patch_size']}, random weights) on {s['device']}, batch {s['batch_size']}, "
           f"Euler, resolutions {tuple(s['resolutions'])}, {s['steps_per_stage']} steps per stage; "
           f"median of {s['timings']['multi']['repeats']} after warm-up.", ""]
    K = len(s["resolutions"])
    out.append(common.table(
        ["sampler", "NFE", "time (s)", "speed-up of multi-stage", "analytic FLOPs", "Thm 3 cost model (d_k)"],
        [["multi-stage", K * s["steps_per_stage"], s["time_multi"], 1.0, 1.0, 1.0],
         ["single stage, equal steps", s["steps_per_stage"], s["time_single_equal_steps"], s["speedup_equal_steps"],
          s["analytic_speedup_equal_steps"], s["linear_model_speedup_equal_steps"]],
         ["single stage, equal NFE", K * s["steps_per_stage"], s["time_single_equal_nfe"], s["speedup_equal_nfe"],
          s["analytic_speedup_equal_nfe"], s["linear_model_speedup_equal_nfe"]]]))
    c = r["scaling"]
    out += ["", f"Time against output size: {c['stages']} stages ending at each size, DiT-{c['model']} patch "
                f"{c['patch_size']}, {c['steps_per_stage']} steps per stage, batch {c['batch_size']}:", ""]
    out.append(common.table(["size", "resolutions", "pixels", "top-stage tokens", "time (s)", "min", "max", "FLOPs"],
                            [[w["size"], ",".join(map(str, w["resolutions"])), w["pixels"], w["tokens_top"], w["time"],
                              w["time_min"], w["time_max"], float(w["flops"])] for w in c["rows"]]))
    out += ["", f"fitted exponent of time vs pixel count: {common.fmt(c['exponent'])} on medians, "
                f"{common.fmt(c['exponent_min'])} on minima (analytic FLOPs: {common.fmt(c['exponent_flops'])}; "
                f"linear in image size = 1)"]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(cdc.PRESETS))
    p.add_argument("--patch-size", type=int, default=None, help="override the preset's patch size (part 1)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resolutions", type=common.int_list, default=None,
                   help="stage sides ending at --image-size; default: 4 stages, each half the next")
    p.add_argument("--steps-per-stage", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=common.int_list, default=(64, 128, 256, 512), help="output sizes for the scaling fit")
    p.add_argument("--scaling-patch-size", type=int, default=8,
                   help="patch size for the scaling runs (8 keeps 512 px at 4096 tokens on a CPU)")
    p.add_argument("--scaling-steps", type=int, default=1, help="steps per stage for the scaling runs")
    common.add_common_args(p, data=False)
    a = p.parse_args(argv)
    common.apply_threads(a)
    res = a.resolutions or tuple(a.image_size >> (3 - s) for s in range(4))
    if res[-1] != a.image_size:
        p.error(f"--resolutions must end at --image-size {a.image_size}, got {res}")
    torch.manual_seed(a.seed)
    r = {"speedup": speedups(a.model, res, a.steps_per_stage, a.batch_size, a.device, a.patch_size,
                             a.warmup, a.repeats, a.seed),
         "scaling": scaling(a.model, a.sizes, len(res), a.scaling_steps, a.batch_size, a.device,
                            a.scaling_patch_size, a.warmup, a.repeats, a.seed)}
    # flat keys, for machines
    for k in ("speedup_equal_nfe", "analytic_speedup_equal_nfe", "speedup_equal_steps", "analytic_speedup_equal_steps"):
        r[k] = r["speedup"][k]
    r["exponent"] = r["scaling"]["exponent"]
    common.emit(r, a.json, render)
    return r


if __name__ == "__main__":
    main()
