"""The forward passes of distillation training: `Pair`, the module that is trained (the student
and the hidden loss's projection, wrapped for data parallelism), which returns the loss parts
of one batch; the frozen teacher's forward pass; the held-out perplexity; and the student's
changes before training (the zeros of a pruned artifact kept, a mixture-of-experts' routers
frozen)."""

from __future__ import annotations

import contextlib
import math

import torch

from compress.distill.losses import chunked_losses, head_losses, hidden_mse
from compress.layerwise import decoder_layers
from compress.moe import is_fused_experts, router_names


@contextlib.contextmanager
def layer_outputs(model, idx: list[int]):
    """{layer index: its output hidden states} for the decoder layers `idx`, filled by the next
    forward pass (hooks on the layers themselves: transformers' output_hidden_states gives the
    last layer's output after the final norm, the others before it)."""
    got: dict[int, torch.Tensor] = {}
    if not idx:
        yield got
        return
    _, layers = decoder_layers(model)

    def hook(i):
        return lambda mod, args, out: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    handles = [layers[i].register_forward_hook(hook(i)) for i in idx]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


class Pair(torch.nn.Module):
    """The student and, where hidden widths differ, its learned projections: the module that
    is trained (and wrapped for data parallelism), returning the loss parts of one batch."""

    def __init__(self, student, proj: torch.nn.Module | None, student_layers: list[int], loss_cfg,
                 compiled: bool = False):
        super().__init__()
        self.student, self.proj, self.layers, self.cfg = student, proj, student_layers, loss_cfg
        self.compiled = compiled  # the output layer's loss arithmetic through torch.compile

    def forward(self, ids: torch.Tensor, t_final: torch.Tensor | None = None, t_states: list[torch.Tensor] = (),
                head_t: torch.nn.Module | None = None, ce_only: bool = False) -> dict:
        """The loss parts of one batch; ce_only: {ce: summed next-token cross-entropy, n: tokens}
        (the held-out perplexity, through this module so that a sharded student is gathered)."""
        c = self.cfg
        if ce_only:
            return ce_sum(self.student, ids, c.chunk)
        with layer_outputs(self.student, self.layers) as got:
            h = self.student.base_model(ids[:, :-1], use_cache=False).last_hidden_state
        labels = ids[:, 1:].reshape(-1)
        n = (labels >= 0).sum().clamp_min(1).float()  # a tensor: no host sync
        loss, kd, ce = head_losses(h.reshape(-1, h.shape[-1]), None if t_final is None or c.kd <= 0 else
                                   t_final.reshape(-1, t_final.shape[-1]), labels,
                                   self.student.get_output_embeddings(), head_t, c.kd / n, c.ce / n, kind=c.kind,
                                   temperature=c.temperature, beta=c.beta, chunk=c.chunk, want_ce=c.ce > 0,
                                   compiled=self.compiled)
        parts = {"kd": kd / n, "ce": ce / n}
        if self.layers:
            parts["hidden"] = hidden_mse([got[i] for i in self.layers], t_states, self.proj)
            loss = loss + c.hidden * parts["hidden"]
        parts["loss"] = loss
        return parts


def teacher_outputs(teacher, ids: torch.Tensor, teacher_layers: list[int]):
    """(the teacher's final hidden states, those of `teacher_layers`), without gradients."""
    with torch.no_grad(), layer_outputs(teacher, teacher_layers) as got:
        h = teacher.base_model(ids[:, :-1], use_cache=False).last_hidden_state
    return h, [got[i] for i in teacher_layers]


def ce_sum(model, ids: torch.Tensor, chunk: int) -> dict:
    """{ce: summed next-token cross-entropy of `model` on `ids`, n: tokens counted}."""
    h = model.base_model(ids[:, :-1], use_cache=False).last_hidden_state
    _, ce, n = chunked_losses(h.reshape(-1, h.shape[-1]), None, ids[:, 1:].reshape(-1), model.get_output_embeddings(),
                              None, want_kd=False, want_ce=True, chunk=chunk)
    return {"ce": ce, "n": n}


@torch.no_grad()
def held_out_perplexity(ce_of, module: torch.nn.Module, windows: torch.Tensor, device, autocast,
                        batch_size: int = 4) -> float | None:
    """exp(mean next-token cross-entropy) over the held-out windows; ce_of(ids) -> {ce, n}
    computes it for one batch (`module` is put in eval mode meanwhile)."""
    if windows.shape[0] == 0:
        return None
    was = module.training
    module.eval()
    ce_total, n_total = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        with autocast():
            r = ce_of(windows[i:i + batch_size].to(device))
        ce_total, n_total = ce_total + float(r["ce"]), n_total + r["n"]
    module.train(was)
    return math.exp(ce_total / max(1, n_total))


def sparsity_masks(model, min_zeros: float = 0.05) -> dict[str, torch.Tensor]:
    """{parameter name: weight != 0} for the weight matrices (linear layers' weights, a mixture-of-
    experts layer's 3-D expert weights) that are at least `min_zeros` exact zeros (a pruned
    artifact): recovery training keeps those zeros."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            params = [("weight", m.weight)]
        elif is_fused_experts(m):
            params = [(n, p) for n, p in m.named_parameters(recurse=False) if p.dim() == 3]
        else:
            continue
        for pname, p in params:
            mask = p != 0
            if 1 - mask.float().mean().item() >= min_zeros:
                out[f"{name}.{pname}" if name else pname] = mask
    return out


def freeze_routers(model) -> int:
    """Stop training the routers of a mixture-of-experts student; returns how many."""
    names = router_names(model)
    for n in names:
        model.get_submodule(n).requires_grad_(False)
    return len(names)
