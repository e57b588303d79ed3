"""Hugging Face transformers engine: eager PyTorch forward passes with a DynamicCache, or a static
cache with the decode step replayed as a CUDA graph (eval.engines.hf_static); lm-eval's HFLM on
the loaded model; what the engine is (version, options, tunable settings, compression facts
from eval.engines.facts); and the weight statistics it reports."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from compress import gpulock
from compress.export import qdq
from compress.engine_facts import EngineFacts
from compress.errors import UserError
from compress.models import load_model
from eval.config import HFOptions
from eval.engines.facts_lookup import lookup
from eval.engines.kernels import hf_kernels
from eval.speed.workload import RequestTiming
from eval.stack import installed_version


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def weight_stats(model) -> dict:
    """Parameter count, non-zero parameters, the linear weights' sparsity (exact zeros) and
    FLOPs per token (2 x the linear weights: what a structured cut reduces and a mask does not)."""
    seen, zeros, numel, nonzero, total = set(), 0, 0, 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        nonzero += int((p != 0).sum().item())
    seen.clear()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            zeros += int((m.weight == 0).sum().item())
            numel += m.weight.numel()
    seen.clear()
    weight_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            weight_bytes += t.numel() * t.element_size()
    return {"params": total, "nonzero_params": nonzero, "linear_sparsity": zeros / numel if numel else 0.0,
            "flops_per_token": 2 * numel,  # dense multiply-adds of the linear layers (attention's not counted)
            "memory": {"weight_bytes": weight_bytes, "weight_bytes_method": "parameters and buffers as loaded"}}


def is_2to4(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive input weights has at most 2 non-zeros."""
    return w.shape[1] % 4 == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(2) <= 2).all())


@torch.no_grad()
def to_semi_structured_(model) -> int:
    """Swap every exactly-2:4-sparse nn.Linear weight for torch's semi-structured sparse tensor
    (cuSPARSELt / CUTLASS kernels; CUDA and 16-bit only). Returns how many were swapped."""
    from torch.sparse import to_sparse_semi_structured

    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.is_cuda and is_2to4(mod.weight):
            mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight), requires_grad=False)
            n += 1
    return n


