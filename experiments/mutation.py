"""
Mutation testing of the method (cdc.py) and of the training code the rest relies on: the training step,
EMA and seeding of train.py, the data order and augmentation RNG of data.py, the checkpoint code of
runs.py. A small self-contained runner (mutmut's idea, our selection of tests):

    python experiments/mutation.py --jobs 1 --out mutation.json          # all targets (hours on 2 cores)
    python experiments/mutation.py --files cdc.py --max-minutes 60        # a part, with a time cap

1. Mutants. Every function of the targets (TARGETS) is parsed and mutated one change at a time: an
   arithmetic or bitwise operator swapped (+ -, * /, // /, ** *, ...), a comparison flipped (< <=,
   == !=, in / not in, ...), and / or swapped, a `not` or unary minus removed, a number n -> n + 1, a
   boolean negated, a call statement deleted (-> pass), an augmented assignment's operator swapped.
   Strings, docstrings, f-strings (messages) and decorators are not mutated.
2. Which tests. One traced run of the test files (sys.settrace, in-process tests only) records the lines
   each test executes; a mutant runs only the tests that execute its line, fastest first, stopping at
   the first failure (-x), at most --max-tests of them. Lines reached only through the scripts' subprocesses (train.py's step, EMA and
   seeding in a real run) also get the tests in SUBPROCESS_TESTS.
3. Running. The tree is copied to a scratch directory; each mutant is written there and pytest runs in
   a forked child of a process that has already imported torch (no interpreter start per mutant), with
   one torch thread and a time limit (a mutant that hangs counts as killed, reported as timeout).
4. Score. killed / (mutants - equivalent) per file; experiments/mutation_equivalent.txt lists the surviving
   mutants judged equivalent (same behaviour for every input the code can receive), one line of why each.

The test files are taken from the working tree, or from a git revision with --tests-rev (the score
"before" a change to the tests).
"""

import argparse
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# file -> qualified names of the functions to mutate (None: every function in the file)
TARGETS = {
    "cdc.py": None,
    "train.py": ["Objective.forward", "make_optimizer", "update_ema", "ema_decay_at", "train_step", "step_seed",
                 "choose_run", "check_compatible"],
    "data.py": ["_ImageDataset.set_epoch", "_ImageDataset.transform", "random_crop_arr", "DataOrder.__init__",
                "DataOrder.set_position", "DataOrder._rest", "DataOrder.__iter__", "DataOrder.__len__"],
    "runs.py": ["save_checkpoint", "list_checkpoints", "load_checkpoint", "prune_checkpoints"],
}
TEST_FILES = sorted(f for f in os.listdir(ROOT) if f.startswith("test_") and f.endswith(".py"))
# Tests that reach the targets through `python train.py` / torchrun subprocesses (invisible to the trace),
# per file or per file:class.
SUBPROCESS_TESTS = {
    "train.py": ["test_train.py::test_train_runs_and_resume_is_bit_exact",
                 "test_train.py::test_torchrun_two_processes_gloo_ranks_agree_and_split_the_data"],
    "data.py:DataOrder": ["test_train.py::test_torchrun_two_processes_gloo_ranks_agree_and_split_the_data",
                          "test_train.py::test_train_runs_and_resume_is_bit_exact"],
    "runs.py": ["test_train.py::test_train_runs_and_resume_is_bit_exact",
                "test_train.py::test_resume_refuses_what_it_cannot_load_or_that_does_not_match"],
}
EQUIVALENT = os.path.join(ROOT, "experiments", "mutation_equivalent.txt")

# ------------------------------------------------------------------------------------------------
#                                          Mutants
# ------------------------------------------------------------------------------------------------

BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
         ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
         ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd}
