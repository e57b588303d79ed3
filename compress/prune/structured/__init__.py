"""Structured pruning: remove whole MLP channels, attention heads and decoder layers, so the
model is smaller and faster on every engine (a dense HF checkpoint with an updated config;
no masks, no zeros).

Cuts (each a stage; the same count in every layer, so the config stays one number):
  - `prune_mlp`: intermediate channels of the gated MLP (rows of gate/up, columns of down).
  - `prune_heads`: attention heads, GQA-aware: `kv_groups` removes whole KV heads with their
    query heads; `query_heads` removes the same number of query heads inside every KV group.
    The config's `head_dim` is written explicitly (hidden / heads no longer gives it).
  - `prune_hidden`: hidden (embedding) channels through every layer, the norms and the
    (tied) head included; RMSNorm weights and eps rescaled for the narrower width.
  - `prune_depth`: whole decoder layers, the least influential by block influence (ShortGPT:
    1 - cos(layer input, layer output), averaged over calibration tokens), or the last ones.
Importance comes from calibration activations collected through the shared layer-wise
runner (compress.layerwise: channel norms of down_proj's input for MLP channels, of
o_proj's input for heads; the runner's `observe` for block influence), or from weight
magnitudes (`importance: magnitude`, no calibration). The cut itself is a pure slicing of
weights (`keep_*` functions), so that cutting nothing changes nothing and a cut equals the
original with the removed parts zeroed (tests check both).

Each stage lives in the module named after what it cuts (mlp, heads, hidden, depth; experts:
`prune_experts`, registered on its own); base holds what they share, cuts the slicing.

Layers are recognised by structure: a decoder layer must hold `self_attn.{q,k,v,o}_proj` and
`mlp.{gate,up,down}_proj` (Llama, Qwen2/3, Mistral and their kin); otherwise the error names
the module it expected.
"""

from compress.prune.structured.base import CutConfig, calibrated, check_common, check_saveable, removed_count
from compress.prune.structured.cuts import (
    ATTN, MLP, as_loadable, blocks, cut_depth, cut_heads, cut_hidden, cut_mlp, head_channels, head_shape,
    heads_fit_width, heads_to_keep, keep_cols, keep_rows, mistral_config, size_info)
from compress.prune.structured import depth, heads, hidden, mlp
from compress.prune.structured.depth import DepthCutConfig, apply_depth, block_influence, check_depth
from compress.prune.structured.heads import HeadCutConfig, apply_heads, check_heads, head_scores
from compress.prune.structured.hidden import HiddenCutConfig, apply_hidden, check_hidden, hidden_scores
from compress.prune.structured.mlp import MLPCutConfig, apply_mlp, check_mlp, mlp_scores

STAGES = [mlp.STAGE, heads.STAGE, hidden.STAGE, depth.STAGE]  # what the registry registers, in this order

__all__ = [
    "ATTN", "MLP", "STAGES", "CutConfig", "DepthCutConfig", "HeadCutConfig", "HiddenCutConfig", "MLPCutConfig",
    "apply_depth", "apply_heads", "apply_hidden", "apply_mlp", "as_loadable", "block_influence", "blocks",
    "calibrated", "check_common", "check_depth", "check_heads", "check_hidden", "check_mlp", "check_saveable",
    "cut_depth", "cut_heads", "cut_hidden", "cut_mlp", "head_channels", "head_scores", "head_shape",
    "heads_fit_width", "heads_to_keep", "hidden_scores", "keep_cols", "keep_rows", "mistral_config", "mlp_scores",
    "removed_count", "size_info"]
