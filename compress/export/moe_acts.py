"""Input-activation rounding for the models compress.export.moe_load builds, as compressed-tensors
rounds a dense layer's input.

transformers gives every layer of a dense W8A8 compressed-tensors checkpoint the library's
quantized forward (`set_forward_quantized`): before the matmul the input goes through
`forward_quantize`, int8 or FP8, with a scale per token computed on the fly (dynamic) or the
checkpoint's `input_scale` (static, with `input_zero_point` where there is one). A per-expert
checkpoint is loaded by Squeeze itself (moe_load), and without this its HF figures would be
W8A16's. Here, after the load:

* every quantized nn.Linear (attention, shared experts, dense MLP layers) is left as transformers
  leaves a dense one: the checkpoint's scheme, status `decompressed` (the weights are already
  dequantized, so they are not rounded again each pass), its `input_*` tensors as parameters,
  and a forward that rounds its input with `forward_quantize`;
* every fused experts module keeps its class, 3-D parameters and state dict, and gets a forward
  that runs each expert that has tokens on those tokens, rounding the input of gate/up and of
  down with that expert's own arguments and scales (buffers `<role>_input_scale` [experts, 1]),
  its weights read from the 3-D parameters (transformers' layout flags, compress.moe.Layout).

Per token means per row of a layer's input, the scale vLLM's fused-MoE kernels use for each
expert. compressed-tensors' token strategy keeps the first two dimensions of what it is given, so
on the 2-D [tokens, hidden] input of an expert or a shared expert it would take one scale for all
rows; those inputs are handed to it as [1, tokens, hidden], the shape a dense layer sees.

Cost: the experts run in a Python loop over the experts that got tokens, one matmul per
projection each (transformers' `eager` experts implementation does the same loop; its grouped and
batched kernels are not used), plus an absmax and a rounding pass over each expert's input; gate
and up share one rounding where their arguments and scales are equal (always, for Squeeze's
checkpoints), else each runs the whole gate/up matmul on its own rounding (2 x that matmul).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from compress import moe
from compress.export import qdq


@dataclass
class InputQuant:
    """One module's input rounding: its scheme and the checkpoint's `input_*` tensors."""

    scheme: object                                        # compressed-tensors QuantizationScheme
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # input_scale, input_zero_point

    @property
    def args(self):
        return self.scheme.input_activations


def input_quant(scheme, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> InputQuant | None:
    """The input rounding of a module from its scheme and its checkpoint tensors (None: 16-bit inputs)."""
    from compressed_tensors.quantization import DynamicType

    args = scheme.input_activations
    if args is None:
        return None
    own = {k: v.to(dtype) if k != "input_zero_point" else v for k, v in tensors.items() if k.startswith("input_")}
    if args.dynamic not in (True, DynamicType.LOCAL) and "input_scale" not in own:
        raise ValueError("static input activations but no input_scale in the checkpoint")
    return InputQuant(scheme, own)


def round_input(holder, x: torch.Tensor, args) -> torch.Tensor:
    """compressed-tensors' `forward_quantize` of a layer input (through compress.export.qdq where it
    covers the arguments: the same bits, no host round trip); 2-D inputs as [1, tokens, hidden] so
    that its token strategy takes a scale per row (see the module docstring)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    v = x[None] if x.dim() == 2 else x
    if qdq.covered(args, None, getattr(holder, "input_global_scale", None)):
        v = qdq.module_qdq(holder, v, args)
    else:
        v = forward_quantize(holder, v, "input", args)
    return v[0] if x.dim() == 2 else v


def _holder(tensors: dict[str, torch.Tensor]):
    from compressed_tensors.quantization import QuantizationStatus

    return types.SimpleNamespace(quantization_status=QuantizationStatus.DECOMPRESSED, **tensors)


# ---------------------------------------------------------------------------- linear modules

def _linear_forward(self, x):
    return type(self).forward(self, round_input(self, x, self.quantization_scheme.input_activations))


def round_linear_input_(mod: nn.Linear, iq: InputQuant) -> None:
    """A dense layer as transformers leaves it after decompressing a W8A8 checkpoint."""
    from compressed_tensors.quantization import QuantizationStatus

    mod.quantization_scheme = iq.scheme
    mod.quantization_status = QuantizationStatus.DECOMPRESSED
    for k, v in iq.tensors.items():
        mod.register_parameter(k, nn.Parameter(v.to(mod.weight.device), requires_grad=False))
    mod.forward = types.MethodType(_linear_forward, mod)


# ---------------------------------------------------------------------------- fused experts