CMPOP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def _functions(tree, wanted):
    """(qualname, node) of the functions to mutate; nested functions belong to their parent."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = prefix + child.name
                if wanted is None or q in wanted:
                    out.append((q, child))
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
    visit(tree, "")
    return out


def _skip_nodes(fn):
    """Nodes whose subtrees are never mutated: docstrings, f-strings, decorators, annotations."""
    skip = set()
    for node in ast.walk(fn):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            skip.add(id(body[0]))
        if isinstance(node, ast.JoinedStr):
            skip.add(id(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for d in getattr(node, "decorator_list", []):
                skip.add(id(d))
            if getattr(node, "returns", None) is not None:
                skip.add(id(node.returns))
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if a.annotation is not None:
                    skip.add(id(a.annotation))
        if isinstance(node, ast.AnnAssign):
            skip.add(id(node.annotation))
    return skip


def _walk(node, skip):
    if id(node) in skip:
        return
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, skip)


def _copy_with(node, **changes):
    new = type(node)(**{f: getattr(node, f) for f in node._fields})
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def mutants_of(path, wanted):
    """List of dicts {file, function, line, col, end, old, new, kind} for one file."""
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src)
    lines = src.encode("utf-8").splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln))
    off = lambda lineno, col: starts[lineno - 1] + col  # noqa: E731  (col offsets are utf-8 bytes)
    out, seen = [], set()
    for qual, fn in _functions(tree, wanted):
        skip = _skip_nodes(fn)
        for node in _walk(fn, skip):
            if node is fn:
                continue
            reps = []  # (node whose source segment is replaced, replacement text, kind)
            if isinstance(node, ast.BinOp) and type(node.op) in BINOP:
                reps.append((node, "(" + ast.unparse(_copy_with(node, op=BINOP[type(node.op)]())) + ")", "binop"))
            elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP:
                reps.append((node, ast.unparse(_copy_with(node, op=BINOP[type(node.op)]())), "augassign"))
            elif isinstance(node, ast.Compare):
                for i, op in enumerate(node.ops):
                    if type(op) in CMPOP:
                        ops = list(node.ops)
                        ops[i] = CMPOP[type(op)]()
                        reps.append((node, "(" + ast.unparse(_copy_with(node, ops=ops)) + ")", "compare"))
            elif isinstance(node, ast.BoolOp):
                other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
                reps.append((node, "(" + ast.unparse(_copy_with(node, op=other)) + ")", "boolop"))
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
                reps.append((node, "(" + ast.unparse(node.operand) + ")", "unary"))
            elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
                reps.append((node, repr(node.value + 1), "number"))
            elif isinstance(node, ast.Constant) and type(node.value) is bool:
                reps.append((node, repr(not node.value), "bool"))
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                reps.append((node, "pass", "delete-call"))
            for target, text, kind in reps:
                a, b = off(target.lineno, target.col_offset), off(target.end_lineno, target.end_col_offset)
                old = src.encode("utf-8")[a:b].decode("utf-8")
                key = (a, b, text)
                if key in seen or text.strip("()") == old:
                    continue
                seen.add(key)
                out.append(dict(file=os.path.basename(path), function=qual, line=target.lineno, col=a - off(target.lineno, 0),
                                start=a, end=b, body=(fn.body[0].lineno, fn.end_lineno),
                                old=" ".join(old.split()), new=text, kind=kind))
    return out


def mutant_id(m):
    return f"{m['file']}:{m['line']}:{m['col']}: {m['old']} -> {m['new']}"


# ------------------------------------------------------------------------------------------------
#                                  Which tests run which lines
# ------------------------------------------------------------------------------------------------

TRACE_PLUGIN = r'''
import os, sys, time, threading, json
class LineTrace:
    def __init__(self, files):
        self.files, self.current, self.lines, self.durations, self.failed = files, None, {}, {}, set()
    def _local(self, frame, event, arg):
        if event == "line" and self.current is not None:
            self.lines.setdefault(self.current, set()).add((self.files[frame.f_code.co_filename], frame.f_lineno))
        return self._local
    def _global(self, frame, event, arg):
        if frame.f_code.co_filename in self.files:
            if self.current is not None:
                self.lines.setdefault(self.current, set()).add((self.files[frame.f_code.co_filename], frame.f_lineno))
            return self._local
        return None
    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid
        for mod in list(sys.modules.values()):  # empty lru caches: a cache hit would hide the lines a test needs
            if getattr(mod, "__file__", None) in self.files:
                for v in list(vars(mod).values()):
                    if callable(getattr(v, "cache_clear", None)):
                        v.cache_clear()
        sys.settrace(self._global); threading.settrace(self._global)
    def pytest_runtest_logfinish(self, nodeid, location):
        sys.settrace(None); threading.settrace(None)
        self.current = None
    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration
        if report.failed:
            self.failed.add(report.nodeid)
'''


def trace_tests(work, test_files, targets, out_path):
    """Run the tests once under a line tracer: {test id: duration}, {(file, line): [test ids]}."""
    code = TRACE_PLUGIN + f'''
import pytest
files = {{os.path.join({work!r}, f): f for f in {list(targets)!r}}}
plugin = LineTrace(files)
rc = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", *{test_files!r}], plugins=[plugin])
cover = {{}}
for test, lines in plugin.lines.items():
    for f, ln in lines:
        cover.setdefault(f + ":" + str(ln), []).append(test)
json.dump({{"rc": int(rc), "durations": plugin.durations, "cover": cover, "failed": sorted(plugin.failed)}},
          open({out_path!r}, "w"))
'''
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=work, env=env, check=False)
    return json.load(open(out_path))


# ------------------------------------------------------------------------------------------------
#                                          Running
# ------------------------------------------------------------------------------------------------


# Project modules in dependency order: the parent imports them once; each child re-executes their
# (possibly mutated) source into the same module objects, so `from runs import x` elsewhere is rebound.
PROJECT = ["cdc", "runs", "data", "fid", "train", "sample", "theory.common", "theory.operators",
           "theory.prior_equivalence", "theory.transport_cost", "theory.inference_time"]


KILLER = os.path.join(tempfile.gettempdir(), f"cdc-mutation-killer-{os.getpid()}")


def run_tests_forked(tests, timeout):
    """pytest -x on `tests` in a forked child (torch and the project already imported). Returns
    'killed', 'survived' or 'timeout'."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest
        for name in PROJECT:
            mod = sys.modules.get(name)
            if mod is not None:
                exec(compile(open(mod.__file__, encoding="utf-8").read(), mod.__file__, "exec"), mod.__dict__)
        class Killer:  # the first failing test, for the report
            def pytest_runtest_logreport(self, report):
                if report.failed:
                    with open(KILLER, "a") as f:
                        f.write(report.nodeid + "\n")
        rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests], plugins=[Killer()])
        os._exit(0 if rc == 0 else 1)
    t0 = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        if time.time() - t0 > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def collect_ids(work):
    code = ("import pytest, json\nclass C:\n    ids = []\n    def pytest_collection_modifyitems(self, items):\n"
            "        C.ids += [i.nodeid for i in items]\n"
            "pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider'], plugins=[C()])\n"
            "json.dump(C.ids, open('ids.json', 'w'))\n")
    subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True)
    return set(json.load(open(os.path.join(work, "ids.json"))))


