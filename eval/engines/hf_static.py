"""A fast greedy decode path for transformers models: a static KV cache, and on CUDA the
one-token decode step captured once as a CUDA graph and replayed for every token.

Why: batch-1 decode of an 8B model through transformers' eager forward is bound by the host
(hundreds of small kernel launches per token from Python), not by the GPU: `generate`
reaches 25.7 tok/s on an H200 where weight bandwidth allows about 300. transformers' own
`cache_implementation="static"` with `torch.compile` ran at 4.4 tok/s there (compilation and
recompilation inside the timed loop). A CUDA graph removes the launch cost without a
compiler: the step's kernels are recorded once and replayed with one call.

Why it can be captured: since transformers 5.17 a `StaticCache` layer keeps its write
position as a device tensor (`cumulative_length`, advanced in place by `update`) and the
causal mask and rotary positions are computed from it with tensor ops, so one recorded step
is correct at every position. The step reads its input token from a static buffer and
writes its argmax back into it, so replays chain on the device with no host work between.

Each (batch size, cache length) gets its own cache and graph, reused across calls (the
cache is reset in place between requests; cache lengths are rounded up to a multiple of 256
so that nearby prompt lengths share one). Where capture fails (a model whose forward syncs
with the host) the step runs eagerly on the static cache, and `fallback` says why.
"""

from __future__ import annotations

import warnings

import torch

from compress.errors import UserError

MODES = ("static", "cuda_graph")
LEN_BUCKET = 256
WARMUP_STEPS = 2


class _Slot:
    """One static cache (and on CUDA one captured step) for a batch size and cache length."""

    def __init__(self, model, batch: int, max_len: int, compile: bool = False):
        from transformers import StaticCache

        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = None  # [B, 1] the step's input token; the step writes its output here
        self.graph: torch.cuda.CUDAGraph | None = None
        # torch.compile fuses the step's small elementwise kernels (norms, rotary, SiLU x up);
        # its first call compiles (in the warm-up, never inside a capture)
        self._next = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        self.ids.copy_(self._next(self.ids))

    def positions(self) -> list[torch.Tensor]:
        return [layer.cumulative_length for layer in self.cache.layers]

    def capture(self) -> None:
        """Record `step` as a CUDA graph from the current state (after a prefill), leaving the
        state (positions, input token) as it was."""
        start = [p.clone() for p in self.positions()]
        ids0 = self.ids.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy allocations and autotuning happen outside the graph
                for _ in range(WARMUP_STEPS):
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
            self.graph = graph
        finally:  # capture runs nothing, but the warm-up moved on: back to where the prefill left it
            torch.cuda.synchronize()
            for p, s in zip(self.positions(), start):
                p.copy_(s)
            self.ids.copy_(ids0)


def graph_hazard(model) -> str | None:
    """Why a replayed step would decode wrongly on this model's static cache, or None. A
    sliding-window layer (StaticSlidingWindowLayer) keeps its length as a host int, and the
    model reads positions and mask offsets from it (`get_seq_length`), so a capture would freeze
    them at the captured position: replays run and return wrong tokens, no error."""
    from transformers import StaticCache

    layers = StaticCache(config=model.config, max_cache_len=1).layers  # allocates nothing until used
    sliding = sum(getattr(layer, "is_sliding", False) for layer in layers)
    return f"{sliding} of its {len(layers)} cache layers are sliding-window" if sliding else None


class StaticDecoder:
    """Greedy decoding of exactly `n_new` tokens (EOS ignored) on a static cache; mode
    "cuda_graph" replays the captured step (CUDA only), "static" runs it eagerly; with
    `compile` the step is a torch.compile'd function (captured as well in cuda_graph)."""

    def __init__(self, model, mode: str = "cuda_graph", compile: bool = False):
        if mode not in MODES:
            raise UserError(f"hf.decode: {mode!r}; allowed: dynamic, {', '.join(MODES)}")
        self.model, self.mode, self.compile = model, mode, compile
        self.device = next(model.parameters()).device
        why = graph_hazard(model) if mode == "cuda_graph" else None
        if why:
            raise UserError(f"hf.decode: cuda_graph cannot replay {model.config.model_type}'s cache ({why}; "
                            "transformers tracks their position on the host); use static")
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise UserError(f"hf.decode: cuda_graph needs a CUDA device; the model is on {self.device} "
                            "(use static or dynamic)")
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.fallback: str | None = None

    def _slot(self, batch: int, total: int) -> _Slot:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        max_len = -(-total // LEN_BUCKET) * LEN_BUCKET
        if limit:
            if total > limit:
                raise UserError(f"hf.decode: {total} tokens exceed the model's {limit} positions")
            max_len = min(max_len, limit)
        key = (batch, max_len)
        if key not in self.slots:
            self.slots[key] = _Slot(self.model, batch, max_len, self.compile)
        return self.slots[key]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, n_new: int, on_step=None) -> torch.Tensor:
        """Tokens [B, n_new] after `input_ids` [B, L] (equal lengths); `on_step(i)` is called
        once token i is computed (not synchronized: the caller syncs if it times)."""
        b, n = input_ids.shape
        slot = self._slot(b, n + n_new)
        slot.cache.reset()
        out = self.model(input_ids=input_ids.to(self.device), past_key_values=slot.cache, use_cache=True,
                         logits_to_keep=1)
        first = out.logits[:, -1:].argmax(-1)
        if slot.ids is None:
            slot.ids = torch.empty_like(first)
        slot.ids.copy_(first)
        toks = [first]
        if on_step:
            on_step(0)
        if self.mode == "cuda_graph" and slot.graph is None and self.fallback is None and n_new > 1:
            try:
                slot.capture()
            except RuntimeError as e:  # a forward that syncs with the host cannot be captured
                self.fallback = f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); decoding eagerly"
                warnings.warn(self.fallback)
        for i in range(1, n_new):
            if slot.graph is not None:
                slot.graph.replay()
            else:
                slot.step()
            toks.append(slot.ids.clone())
            if on_step:
                on_step(i)
        return torch.cat(toks, dim=1)
