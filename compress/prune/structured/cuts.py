"""The structure structured pruning needs and the cuts themselves, as pure functions on
modules: slicing weights (no masks), updating the counts the config holds. Cutting nothing
changes nothing; a cut equals the original with the removed parts zeroed (tests)."""

from __future__ import annotations

import torch

from compress.errors import UserError
from compress.layerwise import decoder_layers

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------ structure

def blocks(model: torch.nn.Module, stage: str, parts: tuple[str, ...]) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers, each checked to hold the modules the cut needs."""
    name, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for part in parts:
            rel = ("self_attn." if part in ATTN else "mlp.") + part
            try:
                mod = layer.get_submodule(rel)
            except AttributeError:
                mod = None
            if not isinstance(mod, torch.nn.Linear):
                raise UserError(f"{stage}: {name}.{i} ({type(layer).__name__}) has no nn.Linear {rel}; this cut "
                                f"expects {', '.join(('self_attn.' if p in ATTN else 'mlp.') + p for p in parts)} "
                                "(Llama-like layers)")
    return name, layers


def head_shape(model) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) from the config."""
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    return heads, kv, hd


# ------------------------------------------------------------------------------ pure cuts

def keep_rows(lin: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    """A new Linear with only the output features `idx` (sorted indices)."""
    out = torch.nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, device=lin.weight.device,
                          dtype=lin.weight.dtype)
    out.weight.data.copy_(lin.weight.data[idx])
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.data[idx])
    return out


def keep_cols(lin: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    """A new Linear reading only the input features `idx`."""
    out = torch.nn.Linear(len(idx), lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                          dtype=lin.weight.dtype)
    out.weight.data.copy_(lin.weight.data[:, idx])
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.data)
    return out


