"""Preference records ({"chosen", "rejected"} with a prompt) through the preprocessing pipeline: groups round trip
(the prompt as the template renders it up to the answer, each response its answer + end-of-turn token), a group
is never split across packs by any packer, roles and reference scores on disk, bad records rejected with reasons,
one kind of record per input and run, and the same bytes for any worker count and for shards merged."""

import json
from collections import Counter

import numpy as np
import pytest

from megalign.data import format as fmt
from megalign.data import packing, synthetic
from megalign.data.groups import check_roles
from megalign.data.inspect import describe
from megalign.data.packed_dataset import Pack, PackedDataset
from megalign.data.preprocess import MergeOptions, available_cpus, merge, preprocess
from megalign.data.source import InMemoryPacks
from megalign.errors import MegalignError
from tests.data.test_preprocess import options, private_leftovers, re_escape
from tests.data.test_shards import every_file

SEQ = 1024


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return synthetic.make_preference_example(tmp_path_factory.mktemp("pref"), 40, 20, 250, reference=True, seed=3)


def pref_options(tmp_path, tokenizer, inputs, **kw):
    kw.setdefault("seq_length", SEQ)
    return options(tmp_path, tokenizer, inputs, **kw)


def groups_of(ds):
    """Every group of every pack: (prompt tokens, (response tokens, ...), reference scores or None); and checks
    each pack's roles and loss masks on the way."""
    found = []
    for k in range(len(ds)):
        pack = ds[k]
        check_roles(pack.roles)
        bounds = np.concatenate([[0], np.cumsum(pack.lengths)])
        for i, role in enumerate(pack.roles.tolist()):
            a, b = bounds[i], bounds[i + 1]
            assert set(pack.loss_mask[a:b].tolist()) == ({0} if role == 0 else {1})
            tokens = tuple(pack.tokens[a:b].tolist())
            ref = None if pack.reference_logps is None else float(pack.reference_logps[i])
            if role == 0:
                assert ref is None or np.isnan(ref)
                found.append([tokens, [], [] if ref is not None else None])
            else:
                found[-1][1].append(tokens)
                if ref is not None:
                    found[-1][2].append(ref)
    return [(p, tuple(r), None if s is None else tuple(s)) for p, r, s in found]


