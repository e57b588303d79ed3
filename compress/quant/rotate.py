"""The `rotate` stage: an orthogonal rotation of the residual stream folded into the weights
(QuaRot's R1, Ashkboos et al. 2024), so that the activations the quantization stages after it
see have no outlier channels, while the model computes the same function.

Steps, in float64, on a pre-norm decoder (Llama, Mistral, Qwen2, Qwen3):
  1. fold each RMSNorm's weight into the linears that read its output (attention's q/k/v,
     the MLP's gate/up, lm_head after the final norm) and set the norm's weight to 1: an RMSNorm
     without weight commutes with any orthogonal Q (it divides by the root mean square, which
     Q keeps);
  2. with the residual stream h carried as Qᵀh: the embedding's rows become E Q, every linear
     that reads the residual W Q, every linear that writes to it (o_proj, down_proj) Qᵀ W (and
     its bias Qᵀ b).
The result is an ordinary checkpoint of the same architecture that every engine loads with no
custom code (tied input and output embeddings are untied: after the fold they differ). Online
rotations (R3/R4, inside attention and before down_proj) need engine support and are not
written here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from compress.errors import UserError
from compress.export.compressed_tensors import refuse_quantized
from compress.layerwise import decoder_layers
from compress.quant.hadamard import rotation
from compress.schema import Strict
from compress.stage import Stage, StageContext

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # pre-norm decoders whose norms are RMSNorm on the residual


class RotateConfig(Strict):
    kind: Literal["hadamard", "random"] = Field(
        "hadamard", description="hadamard: a randomized Hadamard matrix where the hidden size has one (else a random "
        "orthogonal matrix, recorded); random: a random orthogonal matrix (seeded by the recipe's seed)")


def _parts(layer) -> tuple[list, list, list]:
    """(attention readers, MLP readers, writers) of one decoder layer, by role."""
    attn, mlp = layer.self_attn, layer.mlp
    lin = torch.nn.Linear
    attn_in = [m for n, m in attn.named_children() if isinstance(m, lin) and n != "o_proj"]
    mlp_in = [m for n, m in mlp.named_children() if isinstance(m, lin) and n != "down_proj"]
    return attn_in, mlp_in, [attn.o_proj, mlp.down_proj]


def check(cfg: RotateConfig, model: torch.nn.Module, ctx: StageContext) -> None:
    """Refuse, before any work, what the rotation cannot keep exact."""
    refuse_quantized(ctx.model_dir, "rotate")
    kind = getattr(model.config, "model_type", type(model).__name__)
    if kind not in SUPPORTED:
        raise UserError(f"rotate: {kind} models are not supported (supported: {', '.join(SUPPORTED)}; the norms of "
                        "others sit where a rotation does not commute with them, or their experts are fused)")
    _, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            if getattr(getattr(layer, name, None), "weight", None) is None:
                raise UserError(f"rotate: a decoder layer of {kind} has no {name} with a weight")
        # every matrix that reads or writes the residual must be an nn.Linear the rotation reaches:
        # one it skipped (a fused 3-D expert weight, a custom projection) would change the function
        covered = {id(m.weight) for m in sum(_parts(layer), [])}
        left = [f"layers.{i}.{block}.{n}" for block in ("self_attn", "mlp")
                for n, w in getattr(layer, block).named_parameters() if w.dim() >= 2 and id(w) not in covered]
        if left:
            raise UserError(f"rotate: {len(left)} weight matrices of {kind} are not nn.Linear projections it can "
                            f"rotate (e.g. {left[0]}); rotating the rest would change the model's function")


def _on(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`t` in float64 on the rotation's device (the stage's: about 3e13 multiply-adds on an 8B
    model, which a GPU does far faster than a CPU); the model itself stays where it is. Moved in
    its own dtype and widened there: a float64 copy over PCIe would move 4 x the bytes."""
    return t.detach().to(q.device).to(torch.float64)


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype).to(p.device)  # narrowed where it was computed, then moved


def _fold_read(norm: torch.nn.Module, readers: list[torch.nn.Linear], q: torch.Tensor) -> None:
    """The norm's weight folded into the linears that read its output, then their inputs
    rotated: W' = (W diag(w)) Q, each weight moved and rounded once."""
    w = _on(norm.weight, q)
    for lin in readers:
        _set(lin.weight, (_on(lin.weight, q) * w[None, :]) @ q)
    norm.weight.data.fill_(1.0)


def _read(lin: torch.nn.Linear, q: torch.Tensor) -> None:
    _set(lin.weight, _on(lin.weight, q) @ q)


def _write(lin: torch.nn.Linear, q: torch.Tensor) -> None:
    _set(lin.weight, q.T @ _on(lin.weight, q))
    if lin.bias is not None:
        _set(lin.bias, q.T @ _on(lin.bias, q))


def _untie(model) -> bool:
    """Give lm_head its own weight where it shares the embedding's; True if it did."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if getattr(model.config, "get_text_config", None) is not None:
        model.config.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def apply(model, cfg: RotateConfig, ctx: StageContext):
    check(cfg, model, ctx)
    _, layers = decoder_layers(model)
    d = model.config.hidden_size
    q, what = rotation(d, ctx.seed, cfg.kind)
    q = q.to(ctx.device)
    untied = _untie(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    final_norm = model.model.norm
    for layer in layers:
        attn_in, mlp_in, writers = _parts(layer)
        _fold_read(layer.input_layernorm, attn_in, q)
        _fold_read(layer.post_attention_layernorm, mlp_in, q)
        for lin in writers:
            _write(lin, q)
    _fold_read(final_norm, [head], q)
    _read(emb, q)  # the embedding's rows: E Q, as a reader's weight
    return model, {"rotation": what, "hidden_size": d, "seed": ctx.seed, "layers": len(layers),
                   "untied_embeddings": untied, "device": str(q.device), "online_rotations": "none (R1 only, folded into the weights)"}


STAGE = Stage(name="rotate", config=RotateConfig, apply=apply, check=check, weights=True,
              summary="orthogonal (randomized Hadamard) rotation of the residual stream folded into the weights "
                      "(QuaRot R1): the same function, no outlier channels for the quantization stages after it")


ROTATE_FIELD = ("rotate the residual stream first, inside this stage (the `rotate` stage's rotation, then this "
                "stage on the rotated model, one output): {} for a randomized Hadamard, {kind: random}; null: off")


def rotating(stage: Stage) -> Stage:
    """`stage` (whose config has a `rotate: RotateConfig | None` field) with the rotation run first
    when the field is set: checked before any work with the stage's own checks, applied to the
    model the stage then quantizes, and recorded under `rotate` in the stage's info. One output
    instead of two, so a recipe says `gptq: {rotate: {}}` where it would chain rotate -> gptq."""

    def check_(cfg, model, ctx: StageContext) -> None:
        if cfg.rotate is not None:
            check(cfg.rotate, model, ctx)
        if stage.check is not None:
            stage.check(cfg, model, ctx)

    def apply_(model, cfg, ctx: StageContext):
        rotated = None
        if cfg.rotate is not None:
            model, rotated = apply(model, cfg.rotate, ctx)
        model, info = stage.apply(model, cfg, ctx)
        return model, (info if rotated is None else {**info, "rotate": rotated})

    return replace(stage, apply=apply_, check=check_)
