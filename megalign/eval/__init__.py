"""Evaluation: tasks (needle, RULER-style synthetic, LongBench, LongBench-Chat) that turn into items, generation
backends that answer them, metrics and judges that score them, and results (items.jsonl, one JSON per run)."""