class HFEngine:
    """transformers in this process (see eval.engines.base.Engine for the interface)."""

    name = "hf"
    score_rows = 1  # perplexity windows per score() call: one window's logits over the vocabulary at a time
    # setting -> (type check, what is allowed, as said in errors): what eval.tune may search
    tunable = {
        "batch_size": (lambda v: isinstance(v, int) and v > 0, "a positive integer (requests per static batch)"),
        "attn_implementation": (lambda v: v in ("eager", "sdpa", "flash_attention_2"),
                                "eager, sdpa, flash_attention_2"),
        "decode": (lambda v: v in ("dynamic", "static", "cuda_graph"), "dynamic, static, cuda_graph"),
        "compile_decode": (lambda v: isinstance(v, bool), "true or false (torch.compile the static decode step)"),
        "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16, float16"),
    }

    def __init__(self, model, tokenizer, device: str, decode: str = "dynamic", compile_decode: bool = False):
        from eval.engines.hf_static import StaticDecoder

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.vocab_size = model.config.vocab_size
        self.decoder = None if decode == "dynamic" else StaticDecoder(model, decode, compile_decode)
        self.stats: dict = {}
        self.gpu_hold = None  # compress.gpulock's shared hold on the GPU, from load to close

    # -- what the engine is --------------------------------------------------------------------
    @classmethod
    def version(cls) -> str | None:
        return installed_version("transformers")

    @classmethod
    def check_installed(cls) -> None:
        """transformers is one of squeeze's own requirements: always there."""

    @classmethod
    def check_config(cls, cfg, device: str) -> None:
        """CUDA-graph decoding and torch's 2:4 kernels need a CUDA GPU."""
        if cfg.hf.decode == "cuda_graph" and not device.startswith("cuda"):
            raise UserError(f"eval.hf.decode: cuda_graph needs a CUDA GPU; the device is {device} (use static or "
                            "dynamic)")
        if cfg.hf.sparse_kernels and not device.startswith("cuda"):
            raise UserError(f"eval.hf.sparse_kernels: torch's semi-structured (2:4) kernels need a CUDA GPU; the "
                            f"device is {device}")

    @classmethod
    def fresh_process_evaluations(cls, device: str) -> bool:
        """No: it runs in the process that loads it, where the stages left their memory behind anyway."""
        return False

    @classmethod
    def check_model(cls, cfg, model, model_dir: Path) -> None:
        """Nothing: transformers scores any window the model's positions hold."""

    @classmethod
    def options(cls, cfg, model) -> dict:
        """The model's dtype and the eval.hf options that differ from their defaults (so cache
        keys of earlier runs stay valid)."""
        defaults = HFOptions()
        return {"dtype": model.dtype, **{k: v for k, v in cfg.hf.model_dump().items() if v != getattr(defaults, k)}}

    @classmethod
    def paired_options(cls, options: dict, device: str) -> dict:
        return dict(options)

    @classmethod
    def alternate_options(cls, options: dict, device: str) -> dict:
        return dict(options)

    @classmethod
    def free_memory(cls, device: str) -> int | None:
        """Device memory on a GPU, else host memory."""
        if device.startswith("cuda"):
            return torch.cuda.mem_get_info(device)[0]
        import psutil

        return psutil.virtual_memory().available

    @classmethod
    def facts(cls, device: str, dtype: str) -> EngineFacts:
        return lookup(cls.name, device, cls.version(), dtype)

    @classmethod
    def tune_space(cls, device: str) -> dict[str, list]:
        if device.startswith("cuda"):
            return {"batch_size": [8, 32, 64, 128], "attn_implementation": ["eager", "sdpa"],
                    "decode": ["dynamic", "static", "cuda_graph"]}
        return {"batch_size": [1, 4, 8], "attn_implementation": ["eager", "sdpa"]}

    # -- one loaded model ----------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: Path, dtype: str = "float32", device: str = "cpu",
             trust_remote_code: bool = False, allow_pickle: bool = False,
             sparse_kernels: bool = False, decode: str = "dynamic",
             attn_implementation: str | None = None, compile_decode: bool = False) -> "HFEngine":
        """`decode`: "dynamic" (transformers' DynamicCache, eager), "static" (a static cache) or
        "cuda_graph" (a static cache and the decode step replayed as a CUDA graph); with
        `compile_decode` the static step is torch.compile'd (eval.engines.hf_static)."""
        if compile_decode and decode == "dynamic":
            raise UserError("hf.compile_decode: needs decode static or cuda_graph")
        hold = gpulock.Hold(device, gpulock.SHARED)  # load to close: vLLM starting beside it waits (compress.gpulock)
        try:
            model, tok = load_model(model_dir, dtype, device, trust_remote_code, allow_pickle, attn_implementation)
        except BaseException:
            hold.release()
            raise
        qdq.speed_up_(model)  # compressed-tensors' input rounding without host round trips: the same bits
        eng = cls(model, tok, device, decode, compile_decode)
        eng.gpu_hold = hold
        eng.stats = weight_stats(model)
        if sparse_kernels:
            eng.stats["semi_structured_layers"] = to_semi_structured_(model)
        eng.stats["kernels"] = hf_kernels(model)  # after the 2:4 swap: what the forward passes run
        return eng

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)
        logits = self.model(ids, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()

    @torch.inference_mode()
    def stream(self, prompts: list[list[int]], output_len: int, concurrency: int,
               stream_every: int = 1) -> list[RequestTiming]:
        """Greedy-generate exactly `output_len` tokens (EOS ignored) for each prompt, in static
        batches of `concurrency` equal-length prompts; every step's tokens are stamped when
        the step is done (synchronized), for every request (stamps cost nothing here, so
        `stream_every` is ignored). Requests of a batch are submitted when it starts."""
        out = []
        for i in range(0, len(prompts), concurrency):
            ids = torch.tensor(prompts[i:i + concurrency], device=self.device)
            _sync(self.device)
            reqs = [RequestTiming(time.perf_counter()) for _ in range(ids.shape[0])]
            if self.decoder is not None:
                self.decoder.generate(ids, output_len, on_step=lambda _, reqs=reqs: self._stamp(reqs))
                out += reqs
                continue
            res = self.model(ids, use_cache=True)
            nxt = res.logits[:, -1:].argmax(-1)
            for step in range(output_len):
                if step:
                    res = self.model(nxt, past_key_values=res.past_key_values, use_cache=True)
                    nxt = res.logits[:, -1:].argmax(-1)
                self._stamp(reqs)
            out += reqs
            del res
        return out

    def _stamp(self, reqs: list[RequestTiming]) -> None:
        _sync(self.device)
        t = time.perf_counter()
        for r in reqs:
            r.token_times.append(t)

    @torch.inference_mode()
    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        outs = []
        for p in prompts:
            enc = self.tokenizer(p, return_tensors="pt").to(self.device)
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            outs.append(self.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return outs

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0, batch_size: int = 16) -> list[list[int]]:
        """Batches of equal-length prompts (longer lists are split by length); each continuation
        cut after its first EOS."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        torch.manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: dict[int, list[int]] = {}
        i = 0
        while i < len(order):
            n = len(prompts[order[i]])
            group = [j for j in order[i:i + batch_size] if len(prompts[j]) == n]
            ids = torch.tensor([prompts[j] for j in group], device=self.device)
            gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=temperature > 0, temperature=temperature or None, top_k=0,
                                      top_p=1.0, pad_token_id=next(iter(eos), 0))[:, n:].tolist()
            for j, row in zip(group, gen):
                cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
                out[j] = row[:cut]
            i += len(group)
        return [out[j] for j in range(len(prompts))]

    def lm_eval_model(self, batch_size: int | str = 32):
        """lm-eval's HFLM around the loaded model (log-softmax in float32)."""
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size,
                    max_batch_size=64, device=self.device, softmax_dtype="float32")

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if self.gpu_hold is not None:
            self.gpu_hold.release()
            self.gpu_hold = None
