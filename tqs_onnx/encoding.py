"""A model's protobuf encoding in pieces: its size and its file without the whole encoding in memory.

upb computes ByteSize() by encoding the message, and SerializeToString() holds the encoding twice
while it builds it: about 2x the file beside the model. Protobuf writes fields in field-number order,
and a repeated message field is its elements one after another (key, length, bytes), so the file can
be written one initializer at a time, byte for byte what `onnx.save_model` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
from google.protobuf import unknown_fields

from tqs_onnx.passes.detach import copy_fields

_GRAPH = onnx.ModelProto.GRAPH_FIELD_NUMBER
_INITIALIZER = onnx.GraphProto.INITIALIZER_FIELD_NUMBER


class ModelEncoding:
    """The encoding of `model` around its initializers; `size` is the length of the whole."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.model_head = _fields(model, lambda n: n < _GRAPH)
        self.graph_head = _fields(graph, lambda n: n < _INITIALIZER)
        self.tensor_sizes = [t.ByteSize() for t in graph.initializer]  # one tensor encoded at a time
        self.graph_tail = _fields(graph, lambda n: n > _INITIALIZER)
        self.model_tail = _fields(model, lambda n: n > _GRAPH)
        tensors = sum(len(_length_key(_INITIALIZER)) + len(_varint(s)) + s for s in self.tensor_sizes)
        self.graph_size = len(self.graph_head) + tensors + len(self.graph_tail)
        self.size = (len(self.model_head) + len(_length_key(_GRAPH)) + len(_varint(self.graph_size))
                     + self.graph_size + len(self.model_tail))
        # Unknown fields of the model or graph would be left out of the pieces (and a missing graph
        # would be written as an empty one): such models are encoded whole.
        self.exact = (model.HasField("graph") and not len(unknown_fields.UnknownFieldSet(model))
                      and not len(unknown_fields.UnknownFieldSet(graph)))

    def write(self, path: str | Path) -> None:
        """Write the model file (data inline), as `onnx.save_model(model, path)` would."""
        if not self.exact or self.size > onnx.checker.MAXIMUM_PROTOBUF:
            onnx.save_model(self.model, str(path))  # also raises onnx's own error for files over 2 GB
            return
        with open(path, "wb") as f:
            f.write(self.model_head + _length_key(_GRAPH) + _varint(self.graph_size) + self.graph_head)
            for t, size in zip(self.model.graph.initializer, self.tensor_sizes):
                f.write(_length_key(_INITIALIZER) + _varint(size))
                f.write(t.SerializeToString())
            f.write(self.graph_tail + self.model_tail)


def _fields(message, keep: Callable[[int], bool]) -> bytes:
    """The encoding of the fields of `message` whose numbers pass `keep`."""
    part = type(message)()
    copy_fields(message, part, skip=tuple(fd.name for fd in message.DESCRIPTOR.fields if not keep(fd.number)))
    return part.SerializeToString()


def _length_key(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
