"""The on-disk protocol: a checkpoint is visible only once complete; the tracker is written last; pruning
keeps the newest; damaged checkpoints are named errors."""

import json

import pytest

from megalign.checkpoint.state import verify_checksums
from megalign.checkpoint.store import CheckpointStore, read_manifest
from megalign.errors import MegalignError


def save(store: CheckpointStore, step: int, keep=None, payload=b"x" * 10):
    partial = store.begin(step)
    (partial / "shard.distcp").write_bytes(payload)
    return store.publish(step, {"kind": "training", "step": step}, keep)


def test_publish_seals_a_manifest_and_moves_the_tracker(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest() is None
    first = save(store, 1)
    assert first.name == "step_0000001" and (tmp_path / "latest").read_text().strip() == "step_0000001"
    manifest = read_manifest(first)
    assert manifest["files"] == {"shard.distcp": 10} and manifest["step"] == 1
    save(store, 2)
    assert store.latest().name == "step_0000002"


def test_an_interrupted_save_is_invisible_and_cleaned_by_the_next(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    (store.begin(2) / "shard.distcp").write_bytes(b"half")  # killed before publish
    assert store.latest().name == "step_0000001"
    assert [p.name for p in store.complete()] == ["step_0000001"]
    save(store, 3)
    assert not store.partial_dir(2).exists()


def test_a_lost_tracker_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    save(store, 2)
    (tmp_path / "latest").unlink()  # killed between the rename and the tracker update
    assert store.latest().name == "step_0000002"
    (tmp_path / "latest").write_text("step_0000009\n")  # names something that is not there
    assert store.latest().name == "step_0000002"


def test_keep_prunes_the_oldest(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in range(1, 5):
        save(store, step, keep=2)
    assert [p.name for p in store.complete()] == ["step_0000003", "step_0000004"]


def test_damaged_checkpoints_are_named(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 1)
    (path / "shard.distcp").write_bytes(b"xx")
    with pytest.raises(MegalignError, match="shard.distcp has 2 bytes, the manifest says 10"):
        read_manifest(path)
    (path / "shard.distcp").unlink()
    with pytest.raises(MegalignError, match="shard.distcp is missing"):
        read_manifest(path)
    (path / "megalign.json").write_text(json.dumps({"format_version": 99, "files": {}}))
    with pytest.raises(MegalignError, match="format_version 99"):
        read_manifest(path)
    with pytest.raises(MegalignError, match="no megalign.json"):
        read_manifest(tmp_path)


def test_a_damaged_file_of_the_right_size_fails_its_checksum(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 1, payload=b"0123456789")
    manifest = read_manifest(path)
    assert manifest["checksums"]["algorithm"] == "xxh3_64" and set(manifest["checksums"]["files"]) == {"shard.distcp"}
    verify_checksums(path, manifest)  # intact
    (path / "shard.distcp").write_bytes(b"0123456780")  # one byte flipped, same size: sizes cannot tell
    manifest = read_manifest(path)
    with pytest.raises(MegalignError, match="shard.distcp fail their checksum .*checkpoint.resume_from"):
        verify_checksums(path, manifest)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b'{"format_version": 1}',
                                     b'{"format_version": 1, "kind": "training", "step": 1, "files": {"a": "x"}}',
                                     b'{"format_version": 1, "kind": "training", "step": 1, "files": {}, '
                                     b'"checksums": {"algorithm": "md5", "files": {}}}'])
def test_a_malformed_manifest_is_one_line_naming_it(tmp_path, content):
    path = save(CheckpointStore(tmp_path), 1)
    (path / "megalign.json").write_bytes(content)
    with pytest.raises(MegalignError) as e:
        read_manifest(path)
    message = str(e.value)
    assert message.startswith(f"checkpoint {path / 'megalign.json'}: ") and "\n" not in message, message


@pytest.mark.parametrize("tracker", [b"\xff\xfe\x00", b"../../etc\n", b""])
def test_a_damaged_tracker_counts_as_lost(tmp_path, tracker):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    save(store, 2)
    (tmp_path / "latest").write_bytes(tracker)
    assert store.latest().name == "step_0000002"


def test_going_back_to_an_older_step_sets_the_newer_ones_aside(tmp_path):
    """resume_from step 2 while steps 3 and 4 exist: once step 3 of the new timeline is published, the old 4 is
    renamed aside (not deleted), so a lost tracker cannot resume from it and keep does not count it."""
    store = CheckpointStore(tmp_path)
    for step in (1, 2, 3, 4):
        save(store, step)
    save(store, 3, keep=2)  # the new timeline's step 3 replaces the old one
    assert [p.name for p in store.complete()] == ["step_0000002", "step_0000003"]
    assert (tmp_path / "abandoned-step_0000004" / "megalign.json").is_file()
    (tmp_path / "latest").unlink()
    assert store.latest().name == "step_0000003"