def cut_mlp(layer: torch.nn.Module, keep: torch.Tensor) -> None:
    """Keep intermediate channels `keep` of a gated MLP."""
    mlp = layer.mlp
    mlp.gate_proj, mlp.up_proj = keep_rows(mlp.gate_proj, keep), keep_rows(mlp.up_proj, keep)
    mlp.down_proj = keep_cols(mlp.down_proj, keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of whole heads (sorted head indices -> sorted channels)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def cut_heads(layer: torch.nn.Module, keep_q: torch.Tensor, keep_kv: torch.Tensor, head_dim: int) -> None:
    """Keep query heads `keep_q` and KV heads `keep_kv` (query heads listed group by group)."""
    a = layer.self_attn
    q, kv = head_channels(keep_q, head_dim), head_channels(keep_kv, head_dim)
    a.q_proj, a.k_proj, a.v_proj = keep_rows(a.q_proj, q), keep_rows(a.k_proj, kv), keep_rows(a.v_proj, kv)
    a.o_proj = keep_cols(a.o_proj, q)
    for attr, val in (("num_heads", len(keep_q)), ("num_key_value_heads", len(keep_kv)),
                      ("num_key_value_groups", len(keep_q) // len(keep_kv)), ("head_dim", head_dim)):
        if hasattr(a, attr):
            setattr(a, attr, val)


def heads_to_keep(scores: torch.Tensor, kv: int, remove: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, KV heads) to keep from per-query-head `scores` [heads]: `remove` KV
    groups (kv_groups) or `remove` query heads in every group (query_heads); sorted."""
    g = scores.numel() // kv
    per_group = scores.view(kv, g)
    if mode == "kv_groups":
        kept_kv = per_group.sum(1).argsort(descending=True, stable=True)[:kv - remove].sort().values
        return (kept_kv[:, None] * g + torch.arange(g)).flatten(), kept_kv
    kept = per_group.argsort(dim=1, descending=True, stable=True)[:, :g - remove].sort(dim=1).values
    return (torch.arange(kv)[:, None] * g + kept).flatten(), torch.arange(kv)


def _norms(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The layer's norms over the hidden width (those whose weight has hidden_size entries)."""
    return [m for n, m in layer.named_children() if "norm" in n.lower() and getattr(m, "weight", None) is not None]


def cut_hidden(model: torch.nn.Module, layers: torch.nn.ModuleList, keep: torch.Tensor) -> None:
    """Keep hidden channels `keep` through the whole model: embedding columns, every layer's
    reads (q/k/v, gate/up: input columns) and writes (o, down: output rows), the norms, the
    final norm and the head. RMSNorm divides by the root mean square over the width: with d'
    of d channels kept, its weights are scaled by sqrt(d / d') and its eps by d / d', so that
    the cut model equals the original with those channels zeroed in the residual stream."""
    c = model.config
    d, d2 = c.hidden_size, len(keep)
    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(emb.weight.data[:, keep].clone(), requires_grad=False)
    emb.embedding_dim = d2
    norms = [n for layer in layers for n in _norms(layer)]
    decoder = model.get_decoder()
    if getattr(decoder, "norm", None) is not None:
        norms.append(decoder.norm)
    for layer in layers:
        a, mlp = layer.self_attn, layer.mlp
        a.q_proj, a.k_proj, a.v_proj = (keep_cols(x, keep) for x in (a.q_proj, a.k_proj, a.v_proj))
        mlp.gate_proj, mlp.up_proj = keep_cols(mlp.gate_proj, keep), keep_cols(mlp.up_proj, keep)
        a.o_proj, mlp.down_proj = keep_rows(a.o_proj, keep), keep_rows(mlp.down_proj, keep)
    for norm in norms:
        norm.weight = torch.nn.Parameter(norm.weight.data[keep] * (d / d2) ** 0.5, requires_grad=False)
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(norm, attr, None), float):
                setattr(norm, attr, getattr(norm, attr) * d / d2)
    head = model.get_output_embeddings()
    if getattr(c, "tie_word_embeddings", False):
        head.weight = emb.weight
    else:
        model.lm_head = keep_cols(head, keep)
    c.head_dim = head_shape(model)[2]
    c.hidden_size = d2
    if hasattr(c, "rms_norm_eps"):
        c.rms_norm_eps = c.rms_norm_eps * d / d2


def cut_depth(model: torch.nn.Module, layers_name: str, keep: list[int]) -> None:
    """Keep decoder layers `keep` (in order), renumbering their cache indices."""
    layers = model.get_submodule(layers_name)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_i, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    parent, _, attr = layers_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    c = model.config
    if getattr(c, "layer_types", None):
        c.layer_types = [c.layer_types[i] for i in keep]
    c.num_hidden_layers = len(keep)


# Llama config fields that a Mistral config has no place for (they must hold their defaults).
_LLAMA_ONLY = {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def heads_fit_width(config) -> bool:
    """Whether transformers' LlamaConfig accepts the head count: it refuses hidden_size not
    divisible by num_attention_heads even when head_dim is given (huggingface/transformers
    #46082, still so in 5.19), and vLLM reads configs through it."""
    return config.hidden_size % config.num_attention_heads == 0


def mistral_config(config):
    """The same network as a Mistral config: Llama's modules and weight names, head_dim taken
    as given, no sliding window; or a UserError when the Llama config uses a field Mistral lacks."""
    from transformers import MistralConfig

    d = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    for k, default in _LLAMA_ONLY.items():
        if d.pop(k, default) != default:
            raise UserError(f"the cut leaves {config.num_attention_heads} heads on a hidden width of "
                            f"{config.hidden_size}, which transformers' Llama config refuses, and the Mistral "
                            f"config it would be saved as has no {k}={getattr(config, k)}; choose a ratio that "
                            f"keeps hidden_size divisible by the head count")
    return MistralConfig(**d, sliding_window=None)


def as_loadable(model):
    """The model itself, or, when its Llama config would no longer load (heads_fit_width), the
    same weights in a MistralForCausalLM: identical modules, names and logits (a test), loaded by
    transformers and vLLM with no custom code. Other model types are returned as they are."""
    if getattr(model.config, "model_type", None) != "llama" or heads_fit_width(model.config):
        return model
    from transformers import MistralForCausalLM

    cfg = mistral_config(model.config)
    ref = next(model.parameters())
    with torch.device("meta"):
        out = MistralForCausalLM(cfg)
    out.load_state_dict(model.state_dict(), assign=True, strict=True)
    if model.config.tie_word_embeddings:
        out.tie_weights()
    rope = out.model.rotary_emb  # its frequencies are a buffer the state dict does not carry
    with torch.device(ref.device):
        out.model.rotary_emb = type(rope)(cfg)
    out.generation_config = model.generation_config
    return out.to(ref.dtype).train(model.training)


def size_info(model) -> dict:
    """Parameters and the linear layers' FLOPs per token (2 x their weights; attention's
    score and value products, which grow with the context, not counted)."""
    seen, params, lin = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            lin += m.weight.numel()
    return {"params": params, "flops_per_token": 2 * lin}
