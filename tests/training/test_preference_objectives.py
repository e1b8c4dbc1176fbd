"""Preference objectives against a hand computation on transformers: a tiny HF Llama imported into megalign, packs of
preference groups (shared prompt, and duplicated), the trainer's own forward_backward and gradient norm; against
the HF model run on each prompt + response alone (no packing, no sharing), the formulas written out per group.
Also: a shared prompt gives exactly the per-response log-probs and gradients of duplicated prompts, and the errors
for a missing reference, a non-preference objective on preference data and an unknown objective."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalign.config import Config, TrainingConfig, updated
from megalign.data.groups import CHOSEN, PROMPT, REJECTED
from megalign.data.packed_dataset import Pack
from megalign.data.source import InMemoryPacks
from megalign.errors import MegalignError
from megalign.training.preference import DEFAULTS, Preference

VOCAB = 640
# groups: (prompt length, [chosen length, rejected lengths...]); M = 2 and M = 1 mixed, one prompt of 1 token
PACKS = [[(21, [7, 5, 9]), (13, [4, 6])], [(30, [8, 3, 5]), (1, [6, 4])]]


@dataclasses.dataclass(frozen=True)
class ScoredPack(Pack):
    """A pack with a reference log-prob per sample (the prompts' unused): what a scored dataset will give."""

    reference_logps: np.ndarray | None = None


def make_packs(seed: int = 0):
    rng = np.random.default_rng(seed)
    packs, groups = [], []
    for spec in PACKS:
        tokens, mask, lengths, roles, refs = [], [], [], [], []
        for prompt_len, responses in spec:
            prompt = rng.integers(0, VOCAB, prompt_len)
            answers = [rng.integers(0, VOCAB, n) for n in responses]
            scores = [float(rng.uniform(-60, -20)) for _ in responses]
            groups.append((prompt, answers, scores))
            for i, part in enumerate([prompt, *answers]):
                tokens.append(part), mask.append(np.full(len(part), int(i > 0), np.uint8)), lengths.append(len(part))
                roles.append(PROMPT if i == 0 else CHOSEN if i == 1 else REJECTED + i - 2)
                refs.append(np.nan if i == 0 else scores[i - 1])
        packs.append(ScoredPack(np.concatenate(tokens), np.concatenate(mask), np.array(lengths), roles=np.array(roles),
                                reference_logps=np.array(refs)))
    return packs, groups


def hf_response_logps(hf_model, prompt, answer) -> tuple[torch.Tensor, int]:
    ids = torch.from_numpy(np.concatenate([prompt, answer])).long()[None]
    logp = F.log_softmax(hf_model(ids).logits[0, :-1].float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logp[-len(answer):].sum(), len(answer)


def hand_loss(name: str, beta: float, gamma: float, ls: float, nll_weight: float, chosen, rejected) -> torch.Tensor:
    """One group's loss, written out from the papers: chosen/rejected = (sum log-prob, tokens, reference)."""
    sc, nc, rc = chosen
    nll = -sc / nc
    if name in ("dpo", "longpo", "ipo"):
        pairs = []
        for sl, _, rl in rejected:
            h = (sc - rc) - (sl - rl)
            if name == "ipo":
                pairs.append((h - 1 / (2 * beta)) ** 2)
            else:
                pairs.append(-(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h))
        loss = sum(pairs) / len(pairs)
    elif name == "simpo":
        loss = sum(-F.logsigmoid(beta * sc / nc - beta * sl / nl - gamma) for sl, nl, _ in rejected) / len(rejected)
    elif name == "orpo":
        def log_odds(s, n):
            p = torch.exp(s / n)
            return torch.log(p / (1 - p))

        loss = beta * sum(-F.logsigmoid(log_odds(sc, nc) - log_odds(sl, nl)) for sl, nl, _ in rejected) / len(rejected)
    elif name == "logo":
        rejected_mean = sum(sl / nl for sl, nl, _ in rejected) / len(rejected)
        loss = -F.logsigmoid(beta * sc / nc - beta * rejected_mean - gamma)
    else:
        raise ValueError(name)
    return loss + nll_weight * nll


@pytest.fixture(scope="module")
def setup(tiny_hf_model, tmp_path_factory):
    import transformers
    from megatron.core import parallel_state

    from megalign.convert import import_hf
    from megalign.parallel.setup import shutdown
    from megalign.training.trainer import Trainer

    if parallel_state.model_parallel_is_initialized():
        shutdown()
    imported = tmp_path_factory.mktemp("imported") / "ckpt"
    summary = import_hf(tiny_hf_model, imported)
    if parallel_state.model_parallel_is_initialized():
        shutdown()  # the import's single-process world
    packs, groups = make_packs()
    cfg = updated(Config(model=summary["model"]),
                  training={"global_batch": len(packs), "objective": "dpo", "lr": 1e-3, "warmup_fraction": 0},
                  checkpoint={"init_from": str(imported)}, data={"prefetch": False},
                  run={"device": "cpu", "output_dir": str(tmp_path_factory.mktemp("run"))})
    trainer = Trainer(cfg, datasets=[InMemoryPacks(packs, vocab_size=VOCAB, name="groups")])
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32).eval()
    yield trainer, hf_model, groups
    shutdown()


def megalign_loss_and_grad_norm(trainer, objective, prompt="shared"):
    builder = trainer.batches.replace(objective=objective, data=dataclasses.replace(trainer.cfg.data, prompt=prompt))
    refs = trainer.sampler.packs_at(0, trainer.sampler.global_batch)
    figures = trainer.forward_backward(refs, batches=builder)
    grad_norm = trainer.gradient_norm()
    trainer.zero_grad()
    return figures, grad_norm


def hf_loss_and_grad_norm(hf_model, groups, objective):
    hf_model.zero_grad()
    total = 0.0
    for prompt, answers, scores in groups:
        responses = [(*hf_response_logps(hf_model, prompt, a), r) for a, r in zip(answers, scores)]
        total = total + hand_loss(objective.name, objective.beta, objective.gamma, objective.label_smoothing,
                                  objective.nll_weight, responses[0], responses[1:])
    loss = total / len(groups)
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in hf_model.parameters() if p.grad is not None))
    return float(loss), norm


