"""The training loop on megatron-core: packed THD micro-batches, megatron schedules (1F1B under PP), DDP with
the distributed optimizer, AdamW with warmup + cosine, gradient clipping, LongAlign loss weighting."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megalign.checkpoint import CheckpointStore, load_training, load_weights, resolve, save_training
from megalign.config import Config
from megalign.data.packed_dataset import PackedDataset
from megalign.data.positions import pack_positions
from megalign.data.sampler import PackRef, PackSampler
from megalign.model.attention import resolve_backend
from megalign.model.build import build_model, padded_vocab_size
from megalign.model.init import initialize_weights
from megalign.parallel.setup import Layout, initialize, resolve_device
from megalign.training.batch import Batch, context_parallel_share, thd_batch
from megalign.training.loss import weighted_loss
from megalign.model.arithmetic import step_flops

log = logging.getLogger("megalign")


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float
    sequences: int
    tokens: int
    seconds: float
    flops: float


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        self.attention_backend = backend = resolve_backend(cfg.model.attention_backend)
        self.layout: Layout = initialize(cfg, self.device)
        self.datasets = [PackedDataset(p, verify=cfg.data.verify) for p in cfg.data_paths]
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = max(ds.meta["tokenizer"]["vocab_size"] for ds in self.datasets)
        self.params_dtype = torch.bfloat16 if self.device == "cuda" else torch.float32

        model = build_model(cfg, backend, self.params_dtype)
        initialize_weights(model, cfg.training.seed)
        model.to(self.device)
        self.transformer_config = model.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        t = cfg.training
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
                adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
                bf16=self.params_dtype == torch.bfloat16, params_dtype=self.params_dtype,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            ),
            [self.model],
        )
        warmup = int(round(t.warmup_fraction * t.steps))
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else t.lr, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=t.steps, lr_decay_style="cosine", start_wd=t.weight_decay, end_wd=t.weight_decay,
            wd_incr_steps=t.steps, wd_incr_style="constant",
            # a resumed run follows this config's schedule (e.g. more steps); the checkpoint gives the position
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
        )
        config = self.transformer_config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss

        self.sampler = PackSampler([len(ds) for ds in self.datasets], cfg.data.weights, t.global_batch,
                                   self.layout.dp, t.seed)
        self.padded_vocab = padded_vocab_size(cfg.model)
        self.step = 0
        self.checkpoints = CheckpointStore(cfg.checkpoint.dir or Path(cfg.run.output_dir) / "checkpoints")
        self.saved_step: int | None = None  # the step of the newest checkpoint of this run
        self.source: dict = {}  # the origin of the weights (tools/convert_checkpoint.py), kept in every save
        self.started_from = self._restore()

    # -- one optimizer step ----------------------------------------------------------------------------
    def _micro_batch(self, ref: PackRef) -> Batch:
        pack, d = self.datasets[ref.dataset][ref.pack], self.cfg.data
        # SkipAlign positions of the whole row, before the CP split (which keeps the whole padded row's positions)
        positions = pack_positions(pack, d.positions, d.skipalign_window or self.cfg.model.max_position_embeddings,
                                   d.skipalign_fraction, self.cfg.training.seed, ref.dataset, ref.pack, ref.epoch)
        batch = thd_batch(pack, self.cfg.training.loss, positions)
        if self.layout.cp > 1:
            batch = context_parallel_share(batch, self.layout.cp, self.layout.cp_rank)
        return batch.to(self.device)

    def _forward_step(self, data_iterator, model):
        batch: Batch = next(data_iterator)
        output = model(
            input_ids=batch.tokens.unsqueeze(0),
            position_ids=batch.position_ids.unsqueeze(0),
            attention_mask=None,
            labels=batch.labels.unsqueeze(0),
            packed_seq_params=batch.packed_seq_params(),
        )
        return output, partial(weighted_loss, weights=batch.loss_weight, count=batch.count)

    def sequence_lengths(self, refs: list[PackRef]) -> list[int]:
        lengths = []
        for r in refs:
            ds = self.datasets[r.dataset]
            first, last = ds.pack_boundaries[r.pack], ds.pack_boundaries[r.pack + 1]
            lengths.extend(ds.sample_lengths[first:last].tolist())
        return lengths

    def train_step(self) -> StepResult:
        started = time.perf_counter()
        global_batch = self.sampler.next_global_batch()
        mine = self.sampler.rank_share(global_batch, self.layout.dp_rank)
        micro_batches = [self._micro_batch(r) for r in mine]

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=max(len(b.tokens) for b in micro_batches),
            micro_batch_size=1,
            forward_only=False,
        )
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        loss = self._global_loss(reports)
        lengths = self.sequence_lengths(global_batch)
        return StepResult(
            step=self.step, loss=loss, lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            sequences=len(lengths), tokens=int(sum(lengths)), seconds=time.perf_counter() - started,
            flops=step_flops(self.cfg.model, self.padded_vocab, lengths),
        )

    def _global_loss(self, reports: list[dict]) -> float:
        """The global batch's loss: the sum over micro-batches and DP ranks of the weighted losses over the count.

        Only the last pipeline stage has the losses, and its TP ranks hold the same values: one of them speaks.
        """
        total = torch.zeros(2, dtype=torch.float64)
        if self.layout.is_last_stage and self.layout.tp_rank == 0:
            for r in reports:
                total += r["loss_sum_and_count"].double().cpu()
        total = total.to(self.comm_device())
        dist.all_reduce(total)
        loss_sum, count = total.tolist()
        return loss_sum / max(count, 1.0)

    def comm_device(self):
        """Where tensors for collectives live: this rank's GPU under NCCL, the CPU under gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")

    # -- checkpoints -------------------------------------------------------------------------------------
    def _restore(self) -> str | None:
        """Continue a run (checkpoint.resume_from, else the newest checkpoint in the run's directory), or start
        a new one from weights (checkpoint.init_from), or from the seeded initialisation. Says which."""
        c = self.cfg.checkpoint
        resume = resolve(c.resume_from) if c.resume_from else (self.checkpoints.latest() if c.resume else None)
        if resume is not None:
            self.source = load_training(self, resume).get("source", {})
            self.saved_step = self.step
            return f"resumed from {resume} at step {self.step}"
        if c.init_from:
            manifest = load_weights(self.model.module, c.init_from, self.cfg.model, self.padded_vocab)
            self.source = manifest.get("source", {})
            self.optimizer.reload_model_params()  # the optimizer's fp32 main copies follow the loaded weights
            return f"weights from {c.init_from} ({manifest['kind']} checkpoint, step {manifest['step']})"
        return None

    def save_checkpoint(self) -> Path:
        """Everything needed to resume, published atomically under checkpoint.dir (collective)."""
        where = save_training(self, self.checkpoints, keep=self.cfg.checkpoint.keep or None)
        self.saved_step = self.step
        return where
