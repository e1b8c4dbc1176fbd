"""The config tree: YAML + overrides, presets, and one-line errors that name the key and what would work."""

import json

import pytest

from megalign.config import load_config, validate
from megalign.errors import MegalignError


@pytest.fixture()
def dataset_prefix(tmp_path):
    """Only the metadata file matters to validation."""
    meta = {"format_version": 1, "tokenizer": {"sha256": "x", "vocab_size": 1000}, "seq_length": 1024,
            "num_samples": 0, "num_packs": 0, "files": {}}
    (tmp_path / "ds.json").write_text(json.dumps(meta))
    return str(tmp_path / "ds")


def write_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_overrides_then_types(tmp_path, dataset_prefix):
    path = write_yaml(tmp_path, f"data:\n  path: {dataset_prefix}\ntraining:\n  lr: 1.0e-4\n  steps: 7\n")
    cfg = load_config(path, ["training.lr=3e-5", "parallel.tp=2", "model.preset=llama3-8b", "model.num_layers=4"])
    assert cfg.training.lr == 3e-5 and cfg.training.steps == 7 and cfg.parallel.tp == 2
    assert cfg.model.num_query_groups == 8 and cfg.model.rotary_base == 500000.0  # from the preset
    assert cfg.model.num_layers == 4  # the override wins over the preset
    assert cfg.data_paths == [dataset_prefix]
    validate(cfg, world_size=2)


def test_list_of_paths_with_weights(tmp_path, dataset_prefix):
    cfg = load_config(None, [f"data.path=[{dataset_prefix},{dataset_prefix}]", "data.weights=[0.6,0.4]"])
    assert cfg.data_paths == [dataset_prefix, dataset_prefix]
    validate(cfg, world_size=1)


@pytest.mark.parametrize("overrides,message", [
    (["training.lrr=1"], "config key training.lrr: Key 'lrr' not in 'TrainingConfig'"),
    (["training.steps=ten"], "config key training.steps: Value 'ten' of type 'str' could not be converted to Integer"),
    (["model.preset=gpt5"], "config key model.preset: 'gpt5' is unknown; valid: tiny, llama2-7b"),
    (["training.lr"], "override 'training.lr' is not key=value"),
])
def test_load_errors_are_one_line(overrides, message):
    with pytest.raises(MegalignError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.tp=3"], 3, "parallel.tp=3 must divide model.num_attention_heads=4; try tp in 1, 2, 4"),
    (["parallel.tp=4", "model.num_query_groups=2"], 4, "parallel.tp=4 must divide model.num_query_groups=2"),
    (["parallel.pp=3"], 3, "parallel.pp=3 must divide model.num_layers=2; try pp in 1, 2"),
    (["parallel.tp=2"], 3, "parallel.tp*pp*cp = 2 must divide the world size 3"),
    (["training.global_batch=3"], 2, "training.global_batch=3 must be a multiple of the data-parallel size 2; "
                                      "try training.global_batch=2"),
    (["training.loss=mean"], 1, "config key training.loss: 'mean' is not one of sequence, token, pack"),
    (["model.attention_backend=xformers"], 1, "model.attention_backend: 'xformers' is not one of auto, te"),
    (["model.rope_scaling=yarn", "model.rope_scaling_factor=0.5"], 1,
     "model.rope_scaling_factor=0.5 must be >= 1 for model.rope_scaling=yarn"),
    (["model.rope_scaling=llama3", "model.rope_low_freq_factor=4"], 1,
     "model.rope_low_freq_factor=4.0 must be smaller than model.rope_high_freq_factor=4.0"),
    (["model.rotary_percent=0.2"], 1, "model.rotary_percent=0.2 gives an odd or empty rotary dimension 3"),
    (["model.vocab_size=10"], 1, "model.vocab_size=10 is smaller than the dataset tokenizer's 1000"),
    (["model.max_position_embeddings=512"], 1, "model.max_position_embeddings=512 is shorter than the packs of "
                                               "data.path (1024 tokens): set model.max_position_embeddings=1024"),
])
def test_rules_between_keys(dataset_prefix, overrides, world, message):
    cfg = load_config(None, [f"data.path={dataset_prefix}", *overrides])
    with pytest.raises(MegalignError) as e:
        validate(cfg, world_size=world)
    assert message in str(e.value)


