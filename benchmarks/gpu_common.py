"""What the GPU benchmark scripts share: the environment record, JSONL output, and a
Llama-3.1-8B-shaped model with random weights built quickly in host memory."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)


def env() -> dict:
    """GPU (or "cpu"), library versions and driver: what every benchmark record carries."""
    from compress.manifest import versions
    from eval.memory import device_info

    cuda = torch.cuda.is_available()
    dev = device_info("cuda" if cuda else "cpu")
    out = {"gpu": dev["device_name"] if cuda else "cpu", **versions()}
    if dev.get("driver"):
        out["driver"] = dev["driver"]
    if os.environ.get("VLLM_DISABLED_KERNELS"):
        out["VLLM_DISABLED_KERNELS"] = os.environ["VLLM_DISABLED_KERNELS"]
    return out


def record(args, rec: dict) -> None:
    """Print one JSON line and append it to args.jsonl, with the environment and command."""
    rec = {"bench": args.cmd, **rec, "env": env(), "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    line = json.dumps(rec)
    print(line, flush=True)
    with open(args.jsonl, "a") as f:
        f.write(line + "\n")


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**(TINY if tiny else LLAMA_8B), torch_dtype="bfloat16")


@torch.no_grad()
def random_llama(cfg, device_for_rng: str):
    """A LlamaForCausalLM with N(0, 0.02) bf16 weights in host memory, built without the slow
    default initialisation (random numbers are drawn on the GPU, one tensor at a time)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator(device=device_for_rng).manual_seed(0)
    for p in model.parameters():
        if p.ndim == 1:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=device_for_rng, dtype=torch.bfloat16) * 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its buffers were left empty
    return model.eval()


def bench_context(device: str, vocab: int, n: int, seq: int):
    """A StageContext whose calibration data are random tokens (the weights are random too)."""
    from compress.stage import StageContext

    class BenchContext(StageContext):
        def calibration(self, c):
            return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    return BenchContext(device=device, seed=0, tokenizer=None, progress=True)


def cap_gpu_memory(gib: float) -> None:
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)


def capped_random_llama(args):
    """(device, config, model): the random Llama of --tiny's shape in host memory, the process then
    capped at --cap-gib of GPU memory (the larger-than-GPU case the runner plans for)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = llama_config(args.tiny)
    model = random_llama(cfg, dev)
    if dev == "cuda":
        cap_gpu_memory(args.cap_gib)
    return dev, cfg, model


def add_common_args(sub) -> None:
    for p in sub.choices.values():
        p.add_argument("--tiny", action="store_true", help="a tiny config, for a dry run on the CPU")
        p.add_argument("--jsonl", default=str(Path(os.environ.get("OUT", "/tmp")) / f"{Path(sys.argv[0]).stem}.jsonl"))
