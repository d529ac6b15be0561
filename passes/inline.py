"""Inline model-local functions, so weights inside them and ops behind them are seen as they run.

Exporters that keep modules as functions (torch.onnx's `export_modules_as_functions`, onnxscript)
hide Constant-node weights inside FunctionProto bodies and put every MatMul behind a call node.
ONNX Runtime inlines such functions when it loads the model; this pass does the same first (onnx's
own inliner), so lifting finds the weights, blocks group them by the ops that really consume them,
and the writer's forms match what ORT fuses. A function called several times inlines its Constants
once per call; the duplicate pass (passes/dedup.py, run by tqs_onnx/prepare.py down to 16
elements) stores them once again. Each inlined node is named after its call site ('/enc/layer0' calling
a body's 'MatMul' gives '/enc/layer0/MatMul'): onnx's inliner keeps only the body's names, so the
module structure an exporter wrote into the call names was lost to block names and `--blocks scope`.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnx.defs
import onnx.inliner

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import function_subgraphs, iter_graphs
from tqs_onnx.passes.base import PassResult
from tqs_onnx.util import first_line


# Domains whose ops ONNX Runtime may run with its own kernel even where the model also gives a body.
_KERNEL_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc")


class InlineLocalFunctions:
    name = "inline-functions"

    def run(self, model: onnx.ModelProto) -> PassResult:
        # A function standing for an op ORT implements (a fallback body) is kept: inlined, it would
        # replace the kernel ORT runs with its decomposition.
        kept = [(f.domain, f.name) for f in model.functions
                if f.domain in _KERNEL_DOMAINS or onnx.defs.has(f.name, f.domain)]
        local = {(f.domain, f.name) for f in model.functions} - set(kept)
        if not local:
            return PassResult(model, False, {"functions": 0, "call_sites": 0})
        sites = Counter(f"{n.domain}.{n.op_type}" for n in _all_nodes(model) if (n.domain, n.op_type) in local)
        model = _named_by_call_site(_with_default_attributes(model, local), local)
        try:
            if kept:
                # This entry point converts no opset versions; ORT refuses a function whose opset differs
                # from the model's anyway, so only such (invalid) models behave differently.
                out = onnx.inliner.inline_selected_functions(model, kept, exclude=True)
            else:
                out = onnx.inliner.inline_local_functions(model, convert_version=True)
        except Exception as exc:
            raise TqsError(f"cannot inline the model's local functions: {first_line(exc, 200)}") from None
        # Domains only the functions used stay imported: harmless, and a later pass may not know them.
        functions = sum((f.domain, f.name) in local for f in model.functions)  # overloads count apart
        # Call sites in the main graph, its subgraphs and the functions' bodies (a call inside a
        # function is inlined once per call of that function).
        return PassResult(out, True, {"functions": functions, "call_sites": sum(sites.values()),
                                      "called": dict(sorted(sites.items())), "kept": [f"{d}.{n}" for d, n in kept]})


def _with_default_attributes(model: onnx.ModelProto, local: set[tuple[str, str]]) -> onnx.ModelProto:
    """`model` (a copy where anything changes) whose calls of local functions give every attribute
    the function declares a default for (FunctionProto.attribute_proto) and the call omits.

    onnx's inliner (1.23) ignores the defaults: a body's `alpha=@slope` lost its attribute and the op
    ran with its own default (LeakyRelu 0.01 for the function's 0.3), a different model, silently; a
    Constant whose value was such a reference was left without a value."""
    defaults = {(f.domain, f.name, f.overload): list(f.attribute_proto)
                for f in model.functions if (f.domain, f.name) in local and len(f.attribute_proto)}
    if not defaults:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in _all_nodes(out):
        for default in defaults.get((node.domain, node.op_type, node.overload), ()):
            if all(a.name != default.name for a in node.attribute):
                node.attribute.append(default)
    return out


# Call paths specialized at most (a function calling another twice, 30 levels deep, has 2**30 paths;
# inlining it is hopeless anyway, but naming must not be what runs out of memory first).
MAX_NAMED_CALLS = 20_000


def _named_by_call_site(model: onnx.ModelProto, local: set[tuple[str, str]]) -> onnx.ModelProto:
    """`model` (a copy where anything changes) whose named calls of local functions each call their
    own copy of the function, its nodes (subgraphs' too) named '<call name>/<body node name or op>'
    and its own calls specialized the same way, so the inliner's nodes carry their module path.

    Unnamed calls keep the shared function; beyond MAX_NAMED_CALLS call paths nothing is renamed."""
    bodies = {(f.domain, f.name, f.overload): f for f in model.functions if (f.domain, f.name) in local}
    taken = {(f.domain, f.name, f.overload) for f in model.functions}
    copies: list[onnx.FunctionProto] = []

    def specialize(node: onnx.NodeProto) -> None:
        if len(copies) >= MAX_NAMED_CALLS:
            raise _TooManyCalls
        body = onnx.FunctionProto()
        body.CopyFrom(bodies[(node.domain, node.op_type, node.overload)])
        k = 1
        while (body.domain, f"{body.name}__at{k}", body.overload) in taken:
            k += 1
        body.name = f"{body.name}__at{k}"
        taken.add((body.domain, body.name, body.overload))
        copies.append(body)
        prefix = node.name.rstrip("/")
        for inner in _body_nodes(body):
            inner.name = f"{prefix}/{inner.name or inner.op_type}"
            if (inner.domain, inner.op_type, inner.overload) in bodies:
                specialize(inner)
        node.op_type = body.name

    out = onnx.ModelProto()
    out.CopyFrom(model)
    try:
        for g in iter_graphs(out.graph):
            for node in g.node:
                if node.name and (node.domain, node.op_type, node.overload) in bodies:
                    specialize(node)
    except (_TooManyCalls, RecursionError):
        return model
    if not copies:
        return model
    out.functions.extend(copies)
    return out


class _TooManyCalls(Exception):
    pass


def _body_nodes(f: onnx.FunctionProto):
    yield from f.node
    for g in function_subgraphs(f):
        yield from g.node


def _all_nodes(model: onnx.ModelProto):
    """Nodes of the main graph, the functions' bodies (functions may call functions) and every subgraph
    of either."""
    for g in iter_graphs(model.graph):
        yield from g.node
    for f in model.functions:
        yield from _body_nodes(f)
