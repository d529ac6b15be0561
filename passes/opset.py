"""Raise the default-domain opset when a tier needs it (INT4 and blocked scales: 21; INT2 and INT6: 25)."""

from __future__ import annotations

import onnx
from onnx import version_converter

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import main_opset
from tqs_onnx.passes.base import PassResult, restore_opset_imports, restore_value_info
from tqs_onnx.passes.detach import detach_initializers
from tqs_onnx.passes.sparse import hide_sparse_initializers
from tqs_onnx.util import first_line

ORT_MAX_IR = 13  # the newest IR version onnxruntime 1.31 loads (onnx 1.23 writes 14 by default)
# IR version each opset needs.
_IR_FOR_OPSET = [(25, 11), (23, 11), (21, 10), (19, 9), (15, 8), (13, 7)]


def lower_ir_for_ort(model: onnx.ModelProto) -> None:
    """Lower, in place, an IR version ONNX Runtime refuses but onnx knows (onnx >= 1.23 writes 14 by
    default; nothing the tiers write needs more than 10). An IR newer than the installed onnx knows is
    left for ONNX Runtime to refuse."""
    if ORT_MAX_IR < model.ir_version <= onnx.IR_VERSION:
        model.ir_version = ORT_MAX_IR


def ir_for_opset(opset: int) -> int:
    return next((ir for op, ir in _IR_FOR_OPSET if opset >= op), 7)


class UpgradeOpset:
    name = "upgrade-opset"

    def __init__(self, min_opset: int):
        self.min_opset = min_opset

    def run(self, model: onnx.ModelProto) -> PassResult:
        current = main_opset(model)
        if current >= self.min_opset:
            return PassResult(model, False, {"opset": current})
        # The converter serializes the model to C++ and back: hand it the graph without the weights' data.
        skeleton, stubs = detach_initializers(model)
        sparse = hide_sparse_initializers(skeleton)
        try:
            out = version_converter.convert_version(skeleton, self.min_opset)
        except Exception as exc:
            msg = first_line(exc, 200)
            raise TqsError(f"cannot convert the model from opset {current} to {self.min_opset} "
                           f"(needed by the chosen tiers): {msg}") from None
        sparse.restore(out)
        stubs.attach(out)
        # The converter returns no local functions: a kept one (prepare_graph inlines the rest) would
        # be called and undefined. Its body keeps its own opset imports.
        del out.functions[:]
        out.functions.extend(model.functions)
        # The converter leaves inferred shapes and re-encoded opset entries behind: keep the input's.
        restore_value_info(model, out)
        restore_opset_imports(model, out, self.min_opset)
        out.ir_version = min(max(model.ir_version, ir_for_opset(self.min_opset)), ORT_MAX_IR)
        return PassResult(out, True, {"opset": self.min_opset, "from": current})
