"""The offline reference scoring pass (tools/score_reference.py, training/reference.py): a tiny HF Llama imported
into megalign scores preprocessed preference groups; the scores are the HF model's own log-prob sums of each
prompt + response run alone, the same at TP=1 and TP=2 (torchrun, gloo); a dpo run reads them; a stale or damaged
score file is a clear error; LongPO's short-prompt scoring writes the short dataset's scores for the long one."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalign.data import format as fmt
from megalign.data import synthetic
from megalign.data.cli import preprocess_main
from megalign.data.groups import CHOSEN, PROMPT
from megalign.data.packed_dataset import PackedDataset
from megalign.errors import MegalignError
from megalign.training import reference

ROOT = Path(__file__).resolve().parents[2]


def preprocess(records: Path, tokenizer, prefix: Path, *extra):
    preprocess_main(["--input", str(records), "--tokenizer", str(tokenizer), "--chat-template", "chatml",
                     "--seq-length", "512", "--output-prefix", str(prefix), "--no-progress", *extra])
    return str(prefix)


def shortened(records: Path, out: Path, change_answer: bool = False) -> Path:
    """The same records with each prompt cut to its pass-key sentence and question (LongPO's short context)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in records.read_text().splitlines():
        r = json.loads(line)
        q = r["messages"][0]["content"]
        r["messages"][0]["content"] = re.search(r"The pass key is \d+\. Remember it\.", q).group() + \
            "\n\nWhat is the pass key?"
        if change_answer:
            r["chosen"] = r["chosen"] + " Sure."
        lines.append(json.dumps(r))
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def work(tiny_hf_model, bpe_tokenizer_dir, tmp_path_factory):
    from megatron.core import parallel_state

    from megalign.convert import import_hf
    from megalign.parallel.setup import shutdown

    out = tmp_path_factory.mktemp("reference_scoring")
    if parallel_state.model_parallel_is_initialized():
        shutdown()
    import_hf(tiny_hf_model, out / "imported")
    if parallel_state.model_parallel_is_initialized():
        shutdown()  # the import's single-process world
    records = synthetic.make_preference_example(out / "long", n=6, min_words=30, max_words=90, rejected=2, seed=3)
    data = preprocess(records, bpe_tokenizer_dir, out / "long" / "groups")
    short = preprocess(shortened(records, out / "short" / "preference.jsonl"), bpe_tokenizer_dir,
                       out / "short" / "groups")
    return {"out": out, "imported": out / "imported", "data": data, "short": short, "records": records,
            "tokenizer": bpe_tokenizer_dir, "hf": tiny_hf_model}


def overrides(work, data, run):
    return [f"data.path={data}", f"run.output_dir={run}", "training.global_batch=2", "run.tensorboard=false",
            "run.device=cpu"]


def config(work) -> str:
    return str(work["imported"] / "model.yaml")


def hf_scores(hf_dir, prefix) -> np.ndarray:
    """Per sequence of the dataset: the HF model's log-prob sum of the response after its prompt, run alone."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ds = PackedDataset(prefix, scores=False)
    scores = []
    with torch.no_grad():
        for k in range(len(ds)):
            pack = ds[k]
            starts = np.concatenate([[0], np.cumsum(pack.lengths)])
            for i, role in enumerate(pack.roles.tolist()):
                piece = pack.tokens[starts[i]:starts[i + 1]].astype(np.int64)
                if role == PROMPT:
                    prompt = piece
                    scores.append(np.nan)
                    continue
                ids = torch.from_numpy(np.concatenate([prompt, piece]))[None]
                logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
                scores.append(float(logp[-len(piece):].sum()))
    return np.array(scores)


@pytest.fixture(scope="module")
def scored(work):
    """The TP=1 pass, in this process: the files it wrote and the scores."""
    written = reference.run(config(work), overrides(work, work["data"], work["out"] / "tp1"), str(work["imported"]))
    return written, np.load(written[0])


def test_scores_equal_transformers_and_are_the_same_at_tp2(work, scored):
    out = work["out"]
    written, tp1 = scored
    assert written == [fmt.scores_file(work["data"])]
    record = json.loads(fmt.scores_meta_file(work["data"]).read_text())
    assert record["layout"]["tp"] == 1 and record["model"]["step"] == 0
    assert record["dataset"] == PackedDataset(work["data"]).fingerprint()
    roles = np.concatenate([PackedDataset(work["data"])[k].roles for k in range(len(PackedDataset(work["data"])))])
    assert np.isnan(tp1[roles == PROMPT]).all() and np.isfinite(tp1[roles != PROMPT]).all()
    np.testing.assert_allclose(tp1, hf_scores(work["hf"], work["data"]), rtol=1e-5)

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tools" / "score_reference.py"), "--config", config(work),
                           "--model", str(work["imported"]), *overrides(work, work["data"], out / "tp2"),
                           "parallel.tp=2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {fmt.scores_file(work['data'])}" in done.stdout
    assert json.loads(fmt.scores_meta_file(work["data"]).read_text())["layout"]["tp"] == 2
    np.testing.assert_allclose(np.load(fmt.scores_file(work["data"])), tp1, rtol=1e-5)


def test_a_dpo_run_reads_the_scores(work, scored):
    scores = np.load(fmt.scores_file(work["data"]))  # TP=1's, or TP=2's when the test before ran
    ds = PackedDataset(work["data"])
    read = np.concatenate([ds[k].reference_logps for k in range(len(ds))])
    np.testing.assert_array_equal(read, scores)
    done = subprocess.run([sys.executable, "-m", "megalign.train", "--config", config(work),
                           *overrides(work, work["data"], work["out"] / "dpo"),
                           f"checkpoint.init_from={work['imported']}",
                           "training.objective=dpo", "training.steps=1", "run.progress=false"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((work["out"] / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    # the reference is the model itself: every reward starts at 0 (dpo's loss log 2)
    assert first["chosen_reward"] == pytest.approx(0, abs=1e-5) and first["loss"] == pytest.approx(np.log(2), rel=1e-4)


def test_stale_or_damaged_scores_are_clear_errors(work, tmp_path):
    prefix = preprocess(work["records"], work["tokenizer"], tmp_path / "groups")
    ds = PackedDataset(prefix)
    sequences = int(sum(len(ds.pack_sample_lengths(k)) for k in range(len(ds))))
    reference.write_scores(prefix, np.full(sequences, -3.0), {"dataset": ds.fingerprint()})
    assert PackedDataset(prefix)[0].reference_logps[1] == -3.0
    other = synthetic.make_preference_example(tmp_path / "other", n=5, min_words=30, max_words=90, seed=9)
    preprocess(other, work["tokenizer"], tmp_path / "groups", "--overwrite")  # the dataset changes; the scores stay
    with pytest.raises(MegalignError, match=r"groups.reference.npy is stale: \S+groups.reference.json records other "
                                            r"dataset checksums than \S+groups.json .*rerun tools/score_reference.py"):
        PackedDataset(prefix)
    PackedDataset(prefix, scores=False)  # what the scoring pass opens: it can replace them
    ds = PackedDataset(prefix, scores=False)
    reference.write_scores(prefix, np.full(len(ds.sample_lengths), -3.0), {"dataset": ds.fingerprint()})
    np.save(fmt.scores_file(prefix), np.full(len(ds.sample_lengths), -4.0))  # not what the record names
    with pytest.raises(MegalignError, match="groups.reference.npy fails the sha256 that .*rerun tools/score_reference"):
        PackedDataset(prefix)
    fmt.scores_meta_file(prefix).unlink()
    with pytest.raises(MegalignError, match="groups.reference.npy exists without .*groups.reference.json"):
        PackedDataset(prefix)


def test_longpo_scores_the_short_prompts_for_the_long_dataset(work, tmp_path):
    long_copy = preprocess(work["records"], work["tokenizer"], tmp_path / "long", "--packing", "next-fit")
    reference.run(config(work), overrides(work, long_copy, tmp_path / "run"), str(work["imported"]),
                  [work["short"]])
    scores = np.load(fmt.scores_file(long_copy))
    record = json.loads(fmt.scores_meta_file(long_copy).read_text())
    assert record["scored_on"]["path"] == work["short"] and record["dataset"]["path"] == long_copy
    assert not fmt.scores_file(work["short"]).exists()

    def by_group(prefix, values):  # chosen answer's tokens -> the group's scores
        ds, found, i = PackedDataset(prefix, scores=False), {}, 0
        for k in range(len(ds)):
            pack = ds[k]
            starts = np.concatenate([[0], np.cumsum(pack.lengths)])
            for j, role in enumerate(pack.roles.tolist()):
                if role == CHOSEN:
                    key = pack.tokens[starts[j]:starts[j + 1]].tobytes()
                    found[key] = values[i + j:i + j + 3]  # chosen and its 2 rejected
            i += len(pack.lengths)
        return found

    expected = by_group(work["short"], hf_scores(work["hf"], work["short"]))
    got = by_group(long_copy, scores)
    assert got.keys() == expected.keys() and len(got) == 6
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5)
    long_prompts = hf_scores(work["hf"], long_copy)
    assert not np.allclose(scores[np.isfinite(scores)], long_prompts[np.isfinite(long_prompts)], rtol=1e-3)

    wrong = preprocess(shortened(work["records"], tmp_path / "wrong" / "p.jsonl", change_answer=True),
                       work["tokenizer"], tmp_path / "wrong" / "groups")
    with pytest.raises(MegalignError, match=r"--short-data \S+wrong/groups for \S+long: group 0 \(pack 0\) has no "
                                            "group with the same response tokens"):
        reference.run(config(work), overrides(work, long_copy, tmp_path / "run2"), str(work["imported"]), [wrong])
