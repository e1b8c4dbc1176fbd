"""Both halves of preference training together, as a user runs them: preference records preprocessed by
tools/preprocess_data.py into groups, then `python -m megalign.train` with a preference objective reads them
(shared prompts, LOGO positions) and logs the objective's figures in metrics.jsonl; a dataset's reference scores
reach dpo; sft on preference data is refused before training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megalign.data import synthetic
from megalign.data.cli import preprocess_main

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {"chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "nll", "groups"}


@pytest.fixture(scope="module")
def preference_dataset(tmp_path_factory, bpe_tokenizer_dir):
    out = tmp_path_factory.mktemp("preference_run")
    records = synthetic.make_preference_example(out, n=12, min_words=40, max_words=160, rejected=2, reference=True,
                                                seed=4)
    preprocess_main(["--input", str(records), "--tokenizer", str(bpe_tokenizer_dir), "--chat-template", "chatml",
                     "--seq-length", "1024", "--output-prefix", str(out / "groups"), "--no-progress"])
    return str(out / "groups")


def train(dataset, out, *overrides):
    return subprocess.run([sys.executable, "-m", "megalign.train", "--config", str(ROOT / "examples" / "tiny.yaml"),
                           f"data.path={dataset}", f"run.output_dir={out}", "training.steps=2",
                           "training.global_batch=2", "run.tensorboard=false", *overrides],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("overrides", [("training.objective=logo", "data.positions=logo", "data.logo_window=1024",
                                        "data.logo_chunk=64"),
                                       ("training.objective=dpo", "data.prompt=duplicate")])
def test_preprocessed_groups_train_and_log_the_preference_figures(preference_dataset, tmp_path, overrides):
    done = train(preference_dataset, tmp_path / "run", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(FIGURES <= set(r) and r["groups"] >= 2 for r in records), records[0]
    assert all(0 <= r["reward_accuracy"] <= 1 for r in records)


def test_sft_on_preference_data_is_refused_naming_the_objective(preference_dataset, tmp_path):
    done = train(preference_dataset, tmp_path / "run")
    assert done.returncode != 0 and "objective" in done.stderr.splitlines()[-1], done.stderr[-2000:]
