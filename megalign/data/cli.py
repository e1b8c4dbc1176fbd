"""Command lines of the data tools: parse arguments, call the library, turn MegalignError into one line."""

from __future__ import annotations

from megalign.cli import Parser
from megalign.data import packing
from megalign.data.preprocess import OVERLENGTH_POLICIES, PreprocessOptions, preprocess, summary
from megalign.data.templates import TEMPLATE_NAMES


def preprocess_parser() -> Parser:
    p = Parser(
        prog="preprocess_data.py",
        description="Turn JSONL chats into a packed, indexed dataset (megalign format v1).",
    )
    p.add_argument("--input", dest="inputs", nargs="+", required=True, metavar="FILE",
                   help="JSONL files (plain or .gz)")
    p.add_argument("--ratios", nargs="+", type=float, metavar="R",
                   help="per input: expected copies of each record (0.3 keeps 30%%, 2 doubles); default 1 each")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a SentencePiece .model")
    p.add_argument("--chat-template", required=True, choices=TEMPLATE_NAMES, metavar="NAME",
                   help=f"one of: {', '.join(TEMPLATE_NAMES)}")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per pack")
    p.add_argument("--packing", default="bfd", choices=packing.STRATEGIES, metavar="STRATEGY",
                   help=f"one of: {', '.join(packing.STRATEGIES)} (default bfd)")
    p.add_argument("--group-size", type=int, default=8, help="samples per group for --packing sorted (default 8)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx, PREFIX.json")
    p.add_argument("--overlength", default="drop", choices=OVERLENGTH_POLICIES,
                   help="samples longer than --seq-length: drop (default, counted as rejected) or truncate")
    p.add_argument("--max-reject-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of records is rejected (default 0.01)")
    p.add_argument("--max-record-bytes", type=int, default=64 << 20,
                   help="reject (unread) a JSONL line longer than this (default 64 MiB)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1, at most the CPUs available)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output-prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def preprocess_options(args) -> PreprocessOptions:
    return PreprocessOptions(
        inputs=args.inputs, ratios=args.ratios, tokenizer=args.tokenizer, chat_template=args.chat_template,
        seq_length=args.seq_length, packing=args.packing, group_size=args.group_size,
        output_prefix=args.output_prefix, overlength=args.overlength,
        max_reject_fraction=args.max_reject_fraction, max_record_bytes=args.max_record_bytes,
        workers=args.workers, seed=args.seed,
        overwrite=args.overwrite, progress=False if args.no_progress else None,
    )


def preprocess_main(argv: list[str] | None = None) -> None:
    p = preprocess_parser()
    args = p.parse_args(argv)
    from megalign.megatron_compat import quiet_known_warnings  # (imports torch: only once there is work)

    quiet_known_warnings()  # megatron-core's notices about TE/Apex: noise for the data tools
    result = p.call(preprocess, preprocess_options(args))
    print(summary(result))


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
