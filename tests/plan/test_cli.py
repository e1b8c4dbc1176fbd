"""`python -m megalign.plan` and tools/plan.py end to end: the table, the JSON, one-line errors naming the option."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_plan(*args, tool=False):
    command = [str(ROOT / "tools" / "plan.py")] if tool else ["-m", "megalign.plan"]
    return subprocess.run([sys.executable, *command, *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_a_preset_on_two_nodes():
    done = run_plan("--preset", "llama2-7b", "--seq-length", 65536, "model.max_position_embeddings=65536",
                    "--gpu", "h100-80g", "--nodes", 2, "--top", 5)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("model: llama2-7b, 6.74B parameters")
    assert "cluster: 2 x 8 h100-80g (79.6 GiB, 71.7 usable with 10% headroom)" in out
    assert "layouts fit, the best 5:" in out
    rows = [line for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert len(rows) == 5
    assert "tp16 pp1 cp1 dp1 sp none/selective/full: tp=16 would span nodes" in out
    assert "memory " in out and "GiB usable" in out


def test_json_through_the_tool():
    done = run_plan("--preset", "llama3-8b", "--seq-length", 8192, "--gpu", "a800-80g", "--nodes", 1,
                    "--gpus-per-node", 8, "--global-batch", 16, "--recompute", "none,full", "--json", "--top", 0,
                    tool=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["cluster"] == {"gpu": "a800-80g", "memory_gib": 80.0, "nodes": 1, "gpus_per_node": 8,
                                 "usable_gib": 72.0}
    assert result["workload"]["global_batch"] == 16
    assert {r["recompute"] for r in result["fitting"] + result["excluded"]} == {"none", "full"}
    for r in result["fitting"]:
        assert r["memory"]["total_gib"] <= 72.0
        assert r["tokens_per_second_per_gpu"] > 0
    seconds = [r["step_seconds"]["total"] for r in result["fitting"]]
    assert seconds == sorted(seconds)


def test_a_dataset_and_a_config(dataset, tmp_path):
    config = tmp_path / "model.yaml"
    config.write_text("model:\n  num_layers: 4\n  hidden_size: 128\n  ffn_hidden_size: 352\n"
                      "  num_attention_heads: 4\n  num_query_groups: 2\ntraining:\n  global_batch: 4\n")
    done = run_plan("--config", config, "--data", dataset, "--gpu", "h100-80g", "--gpu-memory", 1, "--nodes", 1,
                    "--gpus-per-node", 2)
    assert done.returncode == 0, done.stderr
    assert f"data: {dataset} (" in done.stdout and "packs of up to 1,024 tokens" in done.stdout
    assert "global batch 4 packs" in done.stdout and "(1.0 GiB, 0.9 usable" in done.stdout


def test_a_hugging_face_config(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    done = run_plan("--hf-config", tmp_path, "--seq-length", 16384, "model.max_position_embeddings=16384",
                    "--nodes", 1)
    assert done.returncode == 0, done.stderr
    assert "22 layers, hidden 2048, 32 heads / 4 KV groups, vocabulary 32,000" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["--preset", "llama2-7b", "--seq-length", 4096, "--gpu", "v100"], "error: --gpu 'v100' is unknown; one of"),
    (["--preset", "llama2-7b", "--seq-length", 4096, "--nodes", 0], "error: --nodes must be >= 1, got 0"),
    (["--preset", "llama2-7b", "--seq-length", 0], "error: --seq-length 0 must be >= 1"),
    (["--preset", "llama2-7b"], "error: give --data PREFIX (a dataset made by tools/preprocess_data.py) or "
                                "--seq-length N"),
    (["--seq-length", 4096], "error: give exactly one of --preset, --hf-config, --config"),
    (["--preset", "gpt5", "--seq-length", 4096], "error: --preset 'gpt5' is unknown; one of tiny, llama2-7b"),
    (["--preset", "llama2-7b", "--seq-length", 65536], "error: packs of 65,536 tokens are longer than "
                                                       "model.max_position_embeddings=4096"),
    (["--preset", "tiny", "--seq-length", 1024], "error: config key model.vocab_size is unset: set it"),
    (["--preset", "llama2-7b", "--seq-length", 4096, "--recompute", "half"], "error: --recompute 'half': give"),
    (["--preset", "llama2-7b", "--seq-length", 4096, "--mfu", 0], "error: --mfu 0.0 must be in (0, 1]"),
    (["--preset", "llama2-7b", "--data", "/missing/ds"], "error: /missing/ds.json not found"),
    (["--preset", "llama2-7b", "--seq-length", 4096, "model.num_layers"], "error: override 'model.num_layers' is "
                                                                          "not key=value"),
    (["--preset", "llama2-7b", "--seq-length", 4096, "--gpu-memory", -1], "error: --gpu-memory -1.0 must be > 0"),
    (["--config", "/missing.yaml", "--seq-length", 4096], "error: --config /missing.yaml: no such file"),
])
def test_bad_input_is_one_line_naming_the_option(args, message):
    done = run_plan(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