def _round(self, role: str, k: int, x: torch.Tensor) -> torch.Tensor:
    args = self.input_activations.get(role)
    if args is None:
        return x
    return round_input(_holder({n: getattr(self, f"{role}_{n}")[k] for n in self.input_tensor_names[role]}), x, args)


def _expert(self, lay: moe.Layout, k: int, x: torch.Tensor) -> torch.Tensor:
    """Expert k on its tokens: the fused module's function with its inputs rounded."""
    def w(p):
        return p[k].T if lay.transposed else p[k]

    def b(name):
        return getattr(self, name)[k] if lay.has_bias else None

    if lay.has_gate:
        xg = _round(self, "gate", k, x)
        gate_up = F.linear(xg, w(self.gate_up_proj), b("gate_up_proj_bias"))
        if not self.gate_up_shared:  # gate and up round their input differently: up's columns from its own
            cols = torch.arange(gate_up.shape[-1], device=x.device)
            is_gate = cols < gate_up.shape[-1] // 2 if lay.concatenated else cols % 2 == 0
            up = F.linear(_round(self, "up", k, x), w(self.gate_up_proj), b("gate_up_proj_bias"))
            gate_up = torch.where(is_gate, gate_up, up)
        if hasattr(self, "_apply_gate"):
            h = self._apply_gate(gate_up)
        else:
            g, u = gate_up.chunk(2, -1) if lay.concatenated else (gate_up[..., ::2], gate_up[..., 1::2])
            h = self.act_fn(g) * u
    else:
        h = self.act_fn(F.linear(_round(self, "up", k, x), w(self.up_proj), b("up_proj_bias")))
    return F.linear(_round(self, "down", k, h), w(self.down_proj), b("down_proj_bias"))


def _experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    lay = moe.Layout.of(self)
    n = moe.num_experts(self)
    out = torch.zeros_like(hidden_states)
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)   # (token, slot) pairs grouped by expert, in token order
    counts = torch.bincount(flat, minlength=n + 1)[:n].tolist()  # past the end: parallel sentinels
    start = 0
    for k, c in enumerate(counts):
        if c:
            pairs = order[start:start + c]
            tok, pos = pairs // top_k, pairs % top_k
            y = _expert(self, lay, k, hidden_states[tok])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        start += c
    return out


def round_expert_inputs_(fused: nn.Module, per_expert: list[dict[str, InputQuant]]) -> None:
    """Give a fused experts module the input rounding of its per-expert checkpoint modules
    (`per_expert[k]`: role gate / up / down -> InputQuant). A role is rounded for all experts
    or none, with the same arguments (what vLLM's fused-MoE methods take)."""
    args, names = {}, {}
    for role in ("gate", "up", "down"):
        iqs = [e.get(role) for e in per_expert]
        if all(q is None for q in iqs):
            continue
        first = iqs[0]
        if any(q is None or q.args != first.args or q.tensors.keys() != first.tensors.keys() for q in iqs):
            raise ValueError(f"experts' {role} projections differ in input activation scheme")
        args[role], names[role] = first.args, sorted(first.tensors)
        for n in names[role]:
            fused.register_buffer(f"{role}_{n}", torch.stack([q.tensors[n] for q in iqs]).to(fused.down_proj.device),
                                  persistent=False)
    fused.input_activations, fused.input_tensor_names = args, names
    fused.gate_up_shared = args.get("gate") == args.get("up") and all(
        torch.equal(getattr(fused, f"gate_{n}"), getattr(fused, f"up_{n}")) for n in names.get("gate", []))
    fused.forward = types.MethodType(_experts_forward, fused)


# ---------------------------------------------------------------------------- whole models

def round_inputs_(model: nn.Module, acts: dict[str, InputQuant], proj: dict[str, str]) -> int:
    """Input rounding for every module of `acts` (linearized names: `…experts.N.<proj>` for an
    expert, `proj` the role -> name map of compress.moe_checkpoint.CheckpointLayout), on the fused model.
    Returns how many modules (expert projections counted one by one) round their input."""
    role_of = {name: role for role, name in proj.items()}
    experts: dict[str, dict[int, dict[str, InputQuant]]] = {}
    for name, iq in acts.items():
        hit = moe.expert_index(name)
        if hit is None:
            round_linear_input_(model.get_submodule(name), iq)
        else:
            path, k, p = hit
            experts.setdefault(path, {}).setdefault(k, {})[role_of[p]] = iq
    for path, per in experts.items():
        fused = model.get_submodule(path)
        round_expert_inputs_(fused, [per.get(k, {}) for k in range(moe.num_experts(fused))])
    return len(acts)
