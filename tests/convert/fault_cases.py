"""Run by tests/convert/test_convert.py in a process of its own (torch.distributed starts once per process):

  python tests/convert/fault_cases.py HF_DIR WORKDIR

An import and an export, then each again with overwrite and a fault injected midway (after the new checkpoint is
written; after the first safetensors tensor): the earlier output must be left exactly as it was, and still load.
Then each once more without a fault: the new output replaces the old one. Writes WORKDIR/results.json.
"""

import hashlib
import json
import sys
import traceback
import warnings
from pathlib import Path
from unittest import mock

warnings.filterwarnings("ignore")


def digests(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(work: Path) -> list:
    return sorted(p.name for p in work.iterdir() if p.name.startswith("."))


def fault(*args, **kwargs):
    raise RuntimeError("injected fault")


def error_of(function, *args, **kwargs) -> str | None:
    """The injected fault's message, or None when `function` ran through."""
    try:
        function(*args, **kwargs)
    except RuntimeError as e:
        return str(e)
    return None


def run(hf: Path, work: Path) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file

    from megalign.checkpoint import load_weights
    from megalign.convert import convert, export_hf, import_hf
    from megalign.convert import hf_config as hfc
    from megalign.convert.safetensors_io import ShardedWriter

    imported, exported = work / "imported", work / "exported"
    import_hf(hf, imported)
    export_hf(imported, exported)
    before = {"import": digests(imported), "export": digests(exported)}
    r = {}

    with mock.patch.object(convert, "_write_model_yaml", fault):  # the new checkpoint is written by then
        r["import_error"] = error_of(import_hf, hf, imported, overwrite=True)
    r["import_unchanged"] = digests(imported) == before["import"]
    r["leftovers_after_import_fault"] = leftovers(work)
    model_cfg, _ = hfc.hf_to_model_config(hfc.read_hf_config(hf))
    model = convert.build_full_model(model_cfg, torch.float32)
    load_weights(model, imported, model_cfg)  # manifest, sizes and checksums checked
    original = load_file(hf / "model.safetensors")["model.embed_tokens.weight"]
    r["import_loads"] = bool(torch.equal(model.embedding.word_embeddings.weight[:len(original)], original))

    add, calls = ShardedWriter.add, []

    def add_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("injected fault")
        return add(self, *args, **kwargs)

    with mock.patch.object(ShardedWriter, "add", add_then_fail):
        r["export_error"] = error_of(export_hf, imported, exported, overwrite=True)
    r["export_unchanged"] = digests(exported) == before["export"]
    r["leftovers_after_export_fault"] = leftovers(work)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    r["export_loads"] = {k: sorted(map(str, v)) for k, v in info.items() if v}

    # without a fault: replaced, nothing left beside
    (imported / "marker").write_text("old")
    (exported / "marker").write_text("old")
    import_hf(hf, imported, overwrite=True)
    export_hf(imported, exported, overwrite=True)
    r["replaced"] = not (imported / "marker").exists() and not (exported / "marker").exists()
    r["leftovers_after_replace"] = leftovers(work)
    return r


def main():
    hf, work = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        results = run(hf, work)
    except Exception as e:
        results = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    from megalign.parallel.setup import shutdown

    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
