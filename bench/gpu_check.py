"""One GPU check for a lent machine (one H100/H200, PyTorch only, no network): sets itself up, runs the GPU-marked
tests, measures a ~1B Llama-shaped model on packed THD batches per attention backend, checks that `auto` gives
the same loss as `sdpa`, and writes one JSON. Made to end inside 8 minutes on one H100.

    python3 bench/gpu_check.py --out gpu_check.json          # on the GPU machine (wheels/ carried along)
    python3 bench/gpu_check.py --dry-run --out /tmp/dry.json  # the same plumbing on CPU, tiny, < 1 min (CI)

Steps, in this order (the most important first; each one's result goes to the JSON as soon as it is known):

 1. setup: megatron-core and omegaconf (the two of megalign's needs that a bare PyTorch image lacks) are
    installed from wheels when they are not importable: `--wheel PATH` (a .whl or a folder of them), else the
    .whl files under wheels/ in the repository, with `pip install --no-index --no-deps --target SITE` (SITE:
    --site-dir); the repository goes on PYTHONPATH. Whatever is still missing is one line in the output, and
    the steps that need it are skipped, not crashed.
 2. environment: torch, CUDA, GPU, its dense bf16 peak (BF16_DENSE_PEAKS, from NVIDIA's datasheets; --peak-tflops
    overrides), an 8192^3 bf16 matmul measured here, megatron-core, TE and flash-attn presence, the backends.
 3. tests: `pytest -m gpu` over the test files that hold GPU-marked tests, with a time cap; counts from junit XML.
 4. benchmarks, one backend after another (the one `auto` resolves to first, then sdpa, then the other
    installed ones): the model (MODEL_1B), bf16, one pack per step (megalign's Trainer: forward, backward,
    optimizer step), packs of --lengths tokens, each as one sample filling it ("single") and as a mix of a
    half, a quarter and 512-token samples ("mixed"); --warmup steps, then --steps timed (cuda synchronize around
    each), the median. tokens/s, model TFLOP/s per GPU (megalign.model.arithmetic.step_flops: the matmuls plus
    causal attention per sample, 3x forward, recomputation not counted), MFU against the bf16 peak, peak
    memory (torch.cuda.max_memory_allocated, reset per config). An out-of-memory config is recorded ("oom") and,
    time allowing, measured again with model.recompute=full (a row of its own).
 5. loss check: the forward-only loss of one mixed 8k pack under the freshly initialised (same-seed) models of
    `auto`'s backend and of `sdpa`: |difference| <= --loss-rtol x |sdpa loss|.

Deadline: --budget-s from the start. Before each config its time is estimated from its FLOPs and the rate
measured so far (a prior of 30% of peak before the first), and it is skipped with a note when it would not end
in time (keeping back what the loss check still needs). A watchdog writes the JSON and exits (code 3) at budget
+ --grace-s whatever runs. Exit code: 0 when the tests ran without a failure (or --skip-tests) and the loss check
passed, 1 otherwise (a missing package included), 3 from the watchdog.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "megalign.gpu_check/1"

# Dense (no sparsity) BF16 Tensor Core peaks, TFLOP/s: NVIDIA's datasheets give the with-sparsity figure, twice
# these (H100: "BF16 Tensor Core 1,979 teraFLOPS*" SXM, 1,513 PCIe, 1,671 NVL; H200: 1,979 SXM, 1,671 NVL;
# A100: 312 dense, 624 with sparsity). First match wins: every word must occur in the CUDA device name.
BF16_DENSE_PEAKS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H100", "PCIE"), 756.0, "H100 PCIe"),
    (("H100", "NVL"), 835.0, "H100 NVL"),
    (("H200", "NVL"), 835.0, "H200 NVL"),
    (("H100",), 989.0, "H100 SXM"),
    (("H200",), 989.0, "H200 SXM (the H100 SXM's compute)"),
    (("A100",), 312.0, "A100"),
)
PEAK_SOURCE = ("NVIDIA datasheets, dense BF16 Tensor Core = half the with-sparsity figure: H100 SXM / H200 SXM 989 "
               "(1,979 sparse), H100 PCIe 756, H100 NVL / H200 NVL 835, A100 312")

# ~1B Llama-shaped model (0.89B parameters with this vocabulary): Llama-3.2-1B's width and depth with MHA-size
# heads of 128, GQA 8 groups, TinyLlama's MLP width and Llama 2's vocabulary.
MODEL_1B = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16, num_query_groups=8,
                vocab_size=32000, rotary_base=500000.0, max_position_embeddings=65536)
MODEL_DRY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                 vocab_size=512, max_position_embeddings=512)
SHORT_SAMPLE = 512  # the mixed pack's short samples (tokens; at most a pack's eighth)
CHECK_TOKENS = 8192  # the loss check's pack (mixed)

ROW_KEYS = ("backend", "pack_tokens", "mix", "samples", "longest_sample", "recompute", "status", "note",
            "warmup_steps", "timed_steps", "step_seconds", "median_step_s", "tokens_per_s", "model_tflop_per_step",
            "tflops_per_gpu", "mfu", "mfu_vs_matmul", "peak_memory_gib", "static_memory_gib", "loss")
BACKEND_ORDER = ("te", "flash", "torch", "sdpa")  # megalign.model.attention.available_backends' order


# -- small pure helpers (unit-tested) ---------------------------------------------------------------------------
def bf16_peak(device_name: str) -> tuple[float | None, str | None]:
    """(dense bf16 TFLOP/s, which part) for a CUDA device name, or (None, None) when unknown."""
    name = device_name.upper()
    for words, tflops, label in BF16_DENSE_PEAKS:
        if all(w in name for w in words):
            return tflops, label
    return None, None


def pack_lengths(tokens: int, mix: str) -> list[int]:
    """The samples of one pack of `tokens`: "single" one sample filling it; "mixed" a half, a quarter, then
    samples of SHORT_SAMPLE tokens (at most tokens // 8), the last one taking the remainder."""
    if mix == "single":
        return [tokens]
    if mix != "mixed":
        raise ValueError(f"mix {mix!r}: single or mixed")
    lengths = [tokens // 2, tokens // 4]
    rest = tokens - sum(lengths)
    short = max(1, min(SHORT_SAMPLE, tokens // 8))
    while rest > 0:
        lengths.append(min(short, rest))
        rest -= lengths[-1]
    return [n for n in lengths if n > 0]


def wheel_distribution(path: str | Path) -> str:
    """The canonical distribution name of a wheel file (megatron_core-0.16.1-cp312-... -> megatron-core)."""
    return re.sub(r"[-_.]+", "-", Path(path).name.split("-")[0]).lower()


def find_wheels(explicit: list[str]) -> list[Path]:
    """--wheel paths (files or folders of .whl), else the .whl files under wheels/ and .whl/ of the repository."""
    places = [Path(p) for p in explicit] if explicit else [ROOT / "wheels", ROOT / ".whl"]
    found = []
    for place in places:
        if place.is_dir():
            found += sorted(place.glob("*.whl"))
        elif place.suffix == ".whl" and place.is_file():
            found.append(place)
    return found


def parse_junit(path: str | Path) -> dict:
    """Counts of a pytest junit XML report: {tests, passed, failed, errors, skipped, failures: [names]}."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"], "failing": failing}


def gpu_test_files(tests_dir: Path) -> list[str]:
    """The test files that hold GPU-marked tests (collecting only these keeps other suites' needs out)."""
    pattern = re.compile(r"mark\.gpu\b")
    return sorted(str(p.relative_to(ROOT)) for p in tests_dir.rglob("test_*.py") if pattern.search(p.read_text()))


def backend_order(available: list[str], auto: str, wanted: list[str] | None) -> list[str]:
    """Which backends run, in order: auto's first, then sdpa (the loss check's reference), then the others;
    `wanted` restricts the benchmarks (auto's and sdpa still run for the loss check)."""
    order = [auto, "sdpa"] + [b for b in BACKEND_ORDER if b in available]
    if wanted is not None:
        order = [b for b in order if b in wanted or b in (auto, "sdpa")]
    return list(dict.fromkeys(b for b in order if b in available))


class Deadline:
    def __init__(self, budget_s: float, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def allows(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        return estimate_s + reserve_s <= self.left()


def estimate_seconds(flops: float, steps: int, rate: float | None, prior: float) -> float:
    """A config's time: its steps at the rate measured so far (FLOP/s; else the prior), 1.5x, plus 2 s."""
    return 1.5 * steps * flops / (rate or prior) + 2.0


def row(**fields) -> dict:
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"not row keys: {sorted(unknown)}")
    return {k: fields.get(k) for k in ROW_KEYS}


def sig(x: float, digits: int = 5) -> float:
    """x to `digits` significant digits (CPU dry runs measure tiny TFLOP/s)."""
    return float(f"{x:.{digits}g}")


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# -- the report ---------------------------------------------------------------------------------------------------
class Report:
    """The JSON, rewritten atomically after every step, so a killed run still leaves what it measured."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.lock = threading.Lock()

    def write(self) -> None:
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
            os.replace(tmp, self.path)

    def note(self, text: str) -> None:
        print(f"gpu_check: {text}", flush=True)
        with self.lock:
            self.data["notes"].append(text)


# -- 1. setup -----------------------------------------------------------------------------------------------------
def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False


def setup_packages(wheels: list[Path], site: Path, report: Report) -> dict:
    """Install the wheels whose distribution is not installed into `site` (no index, no dependencies); put `site`
    and the repository on sys.path and PYTHONPATH (for the pytest subprocess)."""
    result = {"site_dir": str(site), "wheels_found": [w.name for w in wheels], "installed": [], "already": [],
              "failed": []}
    if site.is_dir():  # an earlier run on this machine
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    todo = []
    for w in wheels:
        dist = wheel_distribution(w)
        version = installed_version(dist)
        if version is not None:
            result["already"].append(f"{dist} {version}")
        elif dist not in {wheel_distribution(t) for t in todo}:
            todo.append(w)
    if todo:
        site.mkdir(parents=True, exist_ok=True)
        if importable("pip"):
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, todo)]
            for w in todo:  # one by one: a wheel this Python cannot take fails alone
                done = subprocess.run(cmd[:-len(todo)] + [str(w)], capture_output=True, text=True, timeout=300)
                if done.returncode:
                    last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
                    result["failed"].append(f"{w.name}: {last}")
                    report.note(f"setup: {w.name} not installed: {last}")
                else:
                    result["installed"].append(w.name)
        else:  # no pip: a wheel is a zip of its files, laid out for site-packages
            for w in todo:
                try:
                    with zipfile.ZipFile(w) as z:
                        z.extractall(site, [n for n in z.namelist() if not n.split("/", 1)[0].endswith(".data")])
                    result["installed"].append(f"{w.name} (unzipped: no pip)")
                except (OSError, zipfile.BadZipFile) as e:
                    result["failed"].append(f"{w.name}: {one_line(e)}")
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    paths = [str(site), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return result


NEEDS = {"benchmarks": ("torch", "numpy", "megatron.core", "omegaconf"),
         "tests": ("pytest", "hypothesis", "torch", "numpy", "megatron.core", "omegaconf")}


def missing_for(step: str) -> list[str]:
    return [m for m in NEEDS[step] if not importable(m)]


# -- 2. environment -----------------------------------------------------------------------------------------------
def measure_matmul(torch, device: str) -> dict:
    """TFLOP/s of a square matmul (bf16 8192^3 on CUDA; a small fp32 one on CPU), the mean of timed repeats."""
    n, dtype, repeats = (8192, torch.bfloat16, 10) if device == "cuda" else (256, torch.float32, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(torch, device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(torch, device)
    seconds = (time.perf_counter() - started) / repeats
    del a, b
    return {"shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), "tflops": sig(2 * n ** 3 / seconds / 1e12)}


def sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def environment(torch, device: str, peak_override: float | None) -> dict:
    env = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "device": device,
           "gpu_name": None, "gpu_memory_gib": None, "compute_capability": None, "multiprocessors": None,
           "bf16_peak_tflops": None, "peak_part": None, "peak_source": PEAK_SOURCE, "measured_matmul": None,
           "megatron_core": installed_version("megatron-core") if importable("megatron.core") else None,
           "omegaconf": installed_version("omegaconf") if importable("omegaconf") else None,
           "transformer_engine": importable("transformer_engine"), "flash_attn": importable("flash_attn"),
           "torch_varlen": importable("torch.nn.attention.varlen"), "pytest": importable("pytest"),
           "backends_available": None, "auto_backend": None,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(cudnn=torch.backends.cudnn.version(), gpu_name=props.name,
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        env["bf16_peak_tflops"], env["peak_part"] = bf16_peak(props.name)
    if peak_override:
        env["bf16_peak_tflops"], env["peak_part"] = peak_override, "given with --peak-tflops"
    return env


# -- 3. the GPU-marked tests --------------------------------------------------------------------------------------
TESTS_KEYS = ("status", "reason", "files", "command", "tests", "passed", "failed", "errors", "skipped", "failing",
              "seconds", "timeout_s", "output_tail")


def tests_result(status: str | None = None, reason: str | None = None, **fields) -> dict:
    return {**{k: None for k in TESTS_KEYS}, "failing": [], **fields, "status": status, "reason": reason}


def run_gpu_tests(timeout_s: float, workdir: Path) -> dict:
    files = gpu_test_files(ROOT / "tests")
    junit = workdir / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={junit}", *files]
    result = tests_result(files=files, command="python -m pytest -m gpu " + " ".join(files),
                          timeout_s=round(timeout_s))
    if not files:
        result.update(status="skipped", reason="no test file holds a gpu-marked test")
        return result
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        result.update(status="timeout", reason=f"stopped after {timeout_s:.0f} s", output_tail=out[-1500:],
                      seconds=round(time.monotonic() - started, 1))
        return result
    result["seconds"] = round(time.monotonic() - started, 1)
    result["output_tail"] = (done.stdout + done.stderr)[-1500:]
    if junit.is_file():
        result.update(parse_junit(junit))
    if done.returncode in (0, 5) and not result["failed"] and not result["errors"]:  # 5: nothing selected
        result["status"] = "ok"
        if not result["passed"]:
            result["reason"] = "nothing passed: every selected test was skipped (no CUDA, or no GPU backend)"
    else:
        result["status"] = "failed"
        result["reason"] = f"pytest exit code {done.returncode}"
    return result


# -- 4./5. the model ----------------------------------------------------------------------------------------------
def make_packs(lengths: list[int], mixes: list[str], vocab: int, check_tokens: int, seed: int = 0):
    """One InMemoryPacks with the loss check's pack first, then one pack per (length, mix); pack -> index."""
    import numpy as np

    from megalign.data.packed_dataset import Pack
    from megalign.data.source import InMemoryPacks

    rng = np.random.default_rng(seed)
    keys = [("check", check_tokens, "mixed")] + [("bench", n, mix) for n in lengths for mix in mixes]
    packs, index = [], {}
    for key in keys:
        samples = pack_lengths(key[1], key[2])
        total = sum(samples)
        mask = np.ones(total, np.uint8)
        start = 0
        for n in samples:  # a "prompt" quarter of each sample carries no loss, as in SFT
            mask[start:start + n // 4] = 0
            start += n
        index[key] = len(packs)
        packs.append(Pack(rng.integers(0, vocab, total), mask, np.array(samples)))
    return InMemoryPacks(packs, vocab_size=vocab, name="gpu-check"), index


def model_config(model: dict, backend: str, recompute: str, workdir: Path, device: str):
    from megalign.config import Config, updated, validate

    cfg = updated(Config(), model={**model, "attention_backend": backend, "recompute": recompute},
                  training={"global_batch": 1, "steps": 1000, "lr": 1e-6, "warmup_fraction": 0.0,
                            "on_nonfinite": "skip"},
                  run={"device": device, "output_dir": str(workdir / "run"), "tensorboard": False,
                       "progress": False},
                  checkpoint={"resume": False, "save_at_end": False})
    validate(cfg, 1, with_data=False)
    return cfg


LOSS_CHECK_KEYS = ("status", "reason", "auto_backend", "reference", "pack_tokens", "pack_samples", "loss_auto",
                   "loss_sdpa", "abs_diff", "rtol", "tolerance", "per_token_max_abs_diff", "per_token_mean_abs_diff",
                   "rule")


def loss_check_result(rtol: float, status: str, reason: str | None = None, **fields) -> dict:
    return {**{k: None for k in LOSS_CHECK_KEYS}, "reference": "sdpa", "rtol": rtol,
            "rule": "|loss_auto - loss_sdpa| <= rtol * |loss_sdpa|: forward only, the same seed, the same pack",
            **fields, "status": status, "reason": reason}


class Bench:
    """The benchmark and loss-check steps on one runtime, one Trainer per (backend, recompute) at a time."""

    def __init__(self, args, report: Report, deadline: Deadline, device: str):
        import torch

        from megalign.data.sampler import PackRef
        from megalign.model.arithmetic import parameter_count, step_flops
        from megalign.model.attention import available_backends, resolve_backend
        from megalign.parallel.setup import initialize

        self.torch, self.args, self.report, self.deadline, self.device = torch, args, report, deadline, device
        self.PackRef, self.step_flops = PackRef, step_flops
        self.model = MODEL_DRY if args.dry_run else MODEL_1B
        self.workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.packs, self.index = make_packs(args.lengths, args.mixes, self.model["vocab_size"],
                                            min(CHECK_TOKENS, max(args.lengths)))
        cfg = model_config(self.model, "sdpa", "none", self.workdir, device)
        self.runtime = initialize(cfg, device)
        self.available = available_backends()
        self.auto = resolve_backend("auto")
        env = report.data["environment"]
        env["backends_available"], env["auto_backend"] = self.available, self.auto
        from megalign.config import resolve

        m = resolve(cfg).model
        report.data["model"] = {**{k: getattr(m, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                              "num_attention_heads", "num_query_groups",
                                                              "kv_channels", "vocab_size", "max_position_embeddings",
                                                              "rotary_base")},
                                "name": "tiny (dry run)" if args.dry_run else "llama-shaped ~1B",
                                "parameters": parameter_count(m, m.padded_vocab_size),
                                "params_dtype": str(self.runtime.params_dtype).replace("torch.", ""),
                                "padded_vocab_size": m.padded_vocab_size}
        self.padded_vocab = m.padded_vocab_size
        self.peak = env["bf16_peak_tflops"]
        self.matmul = (env.get("measured_matmul") or {}).get("tflops")
        self.rates: dict[str, float] = {}  # backend -> best FLOP/s measured
        self.build_seconds: float | None = None
        self.check_losses: dict[str, dict] = {}

    # -- building and freeing ----------------------------------------------------------------------------------
    def build(self, backend: str, recompute: str):
        from megalign.training.trainer import Trainer

        started = time.monotonic()
        cfg = model_config(self.model, backend, recompute, self.workdir, self.device)
        trainer = Trainer(cfg, datasets=[self.packs], runtime=self.runtime)
        sync(self.torch, self.device)
        self.build_seconds = max(self.build_seconds or 0.0, time.monotonic() - started)
        return trainer

    def expected_build(self) -> float:
        """Seconds a model build takes: the slowest measured so far, else 30 s on GPU (5 s for the tiny CPU one)."""
        return self.build_seconds or (5.0 if self.device == "cpu" else 30.0)

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def memory(self) -> tuple[float | None, float | None]:
        if self.device != "cuda":
            return None, None
        return (round(self.torch.cuda.memory_allocated() / 2 ** 30, 2),
                round(self.torch.cuda.max_memory_allocated() / 2 ** 30, 2))

    # -- the loss check --------------------------------------------------------------------------------------
    def check_loss(self, trainer, backend: str) -> None:
        """Forward-only loss (the objective's, through the trainer) and per-token losses of the check pack."""
        torch = self.torch
        ref = self.PackRef(0, self.index[("check", min(CHECK_TOKENS, max(self.args.lengths)), "mixed")])
        loss = trainer.forward_backward([ref], forward_only=True)["loss"]
        batch = trainer.batches.build(ref).to(self.runtime.device)
        module = trainer.model.module
        module.eval()
        with torch.no_grad():
            per_token = module(input_ids=batch.tokens[None], position_ids=batch.position_ids[None],
                               attention_mask=None, labels=batch.labels[None],
                               packed_seq_params=batch.packed_seq_params())
        module.train()
        self.check_losses[backend] = {"loss": float(loss), "per_token": per_token.float().reshape(-1).cpu()}

    def loss_check(self) -> dict:
        rtol = self.args.loss_rtol
        tokens = min(CHECK_TOKENS, max(self.args.lengths))
        out = loss_check_result(rtol, "skipped", auto_backend=self.auto, pack_tokens=tokens,
                                pack_samples=len(pack_lengths(tokens, "mixed")))
        if self.auto not in self.check_losses or "sdpa" not in self.check_losses:
            pending = dict.fromkeys(b for b in (self.auto, "sdpa") if b not in self.check_losses)
            out["reason"] = f"not measured under {', '.join(pending)}"
            return out
        a, s = self.check_losses[self.auto], self.check_losses["sdpa"]
        diff = abs(a["loss"] - s["loss"])
        token_diff = (a["per_token"] - s["per_token"]).abs()
        out.update(loss_auto=a["loss"], loss_sdpa=s["loss"], abs_diff=diff, tolerance=rtol * abs(s["loss"]),
                   per_token_max_abs_diff=float(token_diff.max()), per_token_mean_abs_diff=float(token_diff.mean()))
        out["status"] = "pass" if diff <= rtol * abs(s["loss"]) else "fail"
        if self.auto == "sdpa":
            out["reason"] = "auto resolves to sdpa here: the same model, trivially equal"
        return out

    # -- one benchmark config ----------------------------------------------------------------------------------
    def run_config(self, trainer, backend: str, tokens: int, mix: str, recompute: str, reserve_s: float) -> dict:
        torch, args = self.torch, self.args
        lengths = pack_lengths(tokens, mix)
        flops = self.step_flops(trainer.cfg.model, self.padded_vocab, lengths)
        base = dict(backend=backend, pack_tokens=tokens, mix=mix, samples=len(lengths), longest_sample=max(lengths),
                    recompute=recompute, warmup_steps=args.warmup, timed_steps=args.steps,
                    model_tflop_per_step=sig(flops / 1e12))
        prior = 0.3 * (self.peak or 100.0) * 1e12 if self.device == "cuda" else 1e10
        rate = self.rates.get(backend) or (max(self.rates.values()) if self.rates else None)
        estimate = estimate_seconds(flops * (4 / 3 if recompute == "full" else 1), args.warmup + args.steps,
                                    rate, prior)
        if not self.deadline.allows(estimate, reserve_s):
            return row(**base, status="skipped",
                       note=f"deadline: estimated {estimate:.0f} s (+{reserve_s:.0f} s kept back), "
                            f"{self.deadline.left():.0f} s left")
        ref = self.PackRef(0, self.index[("bench", tokens, mix)])
        oom_types = tuple({getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError})
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        static, _ = self.memory()
        times, losses, failure = [], [], None
        try:
            for i in range(args.warmup + args.steps):
                if tokens in args.fake_oom and recompute == "none":  # plumbing test of the OOM path
                    raise oom_types[0]("fake out-of-memory (--fake-oom)")
                sync(torch, self.device)
                started = time.perf_counter()
                figures = trainer.forward_backward([ref])
                trainer.optimizer_step(figures["loss"])
                sync(torch, self.device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - started)
                    losses.append(figures["loss"])
        except oom_types as e:
            failure = ("oom", one_line(e))
        except Exception as e:  # a backend that fails here is a result, not the end of the check
            failure = ("error", one_line(e))
            traceback.print_exc()
        _, peak = self.memory()
        if failure is not None:
            trainer.zero_grad()
            self.free()
            return row(**base, status=failure[0], note=failure[1], peak_memory_gib=peak, static_memory_gib=static)
        median = statistics.median(times)
        tflops = flops / median / 1e12
        self.rates[backend] = max(self.rates.get(backend, 0.0), flops / median)
        return row(**base, status="ok", step_seconds=[sig(t) for t in times], median_step_s=sig(median),
                   tokens_per_s=round(tokens / median, 1), tflops_per_gpu=sig(tflops),
                   mfu=round(tflops / self.peak, 4) if self.peak else None,
                   mfu_vs_matmul=round(tflops / self.matmul, 4) if self.matmul and self.device == "cuda" else None,
                   peak_memory_gib=peak, static_memory_gib=static, loss=round(losses[-1], 5))

    # -- the whole step ----------------------------------------------------------------------------------------
    def reserve(self, backend: str) -> float:
        """Seconds kept back for the loss-check models still to be built after `backend`'s benchmarks."""
        pending = [b for b in (self.auto, "sdpa") if b not in self.check_losses and b != backend]
        return len(pending) * (1.5 * self.expected_build() + 10.0)

    def run(self, backends: list[str]) -> None:
        rows = self.report.data["benchmarks"]
        configs = [(n, mix) for n in self.args.lengths for mix in self.args.mixes]
        for backend in backends:
            benchmark = self.args.backends is None or backend in self.args.backends
            if not self.deadline.allows(1.5 * self.expected_build()):
                self.report.note(f"deadline: {backend} not built ({self.deadline.left():.0f} s left)")
                rows += [row(backend=backend, pack_tokens=n, mix=mix, recompute="none", status="skipped",
                             note="deadline: backend not built") for n, mix in configs if benchmark]
                continue
            try:
                trainer = self.build(backend, "none")
            except Exception as e:
                self.report.note(f"{backend}: the model could not be built: {one_line(e)}")
                traceback.print_exc()
                rows += [row(backend=backend, pack_tokens=n, mix=mix, recompute="none", status="error",
                             note=f"build: {one_line(e)}") for n, mix in configs if benchmark]
                self.free()
                continue
            if backend in (self.auto, "sdpa"):
                try:
                    self.check_loss(trainer, backend)
                except Exception as e:
                    self.report.note(f"loss check under {backend} failed: {one_line(e)}")
                    traceback.print_exc()
                self.report.data["loss_check"] = self.loss_check()
                self.report.write()
            oom = []
            if benchmark:
                for n, mix in configs:
                    r = self.run_config(trainer, backend, n, mix, "none", self.reserve(backend))
                    rows.append(r)
                    self.print_row(r)
                    self.report.write()
                    if r["status"] == "oom":
                        oom.append((n, mix))
            del trainer
            self.free()
            if oom and self.args.retry_oom:
                if not self.deadline.allows(1.5 * self.expected_build(), self.reserve(backend)):
                    self.report.note(f"{backend}: no time to measure the OOM configs with recompute=full")
                    continue
                trainer = self.build(backend, "full")
                for n, mix in oom:
                    r = self.run_config(trainer, backend, n, mix, "full", self.reserve(backend))
                    rows.append(r)
                    self.print_row(r)
                    self.report.write()
                del trainer
                self.free()
        self.report.data["loss_check"] = self.loss_check()

    @staticmethod
    def print_row(r: dict) -> None:
        if r["status"] == "ok":
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
            print(f"  {r['backend']:>5} {r['pack_tokens']:>6} {r['mix']:<6} {r['recompute']:<4} "
                  f"{r['median_step_s']:.3f} s  {r['tokens_per_s']:>10,.0f} tok/s  {r['tflops_per_gpu']:7.1f} TFLOP/s  "
                  f"MFU {mfu}  peak {mem}", flush=True)
        else:
            print(f"  {r['backend']:>5} {r['pack_tokens']:>6} {r['mix']:<6} {r['recompute']:<4} {r['status']}: "
                  f"{r['note']}", flush=True)


# -- main -----------------------------------------------------------------------------------------------------------
def code_state() -> str:
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        from common import code_state as state

        return state()
    except Exception as e:  # no git on the GPU machine, or no .git in the copy
        return f"megalign (commit unknown: {one_line(e)})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, packs of 128 and 256 tokens, 1 step")
    p.add_argument("--wheel", action="append", default=[], help="a wheel or a folder of wheels to install when "
                   "megatron-core/omegaconf are missing (repeatable; default: wheels/ and .whl/ of the repository)")
    p.add_argument("--site-dir", default=os.path.join(tempfile.gettempdir(), "gpu_check_site"),
                   help="where the wheels are installed (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole check (default 420; dry run 300)")
    p.add_argument("--grace-s", type=float, default=45.0, help="the watchdog ends the run this long after the budget")
    p.add_argument("--tests-timeout-s", type=float, default=120.0)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--lengths", default=None, help="pack tokens, comma-separated (default 8192,32768,65536)")
    p.add_argument("--mixes", default="single,mixed")
    p.add_argument("--backends", default=None, help="benchmark only these (comma-separated; the loss check still "
                   "builds auto's backend and sdpa)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per config (default 2; dry run 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5; dry run 1)")
    p.add_argument("--loss-rtol", type=float, default=5e-3, help="the loss check's relative tolerance (bf16's unit "
                   "roundoff is 2^-8 = 3.9e-3; default %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak, if not in the table")
    p.add_argument("--no-retry-oom", dest="retry_oom", action="store_false",
                   help="do not measure OOM configs again with model.recompute=full")
    p.add_argument("--fake-oom", default="", help=argparse.SUPPRESS)  # pack sizes that raise OOM (plumbing tests)
    args = p.parse_args(argv)
    dry = args.dry_run
    args.budget_s = args.budget_s if args.budget_s is not None else (300.0 if dry else 420.0)
    args.lengths = [int(x) for x in (args.lengths or ("128,256" if dry else "8192,32768,65536")).split(",")]
    args.mixes = [m for m in args.mixes.split(",") if m]
    for m in args.mixes:
        pack_lengths(8, m)  # a clear error for an unknown mix
    args.backends = None if args.backends is None else [b for b in args.backends.split(",") if b]
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 2)
    args.steps = args.steps if args.steps is not None else (1 if dry else 5)
    args.fake_oom = {int(x) for x in args.fake_oom.split(",") if x}
    return args


def summary(data: dict) -> None:
    env, tests, check = data["environment"], data["tests"], data["loss_check"]
    print(f"\n== gpu_check ({'dry run, ' if data['dry_run'] else ''}{data['wall_s']} s of {data['budget_s']:.0f}) "
          f"{data['code']}")
    print(f"environment: python {env.get('python')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
          f"{env.get('gpu_name') or env.get('device')}, bf16 peak {env.get('bf16_peak_tflops')} TFLOP/s, "
          f"matmul {(env.get('measured_matmul') or {}).get('tflops')} TFLOP/s, megatron-core "
          f"{env.get('megatron_core')}, backends {env.get('backends_available')} (auto: {env.get('auto_backend')})")
    if data["setup"].get("missing"):
        print(f"missing: {', '.join(data['setup']['missing'])}")
    print(f"tests: {tests.get('status')}" + (f" ({tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
                                             f"errors, {tests['skipped']} skipped, {tests['seconds']} s)"
                                             if tests.get("tests") is not None else "")
          + (f": {tests['reason']}" if tests.get("reason") else ""))
    ok = [r for r in data["benchmarks"] if r["status"] == "ok"]
    others = [r for r in data["benchmarks"] if r["status"] != "ok"]
    if ok:
        print("| backend | pack | mix | recompute | tokens/s | TFLOP/s | MFU | peak GiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in ok:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"| {r['backend']} | {r['pack_tokens']} | {r['mix']} | {r['recompute']} | {r['tokens_per_s']:,.0f} "
                  f"| {r['tflops_per_gpu']:.1f} | {mfu} | {r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-'} |")
    for r in others:
        print(f"  {r['backend']} {r['pack_tokens']} {r['mix']} {r['recompute']}: {r['status']} ({r['note']})")
    if check:  # always a dict of LOSS_CHECK_KEYS
        print(f"loss check: {check['status']}" + (
            f" (auto={check['auto_backend']} {check['loss_auto']:.6f} vs sdpa {check['loss_sdpa']:.6f}, "
            f"|diff| {check['abs_diff']:.2e} <= {check['tolerance']:.2e}?)" if check["loss_auto"] is not None
            else "") + (f": {check['reason']}" if check.get("reason") else ""))
    print(f"ok: {data['ok']}; JSON: {data['out']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    deadline = Deadline(args.budget_s)
    out = Path(args.out).absolute()
    data = {"schema": SCHEMA, "dry_run": args.dry_run, "out": str(out),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": None, "budget_s": args.budget_s,
            "code": None, "argv": sys.argv[1:] if argv is None else list(argv),
            "settings": {"lengths": args.lengths, "mixes": args.mixes, "warmup": args.warmup, "steps": args.steps,
                         "loss_rtol": args.loss_rtol, "retry_oom": args.retry_oom},
            "setup": {}, "environment": {}, "model": {}, "tests": tests_result("skipped", "not reached"),
            "benchmarks": [], "loss_check": loss_check_result(args.loss_rtol, "skipped", "not reached"),
            "notes": [], "ok": None}
    report = Report(out, data)

    def finish() -> None:
        data["wall_s"] = round(deadline.elapsed(), 1)
        tests, check = data["tests"], data["loss_check"]
        data["ok"] = (tests["status"] == "ok" or tests["reason"] == "--skip-tests") and check["status"] == "pass"
        report.write()

    def watchdog() -> None:
        report.note(f"watchdog: the budget ({args.budget_s:.0f} s) + grace ({args.grace_s:.0f} s) ran out; "
                    "ending with what was measured")
        try:
            finish()
            summary(data)
        finally:
            os._exit(3)

    timer = threading.Timer(args.budget_s + args.grace_s, watchdog)
    timer.daemon = True
    timer.start()
    try:
        run_steps(args, report, deadline)
    finally:
        timer.cancel()
        finish()
    summary(data)
    return 0 if data["ok"] else 1


def run_steps(args, report: Report, deadline: Deadline) -> None:
    data = report.data
    # 1. setup
    data["code"] = code_state()
    data["setup"] = setup_packages(find_wheels(args.wheel), Path(args.site_dir), report)
    missing = sorted(set(missing_for("benchmarks")) | set(missing_for("tests")))
    data["setup"]["missing"] = missing
    for m in missing:
        steps = [s for s in NEEDS if m in NEEDS[s]]
        report.note(f"missing: {m} (no wheel for it installed; --wheel PATH): {' and '.join(steps)} skipped")
    if "torch" in missing:
        data["environment"] = {"python": platform.python_version(), "torch": None}
        return
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        report.note("CUDA is not available: nothing to measure (--dry-run checks the plumbing on CPU)")
        data["environment"] = environment(torch, "cpu", args.peak_tflops)
        return

    # 2. environment
    data["environment"] = environment(torch, device, args.peak_tflops)
    try:
        data["environment"]["measured_matmul"] = measure_matmul(torch, device)
    except Exception as e:
        report.note(f"matmul measurement failed: {one_line(e)}")
    if device == "cuda" and data["environment"]["bf16_peak_tflops"] is None:
        report.note(f"no bf16 peak known for {data['environment']['gpu_name']}: MFU is null (--peak-tflops)")
    report.write()

    # 3. tests (before any model takes GPU memory)
    if args.skip_tests:
        data["tests"] = tests_result("skipped", "--skip-tests")
    elif missing_for("tests"):
        data["tests"] = tests_result("skipped", f"missing: {', '.join(missing_for('tests'))}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data["tests"] = run_gpu_tests(max(10.0, min(args.tests_timeout_s, deadline.left() - 60)), Path(tmp))
    report.write()
    print(f"gpu_check: tests {data['tests']['status']} ({deadline.elapsed():.0f} s)", flush=True)

    # 4./5. benchmarks and the loss check
    if missing_for("benchmarks"):
        data["loss_check"] = loss_check_result(args.loss_rtol, "skipped",
                                               f"missing: {', '.join(missing_for('benchmarks'))}")
        return
    bench = None
    try:
        bench = Bench(args, report, deadline, device)
        bench.run(backend_order(bench.available, bench.auto, args.backends))
    except Exception as e:
        report.note(f"benchmarks stopped: {one_line(e)}")
        traceback.print_exc()
        if data["loss_check"]["loss_auto"] is None:
            data["loss_check"]["reason"] = f"benchmarks stopped: {one_line(e)}"
    finally:
        try:
            from megalign.parallel.setup import shutdown

            shutdown()
        except Exception as e:
            report.note(f"shutdown: {one_line(e)}")
        if bench is not None:
            shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
