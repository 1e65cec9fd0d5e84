"""
Tables and figures from experiments/results (called by `python experiments/claims.py report`).

Prints markdown tables (mean ± sd over seeds) and writes PNG figures to experiments/figures/. Every figure
names the machine its runs were measured on and the command that made it.
"""

import glob
import json
import math
import os
from collections import defaultdict

import numpy as np

EXP = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(EXP, "results")
FIGURES = os.path.join(EXP, "figures")
CMD = "python experiments/claims.py report"
MACHINE = "2-core CPU, 1 thread, no GPU"
FID_STEPS = 8  # claims.FID_STEPS: the steps per stage of the Inception FID against S_cfg


def load(set_name):
    out = []
    for p in sorted(glob.glob(os.path.join(RESULTS, set_name, "*.json"))):
        with open(p) as f:
            r = json.load(f)
        r["_file"] = os.path.relpath(p, EXP)
        out.append(r)
    return out


def ms(vals):
    vals = np.asarray(vals, dtype=float)
    if len(vals) == 0:
        return float("nan"), float("nan")
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")


def fmt(vals, digits=1):
    m, s = ms(vals)
    if np.isnan(s):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def method(spec):
    res = spec["resolutions"]
    red = "" if spec.get("reduction", "mean") == "mean" else f", {spec['reduction']}"
    return f"K = {len(res)} ({', '.join(str(r) for r in res)}){red}"


def weighted(spec):
    """method() naming the loss weighting of every K > 1 model, 'mean' included (the weighting sets)."""
    return method(spec) + (", mean" if len(spec["resolutions"]) > 1 and spec.get("reduction", "mean") == "mean" else "")


def floor(set_name=None):
    """The floor (held-out real digits) a set is scored against: results/floor.json for claims 1-9,
    results/curves_floor.json for the curves (and lrlong, claim3long), results/<set>/floor.json for the later
    sets (each measured with the classifier that set is scored with)."""
    path = {None: "floor.json", "curves": "curves_floor.json"}.get(set_name, os.path.join(str(set_name), "floor.json"))
    with open(os.path.join(RESULTS, path)) as f:
        return json.load(f)


def verdict(a, b, lower_better=True):
    """'a better', 'b better' or 'inconclusive': a difference counts only when the means differ by more
    than the larger of the two seed spreads (sd)."""
    (ma, sa), (mb, sb) = ms(a), ms(b)
    spread = np.nanmax([sa, sb, 0.0])
    if np.isnan(spread) or abs(ma - mb) <= spread:
        return "inconclusive"
    better_a = ma < mb if lower_better else ma > mb
    return "first better" if better_a else "second better"


def table_lrgrid():
    rows = ["| method | lr | steps | PFLOP | train s | cfd | acc |", "|---|---|---|---|---|---|---|"]
    for r in sorted(load("lrgrid"), key=lambda r: (len(r["spec"]["resolutions"]), r["spec"]["lr"])):
        if r.get("diverged_at_step") is not None:
            rows.append(f"| {method(r['spec'])} | {r['spec']['lr']:g} | diverged at {r['diverged_at_step']} | | | | |")
            continue
        f = r["final"]
        rows.append(f"| {method(r['spec'])} | {r['spec']['lr']:g} | {r['steps']} | {r['pflop']:.4f} | "
                    f"{r['train_seconds']:.0f} | {f['cfd']:.1f} | {f['acc']:.3f} |")
    return "\n".join(rows)


def by_method(runs):
    g = defaultdict(list)
    for r in runs:
        if r.get("diverged_at_step") is None:
            g[method(r["spec"])].append(r)
    return g


