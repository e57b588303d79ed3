"""The layer-wise calibration runner, shared by every stage that looks at activations: GPTQ,
AWQ, SmoothQuant and static activation scales (int8/fp8) in compress.quant; Wanda, SparseGPT
and OWL's allocation pass (compress.prune.calibrated); structured pruning's channel and head
importance, block influence and expert saliency (compress.prune.structured). MoEfication
(compress.moefy) reuses its capture.

How it runs (one decoder layer and the activations on the device at a time, so a model
larger than the GPU can be compressed; the model itself stays in host memory):
  1. Find the decoder layers by structure (structure.py): the model's largest nn.ModuleList
     of blocks of one class that hold nn.Linear modules. No model names, no torch.fx tracing.
  2. Capture the inputs of layer 0 for every calibration batch, and the arguments each layer
     is called with (capture.py).
  3. For each layer (runner.py): move it to the device; find which target modules read the
     same input (q/k/v, gate/up: one shared statistic) and in which order the layer calls them;
     attach forward hooks that feed each group's collector; run the batches (stopping the layer
     right after the group's last module) (hooks.py); let the algorithm solve the group; with
     `sequential`, one group at a time, so that later groups see the earlier ones' already
     compressed outputs (a mixture-of-experts layer's experts share a pass per projection,
     experts.py). Then run the batches through the compressed layer for the next layer's
     inputs and free the statistics. Hooks are removed and the layer moved back in `finally`.
Hidden states stay on the device when they fit (planned from free memory before starting,
compress.memplan, recorded in the returned info) and are kept in host memory otherwise.
"""

from compress.layerwise.capture import Captured, StopForward, capture, to_store
from compress.layerwise.experts import passes_for
from compress.layerwise.hooks import call_order, collect
from compress.layerwise.runner import Solver, run_layerwise
from compress.layerwise.structure import decoder_layers, split_by_layer

__all__ = ["Captured", "Solver", "StopForward", "call_order", "capture", "collect", "decoder_layers",
           "passes_for", "run_layerwise", "split_by_layer", "to_store"]
