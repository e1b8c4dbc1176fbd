"""A small long-context instruction set made offline: retrieval over long filler text, mixed with short chats;
raw text documents for continued pretraining (long "books" and "code files", short notes); and preference
groups (a long passkey context, the right key chosen, wrong keys rejected).

Long samples hide a fact (a passkey, or the value of one key among many) inside filler text and ask for it, so
a model can only answer by attending far back; short samples are one- or two-turn chats. Used by the
quickstart, the tests and the benchmarks; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after words called just where most know "
    "get through back much before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why things help put "
    "years different away again off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took sometimes "
    "four head above kind began almost live page got earth need far hand high year mother light parts country "
    "father let night following picture being study second eyes soon times story boys since white days ever paper "
    "hard near sentence better best across during today others however sure means knew try told young miles sun "
    "ways thing whole hear example heard several change answer room sea against top turned learn point city play "
    "toward five using himself usually river mountain garden library winter summer bridge window market letter"
).split()

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and exactly.")


def filler(rng: random.Random, n_words: int) -> str:
    sentences, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(6, 18))
        words = [rng.choice(WORDS) for _ in range(k)]
        sentences.append(" ".join(words).capitalize() + rng.choice(".,.;.!?"))
        left -= k
    return " ".join(sentences)


def passkey_record(rng: random.Random, n_words: int) -> dict:
    key = str(rng.randint(10000, 99999))
    before = rng.randint(0, n_words)
    context = f"{filler(rng, before)} The pass key is {key}. Remember it. {filler(rng, n_words - before)}"
    return {"messages": [
        {"role": "user", "content": f"{context}\n\nWhat is the pass key?"},
        {"role": "assistant", "content": f"The pass key is {key}."},
    ]}


def key_value_record(rng: random.Random, n_pairs: int) -> dict:
    pairs = {f"{rng.choice(WORDS)}-{rng.randint(100, 999)}": str(rng.randint(1000, 9999)) for _ in range(n_pairs)}
    key = rng.choice(sorted(pairs))
    context = json.dumps(pairs)
    return {"messages": [
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": f"Here is a JSON object:\n{context}\nWhat is the value of {key}?"},
        {"role": "assistant", "content": pairs[key]},
    ]}


def short_chat_record(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    word = rng.choice(WORDS)
    turns = [
        (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
        (f"Repeat the word '{word}' three times.", " ".join([word] * 3)),
        (f"Write one sentence about the {rng.choice(WORDS)}.", filler(rng, rng.randint(8, 30))),
    ]
    messages = []
    for q, a_ in rng.sample(turns, rng.randint(1, 2)):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a_}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {"messages": messages}


def long_record(rng: random.Random, min_words: int, max_words: int) -> dict:
    n = rng.randint(min_words, max_words)
    return passkey_record(rng, n) if rng.random() < 0.5 else key_value_record(rng, max(2, n // 6))


def write_jsonl(path: str | Path, records) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def make_example(out_dir: str | Path, n_long: int, n_short: int, min_words: int, max_words: int, seed: int = 0) -> dict:
    """Write OUT/long.jsonl and OUT/short.jsonl; returns their paths."""
    return _write_long_and_short(out_dir, "", lambda rng: long_record(rng, min_words, max_words), n_long,
                                 short_chat_record, n_short, seed)


def _write_long_and_short(out_dir, suffix: str, make_long, n_long: int, make_short, n_short: int, seed: int) -> dict:
    """OUT/long{suffix}.jsonl and OUT/short{suffix}.jsonl from one seeded generator (long records first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {"long": out / f"long{suffix}.jsonl", "short": out / f"short{suffix}.jsonl"}
    write_jsonl(paths["long"], (make_long(rng) for _ in range(n_long)))
    write_jsonl(paths["short"], (make_short(rng) for _ in range(n_short)))
    return paths


def corpus(seed: int = 0, n_words: int = 50_000):
    """Text to train a tokenizer on: filler, numbers, JSON punctuation and the synthetic records' phrasing."""
    rng = random.Random(seed)
    for _ in range(n_words // 500):
        yield filler(rng, 500)
        yield json.dumps(key_value_record(rng, 20))
        yield json.dumps(passkey_record(rng, 50))
        yield json.dumps(short_chat_record(rng))


def book_text(rng: random.Random, n_words: int) -> str:
    """Prose in paragraphs, a title first."""
    paragraphs, left = [f"Chapter {rng.randint(1, 40)}: the {rng.choice(WORDS)} {rng.choice(WORDS)}"], n_words
    while left > 0:
        k = min(left, rng.randint(40, 160))
        paragraphs.append(filler(rng, k))
        left -= k
    return "\n\n".join(paragraphs)


def code_text(rng: random.Random, n_words: int) -> str:
    """A Python-looking source file: functions of assignments and returns over the filler words."""
    lines, left = [f"# {rng.choice(WORDS)}_{rng.choice(WORDS)}.py", "import os", ""], n_words
    while left > 0:
        name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}"
        args = ", ".join(rng.sample(WORDS, rng.randint(1, 3)))
        body = [f"    {rng.choice(WORDS)}_{i} = {rng.choice(WORDS)} + {rng.randint(0, 999)}"
                for i in range(rng.randint(2, 8))]
        lines += [f"def {name}({args}):", f'    """{filler(rng, 8)}"""', *body, f"    return {rng.choice(WORDS)}_0", ""]
        left -= 8 + 5 * len(body)
    return "\n".join(lines)


def long_document(rng: random.Random, min_words: int, max_words: int) -> dict:
    n = rng.randint(min_words, max_words)
    return {"text": book_text(rng, n) if rng.random() < 0.5 else code_text(rng, n), "source": "synthetic"}


def short_document(rng: random.Random) -> dict:
    return {"text": filler(rng, rng.randint(10, 120))}


def make_text_example(out_dir: str | Path, n_long: int, n_short: int, min_words: int, max_words: int,
                      seed: int = 0) -> dict:
    """Write OUT/long_text.jsonl (books and code files of min_words..max_words) and OUT/short_text.jsonl (notes
    of 10-120 words), {"text": ...} records; returns their paths."""
    return _write_long_and_short(out_dir, "_text", lambda rng: long_document(rng, min_words, max_words), n_long,
                                 short_document, n_short, seed)


def preference_record(rng: random.Random, n_words: int, rejected: int = 2, form: str = "messages",
                      reference: bool = False) -> dict:
    """A passkey question over n_words of filler: the right key chosen, `rejected` wrong keys rejected. `form`:
    "messages", "conversations" (ShareGPT) or "prompt" (the string form); `reference` adds made-up reference
    scores (a higher one for the chosen answer)."""
    key = rng.randint(10000, 99999)
    wrong = rng.sample([k for k in range(10000, 100000, 997) if k != key], rejected)
    before = rng.randint(0, n_words)
    question = (f"{filler(rng, before)} The pass key is {key}. Remember it. {filler(rng, n_words - before)}\n\n"
                "What is the pass key?")
    answers = [f"The pass key is {k}." for k in [key, *wrong]]
    if form == "messages":
        record = {"messages": [{"role": "user", "content": question}]}
    elif form == "conversations":
        record = {"conversations": [{"from": "human", "value": question}]}
    else:
        record = {"prompt": question}
    record.update(chosen=answers[0], rejected=answers[1:] if rejected > 1 else answers[1])
    if reference:
        record["reference_logps"] = {"chosen": round(-rng.uniform(1, 5), 4),
                                     "rejected": [round(-rng.uniform(5, 15), 4) for _ in range(rejected)]}
    return record


def make_preference_example(out_dir: str | Path, n: int, min_words: int, max_words: int, rejected: int = 2,
                            reference: bool = False, seed: int = 0) -> Path:
    """Write OUT/preference.jsonl: n passkey groups (chosen + `rejected` rejected answers); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path = out / "preference.jsonl"
    write_jsonl(path, (preference_record(rng, rng.randint(min_words, max_words), rejected, reference=reference)
                       for _ in range(n)))
    return path
