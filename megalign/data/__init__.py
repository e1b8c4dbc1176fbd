"""records -> tokens -> packs -> indexed files, and back out. Import submodules directly; this package
imports nothing heavy (tokenizer worker processes load only what they use)."""
