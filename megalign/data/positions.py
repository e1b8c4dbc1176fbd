"""Position ids of a pack's tokens: contiguous (0, 1, ... per sample) or SkipAlign's synthesized positions.

Either way a sample's positions start at its position offset: 0, except for the pieces of a long document
preprocessed with `--positions continue`, whose offsets (k * pack length for piece k, stored with the dataset)
make each piece's positions continue where the previous piece's ended.

SkipAlign (Wu et al. 2024, "Long Context Alignment with Short Instructions and Synthesized Positions") teaches
long-context behaviour with short samples: each sample's position ids keep increasing by one inside a segment
and skip ahead at segment boundaries, so that the relative distances RoPE sees between a sample's tokens reach
across a long target window W although the sample itself is short.

Segments. The dataset stores tokens and a loss mask, not segment boundaries, so a boundary is wherever the loss
mask switches inside a sample: instruction -> response and response -> the next user turn. Known limitation:
boundaries that do not switch the loss mask (system prompt -> user turn, user turn -> tool output, paragraphs
of a long instruction) cannot be recovered from tokens and loss mask, and get no skip.

The draw, per sample of n tokens with k boundaries (numpy Generator seeded by (training seed, dataset index,
pack index, epoch): every rank, layout and resumed run computes the same positions, and every epoch draws anew):

  1. with probability `fraction` (data.skipalign_fraction) the sample gets skips, else it stays contiguous;
     so does a sample with no boundary (k = 0) or not shorter than the window (n >= W);
  2. its span S = last position - first position is uniform on the integers [n-1, W-1]; the extra
     E = S - (n-1) = sum of the skips is uniform on [0, W-n];
  3. E is split over the k boundaries by a uniform random partition (Dirichlet(1, ..., 1): normalised
     standard exponentials), as integers by flooring the cumulative shares (the last one is exactly E);
     skip j is added in front of the first token of segment j+1.

Positions start at 0 in every sample, are strictly increasing (each step is 1 + a skip >= 0) and the largest is
S <= W - 1 < W. Window W <= n (or fraction 0) gives exactly the contiguous positions.

Why this law. The span S is uniform over the window, so the longest-range pair of a sample (its last token
and its first: a response reading the beginning of its instruction) lands at every distance in [n-1, W-1]
equally often. For a single-turn sample (one boundary, the usual short instruction: prompt -> response), every
response-to-prompt pair is at distance E + (its distance without skips), E uniform: all those cross-boundary
distances are uniform over [0, W), up to the sample length. Drawing a skip per boundary independently instead
would make the span a sum (bell-shaped around the middle of the window, rarely near 0 or W, and needing a clip
at W); the uniform partition favours no boundary. With several boundaries, a pair that crosses only j < k of the
k boundaries sees about E * Beta(j, k-j): shorter distances. No monotone scheme can make all of them uniform at
once (if d(a,c) = d(a,b) + d(b,c) and all three had the same law, d(b,c) would be 0), so coverage of the far end
of the window comes from the pairs that cross most boundaries; tests/data/test_positions.py measures both.

Preference groups (Pack.roles, data/groups.py). Whatever the mode, every response of a group continues the
prompt's positions (prompt's last position + 1, + 2, ...): each response sees what it would see alone, and all
responses of a group have the same positions. `logo` (LOGO, Tang et al. 2024, Eq. 4) is for them only: a group's
prompt of P tokens is cut into K = ceil(P / chunk) near-equal chunks; with R the longest response and the window
W, the last chunk (the question) ends at W - R - 1, so that the question and the answers sit at the end of the
window, and chunk 0 < k < K-1 lies in its virtual block [k B, (k+1) B), B = (W - R - |last chunk|) // (K-1), at
a uniform offset inside it (b_k of Eq. 4: one draw per chunk); chunk 0 starts at 0. Positions are +1 inside a chunk and jump between
chunks, strictly increasing, all below W. A group whose chunks do not fit their blocks (W too small) keeps
contiguous positions.
"""

from __future__ import annotations

import numpy as np

from megalign.config import POSITIONS

_STREAM = 0x534B4950  # "SKIP": keeps these seeds apart from the sampler's ([seed, dataset, epoch])


def contiguous_positions(lengths, offsets=None) -> np.ndarray:
    """0, 1, ... restarting at every sample (at offsets[i] for sample i, when given): [sum(lengths)] int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    return positions if offsets is None else with_offsets(positions, lengths, offsets)


def with_offsets(positions: np.ndarray, lengths, offsets) -> np.ndarray:
    """Positions of samples that start at 0, moved to start at each sample's offset."""
    return positions + np.repeat(np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64))


def segment_starts(loss_mask, lengths) -> np.ndarray:
    """[t] bool: token t starts a new segment of its sample (the loss mask differs from the previous token's in
    the same sample). A sample's first token is not a boundary."""
    mask = np.asarray(loss_mask)
    lengths = np.asarray(lengths, dtype=np.int64)
    switch = np.zeros(len(mask), dtype=bool)
    switch[1:] = mask[1:] != mask[:-1]
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    switch[starts] = False
    return switch


def pack_rng(seed: int, dataset: int, pack: int, epoch: int) -> np.random.Generator:
    """The generator of one pack's draws in one epoch."""
    return np.random.default_rng([seed, _STREAM, dataset, pack, epoch])


