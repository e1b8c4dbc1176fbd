"""Needle in a haystack: a grid of context lengths x needle depths, as in gkamradt's pressure test and
LongAlign's Needle_test (10 lengths from 1000 up to the window, depths 10..90 %), scored by string match.

Where the references went wrong, this does not:
  - the context has exactly the requested number of tokens of the model's own tokenizer, counted without
    special tokens (LongAlign counted a BOS, then trimmed by decoding token ids back to text);
  - the needle goes in at a sentence boundary found in the text (the last one at or before the requested
    depth), not by walking back to a hard-coded period token id;
  - re-tokenizing the joined text can merge tokens across the joins, so the final context is encoded again and
    the haystack's tail trimmed or extended until the count is exact; where cutting alone skips the count, the
    needle goes on a line of its own or the haystack starts at a later sentence (or a MegalignError says so).
The haystack: text files (haystack.read_text_files), repeated when too short, or synthetic filler from a seed.
The question comes after the context and is not counted in the requested length; `default_lengths` leaves room
for it (and the chat template and the answer) below the window.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megalign.data.tokenizer import Tokenizer
from megalign.errors import MegalignError
from megalign.eval.haystack import EncodedText, count_tokens, special_ids, synthetic_haystack, token_spans
from megalign.eval.items import EvalItem
from megalign.eval.ruler import string_match_all

NEEDLE = "The special magic number that opens the old lighthouse is 4827391."
QUESTION = "What is the special magic number that opens the old lighthouse?"
ANSWER = "4827391"
PROMPT = "{context}\n\nAnswer from the document above only, in a few words. {question}"


def default_lengths(max_length: int, n: int = 10, min_length: int = 1000, reserve: int = 200) -> list[int]:
    """`n` context lengths linearly spaced from `min_length` to the window less `reserve` tokens, which the
    question, the chat template and the answer need (LongAlign's final_context_length_buffer)."""
    top = max_length - reserve
    if top < min_length:
        raise MegalignError(f"a window of {max_length} tokens less {reserve} for the question and answer "
                            f"is below the shortest context ({min_length})")
    return sorted({int(x) for x in np.round(np.linspace(min_length, top, num=n))})


def default_depths(n: int = 10, low: float = 10, high: float = 90) -> list[float]:
    """LongAlign's depths: `n` points from 10 to 90 %, rounded to whole percents."""
    return [float(x) for x in np.round(np.linspace(low, high, num=n))]


@dataclass(frozen=True)
class NeedleContext:
    text: str
    length: int  # tokens of `text`
    needle_char: int  # where the needle starts in `text`
    needle_token: int  # the token holding the needle's first character
    haystack_start: int  # where the haystack part starts in the haystack text: 0, or a later sentence's start
    requested_token: int  # haystack tokens from haystack_start to the requested depth
    requested_char: int  # where that is in the haystack text

    @property
    def depth(self) -> float:
        """Where the needle starts, in % of the context's tokens."""
        return 100.0 * self.needle_token / self.length


# Ways to an exact count, tried in turn while merges across the joins skip it: the needle joined by a space (none
# beside whitespace already there) or on a line of its own (LongAlign's needle is "\n...\n"); the haystack from
# its start or, when neither hits (SentencePiece drops a trailing space and then adds two tokens for the next
# word), from one of its next sentences, which moves every token boundary at the cut.
_JOINS = (" ", "\n")
_LATER_STARTS = 8


def _compose(text: str, start: int, insert_at: int | None, cut: int, needle: str, join: str) -> tuple[str, int] | None:
    """text[start:cut] with the needle at `insert_at` (None: appended), and where the needle starts; None when
    the cut falls before the insertion point."""
    if insert_at is None:
        head, tail = text[start:cut], ""
    elif cut < insert_at:
        return None
    else:
        head, tail = text[start:insert_at], text[insert_at:cut]
    if join == " ":
        left = " " if head and not head[-1].isspace() else ""
        right = " " if tail and not tail[0].isspace() else ""
    else:
        head, tail = head.rstrip(), tail.lstrip()
        left, right = (join if head else ""), (join if tail else "")
    return head + left + needle + right + tail, len(head) + len(left)


def _attempt(tokenizer: Tokenizer, hay: EncodedText, length: int, depth: float, needle: str, room: int,
             start: int, join: str, seen: list[int]) -> tuple[str, int, int, int] | None:
    """(context, needle_char, requested_token, requested_char) of exactly `length` tokens, or None."""
    first = hay.token_at(start) if start else 0
    available = len(hay.ids) - first
    if available < length:
        return None

    def cut_after(kept: int) -> int:
        return hay.cut_after(first + kept) if kept > 0 else start

    if depth >= 100:
        requested_token, insert_at = room, None
        requested_char = cut_after(room)
    else:
        requested_token = round(depth / 100 * room)
        requested_char = max(start, hay.spans[first + requested_token][0])
        # like gkamradt, walk back to the previous sentence end, but find it in the text
        insert_at = max(start, hay.sentence_end_at_or_before(requested_char))

    counts: dict[int, int | None] = {}  # haystack cut (chars) -> tokens of the context

    def tokens_with(cut: int) -> int | None:
        if cut not in counts:
            composed = _compose(hay.text, start, insert_at, cut, needle, join)
            counts[cut] = None if composed is None else count_tokens(tokenizer, composed[0])
            if counts[cut] is not None:
                seen.append(counts[cut])
        return counts[cut]

    # Newton steps on the number of haystack tokens: one or two settle almost every context
    kept, exact = room, None
    for _ in range(8):
        n = tokens_with(cut_after(kept))
        if n == length:
            exact = cut_after(kept)
            break
        if n is None:
            break
        following = min(max(kept + length - n, 0), available)
        if cut_after(following) in counts:  # a cycle, or tokens sharing one character
            break
        kept = following
    if exact is None:
        # a skipped count (a trailing space absorbed by the needle, a character split over tokens): try the
        # token cuts next to the last one, then every character cut between them
        nearby = [k for k in (kept - 1, kept + 1, kept - 2, kept + 2) if 0 <= k <= available]
        chars = range(cut_after(max(0, kept - 2)), cut_after(min(available, kept + 2)) + 1)
        exact = next((cut for cut in [cut_after(k) for k in nearby] + list(chars) if tokens_with(cut) == length), None)
    if exact is None:
        return None
    context, needle_char = _compose(hay.text, start, insert_at, exact, needle, join)
    return context, needle_char, requested_token, requested_char


def build_context(tokenizer: Tokenizer, haystack: EncodedText, length: int, depth: float, needle: str) -> NeedleContext:
    """`length` tokens of haystack with `needle` at `depth` % of the haystack part (100: appended at the end)."""
    needle = needle.strip()
    needle_tokens = count_tokens(tokenizer, needle)
    room = length - needle_tokens  # haystack tokens, before the joins merge anything
    if room < 1:
        raise MegalignError(f"a {length}-token context has no room for the needle ({needle_tokens} tokens)")
    if len(haystack.ids) < length:
        raise MegalignError(f"the haystack has {len(haystack.ids)} tokens; a {length}-token context needs at "
                            f"least {length}")
    starts = [0] + [haystack.next_non_space(e) for e in haystack.sentence_ends[:_LATER_STARTS]]
    seen: list[int] = []
    for start in starts:
        for join in _JOINS:
            found = _attempt(tokenizer, haystack, length, depth, needle, room, start, join, seen)
            if found is not None:
                break
        if found is not None:
            break
    else:
        near = f"; cuts nearby give {min(seen)}..{max(seen)} tokens" if seen else ""
        raise MegalignError(f"cannot make a needle context of exactly {length} tokens at depth {depth:g}% "
                            f"(the tokenizer merges across the needle's joins{near})")
    context, needle_char, requested_token, requested_char = found

    ids, spans = token_spans(tokenizer, context)
    assert len(ids) == length
    specials = special_ids(tokenizer)
    leaked = specials.keys() & set(ids)
    if leaked:
        names = ", ".join(repr(specials[i]) for i in sorted(leaked))
        raise MegalignError(f"the needle context spells special token(s) {names}, which the tokenizer reads as "
                            "control tokens; take them out of the haystack or the needle")
    needle_token = next(i for i, (_, end) in enumerate(spans) if end > needle_char)
    return NeedleContext(context, length, needle_char, needle_token, start, requested_token, requested_char)


def needle_items(tokenizer: Tokenizer, lengths: list[int], depths: list[float], haystack_text: str | None = None,
                 needle: str = NEEDLE, question: str = QUESTION, answer: str = ANSWER, seed: int = 0, *,
                 repeat_haystack: bool = True, max_new_tokens: int = 64) -> list[EvalItem]:
    """One item per (length, depth): the prompt is the context, then the question; references = [answer].

    haystack_text: the haystack (e.g. haystack.read_text_files(paths)), repeated when shorter than the longest
    context unless repeat_haystack is False (then a MegalignError says how long it must be); None: a
    synthetic haystack from `seed`.
    """
    if not lengths or not depths:
        raise MegalignError("the needle grid needs at least one length and one depth")
    if any(int(L) != L or L < 1 for L in lengths):
        raise MegalignError(f"needle lengths must be positive whole token counts, got {lengths}")
    if any(not 0 <= d <= 100 for d in depths):
        raise MegalignError(f"needle depths are percents in [0, 100], got {depths}")
    longest = max(lengths)
    repeats = 1
    if haystack_text is None:
        source = f"synthetic(seed={seed})"
        text = synthetic_haystack(tokenizer, longest + 256, seed)  # spare text for a later start (build_context)
    else:
        source, text = "text", haystack_text.strip()
        have = count_tokens(tokenizer, text)
        if have < longest:
            if not repeat_haystack or not have:
                raise MegalignError(f"the haystack text has {have} tokens; the {longest}-token context needs at "
                                    f"least {longest}")
            repeats = math.ceil(longest / have) + 1  # one spare copy: joins can merge tokens
            text = "\n\n".join([text] * repeats)
    haystack = EncodedText.of(tokenizer, text)
    if not haystack.sentence_ends and any(0 < d < 100 for d in depths):
        raise MegalignError("the haystack text has no sentence end ('.', '!' or '?' before a space) to put the "
                            "needle after")

    items = []
    for length in lengths:
        for depth in depths:
            ctx = build_context(tokenizer, haystack, int(length), float(depth), needle)
            prompt = PROMPT.format(context=ctx.text, question=question)
            digest = hashlib.sha256(f"{prompt}\0{answer}".encode()).hexdigest()[:10]
            items.append(EvalItem(
                task="needle",
                id=f"needle/len{int(length)}/depth{float(depth):g}/{digest}",
                prompt=prompt,
                references=[answer],
                max_new_tokens=max_new_tokens,
                meta={
                    "requested_length": int(length),
                    "actual_length": ctx.length,
                    "requested_depth": float(depth),
                    "actual_depth": round(ctx.depth, 2),
                    "needle_position": ctx.needle_token,
                    "needle_char": ctx.needle_char,
                    "haystack_start": ctx.haystack_start,
                    "context_chars": len(ctx.text),
                    "prompt_tokens": count_tokens(tokenizer, prompt),
                    "haystack": source,
                    "haystack_repeats": repeats,
                },
            ))
    return items


def score_string_match(prediction: str, references: list[str]) -> float:
    """RULER's string match: the fraction of references found in the prediction, ignoring case."""
    return string_match_all(prediction, references)


def heatmap(results: list[dict], path: str | Path) -> dict:
    """Depth x length grid of mean scores, drawn to a PNG at `path` and returned for JSON.

    results: records as in items.jsonl, each with a "score" and a "meta" holding requested_length and
    requested_depth. Cells without a score are None in the grid and blank in the picture.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg directly: no display, no pyplot state
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    cells: dict[tuple[int, float], list[float]] = {}
    for r in results:
        meta = r.get("meta", r)
        if r.get("score") is None:
            continue
        cells.setdefault((int(meta["requested_length"]), float(meta["requested_depth"])), []).append(float(r["score"]))
    if not cells:
        raise MegalignError("no scored needle results to draw")
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (length, depth), scores in cells.items():
        grid[depths.index(depth), lengths.index(length)] = sum(scores) / len(scores)
    mean = float(np.nanmean(grid))

    fig = Figure(figsize=(max(6.0, 0.8 * len(lengths) + 3), max(4.0, 0.45 * len(depths) + 2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])  # LongAlign's colours
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(f"Needle in a haystack (mean score {mean:.3f})")
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    return {
        "lengths": lengths,
        "depths": depths,
        "scores": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in grid],
        "mean": round(mean, 4),
    }
