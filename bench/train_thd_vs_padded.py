"""CPU training throughput of the example model: THD packs (sdpa) against the same tokens as padded batches.

Same samples, same model, same process, interleaved repeats; forward + backward per batch, real (non-padding)
tokens per second, medians over repeats:
  thd           a pack's samples concatenated, attention inside each sample (what megalign trains on)
  pack-causal   the same packs attended as ONE sequence (packing without THD: cross-sample attention)
  padded        the same samples in batches of --batch samples, each padded to the longest in its batch
                (LongAlign's "naive" batching; padding positions carry no loss but cost compute)

  python bench/train_thd_vs_padded.py [--packs 8] [--seq-length 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np

from common import example_dataset  # bench/, the script's folder, is on sys.path

warnings.filterwarnings("ignore")


def make_dataset(workdir: str, seq_length: int) -> str:
    return example_dataset(workdir, seq_length, n_long=60, n_short=240, min_words=300, max_words=1500,
                           vocab_size=2000)


def build(prefix: str):
    from megalign.config import load_config, validate
    from megalign.training.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "examples", "tiny.yaml"),
                      [f"data.path={prefix}", "run.device=cpu", "model.attention_backend=sdpa"])
    validate(cfg, 1)
    return Trainer(cfg)


def run_thd(model, batch, whole_pack: bool):
    import torch

    from megatron.core.packed_seq_params import PackedSeqParams

    params = batch.packed_seq_params()
    if whole_pack:  # one causal sequence over the whole pack
        n = len(batch.tokens)
        cu = torch.tensor([0, n], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n)
    out = model(input_ids=batch.tokens[None], position_ids=batch.position_ids[None], attention_mask=None,
                labels=batch.labels[None], packed_seq_params=params)
    (out.reshape(-1) * batch.loss.per_token["weight"]).sum().backward()


def run_padded(model, samples):
    import torch

    longest = max(len(t) for t, _ in samples)
    tokens = torch.zeros(len(samples), longest, dtype=torch.long)
    labels = torch.zeros_like(tokens)
    weights = torch.zeros(len(samples), longest)
    for i, (t, m) in enumerate(samples):
        n = len(t)
        tokens[i, :n] = torch.from_numpy(t.astype(np.int64))
        labels[i, : n - 1] = tokens[i, 1:n]
        weights[i, : n - 1] = torch.from_numpy(m[1:].astype(np.float32))
    positions = torch.arange(longest).expand(len(samples), -1)
    out = model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels)
    (out * weights).sum().backward()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packs", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="samples per padded batch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from megalign.training.batch import thd_batch
    from megalign.training.objective import SFT

    with tempfile.TemporaryDirectory() as workdir:
        trainer = build(make_dataset(workdir, args.seq_length))
        model = trainer.model.module
        ds = trainer.datasets[0]
        packs = [ds[k] for k in range(min(args.packs, len(ds)))]
        batches = [thd_batch(pk, SFT("sequence")) for pk in packs]
        samples = []
        for pk in packs:
            bounds = np.concatenate([[0], np.cumsum(pk.lengths)])
            samples += [(pk.tokens[a:b], pk.loss_mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        order = np.random.default_rng(0).permutation(len(samples))  # batches as a shuffled loader would make them
        padded = [[samples[i] for i in order[j:j + args.batch]] for j in range(0, len(samples), args.batch)]
        real_tokens = sum(len(t) for t, _ in samples)
        padded_tokens = sum(len(b) * max(len(t) for t, _ in b) for b in padded)

        workloads = {
            "thd": lambda: [run_thd(model, b, False) for b in batches],
            "pack-causal": lambda: [run_thd(model, b, True) for b in batches],
            "padded": lambda: [run_padded(model, b) for b in padded],
        }
        times = {name: [] for name in workloads}
        for _ in range(args.repeats):
            for name, work in workloads.items():  # interleaved: drift hits all three alike
                trainer.model.zero_grad_buffer()
                started = time.perf_counter()
                work()
                times[name].append(time.perf_counter() - started)

    print(f"{len(samples)} samples, {real_tokens} real tokens in {len(packs)} packs of {args.seq_length}; "
          f"padded batches of {args.batch}: {padded_tokens} token slots ({padded_tokens / real_tokens:.2f}x)\n")
    print("| layout | median s | real tokens/s | vs thd |")
    print("|---|---|---|---|")
    base = statistics.median(times["thd"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {real_tokens / m:,.0f} | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
