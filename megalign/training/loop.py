"""The run: steps, per-step metrics, console/progress output, periodic checkpoints, preemption, the final
checkpoint, and how it ended (training/status.py)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from megalign.checkpoint.preemption import PreemptionWatch
from megalign.training.metrics import MetricsLogger
from megalign.training.status import RunStatus
from megalign.training.trainer import StepResult, Trainer
from megalign.training.validation import validator_for


@dataclass(frozen=True)
class RunEnd:
    status: RunStatus
    step: int
    reason: str
    records: list


def metrics_record(r: StepResult, world_size: int) -> dict:
    return {
        "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "sequences": r.sequences,
        "tokens": r.tokens, "step_time_s": r.seconds, "tokens_per_s": r.tokens / r.seconds,
        "tflops_per_gpu": r.flops / r.seconds / world_size / 1e12, "skipped": int(r.skipped),
        "dp_imbalance": r.dp_imbalance,  # modelled slowest DP rank / mean (training/balance.py)
        "host_seconds": r.host_seconds,  # the step's wait for its micro-batches (prefetched: ~0)
        **r.figures,  # the objective's own figures (preference: rewards, reward accuracy and margin, NLL, groups)
    }


def train(trainer: Trainer, log: logging.Logger, watch: PreemptionWatch | None = None) -> RunEnd:
    """Run to training.steps (or run.stop_at_step, or a signal). `watch`: one the caller has already entered, to
    catch signals from before the trainer was built; None: the loop watches for them itself."""
    cfg, layout = trainer.cfg, trainer.layout
    speaker = layout.rank == 0
    metrics = MetricsLogger(cfg, enabled=speaker, resumed_at=trainer.saved_step)
    out = Path(cfg.run.output_dir)
    log.info(f"megalign: {layout.world_size} processes (tp {layout.tp}, pp {layout.pp}, cp {layout.cp}, "
             f"dp {layout.dp}) on {trainer.runtime.device.type}, attention {trainer.attention_backend}, "
             f"objective {trainer.objective.name} ({cfg.training.loss}), "
             f"{sum(len(d) for d in trainer.datasets)} packs, global batch {cfg.training.global_batch}")
    if trainer.started_from:
        log.info(trainer.started_from)
    records = []
    preempted = None
    bar = tqdm(total=cfg.training.steps, initial=trainer.step, desc="train",
               disable=not (speaker and cfg.run.progress), leave=False)
    validator = validator_for(trainer)
    watching = nullcontext(watch) if watch is not None else PreemptionWatch()
    last_step = min(cfg.training.steps, cfg.run.stop_at_step or cfg.training.steps)
    try:
        with watching as watch:
            watch.device = trainer.runtime.comm_device
            while trainer.step < last_step:
                result = trainer.train_step()
                every = cfg.training.eval_interval
                due = validator is not None and (result.step % every == 0 or result.step == last_step)
                valid = validator.run() if due else None
                _report(result, valid, cfg, layout, metrics, bar, records, log)
                stop = watch.agreed()
                interval = cfg.checkpoint.interval
                if stop or (interval and result.step % interval == 0):
                    _save(trainer, log)
                if stop:
                    preempted = watch.signal_name
                    break
    finally:
        trainer.close()
        bar.close()
        metrics.close()
    if preempted:
        log.info(f"stopped by {preempted} after step {trainer.step}: the checkpoint above holds the run; "
                 "run the same command again to resume")
    elif (cfg.checkpoint.save_at_end or trainer.step < cfg.training.steps) and trainer.saved_step != trainer.step:
        _save(trainer, log)
    if records:
        tail = [r["loss"] for r in records[-5:]]
        log.info(f"loss {records[0]['loss']:.4f} at step {records[0]['step']} -> {records[-1]['loss']:.4f} at step "
                 f"{records[-1]['step']} (mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f})")
    log.info(f"metrics: {out / 'metrics.jsonl'}; log: {out / 'train.log'}; tensorboard: {out / 'tensorboard'}")
    if preempted:
        return RunEnd(RunStatus.STOPPED, trainer.step, f"stopped by {preempted}", records)
    if trainer.step < cfg.training.steps:
        return RunEnd(RunStatus.PAUSED, trainer.step, f"run.stop_at_step={cfg.run.stop_at_step}", records)
    return RunEnd(RunStatus.FINISHED, trainer.step, f"training.steps={cfg.training.steps}", records)


def _save(trainer: Trainer, log: logging.Logger) -> None:
    started = time.perf_counter()
    where = trainer.save_checkpoint()
    size = sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
    log.info(f"checkpoint: {where} ({size / 2**20:,.1f} MiB in {time.perf_counter() - started:.1f} s)")


def _report(result: StepResult, valid: dict | None, cfg, layout, metrics, bar, records: list,
            log: logging.Logger) -> None:
    record = metrics_record(result, layout.world_size)
    if valid is not None:
        record.update({f"valid_{k}": v for k, v in valid.items()})
        buckets = " ".join(f"{k[len('loss/'):]} {v:.4f}" for k, v in valid.items() if k.startswith("loss/"))
        log.info(f"step {result.step}: valid_loss {valid['loss']:.4f} ({buckets}) over {valid['sequences']} "
                 "held-out samples")
    records.append(record)
    metrics.log(record)
    bar.update(1)
    bar.set_postfix(loss=f"{result.loss:.4f}")
    if result.skipped:
        log.warning(f"step {result.step}: loss {result.loss} gradient norm {result.grad_norm}: not finite, skipped "
                    "(training.on_nonfinite=skip)")
    if result.step % cfg.run.log_interval == 0 or result.step == cfg.training.steps:
        log.info(f"step {result.step}/{cfg.training.steps} loss {result.loss:.4f} lr {result.lr:.3g} "
                 f"grad_norm {result.grad_norm:.3f} seqs {result.sequences} tokens {result.tokens} "
                 f"{record['tokens_per_s']:,.0f} tok/s {record['tflops_per_gpu']:.4f} TFLOP/s/gpu")
