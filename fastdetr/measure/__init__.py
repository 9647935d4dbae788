"""fastdetr.measure: what a step costs, counted apart from the model code.

- `counters`: ATen ops and host syncs (`OpCounter`), torch-level calls
  (`TorchFunctionCounter`), Triton kernel launches (`TritonLaunchCounter`);
- `saved_bytes`: what autograd keeps for backward (`saved_tensor_bytes`), one
  DETR layer reference against fused (`layer_saved_bytes`); `fastdetr memory`;
- `proxies`: one training step's launches, host syncs and saved bytes,
  reference against fused (`step_proxies`); `fastdetr proxies`. Imported by
  its own name: it builds the model and criterion, and this package stays
  importable from anywhere in the library without a cycle;
- `problem`: DETR-R50's problem size (`DETR_R50`), which these and the
  benchmarks read.

Measured figures live in the benchmark results and the README, not here.
"""
from .counters import ALLOCATION_OPS, HOST_SYNC_OPS, OpCounter, TorchFunctionCounter, TritonLaunchCounter
from .problem import DETR_R50, DETRProblem
from .saved_bytes import LayerReport, LayerShape, SavedBytes, gpu_dropout, layer_saved_bytes, saved_tensor_bytes

__all__ = [
    "ALLOCATION_OPS", "HOST_SYNC_OPS", "OpCounter", "TorchFunctionCounter", "TritonLaunchCounter",
    "DETR_R50", "DETRProblem",
    "LayerReport", "LayerShape", "SavedBytes", "gpu_dropout", "layer_saved_bytes", "saved_tensor_bytes",
]
