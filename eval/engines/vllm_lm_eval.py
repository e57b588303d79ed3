"""lm-eval's own vLLM backend (`lm_eval.models.vllm_causallms.VLLM`) around an `LLM` the vLLM
engine has already loaded: task accuracy is scored by lm-eval's code on our engine, with no
second load.

lm-eval's `VLLM.__init__` builds its own `LLM` from model arguments; `VLLMOnLoaded` skips it
and sets what the backend's methods read (the fields below, as lm-eval 0.4.x's __init__ sets
them for one GPU, no LoRA, no chat template). Its module reads `version("vllm")` at import,
which the CPU build answers only through eval.engines.vllm_dist.
"""

from __future__ import annotations

from eval.engines.vllm_dist import answering_vllm


def lm_eval_module():
    """lm-eval's vLLM backend module, imported with `version("vllm")` answered for either build
    (and answered so afterwards, for the calls the module makes with its own `version`)."""
    with answering_vllm() as version:
        import lm_eval.models.vllm_causallms as mod
    mod.version = version
    return mod


def lm_eval_model(llm):
    """lm-eval's VLLM backend on `llm` (a loaded ``vllm.LLM``)."""
    mod = lm_eval_module()
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import configure_pad_token

    class VLLMOnLoaded(mod.VLLM):
        """lm-eval's VLLM backend on an existing ``LLM`` (its __init__ would build a second one)."""

        def __init__(self, llm):
            TemplateLM.__init__(self)
            self.model = llm
            cfg = llm.llm_engine.model_config
            self._config = cfg.hf_config
            self._max_length = cfg.max_model_len
            self.tensor_parallel_size = self.data_parallel_size = 1
            self.truncation_side, self.batch_size, self._max_gen_toks = "left", "auto", 256
            self.add_bos_token = self.custom_prefix_token_id = self.lora_request = None
            self.think_end_token = self.enable_thinking = self.hf_chat_template = None
            self.chat_template_args, self.model_args = {}, {}
            self.tokenizer = configure_pad_token(llm.get_tokenizer(), model_config=self._config)

    return VLLMOnLoaded(llm)
