"""megalign-submit without a cluster: what it writes (--dry-run), and the submissions it refuses before sbatch.

A fake `sbatch` on PATH records every call, so "refused before sbatch" is checked, not assumed."""

import os
import subprocess

import pytest
import yaml

from megalign.launch.profiles import available, load_profile
from megalign.errors import MegalignError
from tests.launch.conftest import megalign_submit, write_config


@pytest.fixture
def fake_sbatch(tmp_path):
    """A PATH whose sbatch appends its arguments to a file and answers with job id 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho 4242\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def test_the_shipped_profiles_load():
    assert {"a800-ib", "h100-ib", "local-cpu"} <= set(available())
    a800 = load_profile("a800-ib")
    assert a800.gpus_per_node == 8 and a800.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert {"NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_IB_TIMEOUT", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "TORCH_NCCL_DUMP_ON_TIMEOUT"} <= set(a800.env)
    assert load_profile("local-cpu").gpus_per_node == 0


def test_a_bad_profile_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("gpus_per_node: 8\nnccl_env: {}\n")
    with pytest.raises(MegalignError, match=r"mine.yaml: key nccl_env: .*not in"):
        load_profile(str(bad))
    bad.write_text("gpus_per_node: eight\n")
    with pytest.raises(MegalignError, match=r"mine.yaml: key gpus_per_node"):
        load_profile(str(bad))


def test_users_add_profiles_in_a_directory_of_their_own(tmp_path, monkeypatch):
    (tmp_path / "ours.yaml").write_text("gpus_per_node: 4\ncpus_per_node: 32\npartition: long\n")
    monkeypatch.setenv("MEGALIGN_CLUSTERS", str(tmp_path))
    ours = load_profile("ours")
    assert (ours.name, ours.gpus_per_node, ours.partition) == ("ours", 4, "long")


def test_dry_run_prints_the_script_for_the_allocation_and_writes_nothing(dataset, tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", dataset, run, parallel={"tp": 8},
                          model={"num_attention_heads": 8, "num_query_groups": 8, "hidden_size": 128})
    profile = tmp_path / "gpu.yaml"
    ours = yaml.safe_load(available()["a800-ib"].read_text())
    ours.update(partition="batch", container={"image": "/images/megalign.sqsh", "mounts": ["/data:/data"]})
    profile.write_text(yaml.safe_dump(ours))
    done = megalign_submit("train", "--cluster", str(profile), "--nodes", "2", "--time", "2:00:00", "--dry-run",
                           "--config", str(config), "training.global_batch=2", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=2:00:00", "#SBATCH --partition=batch",
                 "#SBATCH --signal=USR1@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={run}/logs/slurm-%j.out", "#SBATCH --exclusive",
                 'export CUDA_DEVICE_MAX_CONNECTIONS="1"', 'export MEGALIGN_CONTAINER_IMAGE="/images/megalign.sqsh"',
                 'export TORCH_FR_DUMP_TEMP_FILE="$MEGALIGN_RUN_DIR/nccl_trace/rank_"',
                 f"set -- --config {config} parallel.timeout_minutes=20 training.global_batch=2",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    assert "(tp 8, pp 1, cp 1, dp 2)" in script
    assert not run.exists() and not calls.exists()


def test_the_submitted_script_is_written_into_the_run_directory(dataset, tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", dataset, run, parallel={"tp": 2})
    done = megalign_submit("train", "--cluster", "local-cpu", "--nodes", "2", "--tasks-per-node", "2",
                           "--config", str(config), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4242"]
    written, = (run / "slurm").glob("train-*.sbatch")
    assert calls.read_text().split() == ["--parsable", str(written)]
    assert (run / "logs").is_dir()  # Slurm does not make --output's directory
    bash = subprocess.run(["bash", "-n", str(written)], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr


@pytest.mark.parametrize("args, overrides, message", [
    (["--nodes", "3", "--tasks-per-node", "1"], ["parallel.tp=2"],
     "parallel.tp*pp*cp = 2 must divide the world size 3"),
    (["--nodes", "2", "--tasks-per-node", "2"], ["training.global_batch=3"],
     "training.global_batch=3 must be a multiple of the data-parallel size 4"),
    (["--nodes", "1"], ["data.path=/nowhere/ds"], "/nowhere/ds"),
    (["--nodes", "1"], ["checkpoint.init_from=/nowhere/ckpt"], "/nowhere/ckpt"),
    (["--nodes", "1", "--gpus-per-node", "2"], [], "--gpus-per-node local-cpu is a CPU-only cluster profile"),
])
def test_bad_submissions_are_refused_before_sbatch_as_one_line(dataset, tmp_path, fake_sbatch, args, overrides,
                                                               message):
    env, calls = fake_sbatch
    config = write_config(tmp_path / "c.yaml", dataset, tmp_path / "run")
    done = megalign_submit("train", "--cluster", "local-cpu", *args, "--config", str(config), *overrides,
                           cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert not calls.exists()


def test_an_unknown_profile_is_refused_naming_the_known_ones(dataset, tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    config = write_config(tmp_path / "c.yaml", dataset, tmp_path / "run")
    done = megalign_submit("train", "--cluster", "a900", "--nodes", "1", "--config", str(config), cwd=tmp_path,
                           env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--cluster 'a900' is not a cluster profile; known: a800-ib, h100-ib, local-cpu" in done.stderr
    assert not calls.exists()


def test_a_chain_checks_the_preprocessing_against_the_config(dataset, bpe_tokenizer_dir, tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    config = write_config(tmp_path / "c.yaml", tmp_path / "new_ds", tmp_path / "run")
    (tmp_path / "in.jsonl").write_text("")
    common = ["train", "--cluster", "local-cpu", "--nodes", "1", "--config", str(config)]
    prep = f"--input {tmp_path / 'in.jsonl'} --tokenizer {bpe_tokenizer_dir} --chat-template chatml"
    refused = {
        f"{prep} --seq-length 2048": "--seq-length 2048 is longer than config key model.max_position_embeddings=1024",
        f"{prep} --seq-length 1024 --output-prefix {tmp_path / 'other'}": "but config key data.path is",
        f"--input {tmp_path / 'missing.jsonl'} --tokenizer {bpe_tokenizer_dir} --chat-template chatml "
        "--seq-length 1024": "--input " + str(tmp_path / "missing.jsonl") + ": no such file",
    }
    for args, message in refused.items():
        done = megalign_submit(*common, "--preprocess", args, cwd=tmp_path, env=env)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not calls.exists()
    done = megalign_submit(*common, "--preprocess", f"{prep} --seq-length 1024", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    first, second = calls.read_text().splitlines()
    assert first.split()[-1].endswith(".sbatch") and "preprocess-" in first
    assert "--dependency=afterok:4242 --kill-on-invalid-dep=yes" in second and "train-" in second


def test_an_evaluation_job_is_checked_and_written_beside_its_output(dataset, tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    (tmp_path / "model").mkdir()
    common = ["eval", "--cluster", "h100-ib", "--"]
    refused = {
        ("--model", str(tmp_path / "model"), "--tasks", "needle,nope", "--out", "o"): "--tasks nope: unknown",
        ("--model", str(tmp_path / "gone"), "--tasks", "needle", "--out", "o"): "--model " + str(tmp_path / "gone"),
        ("--model", str(tmp_path / "model"), "--tasks", "longbench", "--longbench-dir", "/nowhere", "--out", "o"):
            "--longbench-dir /nowhere: no such file",
    }
    for args, message in refused.items():
        done = megalign_submit(*common, *args, cwd=tmp_path, env=env)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not calls.exists()
    done = megalign_submit("eval", "--cluster", "h100-ib", "--after", "77", "--", "--model", str(tmp_path / "model"),
                           "--backend", "vllm", "--tensor-parallel", "4", "--tasks", "needle", "--out",
                           str(tmp_path / "ev"), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    written, = (tmp_path / "ev" / "slurm").glob("eval-*.sbatch")
    script = written.read_text()
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --signal=B:USR1@" in script
    assert "--tensor-parallel 4" in script and 'megalign.eval --no-progress "$@"' in script
    assert calls.read_text().split() == ["--parsable", "--dependency=afterok:77", "--kill-on-invalid-dep=yes",
                                         str(written)]
    assert subprocess.run(["bash", "-n", str(written)]).returncode == 0


def test_training_with_eval_queues_the_evaluation_of_its_checkpoints_after_it(dataset, tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", dataset, run)
    done = megalign_submit("train", "--cluster", "local-cpu", "--nodes", "1", "--config", str(config), "--eval",
                           "--tasks needle --all-checkpoints", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    train_call, eval_call = calls.read_text().splitlines()
    assert "train-" in train_call and "--dependency=afterok:4242" in eval_call
    written, = (run / "eval" / "slurm").glob("eval-*.sbatch")
    assert f"--model {run / 'checkpoints'}" in written.read_text()  # it need not exist yet


def test_sharded_preprocessing_is_an_array_then_a_merge_then_training(dataset, bpe_tokenizer_dir, tmp_path,
                                                                       fake_sbatch):
    env, calls = fake_sbatch
    config = write_config(tmp_path / "c.yaml", tmp_path / "new_ds", tmp_path / "run")
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    prep = f"--input {tmp_path / 'docs.jsonl'} --tokenizer {bpe_tokenizer_dir} --seq-length 1024"
    common = ["train", "--cluster", "local-cpu", "--nodes", "1", "--config", str(config)]
    for args, message in {("--preprocess-shards", "2"): "--preprocess-shards shards the --preprocess job: give "
                                                        "--preprocess too",
                          ("--preprocess-shards", "2", "--preprocess", f"{prep} --shard 0/2"): "--shard is set per "
                                                                                               "array task"}.items():
        done = megalign_submit(*common, *args, cwd=tmp_path, env=env)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not calls.exists()
    done = megalign_submit(*common, "--preprocess-shards", "3", "--preprocess", prep, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    array, merge, train = calls.read_text().splitlines()
    assert "--dependency" not in array and "afterok:4242" in merge and "afterok:4242" in train
    slurm_dir = tmp_path / "run" / "slurm"
    prep_script = next(slurm_dir.glob("preprocess-*.sbatch")).read_text()
    merge_script = next(slurm_dir.glob("merge-*.sbatch")).read_text()
    assert "#SBATCH --array=0-2" in prep_script and "preprocess-%A_%a.out" in prep_script
    assert prep_script.count("--shard slurm") == 1 and "megalign.preprocess" in prep_script
    assert f"set -- --output-prefix {tmp_path / 'new_ds'}" in merge_script and "megalign.merge" in merge_script
    for script in slurm_dir.glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
