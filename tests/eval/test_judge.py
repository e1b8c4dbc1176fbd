"""The LongBench-Chat judge's rating parser, on crafted judge replies, and one judge pass on a stub client."""

import pytest

from megalign.eval.judge import SYSTEM_PROMPT, judge_pass, parse_score
from megalign.eval.openai_client import Reply


@pytest.mark.parametrize("reply, score", [
    ("[[7]]", 7.0),
    ("The answer is mostly right. Rating: [[8]]", 8.0),
    ("Rating: [[7.5]]", 7.5),
    ("[[ 9 ]]", 9.0),
    ("[[10]]", 10.0),
    ("[[1]]", 1.0),
    ("[[Rating: 6]]", 6.0),
    ("[[8/10]]", 8.0),  # LongAlign reads the first number inside the brackets
    ("[[7分]]", 7.0),
    ("[[7.]]", 7.0),
    ("Rating:\n[[\n4\n]]", 4.0),
])
def test_reads_the_rating(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply, score", [
    # the last [[...]] wins: the judge may quote the format or an example first
    ('Reply strictly in the format "[[rating]]", e.g. "Rating: [[5]]". Rating: [[3]]', 3.0),
    ("[[2]] at first, but on reflection: [[6.5]]", 6.5),
    ("Rating: [[9]] (not [[x]]) and finally [[4]]", 4.0),
])
def test_the_last_brackets_count(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply", [
    "",
    None,
    "The answer is good. Rating: 8",  # no brackets
    "Rating: [8]",
    "Rating: [[8]",
    "[[]]",
    "[[rating]]",
    "[[excellent]]",
    "[[8]] was my first thought; now: [[n/a]]",  # the last brackets hold no number: no falling back to 8
    "[[nan]]",
    "[[inf]]",
    "[[1e3]]",
    "[[7.5.1]]",
])
def test_no_rating_is_none(reply):
    assert parse_score(reply) is None


@pytest.mark.parametrize("reply", ["[[0]]", "[[0.5]]", "[[11]]", "[[10.5]]", "[[-3]]", "[[100]]",
                                   "[[" + "9" * 400 + "]]"])
def test_out_of_range_is_none(reply):
    assert parse_score(reply) is None


class _StubClient:
    def __init__(self, text: str):
        self.text, self.calls = text, []

    def chat(self, messages, max_tokens, temperature=0.0, stop=None):
        self.calls.append((messages, max_tokens, temperature))
        return Reply(self.text, "stop", 100, 20)


def test_judge_pass_sends_the_prompt_greedily_and_returns_score_and_reply():
    client = _StubClient("Good coverage of the key points. Rating: [[8.5]]")
    score, raw = judge_pass(client, "QUESTION ... ANSWER ...")
    assert (score, raw) == (8.5, "Good coverage of the key points. Rating: [[8.5]]")
    [(messages, _, temperature)] = client.calls
    assert messages == [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": "QUESTION ... ANSWER ..."}]
    assert temperature == 0.0


def test_judge_pass_without_a_rating_returns_none_and_the_reply():
    score, raw = judge_pass(_StubClient("I cannot rate this."), "prompt")
    assert score is None and raw == "I cannot rate this."