def skipalign_positions(loss_mask, lengths, window: int, rng: np.random.Generator, fraction: float = 1.0) -> np.ndarray:
    """SkipAlign position ids of a pack (the module docstring says how they are drawn): [t] int64.

    The generator draws the same amounts whatever `window` and `fraction` are (one uniform per sample for
    `fraction`, one for the span, one exponential per boundary), so a sample's draw does not depend on them.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    positions = contiguous_positions(lengths)
    if len(positions) != len(np.asarray(loss_mask)):
        raise ValueError(f"loss mask of {len(np.asarray(loss_mask))} tokens for samples of {len(positions)}")
    switch = segment_starts(loss_mask, lengths)
    n_samples = len(lengths)
    sample_of = np.repeat(np.arange(n_samples), lengths)
    boundary_sample = sample_of[switch]  # the sample of each boundary, in order
    k = np.bincount(boundary_sample, minlength=n_samples)

    apply = rng.random(n_samples) < fraction
    span_u = rng.random(n_samples)
    shares = rng.standard_exponential(len(boundary_sample))

    room = np.maximum(int(window) - lengths, 0)  # E is uniform on [0, room]
    extra = np.minimum(np.floor(span_u * (room + 1)).astype(np.int64), room)
    extra = np.where(apply & (k > 0), extra, 0)
    if not extra.any():
        return positions

    # Dirichlet(1) split of each sample's extra over its boundaries: floors of the cumulative shares
    first = (np.cumsum(k) - k)[boundary_sample]  # per boundary: its sample's first boundary
    last = (np.cumsum(k) - 1)[boundary_sample]  # and last
    cumulative = np.cumsum(shares)
    within = cumulative - cumulative[first] + shares[first]  # cumulative shares inside the sample
    total = np.maximum(within[last], np.finfo(np.float64).tiny)
    e = extra[boundary_sample]
    offset = np.minimum(np.floor(e * (within / total)).astype(np.int64), e)  # skips up to and at this boundary
    at = np.arange(len(boundary_sample))
    offset[at == last] = e[at == last]
    skips = offset - np.where(at == first, 0, np.concatenate([[0], offset[:-1]]))

    added = np.zeros(len(positions), dtype=np.int64)
    added[switch] = skips
    running = np.cumsum(added)
    sample_starts = np.cumsum(lengths) - lengths
    base = np.concatenate([[0], running])[sample_starts]  # skips of earlier samples
    return positions + running - np.repeat(base, lengths)


def continue_responses(positions: np.ndarray, lengths, roles) -> np.ndarray:
    """Positions of a preference pack whose samples each start at 0, with every response moved to continue its
    group's prompt (the prompt's last position + 1, ...)."""
    lengths, roles = np.asarray(lengths, dtype=np.int64), np.asarray(roles)
    starts = np.cumsum(lengths) - lengths
    shift = np.zeros(len(lengths), dtype=np.int64)
    prompt_end = 0
    for i, role in enumerate(roles.tolist()):
        if role == 0:  # groups.PROMPT
            prompt_end = int(positions[starts[i] + lengths[i] - 1]) + 1
        else:
            shift[i] = prompt_end - int(positions[starts[i]])
    return positions + np.repeat(shift, lengths)


def logo_positions(lengths, roles, window: int, chunk: int, rng: np.random.Generator) -> np.ndarray:
    """LOGO's synthesized positions of a preference pack (the module docstring says how): [t] int64."""
    lengths, roles = np.asarray(lengths, dtype=np.int64), np.asarray(roles)
    prompts = np.flatnonzero(roles == 0)
    ends = np.append(prompts[1:], len(roles))
    out = []
    for p, end in zip(prompts.tolist(), ends.tolist()):
        n = int(lengths[p])
        k = -(-n // chunk)
        sizes = np.array([len(c) for c in np.array_split(np.arange(n), k)], dtype=np.int64)
        offsets = rng.random(k)  # drawn for every group, fitting or not: later groups' draws do not depend on it
        longest = int(lengths[p + 1:end].max())
        block = (window - longest - sizes[-1]) // (k - 1) if k > 1 else 0
        prompt = np.arange(n, dtype=np.int64)
        if k > 1 and block >= sizes[:-1].max():
            room = block - sizes[:-1]
            starts = np.arange(k - 1) * block + np.minimum(np.floor(offsets[:-1] * (room + 1)), room).astype(np.int64)
            starts[0] = 0  # the first chunk at 0, as every sample's positions start
            starts = np.append(starts, window - longest - sizes[-1])
            prompt = np.repeat(starts, sizes) + contiguous_positions(sizes)
        out.append(prompt)
        out.extend(prompt[-1] + 1 + np.arange(lengths[r]) for r in range(p + 1, end))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def pack_positions(pack, positions: str, window: int, fraction: float, seed: int, dataset: int, index: int,
                   epoch: int, logo_chunk: int = 512) -> np.ndarray | None:
    """Position ids of `pack` (a packed_dataset.Pack), pack `index` of dataset `dataset` in `epoch`, for
    data.positions = `positions`, from each sample's position offset; None for contiguous (thd_batch's own, which
    adds the offsets itself). A preference pack's responses continue their prompt's positions."""
    roles = getattr(pack, "roles", None)
    if positions not in POSITIONS:
        raise ValueError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
    if positions == "logo":
        if roles is None:
            raise ValueError("data.positions=logo is for preference data (packs with roles: prompts and responses)")
        return logo_positions(pack.lengths, roles, window, logo_chunk, pack_rng(seed, dataset, index, epoch))
    if positions == "contiguous":
        if roles is None:
            return None
        drawn = contiguous_positions(pack.lengths)
    else:
        drawn = skipalign_positions(pack.loss_mask, pack.lengths, window, pack_rng(seed, dataset, index, epoch),
                                    fraction)
    if roles is not None:
        return continue_responses(drawn, pack.lengths, roles)
    offsets = getattr(pack, "position_offsets", None)
    return drawn if offsets is None else with_offsets(drawn, pack.lengths, offsets)
