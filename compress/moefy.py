"""MoEfication: a dense Llama's MLPs split into experts, as a transformers Mixtral model.

A Llama MLP, y = down(silu(gate x) * up x) with intermediate width I, is a sum over its I
channels. A partition of the channels into E groups P_e of I/E gives E experts whose sum is
the MLP. Shapes (H hidden, E experts, I' = I / E, k experts per token):
    gate, up [I, H], down [H, I]  ->  mlp.gate.weight (the router) [E, H],
    mlp.experts.gate_up_proj [E, 2I', H] = [gate[P_e]; up[P_e]],
    mlp.experts.down_proj    [E, H, I']  = k · down[:, P_e].
Mixtral's router takes a softmax over the E experts, keeps the top k and renormalizes the k
weights w_e to sum 1; the experts' outputs are summed with those weights. A router close to
uniform gives w_e ≈ 1/k, so k · w_e · y_e ≈ y_e: the layer computes the sum of its k chosen
experts' parts of the dense MLP. With k = E and a zero router, w_e = 1/E exactly (E a power
of 2: the scale is exact too) and the model computes the Llama's function (up to the order of
float sums). Attention, norms, embeddings and lm_head are copied.

For k < E the partition and the router decide what is lost (Zhang et al. 2022, "MoEfication"):
  * partition "coact": balanced k-means (cosine) of the channels' contribution profiles
    |silu(g_i x) u_i x| · ||down[:, i]|| over calibration tokens, so channels active together share
    an expert; "weights": the same over the channels' [gate_i, up_i] rows (no data); "contiguous";
  * router "lsq": each expert's router row fitted by ridge least squares to predict, from the
    layer's MLP input, the log-norm of that expert's output (centred over experts per token: only
    the ranking within a token counts), then scaled so that no calibration token's logits lie
    further apart than `spread` (the renormalized weights stay within about that of 1/k);
    "gate_mean": the mean of the expert's gate rows, scaled the same; "zero";
  * refit: the experts' down_proj solved by least squares so that the k routed experts reproduce
    the dense MLP's output on calibration tokens, with a ridge (`REFIT`) pulling toward the plain
    split: the chosen experts take up part of what the dropped ones would have added.
`moefy` is a function of the model and, for k < E, calibration tokens: it goes through the
decoder one layer at a time (the calibration runner's capture, compress.layerwise.capture), so
each layer's partition, router and refit see the inputs that the layers already MoEfied produce.
compress.models makes the built-in sources `smollm2-moe` and `smollm2-moe-topK` with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REFIT = 1e-1  # the down_proj refit's ridge, relative to the mean diagonal (measured: benchmarks/moe_smollm2.py)


# ---------------------------------------------------------------------------- config

def moe_config(cfg, num_experts: int, top_k: int):
    """The MixtralConfig of a LlamaConfig's MoEfied form (same attention, norms, rope, vocab)."""
    from transformers import MixtralConfig

    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("moefy: Mixtral has no attention or MLP biases; this Llama has them")
    if cfg.intermediate_size % num_experts or not 1 <= top_k <= num_experts:
        raise ValueError(f"moefy: {num_experts} experts must divide intermediate_size {cfg.intermediate_size} "
                         f"and 1 <= top_k <= experts (got {top_k})")
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size // num_experts,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None),
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        attention_dropout=cfg.attention_dropout, sliding_window=None,
        num_local_experts=num_experts, num_experts_per_tok=top_k, architectures=["MixtralForCausalLM"])


# ---------------------------------------------------------------------------- partition