def table_claim1():
    g = by_method(load("claim1"))
    rows = ["| method | lr | seeds | eval | PFLOP | steps | train s | cfd | acc |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m, runs in sorted(g.items()):
        n_ev = min(len(r["evals"]) for r in runs)
        for i in range(n_ev):
            ev = [r["evals"][i] for r in runs]
            rows.append(f"| {m} | {runs[0]['spec']['lr']:g} | {len(runs)} ({', '.join(str(r['spec']['seed']) for r in runs)}) "
                        f"| {i + 1}/{n_ev} | {fmt([e['pflop'] for e in ev], 4)} | {fmt([e['step'] for e in ev], 0)} "
                        f"| {fmt([e['train_seconds'] for e in ev], 0)} | {fmt([e['cfd'] for e in ev])} "
                        f"| {fmt([e['acc'] for e in ev], 3)} |")
    return "\n".join(rows), g


def save_figure(fig, plt, name, rect=None, **kw):
    """Lay out, write experiments/figures/<name> and free the figure; returns the path."""
    fig.tight_layout(rect=rect)
    path = os.path.join(FIGURES, name)
    fig.savefig(path, dpi=110, **kw)
    plt.close(fig)
    return path


def bars(ax, x, vals, **kw):
    """Mean ± sd (n - 1; 0 for one value) of each list in vals at x; returns the errorbar container."""
    return ax.errorbar(x, [np.mean(v) for v in vals], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
                       marker="o", capsize=3, **kw)


def fig_claim1(g, plt):
    fl = floor()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, runs in sorted(g.items()):
        n_ev = min(len(r["evals"]) for r in runs)
        x = [np.mean([r["evals"][i]["pflop"] for r in runs]) for i in range(n_ev)]
        for ax, key in zip(axes, ("cfd", "acc")):
            bars(ax, x, [[r["evals"][i][key] for r in runs] for i in range(n_ev)], label=f"{m}, {len(runs)} seeds")
    f32 = [v["cfd"] for v in fl["per_side"]["32"]]
    a32 = [v["acc"] for v in fl["per_side"]["32"]]
    axes[0].axhline(np.mean(f32), color="grey", ls="--", label=f"held-out real digits (n = {fl['n']})")
    axes[1].axhline(np.mean(a32), color="grey", ls="--", label="held-out real digits")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("classifier Fréchet distance (lower is better)")
    axes[1].set_ylabel("conditional accuracy")
    for ax in axes:
        ax.set_xlabel("training compute (PFLOP)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Claim 1: MNIST 32 px, DiT width 192 depth 4 patch 4, batch 32, equal training FLOPs, "
                 "mean ± sd over seeds; EMA, S_cfg 3, Euler 8 steps/stage, 200 samples\n"
                 f"{MACHINE}; {CMD}", fontsize=9)
    return save_figure(fig, plt, "claim1_compute.png")


def sampling_rows(set_name):
    g = defaultdict(list)
    for r in load(set_name):
        s = r["checkpoint_spec"]
        key = (method(s), tuple(sorted((k, v) for k, v in r["sampler"].items() if k != "solver")))
        g[key].append(r)
    return g


def table_claim9():
    g = sampling_rows("claim9")
    rows = ["| method | steps/stage | NFE (with CFG) | seeds | sampling s / 200 images | cfd | acc |",
            "|---|---|---|---|---|---|---|"]
    for (m, kw), runs in sorted(g.items(), key=lambda kv: (kv[0][0], dict(kv[0][1])["steps"])):
        steps = dict(kw)["steps"]
        K = len(runs[0]["checkpoint_spec"]["resolutions"])
        rows.append(f"| {m} | {steps} | {2 * K * steps} | {len(runs)} | {fmt([r['sample_seconds'] for r in runs])} "
                    f"| {fmt([r['final']['cfd'] for r in runs])} | {fmt([r['final']['acc'] for r in runs], 3)} |")
    return "\n".join(rows), g


def fig_claim9(g, plt):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = defaultdict(list)
    for (m, kw), runs in g.items():
        series[m].append((dict(kw)["steps"], runs))
    for m, pts in sorted(series.items()):
        pts.sort()
        t = [np.mean([r["sample_seconds"] for r in runs]) for _, runs in pts]
        for ax, key in zip(axes, ("cfd", "acc")):
            vals = [[r["final"][key] for r in runs] for _, runs in pts]
            bars(ax, t, vals, label=f"{m}, {min(len(r) for _, r in pts)} seed(s)")
            for (steps, _), tt, mm in zip(pts, t, [np.mean(v) for v in vals]):
                ax.annotate(str(steps), (tt, mm), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("classifier Fréchet distance")
    axes[1].set_ylabel("conditional accuracy")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.xaxis.set_major_formatter(plt.ScalarFormatter())
        ax.set_xticks([10, 20, 50, 100, 200])
        ax.set_xlabel("sampling wall time for 200 images, S_cfg = 3 (s)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Claims 1 and 9: quality against sampling time (labels: Euler steps per stage), claim-1 EMA models\n"
                 f"{MACHINE}; {CMD}", fontsize=9)
    return save_figure(fig, plt, "claim9_sampling.png")


def table_claim8():
    g = sampling_rows("claim8")
    fl = floor()
    sides = None
    rows = []
    for (m, kw), runs in sorted(g.items(), key=lambda kv: dict(kv[0][1])["cfg_scale"]):
        sides = [p["side"] for p in runs[0]["per_stage"]]
        cells = []
        for i in range(len(sides)):
            cells.append(f"{fmt([r['per_stage'][i]['cfd'] for r in runs])} / {fmt([r['per_stage'][i]['acc'] for r in runs], 2)}")
        rows.append(f"| {dict(kw)['cfg_scale']:g} | {len(runs)} | " + " | ".join(cells) + " |")
    if not rows:
        return "", g
    head = "| S_cfg | seeds | " + " | ".join(f"{s} px: cfd / acc" for s in sides) + " |"
    sep = "|---|---|" + "---|" * len(sides)
    floor_row = "| real held-out | 3 draws | " + " | ".join(
        f"{fmt([v['cfd'] for v in fl['per_side'][str(s)]])} / {fmt([v['acc'] for v in fl['per_side'][str(s)]], 2)}"
        for s in sides) + " |"
    return "\n".join([head, sep] + rows + [floor_row]), g


def fig_claim8(g, plt):
    fl = floor()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    items = sorted(g.items(), key=lambda kv: dict(kv[0][1])["cfg_scale"])
    if not items:
        return None
    sides = [p["side"] for p in items[0][1][0]["per_stage"]]
    scales = [dict(kw)["cfg_scale"] for (m, kw), _ in items]
    for i, side in enumerate(sides):
        for ax, key in zip(axes, ("cfd", "acc")):
            line = bars(ax, scales, [[r["per_stage"][i][key] for r in runs] for _, runs in items],
                        label=f"stage {i + 1}: {side} px")
            ax.axhline(np.mean([v[key] for v in fl["per_side"][str(side)]]), ls="--", lw=0.8,
                       color=line[0].get_color())
    axes[0].set_yscale("log")
    axes[0].set_ylabel("Fréchet distance to real digits at that resolution")
    axes[1].set_ylabel("conditional accuracy at that resolution")
    for ax in axes:
        ax.set_xlabel("S_cfg (one scale for all stages)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Claim 8: per-stage quality against S_cfg, K = 3 claim-1 models (dashed: held-out real digits)\n"
                 f"{MACHINE}; {CMD}", fontsize=9)
    return save_figure(fig, plt, "claim8_cfg.png")


def table_inception():
    """Standard Inception FID of the claim-1 models (claims.py inception), mean ± sd over seeds."""
    runs = load("inception")
    floor_ = [r for r in runs if "checkpoint_spec" not in r]
    g = by_method([dict(r, spec=r["checkpoint_spec"]) for r in runs if "checkpoint_spec" in r])
    if not g:
        return ""
    n, ref_n = runs[0]["n"], runs[0]["ref_n"]
    rows = [f"| method | seeds | Inception FID (n = {n} vs {ref_n} held-out digits) |", "|---|---|---|"]
    for m, rs in sorted(g.items()):
        rows.append(f"| {m} | {len(rs)} | {fmt([r['fid'] for r in rs])} |")
    for r in floor_:
        rows.append(f"| {r['n']} real training digits (floor) | - | {r['fid']:.1f} |")
    return "\n".join(rows)


ABLATION_SETS = ("claim2", "claim3", "claim4", "claim5", "claim6", "claim7")
VARIANT_KEYS = ("resolutions", "gamma", "sigma", "interpolant", "fusion", "reduction", "stage_sampling",
                "stage_specific")


def baseline_runs():
    """The claim-1 CDC runs (K = 3, paper's defaults): the baseline every ablation changes one thing of."""
    return by_method(load("claim1")).get("K = 3 (8, 16, 32)", [])


def variant(spec, base):
    """What a run changes from the baseline's spec, e.g. 'gamma = 3'."""
    diff = [(k, spec.get(k)) for k in VARIANT_KEYS
            if spec.get(k) != base.get(k) and not (k == "stage_specific" and not spec.get(k))]
    if not diff:
        return "baseline"
    return ", ".join("K stage-specific models" if k == "stage_specific" else
                     f"{k} = {', '.join(map(str, v)) if isinstance(v, list) else f'{v:g}' if isinstance(v, float) else v}"
                     for k, v in diff)


def ablation_groups():
    """{(set, variant): [runs]} for claims 2-7, in file order."""
    base = baseline_runs()
    g = {}
    for s in ABLATION_SETS:
        for r in load(s):
            g.setdefault((s, variant(r["spec"], base[0]["spec"])), []).append(r)
    return g, base


def versus(variant, base, lower_better=True):
    """'better', 'worse' or 'inconclusive' against the baseline (see table_ablations for the rule)."""
    if len(variant) > 1:
        return {"first better": "better", "second better": "worse", "inconclusive": "inconclusive"}[
            verdict(variant, base, lower_better)]
    (mb, sb), v = ms(base), variant[0]
    if abs(v - mb) <= 2 * sb * np.sqrt(1 + 1 / len(base)):
        return "inconclusive"
    return ("better" if (v < mb) == lower_better else "worse") + " (1 seed)"


def table_ablations():
    g, base = ablation_groups()
    if not base or not g:
        return "", g, base
    bc, ba = [r["final"]["cfd"] for r in base], [r["final"]["acc"] for r in base]
    rows = [(f"Baseline: claim 1's K = 3 runs ({len(base)} seeds): cfd {fmt(bc)}, acc {fmt(ba, 3)}. A variant with "
             "several seeds is called better or worse only when its mean differs from the baseline's by more than the "
             "larger seed sd. A one-seed variant has no spread of its own (claim 7's i.i.d. variant had 6x the "
             "baseline's): it is called better or worse (1 seed) only beyond two standard errors of one draw against "
             f"a {len(base)}-seed mean, taking the baseline's sd for both: 2 sd sqrt(1 + 1/{len(base)})."), "",
            "| claim | variant | seeds | steps | train s | cfd | acc | vs baseline (cfd; acc) |",
            "|---|---|---|---|---|---|---|---|"]
    for (s, v), runs in g.items():
        ok = [r for r in runs if r.get("diverged_at_step") is None]
        if not ok:
            rows.append(f"| {s[5:]} | {v} | {len(runs)} | diverged | | | | |")
            continue
        c, a = [r["final"]["cfd"] for r in ok], [r["final"]["acc"] for r in ok]
        rows.append(f"| {s[5:]} | {v} | {len(ok)} ({', '.join(str(r['spec']['seed']) for r in ok)}) "
                    f"| {fmt([r['steps'] for r in ok], 0)} | {fmt([r['train_seconds'] for r in ok], 0)} | {fmt(c)} "
                    f"| {fmt(a, 3)} | {versus(c, bc)}; {versus(a, ba, lower_better=False)} |")
    return "\n".join(rows), g, base


def fig_claim3(g, base, plt):
    """Claim 3's cross through (gamma 2, sigma 1): cfd and acc against gamma at sigma 1 and sigma at gamma 2."""
    runs3 = [r for (s, _), rs in g.items() if s == "claim3" for r in rs if r.get("diverged_at_step") is None]
    if not runs3 or not base:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharey="row")
    for col, (key, fixed, fixed_val) in enumerate((("gamma", "sigma", 1.0), ("sigma", "gamma", 2.0))):
        pts = [(r["spec"][key], [r]) for r in runs3 if r["spec"][fixed] == fixed_val and r["spec"][key] != base[0]["spec"][key]]
        pts.append((base[0]["spec"][key], base))
        pts.sort(key=lambda p: p[0])
        for row, (m, label) in enumerate((("cfd", "classifier Fréchet distance"), ("acc", "conditional accuracy"))):
            ax = axes[row, col]
            xs = [p[0] for p in pts]
            vals = [[r["final"][m] for r in rs] for _, rs in pts]
            bars(ax, xs, vals)
            for x, v in zip(xs, vals):
                ax.annotate(f"{len(v)} seed{'s' * (len(v) > 1)}", (x, np.mean(v)), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel(f"{'γ' if key == 'gamma' else 'σ'} ({fixed} = {fixed_val:g})")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    fig.suptitle("Claim 3: diminish factor γ and coupling noise σ (K = 3, 8/16/32 px, 0.008 PFLOP each; "
                 "the point with 3 seeds is claim 1's baseline)\n"
                 f"{MACHINE}; {CMD}", fontsize=9)
    return save_figure(fig, plt, "claim3_gamma_sigma.png")


# ------------------------------------------------------------------------------------------------
#                         Curves: quality against compute, compute ratios
# ------------------------------------------------------------------------------------------------

K1_NAME, K3_NAME = "K = 1 (32)", "K = 3 (8, 16, 32)"


def curve_runs(set_name="curves"):
    """{method: [runs]} of experiments/results/<set_name> (partial runs included), seeds in order."""
    g = defaultdict(list)
    for r in load(set_name):
        if r.get("kind") == "train":
            g[method(r["spec"])].append(r)
    for runs in g.values():
        runs.sort(key=lambda r: r["spec"]["seed"])
    return g


def floor32(set_name="curves"):
    """(cfd, acc, n) of n held-out real digits at 32 px (mean of 3 draws) under the classifier a curve set is
    scored with: results/curves_floor.json for the curves (results/floor.json belongs to the classifier of
    claims 1-9), results/<set>/floor.json for the later sets (curves_rerun, curveslr)."""
    fl = floor(set_name)
    return (float(np.mean([v["cfd"] for v in fl["per_side"]["32"]])),
            float(np.mean([v["acc"] for v in fl["per_side"]["32"]])), fl["n"])


def curve_series(runs, key):
    """Per mark index: (mean PFLOP, mean, sd or nan, n seeds), over the runs that reached that mark."""
    out = []
    for i in range(max((len(r["evals"]) for r in runs), default=0)):
        ev = [r["evals"][i] for r in runs if len(r["evals"]) > i]
        v = [e[key] for e in ev]
        out.append((float(np.mean([e["pflop"] for e in ev])), float(np.mean(v)),
                    float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), len(v)))
    return out


def compute_to_reach(evals, key, level, lower_better):
    """PFLOP at which the metric first reaches `level`: ('at', p) interpolated between the two measured
    points around the first crossing (log PFLOP against acc, log PFLOP against log cfd); ('le', p) when the
    first point already reaches it (no extrapolation below it); ('nr', p_max) when no measured point does."""
    pts = [(e["pflop"], e[key]) for e in evals]
    if not pts:
        return ("nr", 0.0)
    f = (lambda v: math.log(v)) if key == "cfd" else (lambda v: v)
    hit = (lambda v: v <= level) if lower_better else (lambda v: v >= level)
    for i, (p, v) in enumerate(pts):
        if hit(v):
            if i == 0:
                return ("le", p)
            (p0, v0) = pts[i - 1]
            t = (f(level) - f(v0)) / (f(v) - f(v0))
            return ("at", math.exp(math.log(p0) + t * (math.log(p) - math.log(p0))))
    return ("nr", pts[-1][0])


def cell(c):
    kind, p = c
    return {"at": f"{p:.4f}", "le": f"≤ {p:.4f}", "nr": f"not reached by {p:.4f}"}[kind]


def ratio_cell(a, b):
    """K = 1 / K = 3 from two compute_to_reach results: a number, a bound, or '-' (with the reason)."""
    (ka, pa), (kb, pb) = a, b
    if ka == "nr" and kb == "nr":
        return "neither reached", None
    if ka == "nr":  # K = 1 needs more than it was run for
        lo = pa / pb
        return (f"> {lo:.2f}" if kb == "at" else f"> {lo:.2f} (K = 3 at first point)"), None
    if kb == "nr":
        return f"< {pa / pb:.2f}", None
    if kb == "le" and ka == "at":
        return f"≥ {pa / pb:.2f}", None
    if kb == "le" or ka == "le":
        return "- (both at or below the first point)", None
    return f"{pa / pb:.2f}", pa / pb


def curve_levels(set_name="curves"):
    f, _, n = floor32(set_name)
    return [("acc", 0.9, False, "acc ≥ 0.9"), ("acc", 0.95, False, "acc ≥ 0.95"),
            ("cfd", 8 * f, True, f"cfd ≤ 8 × floor ({8 * f:.1f})"),
            ("cfd", 4 * f, True, f"cfd ≤ 4 × floor ({4 * f:.1f})"), ("cfd", 2 * f, True, f"cfd ≤ 2 × floor ({2 * f:.1f})")]


def table_curves(g, set_name="curves", names=(K1_NAME, K3_NAME)):
    """Compute each method needs to reach fixed quality levels, per seed, and the ratio of the first method's
    (single-stage, K = 1) to the second's (CDC)."""
    if not g:
        return ""
    lines = []
    fcfd, facc, n = floor32(set_name)
    levels = curve_levels(set_name)
    a, b = g.get(names[0], []), g.get(names[1], [])
    for m, runs in zip(names, (a, b)):
        if runs:
            lines.append(f"- {m}: {len(runs)} seed{'s' * (len(runs) > 1)} "
                         f"({', '.join(str(r['spec']['seed']) for r in runs)}), measured to "
                         + ", ".join(f"{r['evals'][-1]['pflop']:.4f}" if r["evals"] else "0" for r in runs)
                         + f" PFLOP (of {runs[0]['spec']['budget_pflop']:g})")
    lines += ["", "PFLOP needed to reach each level (per run):", ""]
    lines.append("| method | seed | evals | PFLOP reached | lowest cfd (at PFLOP) | "
                 + " | ".join(l[3] for l in levels) + " |")
    lines.append("|---|---|---|---|---|" + "---|" * len(levels))
    for m, runs in zip(names, (a, b)):
        for r in runs:
            cells = [cell(compute_to_reach(r["evals"], k, lv, lb)) for k, lv, lb, _ in levels]
            last = r["evals"][-1]["pflop"] if r["evals"] else 0.0
            best = min(r["evals"], key=lambda e: e["cfd"])
            lines.append(f"| {m} | {r['spec']['seed']} | {len(r['evals'])}/{r['n_marks']}"
                         f"{' (complete)' if r.get('complete') else ''} | {last:.4f} | {best['cfd']:.1f} "
                         f"({best['pflop']:.4f}) | " + " | ".join(cells) + " |")
    seeds = sorted(set(r["spec"]["seed"] for r in a) & set(r["spec"]["seed"] for r in b))
    if seeds:
        lines += ["", f"Compute ratio {names[0]} / {names[1]} (how many times the training FLOPs single-stage flow "
                  "matching needs to reach the level CDC reaches), per seed; mean ± sd over the seeds where both reached it:",
                  "", "| level | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        by_seed = {(i, r["spec"]["seed"]): r for i, runs in enumerate((a, b)) for r in runs}
        for k, lv, lb, label in levels:
            cells, vals = [], []
            for s in seeds:
                c, v = ratio_cell(compute_to_reach(by_seed[(0, s)]["evals"], k, lv, lb),
                                  compute_to_reach(by_seed[(1, s)]["evals"], k, lv, lb))
                cells.append(c)
                if v is not None:
                    vals.append(v)
            summary = (f"{fmt(vals, 2)} ({len(vals)} seed{'s' * (len(vals) != 1)})" if vals else "-")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary} |")
    lines += ["", f"Floor: {n} held-out real digits, cfd {fcfd:.1f}, acc {facc:.3f} (mean of 3 draws). PFLOP at a "
              "level: first crossing, interpolated between the two measured points around it (log PFLOP "
              "against acc; log PFLOP against log cfd); '≤' when the first point (0.001 PFLOP) already reaches "
              "it; 'not reached' when no measured point does (never extrapolated)."]
    return "\n".join(lines)


def fig_curves(g, plt, set_name="curves", name="curves_compute.png", title=None, cmd=f"{CMD} curves"):
    if not g:
        return None
    fcfd, facc, n = floor32(set_name)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for m in ([K1_NAME, K3_NAME] if set(g) <= {K1_NAME, K3_NAME} else list(g)):
        runs = g.get(m, [])
        if not runs:
            continue
        seeds = ", ".join(str(r["spec"]["seed"]) for r in runs)
        common = min(len(r["evals"]) for r in runs)  # marks every seed has reached: mean (± sd band)
        for ax, key in zip(axes, ("cfd", "acc")):
            s = curve_series(runs, key)[:common]
            x, mean, sd = (np.array([p[i] for p in s]) for i in range(3))
            line, = ax.plot(x, mean, marker="o", ms=3,
                            label=(m if ", lr " in m else f"{m}, lr {runs[0]['spec']['lr']:g}") + ", "
                                  + (f"mean of seeds {seeds}" if len(runs) > 1 else f"seed {seeds}"))
            if len(runs) > 1:
                ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
            for r in runs:  # seeds that ran further than the others: their own points, thin
                if len(r["evals"]) > common:
                    tail = r["evals"][max(common - 1, 0):]
                    ax.plot([e["pflop"] for e in tail], [e[key] for e in tail], ls="--", lw=0.8, marker=".",
                            color=line.get_color(), label=f"{m}, seed {r['spec']['seed']} alone")
    axes[0].axhline(fcfd, color="grey", ls="--", label=f"held-out real digits (n = {n}): {fcfd:.1f}")
    for k, style in ((2, ":"), (4, "-.")):
        axes[0].axhline(k * fcfd, color="grey", ls=style, lw=0.8, label=f"{k} × floor")
    axes[1].axhline(facc, color="grey", ls="--")
    for lv in (0.9, 0.95):
        axes[1].axhline(lv, color="grey", ls=":", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("classifier Fréchet distance (lower is better)")
    axes[1].set_ylabel("conditional accuracy")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training compute (PFLOP)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    h1, l1 = axes[1].get_legend_handles_labels()
    extra = [(h, l) for h, l in zip(h1, l1) if l not in labels]
    fig.legend(handles + [h for h, _ in extra], labels + [l for _, l in extra], loc="lower center", ncol=3,
               fontsize=7, frameon=False)
    nseeds = "; ".join(f"{m}: {len(r)}" for m, r in sorted(g.items()))
    fig.suptitle((title or "Curves") + ": MNIST 32 px, DiT width 192, depth 4, patch 4, batch 32, equal training "
                 "FLOPs; EMA, S_cfg 3, Euler 8 steps/stage, 200 samples per point\n"
                 f"lines: mean over seeds ({nseeds}), bands ± sd where every seed has the point\n"
                 f"{MACHINE}; {cmd}", fontsize=8)
    return save_figure(fig, plt, name, rect=(0, 0.17, 1, 0.97))


def report_curves(plt):
    g = curve_runs()
    if not g:
        print("\n## curves\n\n(no results yet)")
        return
    print("\n## curves: quality against training compute, and the compute to reach fixed quality\n")
    print(table_curves(g))
    print("\nfigure:", fig_curves(g, plt))
    print("grids:", fig_grids(plt))


# ------------------------------------------------------------------------------------------------
#               Re-checks on learned models: lr at 0.032 PFLOP, gamma, score lr, final models
# ------------------------------------------------------------------------------------------------


def at_mark(r, mark):
    """The evaluation of run r at compute mark `mark` (PFLOP), or None."""
    return next((e for e in r["evals"] if abs(e.get("mark_pflop", e["pflop"]) - mark) < 1e-9 * max(mark, 1)), None)


def table_ladder(set_name):
    """An lr ladder at the long budget (lrlong; lrweight and lrsum, the paper's loss weightings): every lr's
    cfd / acc at each mark, and each method's lowest cfd at the last."""
    runs = [r for r in load(set_name) if r.get("complete")]
    if not runs:
        return ""
    marks = runs[0]["spec"]["eval_pflop"]
    rows = ["| method | lr | " + " | ".join(f"cfd / acc at {m:g}" for m in marks) + " |",
            "|---|---|" + "---|" * len(marks)]
    for r in sorted(runs, key=lambda r: (len(r["spec"]["resolutions"]), r["spec"]["lr"])):
        if r.get("diverged_at_step") is not None:
            rows.append(f"| {method(r['spec'])} | {r['spec']['lr']:g} | diverged at step {r['diverged_at_step']} |")
            continue
        cells = [(lambda e: f"{e['cfd']:.1f} / {e['acc']:.3f}" if e else "-")(at_mark(r, m)) for m in marks]
        rows.append(f"| {method(r['spec'])} | {r['spec']['lr']:g} | " + " | ".join(cells) + " |")
    best = {}
    for r in runs:
        if r.get("diverged_at_step") is None:
            m = method(r["spec"])
            if m not in best or r["final"]["cfd"] < best[m][0]:
                best[m] = (r["final"]["cfd"], r["spec"]["lr"])
    return "\n".join(rows) + "\n\nLowest cfd at the last mark: " + "; ".join(
        f"{m}: lr {lr:g} ({c:.1f})" for m, (c, lr) in sorted(best.items()))


def table_claim3long():
    runs = [r for r in load("claim3long") if r.get("complete")]
    if not runs:
        return ""
    marks = runs[0]["spec"]["eval_pflop"]
    seeds = sorted({r["spec"]["seed"] for r in runs})
    by_gamma = defaultdict(list)
    for r in runs:
        by_gamma[r["spec"]["gamma"]].append(r)
    base = [r for r in curve_runs().get(K3_NAME, []) if r["spec"]["seed"] in seeds]
    by_gamma[base[0]["spec"]["gamma"] if base else 2.0] += base
    rows = ["| γ | seeds | " + " | ".join(f"cfd / acc at {m:g} PFLOP" for m in marks) + " |", "|---|---|" + "---|" * len(marks)]
    for g in sorted(by_gamma):
        cells = []
        for m in marks:
            ev = [e for e in (at_mark(r, m) for r in by_gamma[g]) if e]
            cells.append(f"{fmt([e['cfd'] for e in ev])} / {fmt([e['acc'] for e in ev], 3)}")
        rows.append(f"| {g:g} | {len(by_gamma[g])} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + (f"\n\nγ = 2: the curves' K = 3 runs (seeds {', '.join(map(str, seeds))}) at the same marks; "
                              "mean ± sd over seeds.")


def table_claim4lr():
    runs = load("claim4lr")
    if not runs:
        return ""
    rows = ["| interpolant | lr | seed | cfd | acc |", "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r["spec"]["lr"]):
        f = r["final"]
        rows.append(f"| {r['spec']['interpolant']} | {r['spec']['lr']:g} | {r['spec']['seed']} | "
                    + ("diverged |  |" if r.get("diverged_at_step") is not None else f"{f['cfd']:.1f} | {f['acc']:.3f} |"))
    mark = runs[0]["spec"]["budget_pflop"]
    base = [at_mark(r, mark) for r in curve_runs().get(K3_NAME, [])]
    base = [e for e in base if e]
    if base:
        rows.append(f"| linear (the curves' K = 3 at {mark:g}) | {curve_runs()[K3_NAME][0]['spec']['lr']:g} | "
                    f"{len(base)} seeds | {fmt([e['cfd'] for e in base])} | {fmt([e['acc'] for e in base], 3)} |")
    return "\n".join(rows)


def table_final():
    """The final models, one row each: the curves' own runs, their re-runs (curves_rerun) and curveslr. The
    Inception FID needs no classifier and pools over machines; cfd and acc are on the scale of the classifier
    named in the row."""
    name = lambda r: f"{method(r['spec'])}, lr {r['spec']['lr']:g}"  # noqa: E731
    runs = sorted((r for r in load("curves_final") if r.get("kind") == "final" and "guidance_grid" not in r),
                  key=lambda r: (name(r), r["spec"]["seed"]))
    if not runs:
        return ""
    floors = []
    for p in sorted(glob.glob(os.path.join(RESULTS, "curves_final", "*floor.json"))):
        with open(p) as f:
            fl = json.load(f)
        if fl["classifier_sha1"] not in [x["classifier_sha1"] for x in floors]:
            floors.append(fl)
    n, ref_n = runs[0]["n"], runs[0]["inception_ref_n"]
    model = lambda r: {"curves_rerun": "re-run", "curveslr": "curveslr run", "weighting": "weighting run"}.get(  # noqa: E731
        r.get("set"), "recorded run")
    rows = [f"| method | seed | EMA of | classifier | cfd (n = {n}) | acc | Inception FID (n = {n} vs {ref_n} "
            "held-out) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {name(r)} | {r['spec']['seed']} | {model(r)} | {r['classifier_sha1'][:7]} | "
                    f"{r['cfd']:.1f} | {r['acc']:.3f} | {r['inception_fid']:.1f} |")
    for fl in floors:
        rows.append(f"| real digits (floor) | - | - | {fl['classifier_sha1'][:7]} | {fl['classifier']['cfd']:.1f} | "
                    f"{fl['classifier']['acc']:.3f} | {fl['inception_fid']:.1f} |")
    g = defaultdict(list)
    for r in runs:
        g[name(r)].append(r)
    rows += ["", "Inception FID by method (mean ± sd over seeds): " + "; ".join(
        f"{m}: {fmt([r['inception_fid'] for r in rs])} ({len(rs)} seed{'s' * (len(rs) > 1)})" for m, rs in sorted(g.items()))]
    steps = [v["steps_per_stage"] for v in runs[0]["steps_sweep"]]
    rows += ["", "Steps per stage (claim 9 on the final models; 200 samples, the curves' noise; cfd / acc, each "
             "on its model's classifier):", "",
             "| method | seed | EMA of | " + " | ".join(f"{k} steps" for k in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    for r in runs:
        cells = [f"{v['cfd']:.1f} / {v['acc']:.3f}" for v in r["steps_sweep"]]
        rows.append(f"| {name(r)} | {r['spec']['seed']} | {model(r)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def best_runs():
    """The final models measured at their best guidance (sets weighting and atbest; a JSON with 'how' was
    evaluated over several processes), grouped by method and lr, seeds in order."""
    g = defaultdict(list)
    for r in sorted((r for r in load("curves_final") if "guidance_grid" in r), key=lambda r: r["spec"]["seed"]):
        g[f"{weighted(r['spec'])}, lr {r['spec']['lr']:g}"].append(r)
    return dict(sorted(g.items()))


def table_atbest():
    """Each final model at S_cfg 3 / 8 steps (the curves' protocol), at its lowest-cfd guidance point and at
    S_cfg 1: cfd (classifier) and the Inception FID, n = 1,000 against the 2,000 held-out digits; each stage's
    share of the gradient; mean ± sd over seeds per method; the teacher-forced diagnosis at the best point."""
    g = best_runs()
    if not g:
        return ""
    pt = lambda p: f"S {p['cfg']:g}, {p['steps_per_stage']} steps: {p['cfd']:.1f} / {p['inception_fid']:.1f}"  # noqa: E731
    rows = ["| method | seed | S 3, 8 steps: cfd / FID | best point: cfd / FID | S 1: cfd / FID | "
            "gradient share 8 / 16 / 32 px (its weighting) |", "|---|---|---|---|---|---|"]
    for m, runs in g.items():
        for r in runs:
            share = r["gradient"]["share"][r["spec"].get("reduction", "mean")]
            rows.append(f"| {m} | {r['spec']['seed']} | {r['cfd']:.1f} / {r['inception_fid']:.1f} | {pt(r['at_best'])} | "
                        f"{pt(r['at_cfg1'])} | {' / '.join(f'{100 * v:.0f} %' for v in share)} |")
    lowest = lambda r: min(r["fid_grid"], key=lambda c: c["inception_fid"])  # noqa: E731
    rows += ["", "Inception FID (n = 1,000), mean ± sd over seeds; 'lowest over S_cfg' is each model's lowest Inception "
             f"FID over S_cfg at {FID_STEPS} steps (its S_cfg), picked on the noise that measures it (biased low); the "
             "last column draws each model again with other noise at its method's S_cfg (the lowest seed mean):", "",
             "| method | seeds | S 3, 8 steps | its lowest-cfd point | S 1 | lowest over S_cfg | at the method's best "
             "S_cfg, other noise |", "|---|---|---|---|---|---|---|"]
    for m, runs in g.items():
        fg = [r for r in runs if "fid_grid" in r]
        at = ", ".join(f"{lowest(r)['cfg']:g}" for r in fg)
        low = f"{fmt([lowest(r)['inception_fid'] for r in fg])} (S {at}; {len(fg)} seed{'s' * (len(fg) > 1)})" if fg else "-"
        fc = [r["fid_check"] for r in runs if "fid_check" in r]
        S = ", ".join(sorted({format(c["cfg"], "g") for c in fc}))
        check = f"{fmt([c['inception_fid'] for c in fc])} (S {S}; {len(fc)} seed{'s' * (len(fc) > 1)})" if fc else "-"
        rows.append(f"| {m} | {len(runs)} | {fmt([r['inception_fid'] for r in runs])} | "
                    f"{fmt([r['at_best']['inception_fid'] for r in runs])} | {fmt([r['at_cfg1']['inception_fid'] for r in runs])} | "
                    f"{low} | {check} |")
    rows += ["", "Teacher-forced at the best point (200 held-out digits, cfd per stage side): the chained sampler, "
             "each stage started from the real coarser image ('alone'), that start run on to 32 px ('to end'), "
             "real digits ('floor'):", "", "| method | seed | stage | chained | alone | to end | floor |",
             "|---|---|---|---|---|---|---|"]
    for m, runs in g.items():
        for r in runs:
            tf = r["at_best"]["teacher_forced"]
            for k, c in enumerate(tf["chained"]):
                f = lambda e: f"{e['cfd']:.1f}" if e else "-"  # noqa: E731
                rows.append(f"| {m} | {r['spec']['seed']} | {c['side']} px | {c['cfd']:.1f} | {f(tf['alone'][k])} | "
                            f"{f(tf['to_end'][k])} | {tf['floor'][k]['cfd']:.1f} |")
    return "\n".join(rows)


def fig_guidance(plt):
    """cfd (200 samples) against S_cfg at 8 and 24 steps per stage, mean ± sd over seeds, one line per
    method; and the Inception FID (1,000 samples) at the points where it was measured."""
    g = best_runs()
    if not g:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 7))
    for i, (m, runs) in enumerate(g.items()):
        for steps, ls in ((8, "--"), (24, "-")):
            cells = [[c for c in r["guidance_grid"] if c["steps_per_stage"] == steps] for r in runs]
            S = [c["cfg"] for c in cells[0]]
            bars(a, S, [[cs[j]["cfd"] for cs in cells] for j in range(len(S))], color=f"C{i}", ls=ls,
                 label=f"{m} ({len(runs)} seed{'s' * (len(runs) > 1)}), {steps} steps")
        grids = [r["fid_grid"] for r in runs if "fid_grid" in r]
        if grids:
            bars(b, [c["cfg"] for c in grids[0]], [[gr[j]["inception_fid"] for gr in grids] for j in range(len(grids[0]))],
                 color=f"C{i}", label=f"{m} ({len(grids)} seed{'s' * (len(grids) > 1)}), {grids[0][0]['steps_per_stage']} steps")
        fc = [r["fid_check"] for r in runs if "fid_check" in r]
        if fc:  # (drawn again with other noise at the method's S_cfg, shifted right to be seen)
            b.errorbar([fc[0]["cfg"] + 0.06], [np.mean([c["inception_fid"] for c in fc])], fmt="D", mfc="none",
                       yerr=[np.std([c["inception_fid"] for c in fc], ddof=1) if len(fc) > 1 else 0], capsize=3,
                       color=f"C{i}", label=f"{m}, best S_cfg, other noise")
        pts = [(r[k]["cfg"], r[k]["inception_fid"]) for r in runs for k in ("at_best", "at_cfg1")
               if r[k]["steps_per_stage"] != FID_STEPS or "fid_grid" not in r]
        pts += [(r["spec"]["cfg"], r["inception_fid"]) for r in runs if "fid_grid" not in r]
        if pts:
            b.scatter(*zip(*pts), color=f"C{i}", marker="x", label=f"{m}, at other steps per stage")
    fl = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(RESULTS, "curves_final", "*floor.json")))]
    a.axhline(np.mean([v["cfd"] for v in floor("weighting")["per_side"]["32"]]), color="k", lw=0.8, ls=":",
              label="200 held-out digits")
    b.axhline(fl[-1]["inception_fid"], color="k", lw=0.8, ls=":", label="1,000 training digits")
    a.set(xlabel="S_cfg", ylabel="cfd (n = 200; lower is better)", yscale="log", title="classifier Fréchet distance")
    b.set(xlabel="S_cfg", ylabel="Inception FID (n = 1,000 vs 2,000 held-out)", title="Inception FID")
    for ax in (a, b):  # below the axes: the curves fill them
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.suptitle(f"The final models (0.128 PFLOP) against guidance; {MACHINE}; {CMD} rechecks", fontsize=8)
    return os.path.relpath(save_figure(fig, plt, "guidance.png", bbox_inches="tight"), EXP)


RERUN_MARKS = (0.004, 0.016, 0.032, 0.064, 0.128)


def rows_at_marks(named):
    """cfd / acc of every run at RERUN_MARKS, a row per (method, seed)."""
    rows = ["| method | seed | " + " | ".join(f"cfd / acc at {m:g}" for m in RERUN_MARKS) + " |",
            "|---|---|" + "---|" * len(RERUN_MARKS)]
    for m, runs in named.items():
        for r in runs:
            cells = [(lambda e: f"{e['cfd']:.1f} / {e['acc']:.2f}" if e else "-")(at_mark(r, mk)) for mk in RERUN_MARKS]
            rows.append(f"| {m} | {r['spec']['seed']} | " + " | ".join(cells) + " |")
    return rows


def table_curveslr(plt=None):
    """K = 3 at its long-budget lr (curveslr) against the runs of the same machine and classifier (the
    re-runs): per seed at a few marks, the compute table with K = 1's re-runs, and their figure."""
    lr_runs = curve_runs("curveslr").get(K3_NAME, [])
    if not lr_runs:
        return ""
    rr = curve_runs("curves_rerun")
    lr = lr_runs[0]["spec"]["lr"]
    named = {f"{m}, lr {runs[0]['spec']['lr']:g}": runs for m, runs in sorted(rr.items())}
    named[f"{K3_NAME}, lr {lr:g}"] = lr_runs
    rows = rows_at_marks(named)
    fig = (fig_curves(named, plt, "curveslr", "curves_lr.png", f"K = 3 at lr {lr:g} beside the re-runs (second CPU)",
                      f"{CMD} rechecks") if plt else None)
    return "\n".join(rows + ["", f"K = 1 (its re-runs) against K = 3 at lr {lr:g}:", "",
                              table_curves({K1_NAME: rr.get(K1_NAME, []), K3_NAME: lr_runs}, "curveslr")]
                      + ([f"\nfigure: {fig}"] if fig else []))


def table_weighting_curves(plt=None):
    """Through convergence under the curves' protocol (S_cfg 3, 8 steps, n = 200 per mark): K = 1 and K = 3
    'mean' (atbest) and K = 3 under Alg. 1's weights (weighting), per seed at a few marks; the compute tables of
    single-stage FM against each CDC objective; the figure."""
    w = [r for runs in curve_runs("weighting").values() for r in runs]
    if not w:
        return ""
    named = {f"{weighted(runs[0]['spec'])}, lr {runs[0]['spec']['lr']:g}": runs
             for runs in [runs for _, runs in sorted(curve_runs("atbest").items())] + [w]}
    rows = rows_at_marks(named)
    k1, *k3s = named  # K = 1 first (sorted), then K = 3 'mean', then K = 3 under Alg. 1's weights
    for k3 in reversed(k3s):
        rows += ["", f"{k1} against {k3}:", "", table_curves(named, "weighting", (k1, k3))]
    fig = (fig_curves(named, plt, "weighting", "curves_weighting.png", "Loss weightings",
                      f"{CMD} rechecks") if plt else None)
    return "\n".join(rows + ([f"\nfigure: {os.path.relpath(fig, EXP)}"] if fig else []))


def table_rerun():
    """The curves' runs trained again on a second CPU (another rounding, a retrained classifier): the record
    against the re-run at a few marks, and the re-runs' own compute-to-quality table."""
    g, rec = curve_runs("curves_rerun"), curve_runs("curves")
    if not g:
        return ""
    rows = ["| method | seed | " + " | ".join(f"{m:g} PFLOP: record → re-run" for m in RERUN_MARKS) + " |",
            "|---|---|" + "---|" * len(RERUN_MARKS)]
    for m, runs in sorted(g.items()):
        for r in runs:
            old = next((o for o in rec.get(m, []) if o["spec"] == r["spec"]), None)
            cells = []
            for mark in RERUN_MARKS:
                a, b = (at_mark(x, mark) if x else None for x in (old, r))
                f = lambda e: f"{e['cfd']:.1f} / {e['acc']:.2f}" if e else "-"  # noqa: E731
                cells.append(f"{f(a)} → {f(b)}")
            rows.append(f"| {m} | {r['spec']['seed']} | " + " | ".join(cells) + " |")
    fo, fr = floor32("curves"), floor32("curves_rerun")
    rows += ["", f"cfd / acc, 200 samples each. Floors (200 held-out digits, 3 draws): record {fo[0]:.2f} / {fo[1]:.3f}, "
             f"re-run {fr[0]:.2f} / {fr[1]:.3f}.", "", "The re-runs' own table:", "", table_curves(g, "curves_rerun")]
    return "\n".join(rows)


def fig_grids(plt, k1_seed=2, k3_seed=1):
    """Sample grids of both methods at matched compute (0.016 and 0.128 PFLOP) and at matched quality (the
    first mark with acc >= 0.95), from every mark's grid kept in experiments/cache/grids (not committed)."""
    runs = {m: next((r for r in curve_runs().get(m, []) if r["spec"]["seed"] == sd and r.get("complete")), None)
            for m, sd in ((K1_NAME, k1_seed), (K3_NAME, k3_seed))}
    if None in runs.values():
        return None
    first95 = {m: next(e["mark_pflop"] for e in r["evals"] if e["acc"] >= 0.95) for m, r in runs.items()}
    cols = [("matched compute", {m: 0.016 for m in runs}), ("matched compute", {m: 0.128 for m in runs}),
            ("matched quality: first acc ≥ 0.95", first95)]
    png = lambda r, mark: os.path.join(EXP, "cache", "grids", "curves__" + os.path.splitext(  # noqa: E731
        os.path.basename(r["_file"]))[0] + f"__{mark:g}.png")
    missing = [png(r, marks[m]) for _, marks in cols for m, r in runs.items() if not os.path.exists(png(r, marks[m]))]
    if missing:  # the grids live only in a cache: never overwrite the committed figure with empty panels
        return f"kept (experiments/cache/grids lacks {len(missing)} of the {len(cols) * len(runs)} grids)"
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.6))
    for j, (what, marks) in enumerate(cols):
        for i, (m, r) in enumerate(runs.items()):
            e = at_mark(r, marks[m])
            ax = axes[i][j]
            ax.axis("off")
            ax.imshow(plt.imread(png(r, marks[m])))
            ax.set_title(f"{what}\n{m}, seed {r['spec']['seed']}: {marks[m]:g} PFLOP\ncfd {e['cfd']:.1f}, acc {e['acc']:.3f}"
                         f" (n = 200)", fontsize=8)
    fig.suptitle(f"EMA samples (one row per digit), S_cfg 3, Euler 8 steps/stage; {MACHINE}; {CMD} curves", fontsize=8)
    return os.path.relpath(save_figure(fig, plt, "curves_grids.png", bbox_inches="tight"), EXP)


