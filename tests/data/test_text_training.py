"""Text datasets in the model (a Trainer in this process, CPU): document masking (a pack of documents' pieces gives
the per-token losses and gradients of each piece run on its own), positions that continue across the pieces of
one document reach the model as stored, and a piece beyond the model's positions is refused."""

import numpy as np
import pytest
import torch

from megalign.config import Config, updated
from megalign.data import synthetic
from megalign.data.packed_dataset import Pack, PackedDataset
from megalign.data.preprocess import preprocess
from megalign.errors import MegalignError
from tests.data.test_text_records import text_options
from tests.training.distributed_checks import packed_vs_separate

SEQ = 256
MODEL = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, bpe_tokenizer_dir):
    """The same documents, positions restarting and continuing; packed at 256, so most documents are pieces."""
    out = tmp_path_factory.mktemp("text_training")
    docs = synthetic.make_text_example(out, n_long=6, n_short=30, min_words=150, max_words=400, seed=3)
    made = {}
    for positions in ("restart", "continue"):
        opts = text_options(out, bpe_tokenizer_dir, [docs["long"], docs["short"]], seq_length=SEQ,
                            positions=positions, output_prefix=str(out / positions))
        made[positions] = PackedDataset(preprocess(opts).prefix)
    return made


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, datasets):
    from megatron.core import parallel_state

    from megalign.parallel.setup import shutdown
    from megalign.training.trainer import Trainer

    if parallel_state.model_parallel_is_initialized():
        shutdown()  # another module's world; this one builds its own
    cfg = updated(Config(), model=MODEL, training={"global_batch": 2, "steps": 2, "loss": "token"},
                  run={"device": "cpu", "output_dir": str(tmp_path_factory.mktemp("run"))})
    built = Trainer(cfg, datasets=[datasets["restart"], datasets["continue"]])
    yield built
    shutdown()


def per_token_losses(trainer, pack: Pack) -> torch.Tensor:
    from megalign.training.batch import thd_batch
    from megalign.training.objective import SFT

    batch = thd_batch(pack, SFT("token"))
    with torch.no_grad():
        out = trainer.model.module(input_ids=batch.tokens[None], position_ids=batch.position_ids[None],
                                   attention_mask=None, labels=batch.labels[None],
                                   packed_seq_params=batch.packed_seq_params())
    return out.reshape(-1) * batch.loss.per_token["weight"]


def test_a_pack_of_documents_equals_the_documents_run_separately(trainer, datasets):
    ds = datasets["restart"]
    most = max(range(len(ds)), key=lambda k: len(ds[k].lengths))
    assert len(ds[most].lengths) >= 3 and ds[most].position_offsets is None
    check = packed_vs_separate(trainer)  # the training tests' check, on trainer.datasets[0]: the text dataset
    assert check["samples"] == len(ds[most].lengths)
    assert check["loss_max_abs_diff"] <= 1e-5 * check["loss_max"]
    assert check["grad_max_abs_diff"] <= 1e-5 * check["grad_max"]


def test_continued_positions_reach_the_model_as_stored(trainer, datasets):
    from megalign.data.sampler import PackRef

    ds = datasets["continue"]
    k = max(range(len(ds)), key=lambda i: (int(ds[i].position_offsets.max()), len(ds[i].lengths)))
    pack = ds[k]
    assert pack.position_offsets.max() >= SEQ and len(pack.lengths) >= 2  # a later piece among other samples
    batch = trainer.batches.build(PackRef(1, k, 0))  # the trainer's own builder: dataset 1 is the continuing one
    starts = np.concatenate([[0], np.cumsum(pack.lengths)[:-1]])
    assert batch.position_ids[starts].tolist() == pack.position_offsets.tolist()  # piece k starts at k * 256
    within = np.arange(len(pack.tokens)) - np.repeat(starts, pack.lengths)
    assert np.array_equal(batch.position_ids.numpy(), np.repeat(pack.position_offsets, pack.lengths) + within)
    packed = per_token_losses(trainer, pack)
    bounds = np.concatenate([starts, [len(pack.tokens)]])
    alone = torch.cat([per_token_losses(trainer, Pack(pack.tokens[a:b], pack.loss_mask[a:b], np.array([b - a]),
                                                      np.array([o])))
                       for a, b, o in zip(bounds[:-1], bounds[1:], pack.position_offsets)])
    assert float((packed - alone).abs().max()) <= 1e-5 * float(packed.abs().max())  # document masking, offsets kept
    # RoPE sees only distances inside a piece: shifting a whole piece's positions leaves its loss (to rounding)
    restarted = per_token_losses(trainer, Pack(pack.tokens, pack.loss_mask, pack.lengths))
    assert float((packed - restarted).abs().max()) <= 1e-4 * float(packed.abs().max())


def test_a_piece_beyond_the_model_positions_is_refused(trainer, datasets):
    from megalign.data.sampler import PackRef

    ds = datasets["continue"]
    k = int(np.argmax([int((ds[i].position_offsets + ds[i].lengths).max()) for i in range(len(ds))]))
    end = int((ds[k].position_offsets + ds[k].lengths).max())
    assert end == ds.meta["documents"]["max_position"] > SEQ
    with pytest.raises(MegalignError, match=f"pack {k}: a document's piece reaches position {end - 1} .*beyond "
                                            f"model.max_position_embeddings={end - 1}"):
        trainer.batches.replace(max_positions=end - 1).build(PackRef(1, k, 0))
    trainer.batches.replace(max_positions=end).build(PackRef(1, k, 0))


def test_position_offsets_in_batches_skipalign_and_context_parallel():
    from megalign.data.positions import pack_positions
    from megalign.training.batch import context_parallel_share, thd_batch
    from megalign.training.objective import SFT

    lengths, offsets = np.array([5, 3, 4]), np.array([512, 0, 256])
    pack = Pack(np.arange(12), np.ones(12, np.uint8), lengths, offsets)
    restart = np.concatenate([np.arange(n) for n in lengths])
    expected = restart + np.repeat(offsets, lengths)
    assert thd_batch(pack, SFT("token")).position_ids.tolist() == expected.tolist()
    assert pack_positions(pack, "contiguous", 4096, 1.0, 0, 0, 0, 0) is None  # thd_batch adds the offsets itself
    # SkipAlign finds no segment in an all-ones mask: its positions are the contiguous ones, from the offsets too
    assert pack_positions(pack, "skipalign", 4096, 1.0, 0, 0, 0, 0).tolist() == expected.tolist()
    for rank in (0, 1):  # CP pads every sample to a multiple of 4 and continues its positions over the padding
        share = context_parallel_share(thd_batch(pack, SFT("token")), 2, rank)
        padded = [8, 4, 4]
        assert share.position_ids.tolist() == np.concatenate(
            [o + np.arange(n) for o, n in zip(offsets, padded)]).tolist()
