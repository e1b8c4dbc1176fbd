"""Preference optimization on packed groups: the row layout of a group (shared or duplicated prompt) and the
objectives (dpo, ipo, simpo, orpo, logo, longpo), non-linear in per-response log-probability sums.

A group is consecutive samples of one pack, [prompt, chosen, rejected_0 .. rejected_{M-1}] (data/groups.py): the
prompt carries no loss, every token of a response is a target (its first one predicted by the prompt's last token).

Row layout (`group_rows`), per group of a prompt of P tokens:

  shared     [prompt 0 .. P-2] as one segment, then per response i the segment [prompt P-1] + response_i, which
             reads the prompt segment's keys and its own causally (never another response's): the attention plan
             (parallel/context.py, `contexts`) puts the prompt's keys before its own, so bottom-right causality lets
             every query see all of them. Positions continue the prompt's (P-1, P, ...): each response's log-probs
             are exactly those of prompt + response run alone, and the prompt is computed once.
  duplicate  per response i the segment prompt + response_i (an ordinary sample): (M+1) x the prompt's work.

The loss. Per response r, S_r = sum of its tokens' log-probs and N_r its tokens; every CP rank holds part of
each response, so S is all-reduced over the CP group (`_SumOverContextParallel`: the backward passes the
gradient to each rank's own share) and every CP rank computes the same non-linear loss of its groups. The loss of
a global batch is the mean over its groups: a micro-batch returns (sum of its groups' losses, number of groups)
and megatron divides by the global count (the count on CP rank 0 only, as sft's; its reports too).

Per group with chosen c and rejected j = 1..M (a_r = S_r / N_r, ref_r the reference log-prob of response r):

  dpo     mean_j [ -(1-ls) log s(beta h_j) - ls log s(-beta h_j) ],  h_j = (S_c - ref_c) - (S_j - ref_j)
  ipo     mean_j (h_j - 1/(2 beta))^2                                (IPO, Azar et al.: summed log-probs)
  simpo   mean_j -log s(beta a_c - beta a_j - gamma)
  orpo    beta mean_j -log s(log odds(a_c) - log odds(a_j)),  odds(a) = e^a / (1 - e^a)   (+ NLL, weight 1)
  logo    -log s(beta a_c - beta mean_j a_j - gamma)           (LOGO Eq. 3: the M rejected averaged; + 0.1 NLL)
  longpo  dpo against the short-context model's log-probs (LongPO), + NLL
  (+ nll_weight * NLL, NLL = -a_c, the chosen answer's per-token mean cross-entropy)

Rewards (logged): beta (S - ref) for the reference objectives, beta a otherwise; accuracy: the share of a
group's rejected answers whose reward is below the chosen one's; margin: chosen reward - mean rejected reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from megalign.config import PREFERENCE_OBJECTIVES, REFERENCE_OBJECTIVES, TrainingConfig
from megalign.data.groups import CHOSEN, PROMPT, REJECTED, check_roles
from megalign.errors import MegalignError
from megalign.training.objective import LossInputs

# per objective: beta, gamma, nll_weight when the training keys are unset
DEFAULTS = {
    "dpo": dict(beta=0.1, gamma=0.0, nll_weight=0.0),
    "ipo": dict(beta=0.1, gamma=0.0, nll_weight=0.0),
    "simpo": dict(beta=2.0, gamma=0.5, nll_weight=0.0),
    "orpo": dict(beta=0.1, gamma=0.0, nll_weight=1.0),
    "logo": dict(beta=10.0, gamma=3.0, nll_weight=0.1),  # LOGO on Llama-3-8B (M = 2)
    "longpo": dict(beta=0.1, gamma=0.0, nll_weight=1.0),
}
METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "nll")


# -- the row layout -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Responses:
    """The responses of a row: the segment that holds each (in the row's segments), its group (0.. in the row),
    its role (groups.CHOSEN, REJECTED + j) and its reference log-prob (None: the pack has none)."""

    segment: np.ndarray
    group: np.ndarray
    role: np.ndarray
    reference: np.ndarray | None = None


@dataclass(frozen=True)
class GroupRows:
    """A preference pack as THD segments: `index[t]` is the pack token that row token t copies; `lengths` the
    segments; `contexts[s]` the segment whose keys segment s reads before its own (-1: none)."""

    index: np.ndarray
    lengths: np.ndarray
    contexts: np.ndarray
    responses: Responses


def group_rows(roles, lengths, shared: bool = True, reference=None) -> GroupRows:
    """The row layout of a pack whose samples have `roles` (data/groups.py) and `lengths`; `reference`: per
    sample reference log-probs (the prompts' are ignored), or None."""
    roles, lengths = np.asarray(roles), np.asarray(lengths, dtype=np.int64)
    check_roles(roles)
    starts = np.cumsum(lengths) - lengths
    pieces, seg_lengths, contexts, segment, group, role, ref = [], [], [], [], [], [], []
    g, head, prompt = -1, -1, None
    for i, r in enumerate(roles.tolist()):
        span = np.arange(starts[i], starts[i] + lengths[i])
        if r == PROMPT:
            g, prompt, head = g + 1, span, -1
            if shared and len(span) > 1:  # the prompt but its last token, computed once
                head = len(seg_lengths)
                pieces.append(span[:-1]), seg_lengths.append(len(span) - 1), contexts.append(-1)
            continue
        own = np.concatenate([prompt[-1:] if shared else prompt, span])
        segment.append(len(seg_lengths)), group.append(g), role.append(r)
        ref.append(np.nan if reference is None else float(reference[i]))
        pieces.append(own), seg_lengths.append(len(own)), contexts.append(head)
    responses = Responses(np.array(segment, dtype=np.int64), np.array(group, dtype=np.int64),
                          np.array(role, dtype=np.int64), None if reference is None else np.array(ref))
    return GroupRows(np.concatenate(pieces), np.array(seg_lengths, dtype=np.int64), np.array(contexts, dtype=np.int64),
                     responses)


# -- the reduction over context parallelism ----------------------------------------------------------------------
class _SumOverContextParallel(torch.autograd.Function):
    """All-reduce (sum) of per-response partial sums over the CP group. Every CP rank then computes the same loss
    of the totals; the backward hands each rank the gradient of the total, which its own share's tokens carry
    (megatron sums the parameter gradients over the CP ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _context_parallel_group():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a < 0 (a per-token mean log-prob)."""
    return torch.log(-torch.expm1(a))


# -- the objectives -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preference:
    """One of the preference objectives (the module docstring gives the formulas)."""

    name: str
    beta: float
    gamma: float = 0.0
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    preference: ClassVar[bool] = True

    def __post_init__(self):
        if self.name not in PREFERENCE_OBJECTIVES:
            raise MegalignError(f"config key training.objective: {self.name!r} is not one of "
                                f"{', '.join(PREFERENCE_OBJECTIVES)}")

    @property
    def needs_reference(self) -> bool:
        return self.name in REFERENCE_OBJECTIVES

    def loss_inputs(self, targets: np.ndarray, lengths: np.ndarray, responses: Responses) -> LossInputs:
        """Per token: `target` (1 on a response's tokens) and `response` (its index); per group, not cut under
        CP: the chosen and rejected responses' indices, each response's token count and reference log-prob."""
        segment_of_token = np.repeat(np.arange(len(lengths)), lengths)
        response_of_segment = np.full(len(lengths), -1, dtype=np.int64)
        response_of_segment[responses.segment] = np.arange(len(responses.segment))
        response = response_of_segment[segment_of_token]
        target = targets * (response >= 0)
        n = np.bincount(np.maximum(response, 0), weights=target, minlength=len(responses.segment))
        groups = int(responses.group.max()) + 1 if len(responses.group) else 0
        chosen = np.zeros(groups, dtype=np.int64)
        rejected_count = np.bincount(responses.group[responses.role >= REJECTED], minlength=groups)
        rejected = np.zeros((groups, max(int(rejected_count.max(initial=0)), 1)), dtype=np.int64)
        mask = np.zeros(rejected.shape, dtype=np.float32)
        for r, (g, role) in enumerate(zip(responses.group.tolist(), responses.role.tolist())):
            if role == CHOSEN:
                chosen[g] = r
            else:
                rejected[g, role - REJECTED], mask[g, role - REJECTED] = r, 1.0
        reference = responses.reference if responses.reference is not None else np.zeros(len(n))
        per_response = {"chosen": chosen, "rejected": rejected, "rejected_mask": mask, "length": n,
                        "reference": reference}
        return LossInputs({"target": torch.from_numpy(target.astype(np.float32)),
                           "response": torch.from_numpy(np.maximum(response, 0))},
                          torch.tensor(groups, dtype=torch.int),
                          {k: torch.from_numpy(np.asarray(v, dtype=np.int64 if v.dtype.kind == "i" else np.float32))
                           for k, v in per_response.items()})

    def response_logps(self, per_token_loss: torch.Tensor, inputs) -> torch.Tensor:
        """S_r: each response's summed token log-probs, totalled over the CP group (with its gradient)."""
        logp = -(per_token_loss.reshape(-1).float() * inputs.per_token["target"])
        sums = logp.new_zeros(len(inputs.groups["length"])).index_add(0, inputs.per_token["response"], logp)
        group = _context_parallel_group()
        return sums if group is None else _SumOverContextParallel.apply(sums, group)

    def group_terms(self, s: torch.Tensor, inputs) -> dict[str, torch.Tensor]:
        """Per group: its loss and the logged figures (METRICS), from the per-response sums `s`."""
        x = inputs.groups
        n, ref, mask = x["length"], x["reference"], x["rejected_mask"]
        c, j = x["chosen"], x["rejected"]
        a = s / n
        nll = -a[c]
        if self.needs_reference:
            chosen_r, rejected_r = self.beta * (s[c] - ref[c]), self.beta * (s[j] - ref[j])
        else:
            chosen_r, rejected_r = self.beta * a[c], self.beta * a[j]
        logits = chosen_r[:, None] - rejected_r
        if self.name in ("dpo", "longpo"):
            ls = self.label_smoothing
            loss = _masked_mean(-(1 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits), mask)
        elif self.name == "ipo":
            loss = _masked_mean((logits / self.beta - 1 / (2 * self.beta)) ** 2, mask)
        elif self.name == "simpo":
            loss = _masked_mean(-F.logsigmoid(logits - self.gamma), mask)
        elif self.name == "orpo":
            log_odds = (a[c][:, None] - a[j]) - (_log1mexp(a[c])[:, None] - _log1mexp(a[j]))
            loss = self.beta * _masked_mean(-F.logsigmoid(log_odds), mask)
        else:  # logo: the rejected answers' length-normalised log-probs averaged inside the sigmoid
            loss = -F.logsigmoid(chosen_r - _masked_mean(rejected_r, mask) - self.gamma)
        loss = loss + self.nll_weight * nll
        rejected_mean = _masked_mean(rejected_r, mask)
        return {"loss": loss, "chosen_reward": chosen_r, "rejected_reward": rejected_mean,
                "reward_accuracy": _masked_mean((logits > 0).float(), mask),
                "reward_margin": chosen_r - rejected_mean, "nll": nll}

    def loss(self, per_token_loss: torch.Tensor, inputs):
        """megatron's loss_func contract: (sum of the groups' losses, number of groups, reports). The count and
        the reports are CP rank 0's only (the other CP ranks have count 0): the groups are counted once."""
        terms = self.group_terms(self.response_logps(per_token_loss, inputs), inputs)
        total = terms["loss"].sum()
        speaks = (inputs.count > 0).to(total.dtype)
        report = torch.stack([terms[k].detach().sum() for k in METRICS]) * speaks
        report = torch.cat([report, inputs.count.detach().to(report.dtype).reshape(1)])
        return total, inputs.count, {"preference": report}

    def sums(self, reports: list[dict]) -> torch.Tensor:
        total = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
        for r in reports:
            total += r["preference"].double().cpu()
        return total

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        values = sums.tolist()
        groups = max(values[-1], 1.0)
        return {k: v / groups for k, v in zip(METRICS, values)} | {"groups": values[-1]}


def make_preference(t: TrainingConfig) -> Preference:
    keys = {k: getattr(t, k) if getattr(t, k) is not None else v for k, v in DEFAULTS[t.objective].items()}
    return Preference(t.objective, label_smoothing=t.label_smoothing, **keys)