def report_rechecks(plt=None):
    for title, t in (("lr at 0.032 PFLOP (seed 100)", table_ladder("lrlong")), ("claim 3 at 0.032 PFLOP", table_claim3long()),
                     ("claim 4: the score interpolant at its own lr", table_claim4lr()),
                     ("the curves' final models", table_final()),
                     ("the curves re-run on a second CPU", table_rerun()),
                     ("K = 3 at its long-budget lr", table_curveslr(plt)),
                     ("lr of the paper's weighting, scaled-sum (lrweight)", table_ladder("lrweight")),
                     ("lr of the paper's weighting, sum (lrsum)", table_ladder("lrsum")),
                     ("through convergence: the weightings against single-stage FM (S_cfg 3)", table_weighting_curves(plt)),
                     ("each final model at its best guidance (weighting, atbest)", table_atbest())):
        print(f"\n## {title}\n\n{t or '(no results yet)'}")
    f = fig_guidance(plt) if plt else None
    if f:
        print(f"\nfigure: {f}")


def report(sections=None):
    """Every table and figure; sections=("curves",) only the curves' table and figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(FIGURES, exist_ok=True)
    if sections:
        if "curves" in sections:
            report_curves(plt)
        if "rechecks" in sections:
            report_rechecks(plt)
        return
    fl = floor()
    with open(os.path.join(RESULTS, "classifier.json")) as f:
        clf = json.load(f)
    print(f"Classifier: held-out accuracy {clf['heldout_accuracy']:.4f} on {clf['n_heldout']} digits.")
    print(f"Floors (n = {fl['n']} held-out digits, 3 draws): " + "; ".join(
        f"{s} px cfd {fmt([v['cfd'] for v in fl['per_side'][s]])}, acc {fmt([v['acc'] for v in fl['per_side'][s]], 3)}"
        for s in ("8", "16", "32")) + f"; all 2000 held-out at 32 px: cfd {fl['full_heldout_32']['cfd']:.2f}")
    print("\n## lr grid\n\n" + table_lrgrid())
    t1, g1 = table_claim1()
    print("\n## claim 1\n\n" + t1)
    if g1:
        print("\nfigure:", fig_claim1(g1, plt))
        ms_ = sorted(g1)
        if len(ms_) == 2:
            a, b = (g1[m] for m in ms_)
            for key, lb in (("cfd", True), ("acc", False)):
                print(f"final {key}: {ms_[0]} {fmt([r['final'][key] for r in a], 3)} vs {ms_[1]} "
                      f"{fmt([r['final'][key] for r in b], 3)}: {verdict([r['final'][key] for r in a], [r['final'][key] for r in b], lb)}")
            for m in ms_:
                print(f"{m}: wall train s {fmt([r['train_seconds'] for r in g1[m]], 0)}, steps {fmt([r['steps'] for r in g1[m]], 0)}, "
                      f"final sampling s {fmt([r['final']['sample_seconds'] for r in g1[m]], 1)}")
    t9, g9 = table_claim9()
    print("\n## claim 9\n\n" + t9)
    if g9:
        print("\nfigure:", fig_claim9(g9, plt))
    t8, g8 = table_claim8()
    print("\n## claim 8\n\n" + t8)
    if g8:
        print("\nfigure:", fig_claim8(g8, plt))
    ti = table_inception()
    if ti:
        print("\n## claim 1: standard Inception FID\n\n" + ti)
    ta, ga, base = table_ablations()
    if ta:
        print("\n## claims 2-7 (ablations of the K = 3 baseline, equal training FLOPs)\n\n" + ta)
        f3 = fig_claim3(ga, base, plt)
        if f3:
            print("\nfigure:", f3)
    report_curves(plt)
    report_rechecks(plt)
