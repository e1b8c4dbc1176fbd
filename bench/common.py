"""What several benchmarks share: the code they measured (their first output line) and an example dataset."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_state() -> str:
    """The commit measured, flagged when megalign/ has uncommitted changes (the numbers then belong to neither)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    dirty = " + uncommitted changes in megalign/" if git("status", "--porcelain", "--", "megalign") else ""
    return f"megalign at {git('rev-parse', '--short', 'HEAD') or 'unknown commit'}{dirty}"


def example_dataset(workdir: str, seq_length: int, n_long: int, n_short: int, min_words: int, max_words: int,
                    vocab_size: int) -> str:
    """The example mix (long retrieval records + short chats, megalign.data.synthetic) with a byte-level BPE
    tokenizer trained on it, packed (bfd, chatml) at `seq_length` under `workdir`; returns the PREFIX."""
    from megalign.data import synthetic
    from megalign.data.preprocess import PreprocessOptions, preprocess
    from megalign.data.tokenizer_training import train_bpe_tokenizer

    paths = synthetic.make_example(workdir, n_long=n_long, n_short=n_short, min_words=min_words,
                                   max_words=max_words, seed=0)
    tok = train_bpe_tokenizer(synthetic.corpus(0), os.path.join(workdir, "tok"), vocab_size=vocab_size)
    opts = PreprocessOptions(inputs=[str(paths["long"]), str(paths["short"])], tokenizer=str(tok),
                             chat_template="chatml", seq_length=seq_length, output_prefix=os.path.join(workdir, "ds"),
                             progress=False)
    return preprocess(opts).prefix