def chatml_reference(tokenizer_dir, record):
    """The prompt's and each answer's ids, straight from `tokenizers`, as ChatML writes them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    if "prompt" in record:
        turns = ([("system", record["system"])] if "system" in record else []) + [("user", record["prompt"])]
    elif "messages" in record:
        turns = [(m["role"], m["content"]) for m in record["messages"]]
    else:
        turns = [({"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), m["value"])
                 for m in record["conversations"]]
    prompt = []
    for role, content in turns:
        prompt += [start] + enc(f"{role}\n") + enc(content) + [end] + enc("\n")
    prompt += [start] + enc("assistant\n")
    answers = [record["chosen"]] + (record["rejected"] if isinstance(record["rejected"], list) else [record["rejected"]])
    answers = [a["content"] if isinstance(a, dict) else a for a in answers]
    return tuple(prompt), tuple(tuple(enc(a) + [end]) for a in answers)


FORMS = [
    {"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 2 plus 2?"},
                  {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 plus 3?"}],
     "chosen": {"role": "assistant", "content": "6."}, "rejected": ["7.", "9."]},
    {"conversations": [{"from": "human", "value": "Name a river."}], "chosen": "The river.",
     "rejected": "A mountain."},
    {"prompt": "Repeat the word garden.", "system": "Answer briefly.", "chosen": "garden",
     "rejected": ["window", "winter", "summer"]},
    {"prompt": "Say one.", "chosen": "one", "rejected": "two"},
]


def test_each_form_round_trips_as_the_template_renders_it(tmp_path, bpe_tokenizer_dir):
    path = tmp_path / "forms.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FORMS))
    result = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [path], packing="none"))
    ds = PackedDataset(result.prefix)
    expected = [chatml_reference(bpe_tokenizer_dir, r) + (None,) for r in FORMS]
    assert groups_of(ds) == expected  # packing none: one group per pack, in input order
    m = ds.meta
    assert m["format_version"] == 2 and m["record_kind"] == "preference" and m["chat_template"] == "chatml"
    g = m["preference"]
    assert g["groups"] == 4 and g["responses_per_group"] == {"2": 2, "3": 1, "4": 1}  # M differs: allowed
    assert g["prompt_tokens"] == sum(len(p) for p, _, _ in expected) and g["reference_logps"] is False
    assert g["response_tokens"] == sum(len(t) for _, r, _ in expected for t in r)
    assert m["num_loss_tokens"] == g["response_tokens"]  # every response token is a target, no prompt token
    assert m["num_samples"] == 4 + 11 and ds[0].reference_logps is None
    assert fmt.roles_file(result.prefix).exists() and not fmt.reference_logps_file(result.prefix).exists()
    assert set(m["files"]) == set(fmt.DATA_SUFFIXES) | {fmt.ROLES_SUFFIX}
    assert "preference groups 4" in describe(ds) and not private_leftovers(result.prefix)


@pytest.mark.parametrize("strategy", packing.STRATEGIES)
def test_a_group_is_never_split_by_any_packer(tmp_path, bpe_tokenizer_dir, prefs, strategy):
    result = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [prefs], seq_length=700, packing=strategy,
                                     group_size=2))
    ds = PackedDataset(result.prefix)
    records = [json.loads(line) for line in prefs.read_text().splitlines()]
    expected = Counter((*chatml_reference(bpe_tokenizer_dir, r),
                        (r["reference_logps"]["chosen"], *r["reference_logps"]["rejected"])) for r in records)
    assert Counter(groups_of(ds)) == expected  # each group once, whole, in role order, its scores beside it
    assert all(ds.pack_lengths() <= 700)
    if strategy != "none":
        assert any(len(ds[k].lengths) > 3 for k in range(len(ds)))  # packs hold several groups
    if strategy == "sorted":
        assert max(int((ds[k].roles == 0).sum()) for k in range(len(ds))) <= 2  # group_size counts groups


def test_roles_and_reference_scores_on_disk(tmp_path, bpe_tokenizer_dir, prefs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    result = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [prefs]))
    ds = PackedDataset(result.prefix)
    roles = np.load(fmt.roles_file(result.prefix))
    reference = np.load(fmt.reference_logps_file(result.prefix))
    assert roles.dtype == np.int8 and reference.dtype == np.float64
    assert len(roles) == len(reference) == len(IndexedDataset(result.prefix)) == ds.meta["num_samples"] == 40 * 4
    assert np.isnan(reference[roles == 0]).all() and not np.isnan(reference[roles != 0]).any()
    assert np.array_equal(np.concatenate([ds[k].roles for k in range(len(ds))]), roles)
    assert ds.meta["preference"]["reference_logps"] is True
    assert {fmt.ROLES_SUFFIX, fmt.REFERENCE_LOGPS_SUFFIX} <= set(ds.meta["files"])


def test_a_damaged_or_missing_roles_file_is_a_clear_error(tmp_path, bpe_tokenizer_dir, prefs):
    prefix = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [prefs])).prefix
    path = fmt.roles_file(prefix)
    roles = np.load(path)
    target = path.resolve()
    bad = roles.copy()
    bad[1], bad[2] = bad[2], bad[1]  # rejected before chosen in pack 0
    target.unlink()
    np.save(target, bad)
    with pytest.raises(MegalignError, match=re_escape(f"dataset {prefix} pack 0: sample 1: role 2, expected 1")):
        PackedDataset(prefix, verify="none")
    with pytest.raises(MegalignError, match="fails its sha256 check"):
        PackedDataset(prefix)
    target.unlink()
    with pytest.raises(MegalignError, match=re_escape(f"{path} is missing: the metadata says the dataset has it")):
        PackedDataset(prefix, verify="none")


def test_chat_and_text_datasets_stay_format_v1_without_roles(tmp_path, bpe_tokenizer_dir):
    chats = synthetic.make_example(tmp_path / "in", 0, 5, 10, 20)["short"]
    ds = PackedDataset(preprocess(options(tmp_path, bpe_tokenizer_dir, [chats])).prefix)
    assert ds.meta["format_version"] == 1 and "preference" not in ds.meta and ds[0].roles is None
    assert not fmt.roles_file(ds.prefix).exists()


def test_in_memory_packs_check_roles():
    tokens = np.arange(6)
    InMemoryPacks([Pack(tokens, np.ones(6, np.uint8), np.array([2, 2, 2]), roles=np.array([0, 1, 2]))], 10)
    with pytest.raises(ValueError, match="pack 0: sample 2: role 1, expected 2"):
        InMemoryPacks([Pack(tokens, np.ones(6, np.uint8), np.array([2, 2, 2]), roles=np.array([0, 1, 1]))], 10)


GOOD = {"messages": [{"role": "user", "content": "Say one."}], "chosen": "one", "rejected": ["two", "three"]}
BAD_PREFERENCE = [
    ({**GOOD, "rejected": ["two", "one"]}, "chosen_equals_rejected"),
    ({**GOOD, "rejected": "  one "}, "chosen_equals_rejected"),
    ({**GOOD, "chosen": "   "}, "empty_response"),
    ({**GOOD, "rejected": ["two", ""]}, "empty_response"),
    ({**GOOD, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "prompt_not_ending_with_user"),
    ({**GOOD, "chosen": "one " * 600}, "group_too_long"),
    ({**GOOD, "reference_logps": {"chosen": -1.0, "rejected": [-2.0]}}, "reference_logps_mismatch"),
    ({**GOOD, "reference_logps": {"chosen": -1.0, "rejected": [-2.0, "x"]}}, "reference_logps_mismatch"),
    ({**GOOD, "reference_logps": [-1.0, -2.0, -3.0]}, "reference_logps_mismatch"),
    ({**GOOD, "rejected": []}, "wrong_shape"),
    ({**GOOD, "chosen": 3}, "non_string_content"),
    ({**GOOD, "chosen": {"role": "user", "content": "one"}}, "wrong_shape"),
    ({"chosen": "one", "rejected": "two"}, "wrong_shape"),
    ({**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "bad_turn_order"),
    ({**GOOD, "messages": [{"role": "robot", "content": "a"}, {"role": "user", "content": "b"}]}, "unknown_role"),
]


def test_bad_preference_records_are_rejected_with_reason_and_line_and_counts_reconcile(tmp_path, bpe_tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(GOOD)] * 3 + [json.dumps(r) for r, _ in BAD_PREFERENCE] + ["", "{broken"] + [json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    m = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [path], seq_length=512, max_reject_fraction=1.0)).metadata
    c = m["counts"]
    expected = Counter(reason for _, reason in BAD_PREFERENCE) + Counter(["malformed_json"])
    assert c["rejected"] == dict(expected)
    assert c["read"] == 4 + len(BAD_PREFERENCE) + 1 and c["kept"] == 4 and c["blank_lines"] == 1
    assert c["read"] == c["kept"] - c["duplicated"] + c["sampled_out"] + sum(c["rejected"].values())
    rejects = [json.loads(line) for line in fmt.rejects_file(str(tmp_path / "ds")).read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == \
        [(4 + i, reason) for i, (_, reason) in enumerate(BAD_PREFERENCE)] + [(5 + len(BAD_PREFERENCE), "malformed_json")]
    assert all(r["input"] == str(path) and r["detail"] for r in rejects)
    assert m["preference"]["groups"] == 4


def test_reference_scores_on_some_records_only_is_an_error(tmp_path, bpe_tokenizer_dir):
    path = tmp_path / "some.jsonl"
    scored = {**GOOD, "reference_logps": {"chosen": -1.0, "rejected": [-2.0, -3.0]}}
    path.write_text(json.dumps(scored) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(MegalignError, match=re_escape(f"{path} line 2 has no reference_logps, but {path} line 1 has")):
        preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [path]))
    assert not (tmp_path / "ds.json").exists() and not private_leftovers(str(tmp_path / "ds"))


def test_an_input_mixing_preference_and_chat_records_is_an_error(tmp_path, bpe_tokenizer_dir, prefs):
    chat = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(prefs.read_text().splitlines()[:3] + [chat]) + "\n")
    with pytest.raises(MegalignError, match=re_escape(f"{path} line 4: a chat record (\"messages\"/\"conversations\") "
                                                      "in an input of preference records (line 1 is one)")):
        preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [path]))
    chats = synthetic.make_example(tmp_path / "in", 0, 5, 10, 20)["short"]
    with pytest.raises(MegalignError, match=re_escape(f"inputs mix chat records ({chats}, line 1) and preference "
                                                      f"records ({prefs}, line 1): one run makes one kind")):
        preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [chats, prefs]))


@pytest.mark.parametrize("change,message", [
    ({"overlength": "truncate"}, "overlength truncate cannot apply to preference records"),
    ({"overlength": "split"}, "overlength split cannot apply to preference records"),
    ({"chat_template": None}, "chat_template is needed for preference records"),
    ({"positions": "continue"}, "positions is for text records"),
])
def test_preference_options_are_checked_before_any_work(tmp_path, bpe_tokenizer_dir, prefs, change, message):
    opts = pref_options(tmp_path, bpe_tokenizer_dir, [prefs])
    for k, v in change.items():
        setattr(opts, k, v)
    with pytest.raises(MegalignError, match=re_escape(message)):
        preprocess(opts)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, prefs):
    """Preference records with a few bad lines and a blank one."""
    path = tmp_path_factory.mktemp("pref_shards") / "p.jsonl"
    lines = prefs.read_text().splitlines()
    bad = [json.dumps(r) for r, _ in BAD_PREFERENCE[:5]]
    path.write_text("\n".join(lines[:13] + bad + [""] + lines[13:]) + "\n")
    return path


def test_shards_merged_and_workers_give_the_same_bytes(tmp_path, bpe_tokenizer_dir, mixed_corpus):
    kw = dict(ratios=[1.5], max_reject_fraction=0.5, seq_length=700)
    (tmp_path / "one").mkdir()
    single = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [mixed_corpus],
                                     output_prefix=str(tmp_path / "one" / "single"), **kw))
    for i in (1, 0):
        preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [mixed_corpus], output_prefix=str(tmp_path / "sharded"),
                                shard=(i, 2), shard_block_lines=5, **kw))
    merged = merge(MergeOptions(str(tmp_path / "sharded")))
    a, b = every_file(single.prefix), every_file(merged.prefix)
    assert sorted(a) == [n.replace("sharded", "single") for n in sorted(b)]
    assert fmt.roles_file(single.prefix).name in a and fmt.reference_logps_file(single.prefix).name in a
    assert [a[n] for n in sorted(a)] == [b[n] for n in sorted(b)]
    assert merged.metadata["counts"]["duplicated"] and merged.metadata["counts"]["rejected"]
    PackedDataset(merged.prefix)
    if available_cpus() >= 2:
        (tmp_path / "two").mkdir()
        two = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [mixed_corpus],
                                      output_prefix=str(tmp_path / "two" / "single"), workers=2, **kw))
        c = every_file(two.prefix)
        assert [a[n] for n in sorted(a)] == [c[n] for n in sorted(c)]


@pytest.mark.parametrize("template", ["llama2", "llama3", "chatml", "chatglm3", "qwen2"])
def test_every_built_in_template_makes_groups_with_one_shared_prompt(tmp_path, word_tokenizer_dir, template):
    from megalign.data.records import conversation_of
    from megalign.data.templates import make_encoder
    from megalign.data.tokenizer import load_tokenizer

    records = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
         "chosen": "bye", "rejected": ["ok", "hi ok"]},
        {"prompt": "hello hi", "chosen": "ok", "rejected": "bye"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = PackedDataset(preprocess(pref_options(tmp_path, word_tokenizer_dir, [path], chat_template=template,
                                               packing="none", seq_length=256)).prefix)
    encoder = make_encoder(template, load_tokenizer(word_tokenizer_dir))
    for k, record in enumerate(records):
        prompt, responses, _ = groups_of(ds)[k]
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        answers = [record["chosen"]] + (record["rejected"] if isinstance(record["rejected"], list)
                                        else [record["rejected"]])
        for answer, response in zip(answers, responses, strict=True):
            sample = encoder.encode_many([conversation_of(
                {"messages": messages + [{"role": "assistant", "content": answer}]})])[0]
            n = len(prompt) + len(response)
            assert tuple(sample.tokens[:n].tolist()) == prompt + response  # the rendering, cut after the answer
            assert not sample.loss_mask[len(prompt):n].tolist().count(0) and sample.loss_mask[n:].sum() == 0
            assert sample.loss_mask[len(prompt) - 1] == 0


def test_the_tokenizers_own_template_makes_groups(tmp_path, bpe_tokenizer_dir):
    path = tmp_path / "forms.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FORMS))
    ds = PackedDataset(preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [path], packing="none",
                                               chat_template="hf")).prefix)
    assert groups_of(ds) == [chatml_reference(bpe_tokenizer_dir, r) + (None,) for r in FORMS]  # its template: ChatML


def test_the_command_line_preprocesses_preference_records(tmp_path, bpe_tokenizer_dir, prefs, capsys):
    from megalign.data.cli import preprocess_main

    prefix = tmp_path / "cli"
    preprocess_main(["--input", str(prefs), "--tokenizer", str(bpe_tokenizer_dir), "--chat-template", "chatml",
                     "--seq-length", str(SEQ), "--output-prefix", str(prefix), "--no-progress"])
    out = capsys.readouterr().out
    assert f"{prefix}{fmt.ROLES_SUFFIX}" in out and "kept 40 groups" in out
    with pytest.raises(SystemExit):
        preprocess_main(["--input", str(prefs), "--tokenizer", str(bpe_tokenizer_dir), "--chat-template", "chatml",
                         "--seq-length", str(SEQ), "--output-prefix", str(tmp_path / "t"), "--overlength", "truncate"])
    assert "--overlength truncate cannot apply to preference records" in capsys.readouterr().err


def test_the_reader_refuses_a_version_that_does_not_match_the_kind(tmp_path, bpe_tokenizer_dir, prefs):
    prefix = preprocess(pref_options(tmp_path, bpe_tokenizer_dir, [prefs])).prefix
    meta = fmt.meta_file(prefix).resolve()
    m = json.loads(meta.read_text())
    meta.unlink()
    meta.write_text(json.dumps(m | {"format_version": 1}))
    with pytest.raises(MegalignError, match="format_version 1; this megalign reads version 2 for preference datasets"):
        PackedDataset(prefix, verify="none")


def test_a_template_that_tokenizes_the_prompt_differently_per_answer_is_a_reject(tmp_path, bpe_tokenizer_dir):
    # the generation prefix "a" merges with the answer's first letters ("and", "at"): no shared prompt
    glued = tmp_path / "tok"
    glued.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (glued / name).write_bytes((bpe_tokenizer_dir / name).read_bytes())
    config = json.loads((glued / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'user' %}Q {{ m['content'] }}\n{% else %}"
                               "a{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}a{% endif %}")
    (glued / "tokenizer_config.json").write_text(json.dumps(config))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "chosen": "nd more", "rejected": "t home"}) + "\n"
                    + json.dumps({"prompt": "hi", "chosen": " more", "rejected": " home"}) + "\n")
    m = preprocess(pref_options(tmp_path, glued, [path], chat_template="hf", max_reject_fraction=0.5,
                                output_prefix=str(tmp_path / "ds"))).metadata
    assert m["counts"]["rejected"] == {"prompt_not_shared": 1} and m["preference"]["groups"] == 1
    reject = json.loads(fmt.rejects_file(str(tmp_path / "ds")).read_text())
    assert reject["line"] == 1 and "differ from those before chosen" in reject["detail"]
