"""Run under torchrun by the tests: train a few steps at one layout and write what the tests compare.

  torchrun --nproc_per_node N tests/training/distributed_checks.py OUT.json key=value ...

Every step uses the next loss mode (sequence, token, pack), so one launch checks all three. Rank 0 writes
{"steps": [{"loss", "grad_norm"}...], "rng": {...}, "skipalign": {...}, "packed_vs_separate": {...}} (the last
only at world 1).
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def rng_semantics(layout) -> dict:
    """What megatron means by its RNG streams, observed on the CPU emulation."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    seed = 1234
    model_parallel_cuda_manual_seed(seed)  # fresh streams (building the model drew from them)
    torch.manual_seed(seed)
    plain = torch.rand(4)
    torch.manual_seed(seed)
    first = torch.rand(2)
    with get_cuda_rng_tracker().fork():
        tp_stream = torch.rand(4)
    rest = torch.rand(2)
    expected_tp = torch.rand(4, generator=torch.Generator().manual_seed(seed + 2718 + layout.tp_rank))
    gathered = [torch.zeros(4) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tp_stream)
    return {
        "fork_restores_default_stream": torch.equal(torch.cat([first, rest]), plain),
        "tp_stream_is_megatrons": torch.equal(tp_stream, expected_tp),
        "tp_streams": [g.tolist() for g in gathered],
    }


