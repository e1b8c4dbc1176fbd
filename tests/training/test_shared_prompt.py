"""The row layout of preference groups (shared and duplicated prompt), its attention plan (at CP=1 and CP=2, with
sequence-parallel padding), and LOGO's synthesized positions. The numbers (log-probs, gradients) are checked in
test_preference_objectives.py and, across layouts, in test_layouts.py."""

import dataclasses

import numpy as np
import pytest

from megalign.config import DataConfig
from megalign.data.groups import CHOSEN, PROMPT, REJECTED
from megalign.data.packed_dataset import Pack
from megalign.data.positions import logo_positions, pack_positions, pack_rng
from megalign.data.sampler import PackRef
from megalign.data.source import InMemoryPacks
from megalign.parallel import context
from megalign.training.batch import BatchBuilder
from megalign.training.preference import Preference, group_rows

ROLES = np.array([PROMPT, CHOSEN, REJECTED, REJECTED + 1, PROMPT, CHOSEN, REJECTED])
LENGTHS = np.array([5, 2, 3, 1, 4, 2, 2])


def pack(roles=ROLES, lengths=LENGTHS):
    n = int(np.sum(lengths))
    mask = np.concatenate([np.full(k, int(r != PROMPT), np.uint8) for k, r in zip(lengths, roles)])
    return Pack(np.arange(100, 100 + n), mask, np.asarray(lengths), roles=np.asarray(roles))


def test_shared_rows_compute_each_prompt_once():
    rows = group_rows(ROLES, LENGTHS, shared=True)
    # group 0: prompt tokens 0-4, responses 5-6, 7-9, 10; group 1: prompt 11-14, responses 15-16, 17-18
    assert rows.lengths.tolist() == [4, 3, 4, 2, 3, 3, 3]
    assert rows.index.tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 7, 8, 9, 4, 10,
                                   11, 12, 13, 14, 15, 16, 14, 17, 18]
    assert rows.contexts.tolist() == [-1, 0, 0, 0, -1, 4, 4]
    assert rows.responses.segment.tolist() == [1, 2, 3, 5, 6]
    assert rows.responses.group.tolist() == [0, 0, 0, 1, 1]
    assert rows.responses.role.tolist() == [CHOSEN, REJECTED, REJECTED + 1, CHOSEN, REJECTED]


def test_duplicated_rows_repeat_the_prompt():
    rows = group_rows(ROLES, LENGTHS, shared=False)
    assert rows.lengths.tolist() == [7, 8, 6, 6, 6]
    assert (rows.contexts == -1).all()
    assert rows.index[:7].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_one_token_prompt_has_no_prompt_segment():
    rows = group_rows([PROMPT, CHOSEN, REJECTED], [1, 2, 2], shared=True)
    assert rows.lengths.tolist() == [3, 3] and rows.contexts.tolist() == [-1, -1]


def builder(**data):
    ds = InMemoryPacks([pack()], vocab_size=1000)
    return BatchBuilder([ds], dataclasses.replace(DataConfig(), **data), Preference("simpo", 2.0, 0.5), 0, 4096, 1000)


def test_the_batch_targets_and_positions_continue_the_prompt():
    b = builder().build(PackRef(0, 0))
    # the response segment of group 0's chosen answer: [prompt's last token] + its 2 tokens, positions 4, 5, 6
    assert b.tokens[4:7].tolist() == [104, 105, 106]
    assert b.position_ids[4:7].tolist() == [4, 5, 6] and b.position_ids[7:11].tolist() == [4, 5, 6, 7]
    assert b.labels[4:7].tolist() == [105, 106, 0]
    assert b.loss.per_token["target"][:11].tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0]
    assert b.loss.groups["length"].tolist() == [2, 3, 1, 2, 2]
    assert int(b.loss.count) == 2
    plan = b.cp_plan
    # a response reads its prompt's 4 keys, then its own causally
    assert plan.cu_k.tolist()[:3] == [0, 4, 11] and plan.keys[4:11].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_sequence_parallel_padding_keeps_the_plan():
    b = builder().replace(sequence_parallel_tp=4).build(PackRef(0, 0))
    assert len(b.tokens) % 4 == 0 and len(b.tokens) == 24
    assert b.cp_plan.cu_q.tolist()[-1] == 24  # the padding segment is in the plan, attending to itself only
    assert b.cp_plan.keys[-2:].tolist() == [22, 23]


def test_context_parallel_plan_reads_the_whole_prompt():
    """CP=2: a response chunk's keys are its prompt's real tokens (gathered from both ranks), then its own up to the
    chunk's end; in the gathered order they are the padded row's positions."""
    lengths = np.array([5, 3])  # prompt head of 5, a response segment of 3 (padded to 8 and 4)
    contexts = np.array([-1, 0])
    padded = context.padded_lengths(lengths, 2)
    for rank in (0, 1):
        cu_q, cu_k, keys = context.attention_segments(padded, 2, rank, contexts, lengths)
        own = [rank, 3 - rank]
        segments = np.split(keys, cu_k[1:-1])
        for j, seg in zip(own, segments[:2]):
            assert seg.tolist() == list(range((j + 1) * 2))
        for j, seg in zip(own, segments[2:]):
            assert seg.tolist() == [0, 1, 2, 3, 4] + list(range(8, 8 + j + 1))


@pytest.mark.parametrize("window,chunk", [(4096, 8), (200, 16), (64, 64), (40, 8)])
def test_logo_positions_stay_in_the_window_are_monotone_and_shared_by_the_responses(window, chunk):
    roles = np.array([PROMPT, CHOSEN, REJECTED, REJECTED + 1, PROMPT, CHOSEN, REJECTED])
    lengths = np.array([37, 9, 4, 12, 20, 3, 5])
    got = logo_positions(lengths, roles, window, chunk, pack_rng(1, 0, 3, 0))
    starts = np.cumsum(lengths) - lengths
    sample = [got[s:s + n] for s, n in zip(starts, lengths)]
    for group in ((0, 1, 2, 3), (4, 5, 6)):
        prompt, responses = sample[group[0]], [sample[i] for i in group[1:]]
        assert (np.diff(prompt) >= 1).all() and prompt[0] == 0
        longest = max(map(len, responses))
        for r in responses:  # continuing the prompt, the same positions for every response
            assert r.tolist() == (prompt[-1] + 1 + np.arange(len(r))).tolist()
        assert max(r[-1] for r in responses) <= max(window - 1, len(prompt) + longest - 1)
        real = len(prompt) + longest
        k = -(-len(prompt) // chunk)
        if real <= window and k > 1 and (window - longest - int(np.ceil(len(prompt) / k))) // (k - 1) >= int(
                np.ceil(len(prompt) / k)):
            assert max(r[-1] for r in responses) == window - 1  # question and answers at the end of the window
            assert np.diff(prompt).max() > 1  # jumps between chunks
        jumps = np.flatnonzero(np.diff(prompt) > 1)
        assert len(jumps) <= k - 1  # +1 inside chunks: jumps only between them


def test_logo_positions_are_seeded_per_pack_and_epoch():
    p = pack()
    args = dict(positions="logo", window=512, fraction=1.0, seed=3, dataset=0, logo_chunk=2)
    first = pack_positions(p, index=5, epoch=0, **args)
    assert np.array_equal(first, pack_positions(p, index=5, epoch=0, **args))
    assert not np.array_equal(first, pack_positions(p, index=5, epoch=1, **args))
    with pytest.raises(ValueError, match="logo is for preference data"):
        pack_positions(Pack(p.tokens, p.loss_mask, p.lengths), index=5, epoch=0, **args)