def load_equivalent():
    eq = {}
    if os.path.exists(EQUIVALENT):
        for line in open(EQUIVALENT, encoding="utf-8"):
            line = line.rstrip("\n")
            if line and not line.startswith("#") and "  # " in line:
                k, why = line.split("  # ", 1)
                eq[k.strip()] = why.strip()
    return eq


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", default=",".join(TARGETS), help="comma-separated target files")
    p.add_argument("--functions", default=None, help="only these qualified names (comma-separated)")
    p.add_argument("--tests-rev", default=None, help="take the test files from this git revision")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new mutants after this")
    p.add_argument("--timeout-factor", type=float, default=4.0)
    p.add_argument("--max-tests", type=int, default=40, help="at most this many (the fastest) covering tests per mutant")
    p.add_argument("--out", default="mutation.json")
    p.add_argument("--list", action="store_true", help="only list the mutants")
    p.add_argument("--trace", default=None, help="keep the traced test map in this file and reuse it if present")
    p.add_argument("--resume", action="store_true", help="skip mutants already in --out")
    p.add_argument("--only", default=None, help="run only the mutant ids listed in this file (one per line)")
    a = p.parse_args(argv)
    files = [f for f in a.files.split(",") if f]
    a.out = os.path.abspath(a.out)
    a.trace = a.trace and os.path.abspath(a.trace)
    only = set(a.functions.split(",")) if a.functions else None

    muts = []
    for f in files:
        wanted = TARGETS[f] if only is None else [q for q in (TARGETS[f] or [q for q, _ in _functions(
            ast.parse(open(os.path.join(ROOT, f)).read()), None)]) if q in only]
        muts += mutants_of(os.path.join(ROOT, f), wanted)
    if a.list:
        for m in muts:
            print(f"{m['function']:28s} {mutant_id(m)}")
        print(len(muts), "mutants")
        return

    work = tempfile.mkdtemp(prefix="cdc-mutation-")
    for name in os.listdir(ROOT):
        s = os.path.join(ROOT, name)
        if name.endswith((".py", ".ini", ".txt", ".cfg")) and os.path.isfile(s):
            shutil.copy(s, work)
    for d in ("theory", "bench", "experiments"):  # what the tests import (results, figures and caches left out)
        if os.path.isdir(os.path.join(ROOT, d)):
            shutil.copytree(os.path.join(ROOT, d), os.path.join(work, d),
                            ignore=shutil.ignore_patterns("results*", "figures", "cache", "__pycache__"))
    test_files = TEST_FILES
    if a.tests_rev:
        test_files = subprocess.run(["git", "ls-tree", "--name-only", a.tests_rev], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.split()
        test_files = [t for t in test_files if t.startswith("test_") and t.endswith(".py")]
        for t in TEST_FILES:
            if t not in test_files:
                os.remove(os.path.join(work, t))
        for t in test_files:
            data = subprocess.run(["git", "show", f"{a.tests_rev}:{t}"], cwd=ROOT, capture_output=True, check=True).stdout
            open(os.path.join(work, t), "wb").write(data)
    os.chdir(work)
    sys.path.insert(0, work)
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"{len(muts)} mutants in {', '.join(files)}; tracing the tests in {work} ...", flush=True)
    t0 = time.time()
    if a.trace and os.path.exists(a.trace):
        trace = json.load(open(a.trace))
        if not a.tests_rev:  # tests added since the trace was taken: trace those and merge
            new = sorted(collect_ids(work) - set(trace["durations"]))
            if new:
                print(f"tracing {len(new)} tests not in {a.trace}", flush=True)
                more = trace_tests(work, new, files, os.path.join(work, "trace_new.json"))
                trace["durations"].update(more["durations"])
                trace["failed"] = sorted(set(trace["failed"]) | set(more["failed"]))
                for k, v in more["cover"].items():
                    trace["cover"].setdefault(k, []).extend(v)
                json.dump(trace, open(a.trace, "w"))
    else:
        trace = trace_tests(work, test_files, files, os.path.join(work, "trace.json"))
        if a.trace:
            shutil.copy(os.path.join(work, "trace.json"), a.trace)
    print(f"traced {len(trace['durations'])} tests in {time.time() - t0:.0f}s (rc {trace['rc']})", flush=True)
    dur = {t: d for t, d in trace["durations"].items() if t not in set(trace["failed"])}  # failing tests kill nothing
    if a.tests_rev and a.trace:  # a reused trace of other test files: keep the tests these files have
        valid = collect_ids(work)
        dur = {t: d for t, d in dur.items() if t in valid}
        dur.update({t: 60.0 for ts in SUBPROCESS_TESTS.values() for t in ts if t in valid and t not in dur})
    if trace["failed"]:
        print("failing before any mutation (ignored):", ", ".join(trace["failed"]), flush=True)

    import torch  # noqa: F401  (imported once, before forking: children start with it loaded)
    import numpy, scipy.linalg, PIL.Image, hypothesis, pytest  # noqa: F401,E401
    import importlib
    for name in PROJECT:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    torch.set_num_threads(1)

    results = {}
    if a.resume and os.path.exists(a.out):
        results = {r["id"]: r for r in json.load(open(a.out))["mutants"]}
    equivalent = load_equivalent()
    only_ids = set(open(a.only, encoding="utf-8").read().splitlines()) if a.only else None
    start = time.time()
    originals = {f: open(os.path.join(work, f), "rb").read() for f in files}
    for i, m in enumerate(muts):
        mid = mutant_id(m)
        if mid in results or (only_ids is not None and mid not in only_ids):
            continue
        if a.max_minutes and time.time() - start > 60 * a.max_minutes:
            print(f"time limit: {len(muts) - i} mutants not run", flush=True)
            break
        # a mutant in the signature (a default value) is evaluated at import, not on a traced line: it is
        # reached through the function's body, so it gets the tests that run the body
        lines = [m["line"]] if m["line"] >= m["body"][0] else range(m["body"][0], m["body"][1] + 1)
        tests = sorted({t for ln in lines for t in trace["cover"].get(f"{m['file']}:{ln}", []) if t in dur}, key=dur.get)
        tests = tests[:a.max_tests]
        sub = SUBPROCESS_TESTS.get(m["file"], []) + SUBPROCESS_TESTS.get(f"{m['file']}:{m['function'].split('.')[0]}", [])
        tests += [t for t in sub if t in dur and t not in tests]
        killer = None
        if not tests:
            status, budget = "no-tests", 0.0
        else:
            budget = sum(dur[t] for t in tests)
            with open(os.path.join(work, m["file"]), "wb") as fh:
                fh.write(originals[m["file"]][:m["start"]] + m["new"].encode("utf-8") + originals[m["file"]][m["end"]:])
            try:
                if os.path.exists(KILLER):
                    os.remove(KILLER)
                status = run_tests_forked(tests, max(30.0, a.timeout_factor * budget + 10))
                killer = open(KILLER).read().split("\n")[0] if os.path.exists(KILLER) else None
            finally:
                with open(os.path.join(work, m["file"]), "wb") as fh:
                    fh.write(originals[m["file"]])
        results[mid] = dict(id=mid, file=m["file"], function=m["function"], line=m["line"], kind=m["kind"],
                            status=status, tests=len(tests), killer=killer)
        print(f"[{i + 1}/{len(muts)} {time.time() - start:6.0f}s] {status:8s} {mid}", flush=True)
        report(results, equivalent, a.out, muts, quiet=(i + 1) % 10 != 0)
    report(results, equivalent, a.out, muts)
    shutil.rmtree(work, ignore_errors=True)


def report(results, equivalent, out, muts, quiet=False):
    by_file = {}
    for r in results.values():
        s = by_file.setdefault(r["file"], dict(mutants=0, killed=0, timeout=0, survived=0, equivalent=0))
        s["mutants"] += 1
        if r["status"] in ("killed", "timeout"):
            s["killed"] += 1
            s["timeout"] += r["status"] == "timeout"
        elif r["id"] in equivalent:
            s["equivalent"] += 1
        else:
            s["survived"] += 1
    for s in by_file.values():
        s["score"] = s["killed"] / max(1, s["mutants"] - s["equivalent"])
    survivors = [r["id"] for r in results.values() if r["status"] in ("survived", "no-tests") and r["id"] not in equivalent]
    json.dump({"files": by_file, "run": len(results), "total": len(muts), "survivors": survivors,
               "mutants": list(results.values())}, open(out, "w"), indent=1)
    if quiet:
        return
    for f, s in sorted(by_file.items()):
        print(f"{f}: {s['killed']}/{s['mutants'] - s['equivalent']} killed = {100 * s['score']:.1f}% "
              f"({s['equivalent']} equivalent, {s['survived']} surviving, {s['timeout']} by timeout)", flush=True)


if __name__ == "__main__":
    main()