def packed_vs_separate(trainer) -> dict:
    """Per-token losses and gradients of one pack equal those of its samples run one at a time."""
    import numpy as np
    import torch

    from megalign.data.packed_dataset import Pack
    from megalign.training.batch import thd_batch
    from megalign.training.objective import SFT

    model = trainer.model.module
    ds = trainer.datasets[0]
    k = max(range(len(ds)), key=lambda i: len(ds[i].lengths))  # the pack with the most samples
    pack = ds[k]

    def losses_and_grads(p: Pack):
        batch = thd_batch(p, SFT("token"))
        weight = batch.loss.per_token["weight"]
        trainer.model.zero_grad_buffer()  # DDP's hooks accumulate gradients into main_grad
        out = model(input_ids=batch.tokens[None], position_ids=batch.position_ids[None], attention_mask=None,
                    labels=batch.labels[None], packed_seq_params=batch.packed_seq_params()).reshape(-1)
        (out * weight).sum().backward()
        grads = {n: q.main_grad.detach().clone() for n, q in model.named_parameters()}
        return (out * weight).detach(), grads

    packed_losses, packed_grads = losses_and_grads(pack)
    bounds = np.concatenate([[0], np.cumsum(pack.lengths)])
    separate_losses, separate_grads = [], {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        losses, grads = losses_and_grads(Pack(pack.tokens[a:b], pack.loss_mask[a:b], np.array([b - a])))
        separate_losses.append(losses)
        for n, g in grads.items():
            separate_grads[n] = separate_grads.get(n, 0) + g
    separate = torch.cat(separate_losses)
    grad_diff = max(float((packed_grads[n] - separate_grads[n]).abs().max()) for n in packed_grads)
    grad_scale = max(float(g.abs().max()) for g in packed_grads.values())
    trainer.model.zero_grad_buffer()
    return {"samples": len(pack.lengths), "loss_max_abs_diff": float((packed_losses - separate).abs().max()),
            "loss_max": float(packed_losses.abs().max()), "grad_max_abs_diff": grad_diff, "grad_max": grad_scale}


def loss_and_grad_norm(trainer, refs, batches=None) -> dict:
    """What train_step reports for the packs `refs`, without the update (the weights and optimizer stay as they
    are): the trainer's own forward_backward, then the gradient norm the optimizer step would compute."""
    loss = trainer.forward_backward(refs, batches=batches)["loss"]
    grad_norm = trainer.gradient_norm()
    trainer.zero_grad()
    return {"loss": loss, "grad_norm": grad_norm}


def skipalign_check(trainer, sharpen: float = 16.0) -> dict:
    """The first step's packs at the initial weights, without updates: contiguous positions (as the first step
    will see them), then with the query/key/value weights scaled by `sharpen` (a power of 2: undone exactly) so
    that attention, nearly uniform at initialization, depends on positions: contiguous again, SkipAlign with zero
    skips (skipalign_fraction=0) and SkipAlign over a 4096 window."""
    import dataclasses

    import torch

    from megalign.training.objective import SFT

    sequence = trainer.batches.replace(objective=SFT("sequence"))

    def positions(**keys):
        return sequence.replace(data=dataclasses.replace(trainer.cfg.data, **keys))

    refs = trainer.sampler.packs_at(trainer.sampler.consumed, trainer.sampler.global_batch)
    result = {"first_step": loss_and_grad_norm(trainer, refs, sequence)}
    qkv = [p for n, p in trainer.model.module.named_parameters() if n.endswith("linear_qkv.weight")]
    with torch.no_grad():
        for p in qkv:
            p.mul_(sharpen)
    result["contiguous"] = loss_and_grad_norm(trainer, refs, sequence)
    result["zero_skips"] = loss_and_grad_norm(
        trainer, refs, positions(positions="skipalign", skipalign_window=4096, skipalign_fraction=0.0))
    result["skipalign"] = loss_and_grad_norm(
        trainer, refs, positions(positions="skipalign", skipalign_window=4096, skipalign_fraction=1.0))
    with torch.no_grad():
        for p in qkv:
            p.div_(sharpen)
    return result


SHORT_LENGTHS = ([1, 3, 6, 11, 301], [2, 5, 7, 10, 97])  # one pack of an odd length (SP pads it)


def short_samples(vocab: int, seed: int = 7):
    """Two packs with samples of awkward lengths for context parallelism: not multiples of 2*cp, and shorter than
    2*cp (a CP rank then holds nothing but padding of that sample)."""
    import numpy as np

    from megalign.data.packed_dataset import Pack
    from megalign.data.source import InMemoryPacks

    rng = np.random.default_rng(seed)
    packs = []
    for lengths in SHORT_LENGTHS:
        n = sum(lengths)
        mask = (rng.random(n) < 0.7).astype(np.uint8)
        packs.append(Pack(rng.integers(0, vocab, n), mask, np.array(lengths)))
    return InMemoryPacks(packs, vocab_size=vocab, name="short-samples")


def short_samples_step(trainer) -> dict:
    """A second trainer, built from in-memory packs on the first one's runtime: one step over both packs."""
    from megalign.config import updated
    from megalign.training.trainer import Trainer

    cfg = updated(trainer.cfg, training={"global_batch": 2, "loss": "sequence", "seed": 0},
                  checkpoint={"resume": False})
    other = Trainer(cfg, datasets=[short_samples(trainer.cfg.model.vocab_size)], runtime=trainer.runtime)
    r = other.train_step()
    return {"loss": r.loss, "grad_norm": r.grad_norm, "sequences": r.sequences}


# preference groups per pack: (prompt length, [chosen, rejected...]); a 1-token prompt and 1-token answers (shorter
# than 2*cp), M = 2 and M = 1, prompts of several LOGO chunks (data.logo_chunk=8)
PREFERENCE_PACKS = ([(37, [9, 4, 1]), (1, [5, 3])], [(22, [1, 6]), (50, [12, 7, 3])])


def preference_packs(vocab: int, seed: int = 11):
    import dataclasses

    import numpy as np

    from megalign.data.packed_dataset import Pack
    from megalign.data.source import InMemoryPacks

    @dataclasses.dataclass(frozen=True)
    class Scored(Pack):  # reference log-probs per sample (Pack.reference_logps once the data side has it)
        reference_logps: np.ndarray | None = None

    rng = np.random.default_rng(seed)
    packs = []
    for groups in PREFERENCE_PACKS:
        lengths = [n for p, r in groups for n in (p, *r)]
        roles = [role for _, r in groups for role in (0, *range(1, len(r) + 1))]
        mask = np.concatenate([np.full(n, int(role > 0), np.uint8) for n, role in zip(lengths, roles)])
        refs = np.where(np.array(roles) > 0, rng.uniform(-40, -10, len(roles)), np.nan)
        packs.append(Scored(rng.integers(0, vocab, sum(lengths)), mask, np.array(lengths), roles=np.array(roles),
                            reference_logps=refs))
    return InMemoryPacks(packs, vocab_size=vocab, name="preference")


def preference_check(trainer, sharpen: float = 16.0) -> dict:
    """Preference objectives on a second trainer (in-memory groups, the first one's runtime), at its initial
    weights with query/key/value sharpened (attention then depends on positions): dpo with the prompt shared and
    duplicated, logo with LOGO positions (a 4096 window), simpo with logo positions duplicated."""
    import dataclasses

    import torch

    from megalign.config import updated
    from megalign.training.preference import Preference
    from megalign.training.trainer import Trainer

    cfg = updated(trainer.cfg, training={"global_batch": 2, "objective": "dpo", "seed": 0},
                  checkpoint={"resume": False})
    other = Trainer(cfg, datasets=[preference_packs(trainer.cfg.model.vocab_size)], runtime=trainer.runtime)
    with torch.no_grad():
        for n, p in other.model.module.named_parameters():
            if n.endswith("linear_qkv.weight"):
                p.mul_(sharpen)
    refs = other.sampler.packs_at(0, 2)
    logo = dict(positions="logo", logo_window=4096, logo_chunk=8)

    def run(objective, **data):
        builder = other.batches.replace(objective=objective, data=dataclasses.replace(other.cfg.data, **data))
        return loss_and_grad_norm(other, refs, builder)

    return {"dpo shared": run(Preference("dpo", 0.1)), "dpo duplicate": run(Preference("dpo", 0.1), prompt="duplicate"),
            "logo shared": run(Preference("logo", 10.0, 3.0, nll_weight=0.1), **logo),
            "logo contiguous": run(Preference("logo", 10.0, 3.0, nll_weight=0.1)),
            "simpo logo duplicate": run(Preference("simpo", 2.0, 0.5), prompt="duplicate", **logo),
            "simpo logo shared": run(Preference("simpo", 2.0, 0.5), **logo)}


def validation_check(trainer) -> list[dict]:
    """The validation loss (overall and per length bucket) of the freshly built model, per weighting, on the run's
    data plus the short-samples packs and one more pack: 9 packs, which do not split evenly over 2 DP ranks."""
    from megalign.data.source import InMemoryPacks
    from megalign.training.objective import SFT
    from megalign.training.validation import Validator

    vocab = trainer.cfg.model.vocab_size
    short = short_samples(vocab)
    datasets = [*trainer.datasets, short, InMemoryPacks([short[0]], vocab_size=vocab, name="one-pack")]
    return [Validator(trainer, datasets, [64, 256], objective=SFT(mode)).run() for mode in ("sequence", "token")]


def three_steps(trainer) -> list[dict]:
    """One optimizer step per loss mode: what train_step reports."""
    from megalign.training.objective import SFT

    steps = []
    for mode in ("sequence", "token", "pack"):
        r = trainer.train_step(trainer.batches.replace(objective=SFT(mode)))
        steps.append({"loss": r.loss, "grad_norm": r.grad_norm, "sequences": r.sequences})
    return steps


def main():
    out_path, overrides = sys.argv[1], sys.argv[2:]
    import torch.distributed as dist

    from megalign.config import load_config, validate
    from megalign.parallel.launcher import world_size_from_env
    from megalign.parallel.setup import shutdown
    from megalign.training.trainer import Trainer

    cfg = load_config(None, overrides)
    validate(cfg, world_size_from_env())
    trainer = Trainer(cfg)
    result = {"rng": rng_semantics(trainer.layout)}
    if trainer.layout.world_size == 1:
        from megalign.model.arithmetic import parameter_count

        result["packed_vs_separate"] = packed_vs_separate(trainer)
        result["parameters"] = {"built": sum(p.numel() for p in trainer.model.module.parameters()),
                                "counted": parameter_count(trainer.cfg.model, trainer.cfg.model.padded_vocab_size)}
    result["validation"] = validation_check(trainer)  # before any step: the same weights at every layout
    result["skipalign"] = skipalign_check(trainer)
    if cfg.parallel.tp > 1:  # the same steps from the same weights with sequence parallelism switched
        from megalign.config import updated

        switched = updated(cfg, parallel={"sequence_parallel": not cfg.parallel.sp}, checkpoint={"resume": False})
        result["sequence_parallel_switched"] = three_steps(Trainer(switched, runtime=trainer.runtime))
    result["steps"] = three_steps(trainer)
    result["short_samples"] = short_samples_step(trainer)
    result["preference"] = preference_check(trainer)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
