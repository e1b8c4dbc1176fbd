"""bench/gpu_check.py: its pure parts, its self-setup from wheels, and its --dry-run end to end on CPU (the same
JSON schema the GPU run writes), so CI exercises the plumbing that runs on a lent GPU machine."""

import base64
import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc_mod():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("Tesla T4", None),
])
def test_bf16_peak_by_device_name(gc_mod, name, peak):
    assert gc_mod.bf16_peak(name)[0] == peak


@pytest.mark.parametrize("tokens", [128, 256, 8192, 32768, 65536, 1000])
def test_packs_fill_exactly(gc_mod, tokens):
    assert gc_mod.pack_lengths(tokens, "single") == [tokens]
    mixed = gc_mod.pack_lengths(tokens, "mixed")
    assert sum(mixed) == tokens and all(n > 0 for n in mixed)
    assert mixed[:2] == [tokens // 2, tokens // 4] and max(mixed[2:]) <= max(1, min(512, tokens // 8))
    with pytest.raises(ValueError):
        gc_mod.pack_lengths(tokens, "padded")


def test_mixed_8k_pack(gc_mod):
    assert gc_mod.pack_lengths(8192, "mixed") == [4096, 2048, 512, 512, 512, 512]


def test_backend_order_runs_auto_first_then_the_reference(gc_mod):
    order = gc_mod.backend_order
    assert order(["torch", "sdpa"], "torch", None) == ["torch", "sdpa"]
    assert order(["sdpa"], "sdpa", None) == ["sdpa"]
    assert order(["te", "flash", "torch", "sdpa"], "te", None) == ["te", "sdpa", "flash", "torch"]
    assert order(["te", "flash", "torch", "sdpa"], "te", ["flash"]) == ["te", "sdpa", "flash"]  # check still built


def test_deadline_and_estimates(gc_mod):
    d = gc_mod.Deadline(100.0, start=gc_mod.time.monotonic() - 40.0)
    assert 59 < d.left() <= 60
    assert d.allows(30.0, reserve_s=20.0) and not d.allows(50.0, reserve_s=20.0)
    # 7 steps of 1 PFLOP at 500 TFLOP/s: 14 s, 1.5x + 2 s
    assert gc_mod.estimate_seconds(1e15, 7, 5e14, 1e14) == pytest.approx(23.0)
    assert gc_mod.estimate_seconds(1e15, 7, None, 5e14) == pytest.approx(23.0)  # the prior before any measurement


def test_rows_have_one_schema(gc_mod):
    r = gc_mod.row(backend="sdpa", status="skipped")
    assert tuple(r) == gc_mod.ROW_KEYS and r["mfu"] is None
    with pytest.raises(KeyError):
        gc_mod.row(speed=1)


def test_junit_counts(gc_mod, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="2">'
                   '<testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure/></testcase>'
                   '<testcase classname="b" name="s1"><skipped/></testcase>'
                   '<testcase classname="b" name="s2"><skipped/></testcase></testsuite></testsuites>')
    counts = gc_mod.parse_junit(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 0, 2)
    assert counts["failing"] == ["a::bad"]


def test_the_gpu_marked_test_files_are_found(gc_mod):
    files = gc_mod.gpu_test_files(ROOT / "tests")
    assert "tests/model/test_attention.py" in files
    assert "tests/test_gpu_check.py" not in files


def test_wheel_names(gc_mod):
    assert gc_mod.wheel_distribution(
        "megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl") == "megatron-core"
    assert gc_mod.wheel_distribution("omegaconf-2.4.0-py3-none-any.whl") == "omegaconf"


def _wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal valid pure-Python wheel holding `module`.py."""
    files = {f"{module}.py": b"VALUE = 42\n",
             f"{dist}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n".encode(),
             f"{dist}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n"}
    record = ""
    for name, body in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(body)}\n"
    files[f"{dist}-0.1.dist-info/RECORD"] = (record + f"{dist}-0.1.dist-info/RECORD,,\n").encode()
    path = folder / f"{dist}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, body in files.items():
            z.writestr(name, body)
    return path


def test_setup_installs_missing_wheels_and_reports_what_is_still_missing(gc_mod, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    wheel = _wheel(tmp_path, "gpu_check_probe", "gpu_check_probe_mod")
    report = gc_mod.Report(tmp_path / "r.json", {"notes": []})
    result = gc_mod.setup_packages(gc_mod.find_wheels([str(tmp_path)]), tmp_path / "site", report)
    assert result["installed"] == [wheel.name] and not result["failed"]
    assert gc_mod.importable("gpu_check_probe_mod")
    assert str(tmp_path / "site") in sys.path and str(ROOT) in gc_mod.os.environ["PYTHONPATH"].split(":")
    again = gc_mod.setup_packages([wheel], tmp_path / "site", report)  # an earlier run's site is reused
    assert again["installed"] == [] and again["already"] == ["gpu-check-probe 0.1"]
    monkeypatch.setitem(gc_mod.NEEDS, "benchmarks", ("torch", "no_such_module_for_gpu_check"))
    assert gc_mod.missing_for("benchmarks") == ["no_such_module_for_gpu_check"]


def test_a_missing_package_skips_its_steps_in_one_line(gc_mod, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(gc_mod.NEEDS, "benchmarks", ("torch", "no_such_module_for_gpu_check"))
    monkeypatch.setitem(gc_mod.NEEDS, "tests", ("no_such_module_for_gpu_check",))
    out = tmp_path / "missing.json"
    rc = gc_mod.main(["--dry-run", "--out", str(out), "--wheel", str(tmp_path / "none"), "--site-dir",
                      str(tmp_path / "site")])
    data = json.loads(out.read_text())
    assert rc == 1 and data["ok"] is False
    assert data["setup"]["missing"] == ["no_such_module_for_gpu_check"]
    assert data["tests"]["status"] == "skipped" and "no_such_module_for_gpu_check" in data["tests"]["reason"]
    assert data["loss_check"]["status"] == "skipped" and data["benchmarks"] == []
    lines = [n for n in data["notes"] if n.startswith("missing: ")]
    assert len(lines) == 1 and "benchmarks and tests skipped" in lines[0]


def test_dry_run_end_to_end(tmp_path):
    """The whole check on CPU: tests step (GPU tests skip here), every row of the schema, an out-of-memory config
    recorded and measured again with recompute=full, the loss check, one JSON, a summary on stdout."""
    out = tmp_path / "dry.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--fake-oom", "256",
                           "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["schema"] == "megalign.gpu_check/1" and data["dry_run"] is True and data["ok"] is True
    assert set(data) == {"schema", "dry_run", "out", "started_at", "wall_s", "budget_s", "code", "argv", "settings",
                         "setup", "environment", "model", "tests", "benchmarks", "loss_check", "notes", "ok"}
    env = data["environment"]
    for key in ("python", "torch", "cuda", "gpu_name", "gpu_memory_gib", "bf16_peak_tflops", "peak_source",
                "measured_matmul", "megatron_core", "transformer_engine", "flash_attn", "backends_available",
                "auto_backend"):
        assert key in env
    assert env["device"] == "cpu" and env["auto_backend"] == "sdpa" and env["megatron_core"]
    assert data["model"]["parameters"] > 0 and data["model"]["num_layers"] == 2

    tests = data["tests"]
    assert tests["status"] == "ok" and "tests/model/test_attention.py" in tests["files"]
    assert tests["tests"] >= 1 and tests["failed"] == 0 and tests["skipped"] == tests["tests"]  # no CUDA here

    rows = data["benchmarks"]
    assert all(tuple(r) == ("backend", "pack_tokens", "mix", "samples", "longest_sample", "recompute", "status",
                            "note", "warmup_steps", "timed_steps", "step_seconds", "median_step_s", "tokens_per_s",
                            "model_tflop_per_step", "tflops_per_gpu", "mfu", "mfu_vs_matmul", "peak_memory_gib",
                            "static_memory_gib", "loss") for r in rows)
    keyed = {(r["backend"], r["pack_tokens"], r["mix"], r["recompute"]): r for r in rows}
    assert set(keyed) == {("sdpa", 128, "single", "none"), ("sdpa", 128, "mixed", "none"),
                          ("sdpa", 256, "single", "none"), ("sdpa", 256, "mixed", "none"),
                          ("sdpa", 256, "single", "full"), ("sdpa", 256, "mixed", "full")}
    for (_, tokens, mix, recompute), r in keyed.items():
        if tokens == 256 and recompute == "none":
            assert r["status"] == "oom" and "fake" in r["note"] and r["tokens_per_s"] is None
            continue
        assert r["status"] == "ok", r
        assert len(r["step_seconds"]) == r["timed_steps"] == 1
        assert r["tokens_per_s"] == pytest.approx(tokens / r["median_step_s"], rel=1e-3)
        assert r["tflops_per_gpu"] > 0 and r["mfu"] is None and r["peak_memory_gib"] is None  # CPU: no peak, no GPU
        assert r["samples"] == (1 if mix == "single" else 4) and r["loss"] > 0

    check = data["loss_check"]
    assert check["status"] == "pass" and check["auto_backend"] == "sdpa" and check["abs_diff"] == 0.0
    assert check["pack_tokens"] == 256 and check["tolerance"] == pytest.approx(5e-3 * check["loss_sdpa"])
    assert "loss check: pass" in done.stdout and "| backend | pack |" in done.stdout