OBJECTIVES = [Preference("dpo", 0.1), Preference("dpo", 0.5, label_smoothing=0.2, nll_weight=0.3),
              Preference("ipo", 0.1), Preference("simpo", 2.0, 0.5), Preference("orpo", 0.1, nll_weight=1.0),
              Preference("logo", 10.0, 3.0, nll_weight=0.1), Preference("longpo", 0.1, nll_weight=1.0)]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}-{o.beta}")
def test_objective_equals_transformers_by_hand(setup, objective):
    trainer, hf_model, groups = setup
    expected_loss, expected_norm = hf_loss_and_grad_norm(hf_model, groups, objective)
    figures, norm = megalign_loss_and_grad_norm(trainer, objective)
    assert figures["groups"] == len(groups)
    assert figures["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert norm == pytest.approx(expected_norm, rel=1e-4)
    assert set(figures) >= {"chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "nll"}


def test_duplicated_prompts_give_the_same_loss_and_grad_norm(setup):
    trainer, hf_model, groups = setup
    for objective in (Preference("dpo", 0.1), Preference("logo", 10.0, 3.0, nll_weight=0.1)):
        shared = megalign_loss_and_grad_norm(trainer, objective, "shared")
        duplicate = megalign_loss_and_grad_norm(trainer, objective, "duplicate")
        assert shared[0]["loss"] == pytest.approx(duplicate[0]["loss"], rel=1e-5)
        assert shared[1] == pytest.approx(duplicate[1], rel=1e-5)
        for key in ("chosen_reward", "rejected_reward", "reward_accuracy", "nll"):
            assert shared[0][key] == pytest.approx(duplicate[0][key], rel=1e-5, abs=1e-7), key


def test_shared_prompt_equals_duplicated_prompt_per_response(setup):
    """Each response's summed log-prob, and the gradient of every parameter of a random combination of them, are
    the same with the prompt shared as with it repeated per response (the row is shorter: the prompts once)."""
    from megalign.data.sampler import PackRef

    trainer, _, _ = setup
    model = trainer.model.module
    objective = Preference("simpo", 2.0, 0.5)

    def per_response(prompt):
        builder = trainer.batches.replace(objective=objective,
                                          data=dataclasses.replace(trainer.cfg.data, prompt=prompt))
        batch = builder.build(PackRef(0, 0))
        trainer.model.zero_grad_buffer()
        out = model(input_ids=batch.tokens[None], position_ids=batch.position_ids[None], attention_mask=None,
                    labels=batch.labels[None], packed_seq_params=batch.packed_seq_params())
        logps = objective.response_logps(out, batch.loss)
        weights = torch.linspace(0.5, 1.5, len(logps))
        (logps * weights).sum().backward()
        grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        trainer.model.zero_grad_buffer()
        return len(batch.tokens), logps.detach(), grads

    shared_len, shared, shared_grads = per_response("shared")
    dup_len, duplicate, dup_grads = per_response("duplicate")
    assert shared_len == sum(p - 1 + len(r) + sum(r) for p, r in PACKS[0])  # the prompt once, its last token per response
    assert dup_len == sum(p * len(r) + sum(r) for p, r in PACKS[0])
    torch.testing.assert_close(shared, duplicate, rtol=1e-5, atol=0)
    scale = max(float(g.abs().max()) for g in dup_grads.values())
    for name, g in dup_grads.items():
        assert float((shared_grads[name] - g).abs().max()) <= 1e-5 * scale, name


def test_metrics_by_hand(setup):
    """Rewards, accuracy and margin of dpo, from the HF log-probs."""
    trainer, hf_model, groups = setup
    objective = Preference("dpo", 0.1)
    figures, _ = megalign_loss_and_grad_norm(trainer, objective)
    chosen, rejected, accuracy, nll = [], [], [], []
    with torch.no_grad():
        for prompt, answers, scores in groups:
            r = [(*hf_response_logps(hf_model, prompt, a), s) for a, s in zip(answers, scores)]
            rewards = [0.1 * float(s - ref) for s, _, ref in r]
            chosen.append(rewards[0]), rejected.append(np.mean(rewards[1:]))
            accuracy.append(np.mean([rewards[0] > x for x in rewards[1:]])), nll.append(-float(r[0][0]) / r[0][1])
    assert figures["chosen_reward"] == pytest.approx(np.mean(chosen), rel=1e-5)
    assert figures["rejected_reward"] == pytest.approx(np.mean(rejected), rel=1e-5)
    assert figures["reward_margin"] == pytest.approx(np.mean(chosen) - np.mean(rejected), rel=1e-4)
    assert figures["reward_accuracy"] == pytest.approx(np.mean(accuracy))
    assert figures["nll"] == pytest.approx(np.mean(nll), rel=1e-5)


def test_missing_reference_and_wrong_pairings_are_clear_errors(setup):
    from megalign.data.sampler import PackRef

    trainer, _, _ = setup
    packs, _ = make_packs()
    unscored = InMemoryPacks([Pack(p.tokens, p.loss_mask, p.lengths, roles=p.roles) for p in packs], VOCAB,
                             name="unscored")
    builder = trainer.batches.replace(datasets=[unscored], objective=Preference("dpo", 0.1))
    with pytest.raises(MegalignError, match=r"dataset unscored, pack 0: training.objective=dpo needs the reference.*"
                                            r"tools/score_reference.py.*simpo, orpo, logo"):
        builder.build(PackRef(0, 0))
    builder.replace(objective=Preference("logo", 10.0, 3.0)).build(PackRef(0, 0))  # reference-free: fine
    from megalign.training.objective import SFT

    with pytest.raises(MegalignError, match="dataset unscored holds preference groups.*training.objective=sft"):
        builder.replace(objective=SFT()).build(PackRef(0, 0))
    plain = InMemoryPacks([Pack(np.arange(10), np.ones(10, np.uint8), np.array([10]))], VOCAB, name="chat")
    with pytest.raises(MegalignError, match=r"dataset chat, pack 0: training.objective=dpo needs preference data"):
        builder.replace(datasets=[plain]).build(PackRef(0, 0))


def test_unknown_objective_and_bad_keys_name_the_key(tmp_path):
    from megalign.config import validate
    from megalign.training.objective import make_objective

    with pytest.raises(MegalignError, match="config key training.objective: 'kto' is not one of sft, dpo, ipo"):
        make_objective(TrainingConfig(objective="kto"))
    base = updated(Config(), run={"output_dir": str(tmp_path)})
    for keys, message in (({"objective": "kto"}, "training.objective: 'kto'"),
                          ({"objective": "dpo", "beta": -1.0}, "training.beta=-1.0 must be > 0"),
                          ({"objective": "simpo", "label_smoothing": 0.1}, "training.label_smoothing=0.1 applies to dpo"),
                          ({"objective": "logo", "nll_weight": -0.5}, "training.nll_weight=-0.5 must be >= 0")):
        with pytest.raises(MegalignError, match=message):
            validate(updated(base, training=keys), 1, with_data=False)
    with pytest.raises(MegalignError, match="data.prompt: 'both' is not one of shared, duplicate"):
        validate(updated(base, data={"prompt": "both"}), 1, with_data=False)
    assert make_objective(TrainingConfig(objective="logo")) == Preference("logo", **DEFAULTS["logo"])
    assert make_objective(TrainingConfig(objective="dpo", beta=0.3)).beta == 0.3


def test_validation_is_the_forward_only_pass(setup):
    from megalign.training.validation import Validator

    trainer, _, groups = setup
    figures = Validator(trainer, trainer.datasets, [64]).run()
    refs = trainer.sampler.packs_at(0, trainer.sampler.global_batch)
    assert figures["groups"] == len(groups)
    assert figures["loss"] == pytest.approx(trainer.forward_backward(refs, forward_only=True)["loss"], rel=1e-6)


def test_a_training_step_logs_the_preference_figures(setup):
    """Last in this module: it updates the weights. The run's own objective (training.objective=dpo)."""
    trainer, _, groups = setup
    step = trainer.train_step()
    assert math.isfinite(step.loss) and step.figures["groups"] == len(groups)
    assert set(step.figures) >= {"chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "nll"}
