"""The trainer on megatron-core: packed THD micro-batches, megatron schedules (1F1B under PP), DDP with the
distributed optimizer, AdamW with warmup + cosine, gradient clipping, an objective (training/objective.py).

Built from parts: `Trainer(cfg, datasets=..., runtime=..., objective=...)`; each part defaults to what the config
names (the datasets at data.path, a fresh runtime from parallel/setup.py, training.objective). The config is
resolved once (megalign.config.resolve) and never changed. One optimizer step is

    refs = sampler.next_global_batch()      which packs (every rank sees the whole global batch)
    forward_backward(refs)                  this rank's micro-batches through megatron's schedule; global figures
    optimizer_step()                        clip, update, advance the LR schedule

and `forward_backward(refs, forward_only=True)` is the same pass without gradients (evaluation).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megalign import checkpoint as ckpt
from megalign import megatron_compat
from megalign.config import Config, checkpoint_dir, resolve, to_dict
from megalign.data.sampler import PackRef, PackSampler
from megalign.data.source import PackSource
from megalign.errors import MegalignError
from megalign.model.arithmetic import step_flops
from megalign.model.attention import resolve_backend
from megalign.model.build import build_model
from megalign.model.init import initialize_weights
from megalign.parallel.setup import Runtime, initialize
from megalign.training.balance import DataParallelBalance
from megalign.training.batch import Batch, BatchBuilder
from megalign.training.objective import make_objective
from megalign.training.prefetch import Prefetcher

log = logging.getLogger("megalign")


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float
    sequences: int
    tokens: int
    seconds: float
    flops: float
    skipped: bool = False  # the loss or gradient norm was not finite and training.on_nonfinite=skip
    dp_imbalance: float = 1.0  # the slowest DP rank's modelled cost over the mean (training/balance.py)
    host_seconds: float = 0.0  # of `seconds`, what the step waited for its micro-batches (built, or prefetched)
    # the objective's other global figures (preference objectives: rewards, reward accuracy and margin, NLL, groups)
    figures: dict = field(default_factory=dict)


def open_datasets(cfg: Config) -> list[PackSource]:
    from megalign.data.packed_dataset import PackedDataset

    return [PackedDataset(p, verify=cfg.data.verify) for p in cfg.data_paths]


class Trainer:
    def __init__(self, cfg: Config, datasets: Sequence[PackSource] | None = None, runtime: Runtime | None = None,
                 objective=None):
        self.datasets = list(datasets) if datasets is not None else open_datasets(cfg)
        for i, ds in enumerate(self.datasets):
            if not isinstance(ds, PackSource):
                raise TypeError(f"dataset {i} ({type(ds).__name__}) lacks the PackSource members (data/source.py)")
        self.cfg = cfg = resolve(cfg, max(ds.vocab_size for ds in self.datasets))
        _check_token_ids(self.datasets, cfg.model.vocab_size)
        self.runtime = runtime if runtime is not None else initialize(cfg)
        self.layout = self.runtime.layout
        self.attention_backend = resolve_backend(cfg.model.attention_backend)
        self.objective = objective if objective is not None else make_objective(cfg.training)
        if self.attention_backend == "te" and getattr(self.objective, "preference", False) and cfg.data.prompt == "shared":
            raise MegalignError("config key data.prompt=shared needs megalign's attention plan (explicit key sets), which "
                                "model.attention_backend=te does not take: set data.prompt=duplicate, or "
                                "model.attention_backend to flash, torch or sdpa")

        model = build_model(cfg, self.attention_backend, self.runtime.params_dtype)
        initialize_weights(model, cfg.training.seed)
        model.to(self.runtime.device)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        self.optimizer, self.scheduler = _optimizer_and_schedule(cfg, self.model, self.runtime.params_dtype)
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.grad_scale_func = self.optimizer.scale_loss

        t = cfg.training
        self.sampler = PackSampler([len(ds) for ds in self.datasets], cfg.data.weights, t.global_batch,
                                   self.layout.dp, t.seed)
        self.balance = DataParallelBalance(cfg.model, cfg.data.balance)  # which DP rank runs which packs
        self.batches = BatchBuilder(self.datasets, cfg.data, self.objective, t.seed,
                                    cfg.model.max_position_embeddings, cfg.model.vocab_size, self.layout.cp,
                                    self.layout.cp_rank,
                                    sequence_parallel_tp=cfg.parallel.tp if cfg.parallel.sp else 1)
        # the next step's micro-batches built while this one computes (data.prefetch; training/prefetch.py)
        self.prefetcher = Prefetcher(self.runtime.device) if cfg.data.prefetch else None
        self.host_seconds = 0.0  # the main thread's time getting micro-batches, summed (train_step reads it)
        self.step = 0
        self.checkpoints = ckpt.CheckpointStore(checkpoint_dir(cfg))
        self.saved_step: int | None = None  # the step of the newest checkpoint of this run
        self.source: dict = {}  # the origin of the weights (tools/convert_checkpoint.py), kept in every save
        self.started_from = self._restore()

    # -- one optimizer step ----------------------------------------------------------------------------
    def forward_backward(self, refs: Sequence[PackRef], forward_only: bool = False,
                         batches: BatchBuilder | None = None, next_refs: Sequence[PackRef] | None = None
                         ) -> dict[str, float]:
        """Forward (and, unless forward_only, backward) over the packs `refs` of every DP rank, this rank taking
        its share; gradients accumulate into the model's buffers. Returns the objective's global figures
        ({"loss": ...}), the same on every rank. `batches`: another builder (other data, objective, positions).
        `next_refs`: the packs of the step after, whose micro-batches are then built while this one computes."""
        batches = batches or self.batches
        if not forward_only:
            self.zero_grad()
        upcoming = None if next_refs is None else self._share(next_refs, batches)
        return batches.objective.metrics(self.forward_sums(self._share(refs, batches), forward_only, batches,
                                                           upcoming))

    def _share(self, refs: Sequence[PackRef], batches: BatchBuilder) -> list[PackRef]:
        return self.balance.assign(refs, batches.datasets, self.layout.dp).shares[self.layout.dp_rank]

    def micro_batches(self, mine: Sequence[PackRef], batches: BatchBuilder,
                      upcoming: Sequence[PackRef] | None = None) -> list[Batch]:
        """This rank's micro-batches for `mine` on the device (prefetched when they were), then the prefetch of
        `upcoming`'s. A prefetch belongs to its builder (held, compared by identity): another builder's, e.g. one
        with another objective, is never taken for this one's."""
        started = time.perf_counter()
        if self.prefetcher is None:
            built = [batches.build(r).to(self.runtime.device) for r in mine]
        else:
            built = self.prefetcher.take(batches, tuple(mine), lambda: [batches.build(r) for r in mine])
            if upcoming:
                self.prefetcher.submit(batches, tuple(upcoming), lambda: [batches.build(r) for r in upcoming])
        self.host_seconds += time.perf_counter() - started
        return built

    def forward_sums(self, mine: Sequence[PackRef], forward_only: bool, batches: BatchBuilder,
                     upcoming: Sequence[PackRef] | None = None) -> torch.Tensor:
        """This rank's packs `mine` through megatron's schedule; the objective's sums over every rank (a
        collective: every rank calls it, one with no packs too, which adds nothing)."""
        reports = []
        if mine:
            micro_batches = self.micro_batches(mine, batches, upcoming)
            training = self.model.training
            if forward_only:
                self.model.eval()
            try:
                reports = get_forward_backward_func()(
                    forward_step_func=partial(self._forward_step, batches.objective),
                    data_iterator=iter(micro_batches),
                    model=[self.model],
                    num_microbatches=len(micro_batches),
                    seq_length=max(len(b.tokens) for b in micro_batches),
                    micro_batch_size=1,
                    forward_only=forward_only,
                )
            finally:
                self.model.train(training)
        return self._global_sums(batches.objective, reports)

    @staticmethod
    def _forward_step(objective, data_iterator, model):
        batch: Batch = next(data_iterator)
        output = model(
            input_ids=batch.tokens.unsqueeze(0),
            position_ids=batch.position_ids.unsqueeze(0),
            attention_mask=None,
            labels=batch.labels.unsqueeze(0),
            packed_seq_params=batch.packed_seq_params(),
        )
        return output, partial(objective.loss, inputs=batch.loss)

    def _global_sums(self, objective, reports: list[dict]) -> torch.Tensor:
        """The objective's sums of the reports over every rank. Only the last pipeline stage has the losses, and
        its TP ranks hold the same values: one of them speaks."""
        sums = objective.sums(reports if self.layout.is_last_stage and self.layout.tp_rank == 0 else [])
        sums = sums.to(self.runtime.comm_device)
        dist.all_reduce(sums)
        return sums.cpu()

    def gradient_norm(self) -> float:
        """The global norm of the gradients accumulated so far (what optimizer_step clips), without a step."""
        self.optimizer.prepare_grads()
        return float(self.optimizer.get_grad_norm())

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def optimizer_step(self, loss: float = 0.0) -> tuple[float, float, bool]:
        """Clip, update, advance the LR schedule and the step counter; returns (grad norm, lr, skipped).

        The gradient norm is computed before the update: when it or `loss` is NaN or inf, no weight changes, and
        training.on_nonfinite says what happens (error: stop, naming the step; skip: this step updates nothing)."""
        grad_norm = self.gradient_norm()  # the same on every rank: they all take the same branch
        skipped = not (math.isfinite(grad_norm) and math.isfinite(loss))
        if skipped and self.cfg.training.on_nonfinite == "error":
            raise MegalignError(
                f"step {self.step + 1}: the loss is {loss} and the gradient norm {grad_norm}; nothing was updated "
                "or saved. Lower training.lr, check the data (tools/inspect_dataset.py --verify full) and the "
                "checkpoint it started from, or set training.on_nonfinite=skip to skip such steps")
        if skipped:
            self.zero_grad()
        else:
            self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return grad_norm, self.optimizer.param_groups[0]["lr"], skipped

    def train_step(self, batches: BatchBuilder | None = None) -> StepResult:
        """One optimizer step on the sampler's next global batch (built by `batches`, default the run's)."""
        started, host_before = time.perf_counter(), self.host_seconds
        batches = batches or self.batches
        refs = self.sampler.next_global_batch()
        upcoming = None  # the packs of the step after (the sampler is a pure function of its position)
        if self.step + 1 < self.cfg.training.steps:
            upcoming = self.sampler.packs_at(self.sampler.consumed, self.cfg.training.global_batch)
        figures = self.forward_backward(refs, batches=batches, next_refs=upcoming)
        grad_norm, lr, skipped = self.optimizer_step(figures["loss"])
        lengths = batches.sequence_lengths(refs)
        balance = self.balance.assign(refs, batches.datasets, self.layout.dp)  # the split just run (kept)
        return StepResult(
            step=self.step, loss=figures["loss"], lr=lr, grad_norm=grad_norm, sequences=len(lengths),
            tokens=int(sum(lengths)), seconds=time.perf_counter() - started,
            flops=step_flops(self.cfg.model, self.cfg.model.padded_vocab_size, lengths), skipped=skipped,
            dp_imbalance=balance.imbalance, host_seconds=self.host_seconds - host_before,
            figures={k: v for k, v in figures.items() if k != "loss"},
        )

    def close(self) -> None:
        """Stop the prefetch worker (a build under way is waited for, its batches dropped); later steps build
        their micro-batches in place."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    # -- checkpoints -------------------------------------------------------------------------------------
    def _parts(self) -> ckpt.TrainingParts:
        return ckpt.TrainingParts(self.model.module, self.optimizer, self.scheduler, self.layout)

    def _identity(self) -> ckpt.RunIdentity:
        return ckpt.RunIdentity(ckpt.model_identity(self.cfg.model), ckpt.data_identity(self.datasets),
                                self.cfg.training.seed)

    def _restore(self) -> str | None:
        """Continue a run (checkpoint.resume_from, else the newest checkpoint in the run's directory), or start
        a new one from weights (checkpoint.init_from), or from the seeded initialisation. Says which."""
        c = self.cfg.checkpoint
        resume = ckpt.resolve(c.resume_from) if c.resume_from else (self.checkpoints.latest() if c.resume else None)
        if resume is not None:
            self.load_checkpoint(resume)
            return f"resumed from {resume} at step {self.step}"
        if c.init_from:
            manifest = ckpt.load_weights(self.model.module, c.init_from, self.cfg.model)
            self.source = manifest.get("source", {})
            self.optimizer.reload_model_params()  # the optimizer's fp32 main copies follow the loaded weights
            return f"weights from {c.init_from} ({manifest['kind']} checkpoint, step {manifest['step']})"
        return None

    def load_checkpoint(self, path: str | Path) -> ckpt.Restored:
        """Continue from the training checkpoint at `path` (saved at any TP/PP/DP layout) as if never stopped."""
        restored = ckpt.load_training(self._parts(), path, self._identity(), self.sampler.state_dict())
        self.sampler.load_state_dict(restored.sampler)
        if restored.rng is not None:
            ckpt.set_rng_state(restored.rng)
        self.step = self.saved_step = restored.step
        self.source = restored.manifest.get("source", {})
        return restored

    def save_checkpoint(self) -> Path:
        """Everything needed to resume, published atomically under checkpoint.dir (collective)."""
        sampler = self.sampler.state_dict()
        manifest = ckpt.training_manifest(self._identity(), self.step, self.layout, sampler, self.source,
                                          to_dict(self.cfg))
        where = ckpt.save_training(self._parts(), self.step, sampler, ckpt.rng_state(), manifest, self.checkpoints,
                                   keep=self.cfg.checkpoint.keep or None)
        self.saved_step = self.step
        return where


def _check_token_ids(datasets: Sequence[PackSource], vocab_size: int) -> None:
    """Before anything is built: every dataset's recorded largest token id fits the model's vocabulary (the
    batch builder checks each pack again as it is read: a file damaged later, or a dataset without the record)."""
    for ds in datasets:
        largest = ds.max_token_id
        if largest is not None and largest >= vocab_size:
            raise MegalignError(f"dataset {ds.fingerprint()['path']} holds token ids up to {largest}, beyond the "
                                f"model's vocabulary of {vocab_size} (model.vocab_size): it was made with another "
                                "tokenizer, or model.vocab_size is too small")


def _optimizer_and_schedule(cfg: Config, model, params_dtype: torch.dtype):
    t = cfg.training
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
            bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        [model],
    )
    warmup = int(round(t.warmup_fraction * t.steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else t.lr, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=t.steps, lr_decay_style="cosine", start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.steps, wd_incr_style="constant",
        # a resumed run follows this config's schedule (e.g. more steps); the checkpoint gives the position
        **megatron_compat.SCHEDULER_FOLLOWS_CONFIG,
    )
    return optimizer, scheduler
