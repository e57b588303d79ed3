"""What the SmolLM2 "parts" benchmarks share (fp8_rotate_parts, int8_static_parts,
w4a8_proxy_smollm2): the evaluator's perplexity protocol on transformers in memory (WikiText-2,
the data set's text tokenized whole, the first 8 x 1,024 tokens), and activations rounded to FP8
per token, dynamically, by compressed-tensors' own fake quantization (what transformers runs for
such a checkpoint)."""
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from compress.data import load_text
from compress.models import load_tokenizer, resolve_model
from eval.accuracy.perplexity import perplexity
from eval.engines.hf import HFEngine

FP8_TOKEN = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)


def smollm2_ppl():
    """(the built-in SmolLM2's tokenizer, ppl(model) -> its WikiText-2 perplexity, context 1,024)."""
    tok = load_tokenizer(resolve_model("smollm2"))
    ids = tok(load_text("wikitext2"), add_special_tokens=False, return_tensors="pt").input_ids[0]

    def ppl(model) -> float:
        return perplexity(HFEngine(model, tok, "cpu"), ids, context_length=1024, max_tokens=8192,
                          progress=False)["perplexity"]

    return tok, ppl


def linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """Every nn.Linear but lm_head (which the W8A8 and W4A8 options leave in 16 bits)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True)
    scale, zp = calculate_qparams(-amax, amax, FP8_TOKEN)
    return fake_quantize(x, scale, zp, FP8_TOKEN)


def fp8_token_hooks(model, which: list[str] | None = None) -> list:
    """Round the inputs of every linear (or of those whose name holds one of `which`) to FP8 per
    token; returns the hooks (remove them to undo)."""
    return [m.register_forward_pre_hook(lambda _, a: (fp8_per_token(a[0]),))
            for n, m in linears(model) if not which or any(w in n for w in which)]
