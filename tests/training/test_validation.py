"""The validation objective on its own: length buckets and their losses, computed by hand."""

import numpy as np
import pytest
import torch

from megalign.training.objective import SFT
from megalign.training.validation import BucketedSFT, bucket_labels


def test_bucket_labels():
    assert bucket_labels([8192, 32768]) == ["<8k", "8k-32k", ">=32k"]
    assert bucket_labels([100]) == ["<100", ">=100"]


@pytest.mark.parametrize("weighting", ["sequence", "token", "pack"])
def test_each_bucket_is_the_weighting_over_its_own_samples(weighting):
    # three samples of lengths 2, 4, 6 (edge 4: the first is "<4", the others ">=4"); every token a target
    lengths = np.array([2, 4, 6])
    targets = np.ones(12)
    per_token_loss = torch.tensor([1., 3.] + [2.] * 4 + [4.] * 6)
    objective = BucketedSFT(SFT(weighting), (4,))
    inputs = objective.loss_inputs(targets, lengths)
    _, _, report = objective.loss(per_token_loss, inputs)
    figures = objective.metrics(objective.sums([report]))
    assert figures["loss/<4"] == pytest.approx(2.0)  # one sample: mean of 1 and 3
    # sequence: the mean of the per-sample means (2 and 4) = 3; token (and pack, inside a bucket): 32 / 10
    assert figures["loss/>=4"] == pytest.approx(3.0 if weighting == "sequence" else 3.2)
    overall = {"sequence": (2 + 2 + 4) / 3, "token": 36 / 12, "pack": 36 / 12}[weighting]
    assert figures["loss"] == pytest.approx(overall)
