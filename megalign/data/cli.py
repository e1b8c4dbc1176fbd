"""Command lines of the data tools: parse arguments, call the library, turn MegalignError into one line."""

from __future__ import annotations

import argparse

from megalign.cli import Parser
from megalign.data import packing
from megalign.data.documents import POSITION_MODES
from megalign.data.preprocess import (OVERLENGTH_POLICIES, MergeOptions, PreprocessOptions, merge, preprocess,
                                      summary)
from megalign.data.shards import parse_shard
from megalign.data.templates import TEMPLATE_NAMES
from megalign.errors import OptionError


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except OptionError as e:
        raise argparse.ArgumentTypeError(e.message.replace("{shard}", "--shard")) from None


def preprocess_parser() -> Parser:
    p = Parser(
        prog="preprocess_data.py",
        description="Turn JSONL chats, text documents or preference records into a packed, indexed dataset "
                    "(megalign format v1; v2 for preference). The kind of record comes from its keys: "
                    '"chosen" + "rejected" (preference groups), "messages"/"conversations" (chats) or "text" '
                    "(documents).",
    )
    p.add_argument("--input", dest="inputs", nargs="+", required=True, metavar="FILE",
                   help="JSONL files (plain or .gz), all of one kind of record")
    p.add_argument("--ratios", nargs="+", type=float, metavar="R",
                   help="per input: expected copies of each record (0.3 keeps 30%%, 2 doubles); default 1 each")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a SentencePiece .model")
    p.add_argument("--chat-template", choices=TEMPLATE_NAMES, metavar="NAME",
                   help=f"chat and preference records: one of {', '.join(TEMPLATE_NAMES)} (text records take none)")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per pack")
    p.add_argument("--packing", default="bfd", choices=packing.STRATEGIES, metavar="STRATEGY",
                   help=f"one of: {', '.join(packing.STRATEGIES)} (default bfd)")
    p.add_argument("--group-size", type=int, default=8, help="samples per pack for --packing sorted (preference records: groups per pack; default 8)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx, PREFIX.json")
    p.add_argument("--overlength", choices=OVERLENGTH_POLICIES,
                   help="records longer than --seq-length: drop (counted as rejected; the default for chats), "
                        "truncate (keep the first --seq-length tokens), or split (text only, the default there: "
                        "pieces of --seq-length tokens, each its own sample); preference records: drop only (a "
                        "group, prompt + all responses, is packed whole)")
    p.add_argument("--min-piece-length", type=int, metavar="N",
                   help="text: drop the last piece of a split document when it is shorter than N tokens (default 2)")
    p.add_argument("--positions", default="restart", choices=POSITION_MODES,
                   help="text: the position ids of each piece restart at 0 (default), or continue where the "
                        "document's previous piece ended (needs --overlength split)")
    p.add_argument("--max-reject-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of records is rejected (default 0.01)")
    p.add_argument("--max-record-bytes", type=int, default=64 << 20,
                   help="reject (unread) a JSONL line longer than this (default 64 MiB)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1, at most the CPUs available)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="tokenize only shard I of N (0 <= I < N; `slurm`: this task of a Slurm job array) into "
                        "PREFIX.shard-I-of-N/; tools/merge_data.py --output-prefix PREFIX then makes the dataset, "
                        "the same bytes as one run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset (or shard) at --output-prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def preprocess_options(args) -> PreprocessOptions:
    return PreprocessOptions(
        inputs=args.inputs, ratios=args.ratios, tokenizer=args.tokenizer, chat_template=args.chat_template,
        seq_length=args.seq_length, packing=args.packing, group_size=args.group_size,
        output_prefix=args.output_prefix, overlength=args.overlength, min_piece_length=args.min_piece_length,
        positions=args.positions, max_reject_fraction=args.max_reject_fraction,
        max_record_bytes=args.max_record_bytes, workers=args.workers, seed=args.seed, shard=args.shard,
        overwrite=args.overwrite, progress=False if args.no_progress else None,
    )


def preprocess_main(argv: list[str] | None = None) -> None:
    p = preprocess_parser()
    args = p.parse_args(argv)
    result = p.call(preprocess, preprocess_options(args))  # (imports neither megatron-core nor torch)
    print(summary(result))


def merge_main(argv: list[str] | None = None) -> None:
    p = Parser(prog="merge_data.py",
               description="Join the shards of one preprocessing run (preprocess_data.py --shard I/N, all N of them) "
                           "into its dataset: the same files, byte for byte, as one run without --shard.")
    p.add_argument("--output-prefix", required=True,
                   help="the --output-prefix the shards ran with: reads PREFIX.shard-I-of-N/, writes the dataset there")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output-prefix")
    p.add_argument("--keep-shards", action="store_true", help="keep the shards' parts (default: removed once merged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    opts = MergeOptions(output_prefix=args.output_prefix, overwrite=args.overwrite, keep_shards=args.keep_shards,
                        progress=False if args.no_progress else None)
    print(summary(p.call(merge, opts)))


def inspect_main(argv: list[str] | None = None) -> None:
    p = Parser(prog="inspect_dataset.py", description="Print the stats of a packed dataset.")
    p.add_argument("prefix", help="dataset PREFIX (as given to --output-prefix)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the sample-length histogram and pack fill")
    p.add_argument("--verify", default="full", choices=("full", "sizes"), help="checksum the files (default) or sizes only")
    args = p.parse_args(argv)
    from megalign.megatron_compat import quiet_known_warnings  # (imports torch: only once there is work)

    quiet_known_warnings()  # megatron-core's notices about TE/Apex: noise for the data tools
    from megalign.data.inspect import describe, plot
    from megalign.data.packed_dataset import PackedDataset

    ds = p.call(PackedDataset, args.prefix, verify=args.verify)
    print(describe(ds))
    if args.plot:
        plot(ds, args.plot)
        print(f"plot: {args.plot}")