def contributions(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[T, I]: how much each intermediate channel adds to the MLP's output, |h_i| · ||down[:, i]||."""
    h = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return h.abs() * mlp.down_proj.weight.norm(dim=0)


def _balanced_assign(sim: torch.Tensor, cap: int) -> list[int]:
    """Each row to a column, at most `cap` rows a column, greedily by decreasing similarity."""
    n, e = sim.shape
    assign, load = [-1] * n, [0] * e
    for idx in sim.flatten().argsort(descending=True, stable=True).tolist():
        i, c = divmod(idx, e)
        if assign[i] < 0 and load[c] < cap:
            assign[i], load[c] = c, load[c] + 1
    return assign


def balanced_kmeans(feats: torch.Tensor, groups: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """[groups, n / groups] row indices of `feats` [n, d]: spherical k-means with equal groups."""
    f = F.normalize(feats.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    cent, assign = f[torch.randperm(len(f), generator=g)[:groups]], None
    for _ in range(iters):
        new = torch.tensor(_balanced_assign(f @ cent.T, len(f) // groups))
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        cent = F.normalize(F.one_hot(assign, groups).T.to(f.dtype) @ f, dim=1)
    return torch.stack([torch.nonzero(assign == c).squeeze(1) for c in range(groups)])


def partition(mlp: nn.Module, num_experts: int, kind: str = "contiguous", x: torch.Tensor | None = None) -> torch.Tensor:
    """[E, I / E] channel indices of each expert, each row sorted."""
    n = mlp.gate_proj.weight.shape[0]
    if kind == "contiguous":
        return torch.arange(n).reshape(num_experts, -1)
    feats = (contributions(mlp, x).T if kind == "coact" else
             torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1))
    return balanced_kmeans(feats, num_experts).sort(dim=1).values


# ---------------------------------------------------------------------------- router

def expert_norms(mlp: nn.Module, parts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[T, E]: the norm of each expert's part of the MLP output."""
    h = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return torch.stack([(h[:, p] @ mlp.down_proj.weight[:, p].T).norm(dim=1) for p in parts], dim=1)


def router(mlp: nn.Module, parts: torch.Tensor, kind: str = "zero", x: torch.Tensor | None = None,
           spread: float = 1e-2, ridge: float = 1e-3) -> torch.Tensor:
    """[E, H] router weight. Non-zero kinds are scaled so that no token of `x` has logits further
    apart than `spread` (the renormalized top-k weights stay within about that of 1/k)."""
    if kind == "zero":
        return torch.zeros(len(parts), mlp.gate_proj.weight.shape[1])
    xd = x.double()
    if kind == "gate_mean":
        w = torch.stack([mlp.gate_proj.weight[p].mean(0) for p in parts]).double()
    else:
        s = expert_norms(mlp, parts, x).double().clamp_min(1e-30).log()  # ranks within a token, each token alike
        s = s - s.mean(1, keepdim=True)
        a = xd.T @ xd
        a += ridge * a.diagonal().mean() * torch.eye(len(a), dtype=a.dtype)
        w = torch.linalg.solve(a, xd.T @ s).T
    logits = xd @ w.T
    return (w * (spread / (logits.max(1).values - logits.min(1).values).max())).float()


def route(w_router: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, E] Mixtral's expert weights of each token: softmax, top k, renormalized (0 elsewhere)."""
    p = torch.softmax((x @ w_router.T).float(), dim=-1)
    v, i = p.topk(top_k, dim=-1)
    return torch.zeros_like(p).scatter(1, i, v / v.sum(1, keepdim=True))


def _expert_acts(gate_up: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[T, E · I']: every expert's intermediate activations times its routing weight (0 if not chosen)."""
    i2 = gate_up.shape[1] // 2
    return torch.cat([F.silu(x @ gate_up[j, :i2].T) * (x @ gate_up[j, i2:].T) * weights[:, j:j + 1]
                      for j in range(len(gate_up))], 1)


def refit_down(gate_up: torch.Tensor, down: torch.Tensor, w_router: torch.Tensor, top_k: int, x: torch.Tensor,
               y: torch.Tensor, ridge: float = REFIT) -> torch.Tensor:
    """[E, H, I'] down_proj solved by least squares so that the routed experts' sum reproduces
    `y` [T, H] (the dense MLP's output) from `x` [T, H], with a ridge pulling toward `down` (the
    split's own): the chosen experts take up what the dropped ones would have added, as far as
    a linear map can."""
    z = _expert_acts(gate_up, route(w_router, x, top_k), x).double()
    a = z.T @ z
    lam = ridge * a.diagonal().mean()
    a += lam * torch.eye(len(a), dtype=a.dtype)
    d0 = torch.cat(list(down.double()), dim=1)  # [H, E * I']
    d = torch.linalg.solve(a, z.T @ y.double() + lam * d0.T).T.float()
    return torch.stack(d.chunk(len(gate_up), dim=1))


# ---------------------------------------------------------------------------- model

class Routed(nn.Module):
    """A MoEfied MLP in plain tensors, computing what MixtralSparseMoeBlock computes from the same
    weights: it stands in for a layer's MLP while the next layers are fitted."""

    def __init__(self, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int):
        super().__init__()
        self.router, self.gate_up, self.down, self.top_k = router, gate_up, down, top_k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        z = _expert_acts(self.gate_up, route(self.router, x, self.top_k), x)
        return (z @ torch.cat(list(self.down), dim=1).T).reshape(h.shape)


def split_mlp(mlp: nn.Module, num_experts: int, top_k: int, partition_kind: str = "contiguous",
              router_kind: str = "zero", x: torch.Tensor | None = None, refit: float | None = None) -> Routed:
    """One Llama MLP as E experts (module docstring); `x` [T, H] its inputs on calibration tokens."""
    parts = partition(mlp, num_experts, partition_kind, x)
    w = router(mlp, parts, router_kind, x)
    gate_up = torch.stack([torch.cat([mlp.gate_proj.weight[p], mlp.up_proj.weight[p]]) for p in parts])
    down = torch.stack([mlp.down_proj.weight[:, p] * top_k for p in parts])
    if refit is not None and top_k < num_experts:
        down = refit_down(gate_up, down, w, top_k, x, mlp(x), refit)
    return Routed(w, gate_up, down, top_k)


@torch.no_grad()
def moefy(model: nn.Module, num_experts: int = 8, top_k: int = 8, calib: torch.Tensor | None = None,
          partition_kind: str = "coact", router_kind: str = "lsq", refit: float | None = REFIT,
          batch_size: int = 4) -> nn.Module:
    """The MoEfied form of `model` (a LlamaForCausalLM) as a new MixtralForCausalLM; `model` is
    left as it was. Without `calib` ([n, seq] token ids): the contiguous split and a zero router
    (with k = E, exactly the Llama). With it: `partition_kind`, `router_kind` and the down_proj
    refit (ridge `refit`, None for none), fitted layer by layer on the MoEfied inputs; with k = E
    only the partition (the router stays zero: exactly the Llama, its experts grouped by
    `partition_kind`)."""
    from transformers import MixtralForCausalLM

    layers = model.model.layers
    if calib is None:
        blocks = [split_mlp(layer.mlp, num_experts, top_k) for layer in layers]
    else:
        if top_k == num_experts:  # every expert active: a zero router keeps the Llama's function exactly
            router_kind, refit = "zero", None
        blocks = _sequential(model, layers, calib, batch_size,
                             lambda mlp, x: split_mlp(mlp, num_experts, top_k, partition_kind, router_kind, x, refit))
    moe = MixtralForCausalLM(moe_config(model.config, num_experts, top_k))
    sd = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, b in enumerate(blocks):
        sd.update({f"model.layers.{i}.mlp.gate.weight": b.router, f"model.layers.{i}.mlp.experts.gate_up_proj": b.gate_up,
                   f"model.layers.{i}.mlp.experts.down_proj": b.down})
    dtype = next(model.parameters()).dtype
    moe.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    moe.generation_config = model.generation_config
    return moe.to(dtype).eval()


def _sequential(model, layers, calib: torch.Tensor, batch_size: int, split) -> list[Routed]:
    """Each layer's MLP split on the inputs that the already-split layers before it produce."""
    from compress.layerwise.capture import capture

    device = next(model.parameters()).device
    batches = list(calib.split(batch_size))
    cap = capture(model, layers, batches, device, device,
                  lambda h, a, kw: isinstance(layers[0](h, *a, **kw), (tuple, list)))
    acts, blocks = cap.inputs, []
    for i, layer in enumerate(layers):
        xs: list[torch.Tensor] = []
        hook = layer.mlp.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        dense = layer.mlp
        try:
            for a in acts:
                args, kwargs = cap.kwargs[a.shape[0]][i]
                layer(a, *args, **kwargs)
            hook.remove()
            blocks.append(split(dense, torch.cat(xs).float()))
            layer.mlp = blocks[-1]
            for b, a in enumerate(acts):
                args, kwargs = cap.kwargs[a.shape[0]][i]
                out = layer(a, *args, **kwargs)
                acts[b] = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            hook.remove()
            layer.mlp = dense
    return blocks
