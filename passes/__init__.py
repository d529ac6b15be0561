"""Graph rewrite passes. Each pass is a class with `name` and `run(model) -> PassResult`.

Imported as ``tqs_onnx.passes`` (pyproject maps this folder into the package namespace).
"""

from tqs_onnx.passes.base import GraphPass, PassResult, run_passes

__all__ = ["GraphPass", "PassResult", "run_passes"]
