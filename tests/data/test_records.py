"""Record parsing: both accepted shapes, and a named reason for every malformed record."""

import gzip
import json

import pytest

from megalign.data.records import RecordRejected, open_lines, parse_record


def line(obj) -> bytes:
    return json.dumps(obj).encode()


def test_messages_shape():
    conv = parse_record(line({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    assert [(m.role, m.content) for m in conv.messages] == [("system", "s"), ("user", "q"), ("assistant", "a")]


def test_sharegpt_shape_maps_roles():
    conv = parse_record(line({"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"}]}))
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]


BAD = [
    (b'{"messages": [', "malformed_json"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "y"}]}', "invalid_utf8"),
    (b"[1, 2]", "wrong_shape"),
    (line({"text": "hi"}), "wrong_shape"),
    (line({"messages": []}), "wrong_shape"),
    (line({"messages": "hi"}), "wrong_shape"),
    (line({"messages": [{"role": "user"}]}), "wrong_shape"),
    (line({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}), "unknown_role"),
    (line({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}), "non_string_content"),
    (line({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "y"}]}), "non_string_content"),
    (line({"messages": [{"role": "user", "content": "  \n"}, {"role": "assistant", "content": "y"}]}), "empty_content"),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}), "empty_content"),
    (line({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}), "no_assistant_turn"),
    (line({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}), "bad_turn_order"),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}), "bad_turn_order"),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "q"}]}), "bad_turn_order"),
]


@pytest.mark.parametrize("raw,reason", BAD)
def test_bad_records_are_rejected_with_their_reason(raw, reason):
    with pytest.raises(RecordRejected) as e:
        parse_record(raw)
    assert e.value.reason.value == reason
    assert e.value.detail


def test_plain_and_gzip_lines_are_the_same(tmp_path):
    rows = [b'{"a": 1}', b"", b'{"b": "\xc3\xa9"}']
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    with gzip.open(tmp_path / "x.jsonl.gz", "wb") as f:
        f.write(b"\r\n".join(rows) + b"\r\n")
    assert list(open_lines(tmp_path / "x.jsonl")) == rows == list(open_lines(tmp_path / "x.jsonl.gz"))