@pytest.mark.parametrize("content", ['{"format_version": 1}', '{"format_version": 1, "num_samples": "3"}',
                                     "[]", "\udcff", '{"format_version": 1, "num_samples": 1, "num_packs": 1, '
                                     '"seq_length": 8, "tokenizer": {"vocab_size": 10}, "files": {}}'])
def test_damaged_dataset_metadata_is_one_line_naming_the_file(tmp_path, content):
    (tmp_path / "ds.json").write_text(content, errors="surrogateescape")
    with pytest.raises(MegalignError) as e:
        validate(load_config(None, [f"data.path={tmp_path}/ds"]), world_size=1)
    assert str(e.value).startswith(f"{tmp_path}/ds.json") and "\n" not in str(e.value), str(e.value)


def test_missing_data_path(tmp_path):
    with pytest.raises(MegalignError, match="config key data.path is missing"):
        validate(load_config(None, []), world_size=1)
    with pytest.raises(MegalignError, match=r"config key data.path: .*nope.json not found"):
        validate(load_config(None, [f"data.path={tmp_path}/nope"]), world_size=1)


@pytest.mark.parametrize("overrides,message", [
    (["checkpoint.interval=-1"], "config key checkpoint.interval: must be >= 0, got -1"),
    (["checkpoint.resume_from=/nope"], "config key checkpoint.resume_from: /nope is not a directory"),
    (["checkpoint.init_from=/nope"], "config key checkpoint.init_from: /nope is not a directory"),
])
def test_checkpoint_keys(dataset_prefix, overrides, message):
    with pytest.raises(MegalignError, match=message):
        validate(load_config(None, [f"data.path={dataset_prefix}", *overrides]), world_size=1)


@pytest.mark.parametrize("overrides,message", [
    (["training.lr=nan"], "config key training.lr=nan is out of range [0, inf]"),
    (["training.lr=-1"], "config key training.lr=-1.0 is out of range [0, inf]"),
    (["training.min_lr=1"], "config key training.min_lr=1.0 is out of range [0, 2e-05]: at most training.lr"),
    (["training.adam_beta2=1"], "config key training.adam_beta2=1.0 is out of range [0, 1]"),
    (["training.warmup_fraction=2"], "config key training.warmup_fraction=2.0 is out of range [0, 1]"),
    (["training.on_nonfinite=ignore"], "config key training.on_nonfinite: 'ignore' is not one of error, skip"),
])
def test_optimizer_numbers_are_checked(dataset_prefix, overrides, message):
    with pytest.raises(MegalignError) as e:
        validate(load_config(None, [f"data.path={dataset_prefix}", *overrides]), world_size=1)
    assert message in str(e.value), str(e.value)


def test_unwritable_output_directories_are_refused_before_the_run(dataset_prefix, tmp_path):
    """A read-only place (here /proc, read-only even for root) or a file where a directory should be: refused by
    validate, before any process group starts, not after the last step."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    for overrides, message in [
        (["run.output_dir=/proc/megalign/run"], "config key run.output_dir=/proc/megalign/run: cannot write in /proc"),
        (["checkpoint.dir=/proc/megalign"], "config key checkpoint.dir=/proc/megalign: cannot write in /proc"),
        ([f"run.output_dir={a_file}/run"], f"config key run.output_dir={a_file}/run: {a_file} is a file"),
    ]:
        with pytest.raises(MegalignError) as e:
            validate(load_config(None, [f"data.path={dataset_prefix}", *overrides]), world_size=1)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    validate(load_config(None, [f"data.path={dataset_prefix}", f"run.output_dir={tmp_path}/new/run"]), 1)
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind


def test_resume_from_and_init_from_exclude_each_other(dataset_prefix, tmp_path):
    cfg = load_config(None, [f"data.path={dataset_prefix}", f"checkpoint.resume_from={tmp_path}",
                             f"checkpoint.init_from={tmp_path}"])
    with pytest.raises(MegalignError, match="exclude each other"):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("example,world", [("tiny.yaml", 1), ("llama3-8b-128k-cp.yaml", 16), ("skipalign.yaml", 8)])
def test_example_configs_load_and_validate(dataset_prefix, example, world):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / example
    validate(load_config(str(path), [f"data.path={dataset_prefix}"]), world_size=world)
