"""Describe a packed dataset: its metadata and, optionally, a plot of sample lengths and pack fill."""

from __future__ import annotations

import numpy as np

from megalign.data.packed_dataset import PackedDataset


def describe(ds: PackedDataset) -> str:
    m = ds.meta
    c = m["counts"]
    lengths = ds.sample_lengths
    pack_lengths = ds.pack_lengths()
    rejected = sum(c["rejected"].values())
    if m.get("record_kind") == "text":
        d = m["documents"]
        kind = (f"text documents (BOS {d['bos_id']}, EOS {d['eos_id']}; overlength {m['overlength']}, min piece "
                f"{d['min_piece_length']}, positions {d['positions']}, largest position {d['max_position'] - 1})")
    elif m.get("record_kind") == "preference":
        g = m["preference"]
        per_group = ", ".join(f"{n} groups with {k}" for k, n in g["responses_per_group"].items())
        kind = (f"template {m['chat_template']}; preference groups {g['groups']} (responses per group: {per_group}), "
                f"prompt tokens {g['prompt_tokens']}, response tokens {g['response_tokens']}, reference scores "
                f"{'yes' if g['reference_logps'] else 'no'}")
    else:
        kind = f"template {m['chat_template']}"
    lines = [
        f"dataset      {ds.prefix} (format v{m['format_version']}, {m['created_by']})",
        f"tokenizer    {m['tokenizer']['kind']} {m['tokenizer']['path']} (vocab {m['tokenizer']['vocab_size']}, "
        f"sha256 {m['tokenizer']['sha256'][:12]}), {kind}",
        f"packing      {m['packing']['strategy']} at {m['seq_length']} tokens, seed {m['packing']['seed']}",
        f"records      read {c['read']}, kept {c['kept']}, rejected {rejected}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in c['rejected'].items())})" if rejected else "")
        + f", sampled out {c['sampled_out']}, duplicated {c['duplicated']}, truncated {c['truncated']}"
        + (f"; {c['split']} documents split into pieces, {c['tails_dropped']} tails dropped "
           f"({c['tail_tokens_dropped']} tokens)" if "split" in c else ""),
    ]
    for i in m["inputs"]:
        lines.append(f"  input      {i['path']} x{i['ratio']}: read {i['read']}, kept {i['kept']}, "
                     f"rejected {sum(i['rejected'].values())}")
    lines += [
        f"samples      {m['num_samples']}: length min {lengths.min()}, median {int(np.median(lengths))}, "
        f"mean {lengths.mean():.0f}, max {lengths.max()}",
        f"packs        {m['num_packs']} (lower bound {m['packs_lower_bound']}), samples per pack "
        f"mean {m['num_samples'] / max(1, m['num_packs']):.1f}, fill min {pack_lengths.min() / m['seq_length']:.1%}",
        f"tokens       {m['num_tokens']} ({m['num_loss_tokens']} targets, "
        f"{m['num_loss_tokens'] / max(1, m['num_tokens']):.1%}), packing efficiency {m['packing_efficiency']:.2%}",
        "length histogram:",
    ]
    hist = m["length_histogram"]
    width = max(hist["counts"]) or 1
    for lo, hi, n in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
        if n:
            lines.append(f"  [{lo:>7}, {hi:>7})  {n:>8}  {'#' * max(1, round(40 * n / width))}")
    return "\n".join(lines)


def plot(ds: PackedDataset, path: str) -> None:
    """Two panels: the sample-length histogram (log bins) and the pack fill histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq_length = ds.seq_length
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.unique(np.geomspace(1, seq_length, 40).astype(int))
    left.hist(ds.sample_lengths, bins=bins, color="tab:blue")
    left.set_xscale("log")
    left.set_xlabel("sample length (tokens)")
    left.set_ylabel("samples")
    left.set_title(f"{ds.meta['num_samples']} samples")
    right.hist(ds.pack_lengths() / seq_length, bins=20, range=(0, 1), color="tab:green")
    right.set_xlabel(f"pack fill (tokens / {seq_length})")
    right.set_ylabel("packs")
    right.set_title(f"{ds.meta['num_packs']} packs, {ds.meta['packing']['strategy']}, "
                    f"efficiency {ds.meta['packing_efficiency']:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
