"""Loss weights against hand computations; THD batches: shifted labels, positions, boundaries."""

import numpy as np
import pytest
import torch

from megalign.data.packed_dataset import Pack
from megalign.training.batch import thd_batch
from megalign.training.loss import token_weights, weighted_loss
from megalign.training.objective import SFT

# Two samples: lengths 4 and 3. Loss mask (on tokens) -> targets (on labels = next token in the same sample).
PACK = Pack(tokens=np.array([10, 11, 12, 13, 20, 21, 22], dtype=np.int32),
            loss_mask=np.array([0, 0, 1, 1, 0, 1, 1], dtype=np.uint8),
            lengths=np.array([4, 3]))


def test_thd_batch_shifts_labels_inside_each_sample():
    b = thd_batch(PACK, SFT("token"))
    assert b.tokens.tolist() == [10, 11, 12, 13, 20, 21, 22]
    assert b.labels.tolist() == [11, 12, 13, 0, 21, 22, 0]  # a sample's last token predicts nothing
    # token t trains on label t where the NEXT token carries the loss mask; never across the boundary
    assert b.loss.per_token["weight"].tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert b.cu_seqlens.tolist() == [0, 4, 7] and b.max_seqlen == 4
    assert b.num_targets == 4 and int(b.loss.count) == 4


def test_sequence_mode_weights_each_sample_equally():
    b = thd_batch(PACK, SFT("sequence"))
    assert b.loss.per_token["weight"].tolist() == pytest.approx([0, 0.5, 0.5, 0, 0.5, 0.5, 0])
    assert int(b.loss.count) == 2


def test_pack_mode_is_the_pack_token_mean():
    b = thd_batch(PACK, SFT("pack"))
    assert b.loss.per_token["weight"].tolist() == pytest.approx([0, 0.25, 0.25, 0, 0.25, 0.25, 0])
    assert int(b.loss.count) == 1


def test_global_loss_by_hand():
    """Two packs, three sequences with 2, 1, 3 targets and known per-token losses, against the definitions."""
    packs = [
        (np.array([0, 1, 1, 0, 1, 0], float), np.array([3, 3]), np.array([0, 2.0, 4.0, 0, 6.0, 0])),
        (np.array([1, 1, 1, 0], float), np.array([4]), np.array([1.0, 2.0, 3.0, 0])),
    ]
    per_sequence = [(2.0 + 4.0) / 2, 6.0 / 1, (1.0 + 2.0 + 3.0) / 3]
    expected = {
        "sequence": sum(per_sequence) / 3,
        "token": (2 + 4 + 6 + 1 + 2 + 3) / 6,
        "pack": ((2 + 4 + 6) / 3 + (1 + 2 + 3) / 3) / 2,
    }
    for mode, value in expected.items():
        total, count = 0.0, 0
        for targets, lengths, losses in packs:
            w, c = token_weights(targets, lengths, mode)
            s, n, _ = weighted_loss(torch.tensor(losses), torch.tensor(w, dtype=torch.float32), torch.tensor(c))
            total, count = total + float(s), count + int(n)
        assert total / count == pytest.approx(value), mode


def test_report_is_a_copy_the_schedule_cannot_divide():
    total, count, report = weighted_loss(torch.ones(3), torch.ones(3), torch.tensor(3))
    total /= 3  # what megatron's schedule may do in place
    assert report["loss_sum_and_count"].tolist() == [3.0, 3.0]
