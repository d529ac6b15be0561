"""Restructure a model without copying its weights: detach large tensors, run passes, attach them.

Protobuf messages share no memory: a pass that rebuilds the model (an onnx-ir round trip, the C++
version converter) copies every weight, and a message keeps all memory it ever held until the whole
message is freed (upb arenas). So such passes run on a *skeleton*: the model with each large tensor
replaced by a stub that has its name, type and dims but no data. Attaching copies each tensor's data
once, into the model that is kept. The caller's model is only read.

Stubs are found again in one of two ways. `Detached` marks them in their doc string: onnx-ir copies
tensors verbatim even when it renames or moves them (lifting). `Stubs` knows main-graph initializers
by name: the version converter and the tier writer keep names (the converter drops doc strings).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from tqs_onnx.graph import iter_tensors

DETACH_MIN_ELEMENTS = 1024  # smaller tensors (shapes, axes, scales an adapter may read) stay in the skeleton
DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "raw_data", "double_data", "uint64_data")
# Marks a stub in its doc_string. The token is drawn per process, so a file's own doc_strings can never
# pass for a mark (a crafted "tqs-detached:0" would otherwise take another tensor's data).
_MARK = f"tqs-detached-{secrets.token_hex(8)}:"
_NESTING_ATTRS = (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS,
                  onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass
class Stubs:
    """Main-graph initializers held without data, by name, and the caller's tensors that hold it."""

    originals: dict[str, onnx.TensorProto]

    def source(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """The tensor holding `tensor`'s data: its original if it is a stub, else itself."""
        original = self.originals.get(tensor.name)
        return original if original is not None and not _has_data(tensor) else tensor

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return numpy_helper.to_array(self.source(tensor))

    def attach(self, model: onnx.ModelProto) -> int:
        """Give each data-less main-graph initializer of `model` the data of the original of its name."""
        stubs = [t for t in model.graph.initializer if t.name in self.originals and not _has_data(t)]
        for t in stubs:
            _copy_data(self.originals[t.name], t)
        return len(stubs)


@dataclass
class Detached:
    """A skeleton whose stubs, in any graph, are marked with their index in `originals`."""

    skeleton: onnx.ModelProto
    originals: list[onnx.TensorProto]

    def source(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        k = _mark_of(tensor)
        return tensor if k is None else self.originals[k]

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return numpy_helper.to_array(self.source(tensor))

    def attach(self, model: onnx.ModelProto) -> int:
        """Give every marked stub of `model` (any graph, initializer or attribute) its original's data."""
        stubs = [(t, k) for t in iter_tensors(model) if (k := _mark_of(t)) is not None]
        for t, k in stubs:
            self._unmark(t, self.originals[k])
            _copy_data(self.originals[k], t)
        return len(stubs)

    def by_name(self, model: onnx.ModelProto) -> Stubs:
        """Hand the stubs that are main-graph initializers of `model` over to `Stubs` (unmarked, so the
        skeleton equals the full model but for their data); attach all other stubs now."""
        originals = {}
        for t in model.graph.initializer:
            k = _mark_of(t)
            if k is not None:
                self._unmark(t, self.originals[k])
                originals[t.name] = self.originals[k]
        self.attach(model)
        return Stubs(originals)

    @staticmethod
    def _unmark(stub: onnx.TensorProto, original: onnx.TensorProto) -> None:
        if original.HasField("doc_string"):
            stub.doc_string = original.doc_string
        else:
            stub.ClearField("doc_string")


def detach(model: onnx.ModelProto, min_elements: int = DETACH_MIN_ELEMENTS) -> Detached:
    """The skeleton of `model` with every tensor of at least `min_elements`, in every graph, a marked stub."""
    originals: list[onnx.TensorProto] = []
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip=("graph",))
    _copy_graph(model.graph, skeleton.graph, originals, min_elements, nested=True, mark=True)
    return Detached(skeleton, originals)


def detach_initializers(model: onnx.ModelProto, min_elements: int = DETACH_MIN_ELEMENTS
                        ) -> tuple[onnx.ModelProto, Stubs]:
    """The skeleton of `model` with each main-graph initializer of at least `min_elements` a stub (by name)."""
    originals: list[onnx.TensorProto] = []
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip=("graph",))
    _copy_graph(model.graph, skeleton.graph, originals, min_elements, nested=False, mark=False)
    return skeleton, Stubs({t.name: t for t in originals})


