"""Generation backends: one call per item, greedy, stopping at the chat template's end-of-turn tokens.

  hf      transformers `generate` on a Hugging Face model directory (a megalign checkpoint is exported to one
          first: megalign/eval/run.py); CPU or GPU
  openai  any OpenAI-compatible server (vllm serve, SGLang, transformers serve, a hosted API): chat items go to
          /v1/chat/completions (the server applies the model's own chat template), plain items to /v1/completions
  vllm    vLLM's offline engine (the `vllm` package, CUDA only): tensor parallel, long max_model_len
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megalign.errors import MegalignError
from megalign.eval.items import EvalItem
from megalign.eval.prompting import PromptRenderer

BACKENDS = ("hf", "openai", "vllm")


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int | None
    new_tokens: int | None


class HFBackend:
    name = "hf"

    def __init__(self, model_dir: str | Path, renderer: PromptRenderer, device: str = "auto", dtype: str = "auto"):
        import torch
        import transformers

        self.renderer = renderer
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device)
        self.model.eval()

    def generate(self, item: EvalItem) -> Generation:
        import torch

        ids, stop_ids = self.renderer.prompt_ids(item), self.renderer.stop_ids_for(item)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids], device=self.device), max_new_tokens=item.max_new_tokens,
                                      min_new_tokens=1 if item.stop_strings else None,
                                      do_sample=False, eos_token_id=stop_ids or None,
                                      pad_token_id=stop_ids[0] if stop_ids else None)
        new = out[0, len(ids):].tolist()
        if new and new[-1] in stop_ids:  # the stop token is not part of the answer
            new.pop()
        return Generation(self.renderer.tokenizer.decode(new), len(ids), len(new))


class OpenAIBackend:
    name = "openai"

    def __init__(self, client, renderer: PromptRenderer | None = None):
        self.client, self.renderer = client, renderer

    def generate(self, item: EvalItem) -> Generation:
        if item.chat:
            reply = self.client.chat([{"role": "user", "content": item.prompt}], max_tokens=item.max_new_tokens,
                                     stop=list(item.stop_strings) or None)
        else:
            reply = self.client.complete(item.prompt, max_tokens=item.max_new_tokens,
                                         stop=list(item.stop_strings) or None)
        return Generation(reply.text, reply.prompt_tokens, reply.completion_tokens)


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str | Path, renderer: PromptRenderer, tensor_parallel: int = 1,
                 max_model_len: int | None = None):
        try:
            import vllm
        except ImportError:
            raise MegalignError("--backend vllm needs the vllm package (a CUDA build: pip install vllm); or serve "
                                "the model with `vllm serve` and use --backend openai") from None
        self.renderer = renderer
        self.engine = vllm.LLM(model=str(model_dir), tensor_parallel_size=tensor_parallel,
                               max_model_len=max_model_len)
        self._params = vllm.SamplingParams

    def generate(self, item: EvalItem) -> Generation:
        ids = self.renderer.prompt_ids(item)
        params = self._params(temperature=0.0, max_tokens=item.max_new_tokens,
                              stop_token_ids=self.renderer.stop_ids_for(item), min_tokens=1 if item.stop_strings else 0)
        out = self.engine.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        return Generation(out.text, len(ids), len(out.token_ids))
