"""The static-cache decode path of the HF engine (eval.engines.hf_static): the same greedy
tokens as transformers' own generate, cache reuse across calls, the engine's stamps, and
the one-line errors. The CUDA-graph mode runs on GPUs only (benchmarks/hf_decode_gpu.py
checks its tokens against the static path there)."""

from __future__ import annotations

import pytest
import torch

from compress.errors import UserError
from eval.engines.hf import HFEngine
from eval.engines.hf_static import StaticDecoder


@pytest.fixture(scope="module")
def engine(tiny_model):
    return HFEngine.load(tiny_model, decode="static")


def _generate(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


@pytest.mark.parametrize("batch", [1, 3])
def test_static_decode_matches_generate(engine, batch):
    ids = torch.randint(10, engine.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(batch))
    ref = _generate(engine.model, ids, 17)
    assert (engine.decoder.generate(ids, 17) == ref).all()
    # the slot (cache) is reused and reset: a different prompt, then the first again
    other = torch.randint(10, engine.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(99))
    assert (engine.decoder.generate(other, 17) == _generate(engine.model, other, 17)).all()
    assert (engine.decoder.generate(ids, 17) == ref).all()
    assert (batch, 256) in engine.decoder.slots


def test_static_decode_across_a_length_bucket(engine):
    """A prompt plus output longer than one cache bucket gets a larger cache, same tokens."""
    ids = torch.randint(10, engine.vocab_size, (1, 250), generator=torch.Generator().manual_seed(5))
    assert (engine.decoder.generate(ids, 12) == _generate(engine.model, ids, 12)).all()
    assert (1, 512) in engine.decoder.slots


def test_engine_stream_stamps_every_token(engine):
    reqs = engine.stream([[11] * 6, [12] * 6, [13] * 6], 5, concurrency=2)
    assert len(reqs) == 3 and all(len(r.token_times) == 5 for r in reqs)
    assert all(r.token_times == sorted(r.token_times) and r.token_times[0] >= r.submitted for r in reqs)


def test_engine_options_reach_the_model(tiny_model):
    eng = HFEngine.load(tiny_model, attn_implementation="eager")
    assert eng.model.config._attn_implementation == "eager" and eng.decoder is None


def test_bad_decode_options(tiny_model, engine):
    with pytest.raises(UserError, match=r"^hf.decode: cuda_graph needs a CUDA device; the model is on cpu") as e:
        StaticDecoder(engine.model, "cuda_graph")
    assert len(e.value.lines) == 1
    with pytest.raises(UserError, match=r"hf.decode: 'fast'; allowed: dynamic, static, cuda_graph"):
        StaticDecoder(engine.model, "fast")
    with pytest.raises(UserError, match=r"hf.decode: 600 tokens exceed the model's 512 positions"):
        engine.decoder.generate(torch.ones(1, 500, dtype=torch.long), 100)


def test_compiled_static_step_matches_generate(tiny_model):
    """compile_decode: the static step through torch.compile (inductor), same tokens."""
    eng = HFEngine.load(tiny_model, decode="static", compile_decode=True)
    ids = torch.randint(10, eng.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    assert (eng.decoder.generate(ids, 9) == _generate(eng.model, ids, 9)).all()
    with pytest.raises(UserError, match="hf.compile_decode: needs decode static or cuda_graph"):
        HFEngine.load(tiny_model, compile_decode=True)


def test_recipe_decode_options(tiny_model, text_file, home, tmp_path, capsys):
    """eval.hf.decode reaches the evaluator (static on the CPU), and cuda_graph on a CPU is
    refused before any work."""
    import json

    import yaml

    from squeeze.cli import main
    from tests.conftest import tiny_recipe

    r = tiny_recipe(tiny_model, text_file)
    r["eval"]["hf"] = {"decode": "static"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    rep = json.loads((home / "tiny" / "report.json").read_text())
    assert rep["protocol"]["engines"]["hf"] == {"dtype": "float32", "decode": "static"}
    assert rep["artifacts"][0]["engines"]["hf"]["speed"]["concurrent"]["output_tok_s"]["median"] > 0
    r["eval"]["hf"] = {"decode": "cuda_graph"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: eval.hf.decode: cuda_graph needs a CUDA GPU; the device is cpu (use static or dynamic)"
    r["model"]["dtype"] = "bfloat16"
    r["eval"]["hf"] = {"sparse_kernels": True}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: eval.hf.sparse_kernels: torch's "
                                                                "semi-structured (2:4) kernels need a CUDA GPU; the "
                                                                "device is cpu")
    r["eval"]["engines"] = ["vllm"]  # the transformers engine's own options do not bind vLLM
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


def test_sliding_window_cache_refuses_cuda_graph():
    """A sliding-window model decodes right on the static path (eager), but its cache keeps the
    position on the host, so cuda_graph is refused (before the device check: testable on a CPU)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
    model = MistralForCausalLM(MistralConfig(**cfg, sliding_window=8)).eval()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    assert (StaticDecoder(model, "static").generate(ids, 12) == _generate(model, ids, 12)).all()  # crosses the window
    with pytest.raises(UserError, match=r"^hf.decode: cuda_graph cannot replay mistral's cache \(2 of its 2 cache "
                                        r"layers are sliding-window; .*use static$"):
        StaticDecoder(model, "cuda_graph")
    with pytest.raises(UserError, match="needs a CUDA device"):  # no sliding window: the device check
        StaticDecoder(MistralForCausalLM(MistralConfig(**cfg, sliding_window=None)).eval(), "cuda_graph")
