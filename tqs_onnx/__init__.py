"""tqs-onnx: trajectory-based quantization sensitivity for frozen ONNX models.

Flow: ONNX file -> graph analysis (graph) -> rollout + sweep (rollout, probes, sweep)
-> allocation (tiers, allocate) -> rewrite passes (tqs_onnx.passes, rewrite) -> verify/report (evaluate).
"""

__version__ = "0.1.0"
# Version of the JSON files exchanged between stages (scores, plans, reports).
SCHEMA_VERSION = 1

from tqs_onnx.errors import TqsError  # noqa: E402

__all__ = ["TqsError", "__version__", "SCHEMA_VERSION"]
