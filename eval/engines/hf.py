"""Hugging Face transformers engine: eager PyTorch forward passes with a DynamicCache."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from compress.models import load_model
from eval.engines.base import GenTiming


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, device: str):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.vocab_size = model.config.vocab_size

    @classmethod
    def load(cls, model_dir: Path, dtype: str = "float32", device: str = "cpu",
             trust_remote_code: bool = False, allow_pickle: bool = False) -> "HFEngine":
        model, tok = load_model(model_dir, dtype, device, trust_remote_code, allow_pickle)
        return cls(model, tok, device)

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)
        logits = self.model(ids, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()

    @torch.inference_mode()
    def timed_generate(self, input_ids: torch.Tensor, new_tokens: int) -> GenTiming:
        ids = input_ids.to(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        prefill = time.perf_counter() - t0
        past, steps = out.past_key_values, []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            out = self.model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(self.device)
            steps.append(time.perf_counter() - t)
        return GenTiming(batch=ids.shape[0], input_len=ids.shape[1], prefill_s=prefill, step_s=steps)

    @torch.inference_mode()
    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        outs = []
        for p in prompts:
            enc = self.tokenizer(p, return_tensors="pt").to(self.device)
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            outs.append(self.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return outs

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