def _copy_graph(src: onnx.GraphProto, dst: onnx.GraphProto, originals: list[onnx.TensorProto],
                min_elements: int, nested: bool, mark: bool) -> None:
    copy_fields(src, dst, skip=("initializer", "node"))
    for t in src.initializer:
        _copy_tensor(t, dst.initializer.add(), originals, min_elements, mark)
    for node in src.node:
        if not nested or not any(a.type in _NESTING_ATTRS for a in node.attribute):
            dst.node.add().CopyFrom(node)
            continue
        new = dst.node.add()
        copy_fields(node, new, skip=("attribute",))
        for a in node.attribute:
            b = new.attribute.add()
            copy_fields(a, b, skip=("t", "tensors", "g", "graphs"))
            if a.HasField("t"):
                _copy_tensor(a.t, b.t, originals, min_elements, mark)
            for t in a.tensors:
                _copy_tensor(t, b.tensors.add(), originals, min_elements, mark)
            if a.HasField("g"):
                _copy_graph(a.g, b.g, originals, min_elements, nested, mark)
            for g in a.graphs:
                _copy_graph(g, b.graphs.add(), originals, min_elements, nested, mark)


def _copy_tensor(src: onnx.TensorProto, dst: onnx.TensorProto, originals: list[onnx.TensorProto],
                 min_elements: int, mark: bool) -> None:
    # Sized by dims (upb's ByteSize encodes the tensor). External references are already data-less;
    # string tensors are not copied verbatim by onnx-ir.
    if (math.prod(src.dims) < min_elements or src.data_location == onnx.TensorProto.EXTERNAL
            or src.data_type == onnx.TensorProto.STRING):
        dst.CopyFrom(src)
        return
    copy_fields(src, dst, skip=(*DATA_FIELDS, "doc_string") if mark else DATA_FIELDS)
    if mark:
        dst.doc_string = f"{_MARK}{len(originals)}"
    originals.append(src)


def copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every set field of `src` into `dst` except those named in `skip` (which are never read).

    Also what tqs_onnx/encoding.py encodes a model or graph around its initializers with."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name in skip:
            continue
        if fd.is_repeated:
            values = getattr(src, fd.name)
            if len(values):
                getattr(dst, fd.name).extend(values)
        elif src.HasField(fd.name):
            if fd.type == fd.TYPE_MESSAGE:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def raw_half(t: onnx.TensorProto) -> bool:
    """Store a float16/bfloat16 tensor held in int32_data (a varint of about 3 bytes per value, as
    onnxconverter-common writes tensors it read from float_data) as raw_data, 2 bytes per value: the
    size the planner counts. The values are the same bits. Returns whether it changed `t`."""
    if not _int32_half(t):
        return False
    t.raw_data = _half_bytes(t)
    t.ClearField("int32_data")
    return True


def _int32_half(t: onnx.TensorProto) -> bool:
    return t.data_type in HALF_TYPES and len(t.int32_data) > 0


def _half_bytes(t: onnx.TensorProto) -> bytes:
    """A float16/bfloat16 tensor's int32_data as raw_data: its 16-bit patterns, little-endian."""
    return np.asarray(t.int32_data, np.uint32).astype("<u2").tobytes()


def _copy_data(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
    if _int32_half(src):  # as raw_data (raw_half)
        dst.raw_data = _half_bytes(src)
        return
    for name in DATA_FIELDS:
        if name == "raw_data":
            if src.HasField("raw_data"):
                dst.raw_data = src.raw_data
        elif len(getattr(src, name)):
            getattr(dst, name).extend(getattr(src, name))


def _has_data(t: onnx.TensorProto) -> bool:
    return t.HasField("raw_data") or any(len(getattr(t, name)) for name in DATA_FIELDS if name != "raw_data")


def _mark_of(t: onnx.TensorProto) -> int | None:
    doc = t.doc_string
    return int(doc[len(_MARK):]) if doc.startswith(_MARK) and doc[len(_MARK):].isdigit() else None
