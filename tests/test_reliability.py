"""Reliability and security: untrusted inputs, interrupted runs, atomic outputs, determinism.

Every bad input in the table below goes through the CLI entry point and must give one line on stderr
naming the problem, exit code 2, nothing written, and no file opened outside the paths it was given.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tiny import init, recurrent_contexts, recurrent_mlp, recurrent_spec, rng_weights, save_case, vec
from tiny import model as tiny_model
from tqs_onnx.cli import main

# ------------------------------------------------------------------------------ watching file access

class OpenWatch:
    """Counts opens and reads of anything in a folder (Linux inotify), from Python or C++ alike.

    onnx and ONNX Runtime open external data from C++, where Python's audit hooks see nothing.
    """

    def __init__(self, folder: Path):
        self.fd = -1
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if self.fd >= 0 and libc.inotify_add_watch(self.fd, os.fsencode(folder), 0x1 | 0x20) < 0:  # ACCESS|OPEN
                os.close(self.fd)
                self.fd = -1

    def events(self) -> int | None:
        """Bytes of events since the last call; None where inotify is not available."""
        if self.fd < 0:
            return None
        n = 0
        while True:
            try:
                n += len(os.read(self.fd, 1 << 16))
            except BlockingIOError:
                return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def listing(root: Path) -> dict[str, tuple]:
    """Every entry under root (symlinks not followed), with size and mtime for files.

    Folder mtimes are left out: a temporary file made and removed again leaves nothing behind.
    """
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode,) if name in dirnames else \
                (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    """main(argv) as a user runs it: its exit code and its stderr (fd level, so ORT's C++ logs count too)."""
    capfd.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capfd.readouterr().err


# ---------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A good model with its spec, contexts, scores and plan; cases copy from here."""
    d = tmp_path_factory.mktemp("base")
    paths = save_case(d, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    scores, plan = d / "s.json", d / "p.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(scores), "--probes", "1", "--min-size", "16", "--quiet", "--tiers", "int8,int4"]) == 0
    assert main(["allocate", str(scores), "--compression", "2", "-o", str(plan), "--quiet"]) == 0
    return {**paths, "scores": scores, "plan": plan}


class Case:
    """A case's folder (the model folder) beside an `outside` folder holding a secret it must not touch."""

    def __init__(self, root: Path, base: dict[str, Path]):
        self.root = root
        self.d = root / "case"
        self.d.mkdir()
        self.outside = root / "outside"
        self.outside.mkdir()
        self.secret = self.outside / "secret.bin"
        # Valid W1 data: a loader that followed a reference here would succeed, so only refusing passes.
        self.secret.write_bytes(numpy_helper.to_array(_w1_tensor()).tobytes())
        self.base = base

    def copy(self, key: str) -> str:
        dst = self.d / self.base[key].name
        if not dst.exists():
            shutil.copy(self.base[key], dst)
        return str(dst)

    def path(self, name: str) -> str:
        return str(self.d / name)

    def write(self, name: str, data: bytes | str) -> str:
        p = self.d / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
        return str(p)

    def save(self, m: onnx.ModelProto, name: str = "bad.onnx") -> str:
        p = self.d / name
        p.write_bytes(m.SerializeToString())
        return str(p)

    def json(self, name: str, doc) -> str:
        return self.write(name, json.dumps(doc))

    def npz(self, name: str, **arrays) -> str:
        np.savez(self.d / name, **arrays)
        return str(self.d / name)

    def sweep(self, model: str | None = None, spec: str | None = None, contexts: str | None = None,
              *extra: str, out: str = "out.json") -> list[str]:
        return ["sweep", model or self.copy("model"), "--rollout", spec or self.copy("spec"),
                "--contexts", contexts or self.copy("contexts"), "-o", self.path(out), "--quiet",
                "--min-size", "16", "--probes", "1", "--tiers", "int8", *extra]

    def allocate(self, scores: str | None = None, *extra: str) -> list[str]:
        return ["allocate", scores or self.copy("scores"), "--compression", "2", "-o", self.path("p.json"),
                "--quiet", *extra]

    def apply(self, model: str | None = None, plan: str | None = None, *extra: str) -> list[str]:
        return ["apply", model or self.copy("model"), plan or self.copy("plan"), "-o", self.path("q.onnx"),
                "--quiet", *extra]


# ---------------------------------------------------------------------------------- model builders

def _without_probe(c: Case, probe: str) -> dict:
    doc = json.loads(Path(c.copy("scores")).read_text())
    for b in doc["blocks"]:
        b.pop(probe, None)
    return doc



def _w1_tensor() -> TensorProto:
    return next(t for t in recurrent_mlp().graph.initializer if t.name == "W1")


def _with_init(m: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return m


def external_w1(c: Case, location: str, **info: str) -> str:
    """The good model with W1 stored externally at `location` (the data itself is written by the case)."""
    m = recurrent_mlp()
    t = next(t for t in m.graph.initializer if t.name == "W1")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    for k, v in info.items():
        t.external_data.add(key=k, value=v)
    return c.save(m, "ext.onnx")


def external_w1_in_function(c: Case, location: str) -> str:
    """The good model with W1 held by a Constant inside a local function, its data stored externally."""
    m = recurrent_mlp()
    t = onnx.TensorProto()
    t.CopyFrom(_w1_tensor())
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    f = helper.make_function("pkg", "First", ["x"], ["a"], [helper.make_node("Constant", [], ["W"], value=t),
                                                           helper.make_node("MatMul", ["x", "W"], ["a"])],
                             [helper.make_opsetid("", 17)])
    node = next(n for n in m.graph.node if "W1" in n.input)
    node.CopyFrom(helper.make_node("First", ["x"], list(node.output), domain="pkg"))
    m.graph.ClearField("initializer")
    m.graph.initializer.extend(t for t in recurrent_mlp().graph.initializer if t.name != "W1")
    m.functions.append(f)
    m.opset_import.append(helper.make_opsetid("pkg", 1))
    return c.save(m, "fext.onnx")


def external_in_training_info(c: Case, location: str) -> str:
    """The good model with a training_info initializer stored externally at `location`."""
    m = recurrent_mlp()
    t = onnx.TensorProto()
    t.CopyFrom(_w1_tensor())
    t.name = "T0"
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    info = m.training_info.add()
    info.initialization.name = "init"
    info.initialization.initializer.append(t)
    return c.save(m, "train.onnx")


def sparse_in_subgraph_model() -> onnx.ModelProto:
    """x -> If(c) { MatMul(x, S) with S a sparse initializer of the branch } else x."""
    sp = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(3, np.float32), "S"),
                                   numpy_helper.from_array(np.array([0, 17, 34], np.int64), "S_i"), [16, 16])
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "S"], ["t"])], "then", [], [vec("t", 16)],
                               sparse_initializer=[sp])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vec("e", 16)])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    return tiny_model(nodes, [numpy_helper.from_array(np.array(True), "c")], [vec("x", 16)], [vec("y", 16)])


def w1_bytes() -> bytes:
    return numpy_helper.to_array(_w1_tensor()).tobytes()


def two_input_model(u_dim: int = 8, u_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x_next = 0.9 x + tanh(x W1) W2 + float(u) Wu: a state x and a second input u."""
    n, h = 16, 32
    w1, w2, wu = rng_weights(0, (n, h), (h, n), (u_dim, n))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "W2"], ["c"]), helper.make_node("Mul", ["x", "k"], ["xs"]),
             helper.make_node("Cast", ["u"], ["uf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["uf", "Wu"], ["d"]), helper.make_node("Add", ["xs", "c"], ["e"]),
             helper.make_node("Add", ["e", "d"], ["x_next"])]
    g = helper.make_graph(nodes, "g", [vec("x", n), helper.make_tensor_value_info("u", u_type, [1, u_dim])],
                          [vec("x_next", n)], [init("W1", w1), init("W2", w2), init("Wu", wu),
                                               init("k", np.float32(0.9))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def two_input_spec(**over) -> dict:
    return {"horizon": 8, "feedback": {"x_next": "x"}, "initial": {"x": "x0"}, "per_step": {"u": "u"}, **over}


def two_input_contexts(s: int = 3, t: int = 8, u_dim: int = 8) -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    return {"x0": r.standard_normal((s, 1, 16)).astype(np.float32),
            "u": r.standard_normal((s, t, 1, u_dim)).astype(np.float32)}


def two_input_case(c: Case, spec: dict | None = None, contexts: dict | None = None, **model_kw) -> list[str]:
    return c.sweep(c.save(two_input_model(**model_kw), "two.onnx"), c.json("two.json", spec or two_input_spec()),
                   c.npz("two.npz", **(contexts or two_input_contexts())))


def cyclic_model() -> onnx.ModelProto:
    w1, = rng_weights(0, (16, 16))
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "W1"], ["b"], name="second"),
             helper.make_node("Identity", ["a"], ["x_next"], name="out")]
    g = helper.make_graph(nodes, "g", [vec("x", 16)], [vec("x_next", 16)], [init("W1", w1)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def renamed_last_op(op: str, domain: str = "") -> onnx.ModelProto:
    m = recurrent_mlp()
    m.graph.node[-1].op_type = op
    m.graph.node[-1].domain = domain
    if domain:
        m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


def empty_weight_model() -> onnx.ModelProto:
    """A recurrent model whose only float weight has zero elements."""
    nodes = [helper.make_node("MatMul", ["x", "E"], ["e"]),
             helper.make_node("Concat", ["x", "e"], ["x_next"], axis=1)]
    g = helper.make_graph(nodes, "g", [vec("x", 16)], [vec("x_next", 16)],
                          [init("E", np.zeros((16, 0), np.float32))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def dynamic_model() -> onnx.ModelProto:
    m = recurrent_mlp()
    for v in (m.graph.input[0], m.graph.output[0]):
        for d, name in zip(v.type.tensor_type.shape.dim, ("batch", "features")):
            d.dim_param = name
    return m


def failing_at_run_time() -> onnx.ModelProto:
    """Loads fine, but gathers column 20 of a 16-column state when it runs."""
    m = recurrent_mlp()
    m.graph.node[0].input[0] = "xg"
    m.graph.node.insert(0, helper.make_node("Gather", ["x", "cols"], ["xg"], axis=1))
    m.graph.initializer.append(init("cols", np.array([*range(15), 20], np.int64)))
    return m


def bomb_model() -> onnx.ModelProto:
    """W1's dims promise 2^40 elements; its data holds 512."""
    m = recurrent_mlp()
    t = next(t for t in m.graph.initializer if t.name == "W1")
    del t.dims[:]
    t.dims.extend([1 << 20, 1 << 20])
    return m


def _w(name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in recurrent_mlp().graph.initializer if t.name == name))


def _nan_at(w: np.ndarray, value: float) -> np.ndarray:
    w = w.copy()
    w.flat[3] = value
    return w


def _set(m: onnx.ModelProto, **fields) -> onnx.ModelProto:
    for k, v in fields.items():
        setattr(m, k, v)
    return m


def _set_output(m: onnx.ModelProto, name: str, rename: bool = False) -> onnx.ModelProto:
    """Point the graph output at `name`; with rename, the output is a real value under a new name."""
    out = m.graph.output[0]
    if rename:
        m.graph.node[-1].output[0] = "y_out"
        out.name = "y_out"
    else:
        out.name = name
    return m


def _renamed_weight(name: str) -> onnx.ModelProto:
    m = recurrent_mlp()
    next(t for t in m.graph.initializer if t.name == "W1").name = name
    for n in m.graph.node:
        n.input[:] = [name if i == "W1" else i for i in n.input]
    return m


def _reading(name: str) -> onnx.ModelProto:
    m = recurrent_mlp()
    m.graph.node[0].input[0] = name
    return m


def _two_writers() -> onnx.ModelProto:
    m = recurrent_mlp()
    m.graph.node.insert(1, helper.make_node("Identity", ["x"], [m.graph.node[0].output[0]]))
    return m


def _npz_declaring(c: Case, key: str, shape: tuple[int, ...]) -> str:
    """An .npz whose member's header declares `shape` (float32) and holds no data: nothing may read it
    before checking what it declares."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    path = c.d / "declaring.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{key}.npy", header.getvalue())
    return str(path)


def edited_json(c: Case, key: str, name: str, edit) -> str:
    doc = json.loads(c.base[key].read_text())
    edit(doc)
    return c.json(name, doc)


# -------------------------------------------------------------------------------------- the corpus

CASES: dict[str, object] = {}


def case(name: str, *needles: str, xfail: str | None = None):
    def deco(build):
        CASES[name] = (build, needles, xfail)
        return build
    return deco


# Model files.
case("missing model", "nope.onnx", "no such file")(lambda c: ["inspect", c.path("nope.onnx")])
case("model path is a folder", "folder")(lambda c: ["inspect", str(c.d)])
case("empty model file", "empty")(lambda c: ["inspect", c.write("e.onnx", b"")])
case("random bytes", "ONNX")(lambda c: ["inspect", c.write("r.onnx", np.random.default_rng(0).bytes(4096))])
case("truncated model", "ONNX")(
    lambda c: ["inspect", c.write("t.onnx", c.base["model"].read_bytes()[:1500])])
case("model cut short at the end", "ONNX")(
    lambda c: ["inspect", c.write("t.onnx", c.base["model"].read_bytes()[:-300])])
case("TensorProto instead of a model", "ONNX")(
    lambda c: ["inspect", c.write("t.onnx", _w1_tensor().SerializeToString())])
case("GraphProto instead of a model", "not an ONNX model")(
    lambda c: ["inspect", c.write("g.onnx", recurrent_mlp().graph.SerializeToString())])
case("JSON instead of a model", "ONNX")(lambda c: ["inspect", c.write("j.onnx", '{"graph": {}}')])
case("cyclic graph", "cycle", "first")(lambda c: ["inspect", c.save(cyclic_model())])
case("cyclic graph in sweep", "cycle")(lambda c: c.sweep(c.save(cyclic_model())))
case("unknown op", "NoSuchOp")(lambda c: c.sweep(c.save(renamed_last_op("NoSuchOp"))))
case("unknown domain", "com.vendor")(lambda c: c.sweep(c.save(renamed_last_op("Mystery", "com.vendor"))))
case("future IR version", "ONNX Runtime")(
    lambda c: c.sweep(c.save(_set(recurrent_mlp(), ir_version=99))))
case("output naming no value", "ghost")(
    lambda c: c.sweep(c.save(_set_output(recurrent_mlp(), "ghost"))))
case("tensor dims claim more data than it holds", "W1", "bytes")(lambda c: ["inspect", c.save(bomb_model())])
case("NaN weight", "non-finite", "W2")(
    lambda c: c.sweep(c.save(_with_init(recurrent_mlp(), "W2", _nan_at(_w("W2"), math.nan)))))
case("inf weight named by a plan", "W1", "NaN/inf")(
    lambda c: c.apply(c.save(_with_init(recurrent_mlp(), "W1", _nan_at(_w("W1"), math.inf))), None, "--force"))
case("NaN weight named by a plan", "W2", "NaN")(
    lambda c: c.apply(c.save(_with_init(recurrent_mlp(), "W2", _nan_at(_w("W2"), math.nan))), None, "--force"))
case("only weight is zero-size", "no quantizable weights")(
    lambda c: c.sweep(c.save(empty_weight_model()), None, None, "--min-size", "0"))
case("dynamic shapes without a rollout spec", "--rollout")(
    lambda c: c.apply(c.save(dynamic_model()), None, "--force"))

# External data.
case("external data missing", "missing")(lambda c: ["inspect", external_w1(c, "w1.bin")])
case("external data truncated", "truncated")(
    lambda c: (c.write("w1.bin", w1_bytes()[:100]), ["inspect", external_w1(c, "w1.bin", length=str(len(w1_bytes())))])[1])
case("external data shorter than the tensor", "W1", "bytes")(
    lambda c: (c.write("w1.bin", w1_bytes()[:100]), ["inspect", external_w1(c, "w1.bin")])[1])
case("external data ../ escape", "outside the model folder")(
    lambda c: ["inspect", external_w1(c, "../outside/secret.bin")])
case("external data ../ escape inside a local function", "outside the model folder")(
    lambda c: ["inspect", external_w1_in_function(c, "../outside/secret.bin")])
case("external data ../ escape in training_info", "outside the model folder")(
    lambda c: ["inspect", external_in_training_info(c, "../outside/secret.bin")])
case("apply output is the input's external data file", "refusing to overwrite", "data file w1.bin")(
    lambda c: (c.write("w1.bin", w1_bytes()),
               ["apply", external_w1(c, "w1.bin"), c.copy("plan"), "-o", c.path("w1.bin"), "--force"])[1])
case("apply output's data file is the input's", "refusing to overwrite", "data file q.onnx.data")(
    lambda c: (c.write("q.onnx.data", w1_bytes()),
               ["apply", external_w1(c, "q.onnx.data"), c.copy("plan"), "-o", c.path("q.onnx"), "--force",
                "--external-data"])[1])
case("inspect -o is the model's external data file", "refusing to overwrite", "data file w1.bin")(
    lambda c: (c.write("w1.bin", w1_bytes()), ["inspect", external_w1(c, "w1.bin"), "-o", c.path("w1.bin")])[1])
case("apply --report is the model's external data file", "refusing to overwrite", "data file w1.bin")(
    lambda c: (c.write("w1.bin", w1_bytes()),
               ["apply", external_w1(c, "w1.bin"), c.copy("plan"), "-o", c.path("q.onnx"), "--force",
                "--report", c.path("w1.bin")])[1])
case("allocate -o is the swept model's external data file", "refusing to overwrite", "data file w1.bin")(
    lambda c: (c.write("w1.bin", w1_bytes()), external_w1(c, "w1.bin"),
               c.json("s.json", {**json.loads(Path(c.copy("scores")).read_text()),
                                 "model": {**json.loads(Path(c.copy("scores")).read_text())["model"],
                                           "path": c.path("ext.onnx")}}),
               ["allocate", c.path("s.json"), "--compression", "2", "-o", c.path("w1.bin")])[3])
case("apply --no-factor with a plan sized after the lossless passes", "lossless passes")(
    lambda c: ["apply", c.copy("model"), c.copy("plan"), "-o", c.path("q.onnx"), "--no-factor"])
case("sparse initializer inside a subgraph", "sparse tensors inside a subgraph")(
    lambda c: ["inspect", c.save(sparse_in_subgraph_model())])
case("external data absolute path", "outside the model folder")(
    lambda c: ["inspect", external_w1(c, str(c.secret))])
case("external data symlink to a file outside", "outside the model folder")(
    lambda c: (os.symlink(c.secret, c.d / "w1.bin"), ["inspect", external_w1(c, "w1.bin")])[1])
case("external data through a symlinked folder", "outside the model folder")(
    lambda c: (os.symlink(c.outside, c.d / "sub"), ["inspect", external_w1(c, "sub/secret.bin")])[1])
case("external data location is a folder", "not a regular file")(
    lambda c: ((c.d / "sub").mkdir(), ["inspect", external_w1(c, "sub")])[1])
case("external data location with a NUL byte", "W1")(lambda c: ["inspect", external_w1(c, "w1\x00.bin")])
case("external data offset not a number", "offset")(
    lambda c: (c.write("w1.bin", w1_bytes()), ["inspect", external_w1(c, "w1.bin", offset="abc")])[1])
case("external data negative length", "length")(
    lambda c: (c.write("w1.bin", w1_bytes()), ["inspect", external_w1(c, "w1.bin", length="-8")])[1])

# Rollout specs.
case("spec file missing", "cannot read rollout spec")(lambda c: c.sweep(None, c.path("nope.json")))
case("spec not JSON", "not valid JSON")(lambda c: c.sweep(None, c.write("s.json", "{horizon: ")))
case("spec not YAML", "not valid JSON/YAML")(lambda c: c.sweep(None, c.write("s.yaml", "a: [1, 2\nb: {")))
case("spec is a list", "mapping")(lambda c: c.sweep(None, c.json("s.json", [1, 2])))
case("spec with unknown keys", "unknown keys")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "feedbak": {}})))
case("negative horizon in spec", "horizon must be >= 1")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "horizon": -4})))
case("horizon not a number", "integer")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "horizon": "ten"})))
case("spec naming a missing output", "output 'nope'")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "feedback": {"nope": "x"}})))
case("spec naming a missing input", "input 'nope'")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "fixed": {"nope": "x0"}})))
case("spec leaving an input unfed", "does not say how to feed", "u")(
    lambda c: two_input_case(c, spec=two_input_spec(per_step={})))
case("spec feedback of mismatched shape", "does not fit", "x_next")(
    lambda c: two_input_case(c, spec=two_input_spec(feedback={"x_next": "u"}, initial={"u": "u0"}, per_step={},
                                                    fixed={"x": "x0"}),
                             contexts={"x0": np.zeros((2, 1, 16), np.float32), "u0": np.zeros((2, 1, 8), np.float32)}))
case("spec feedback of mismatched dtype", "does not fit", "int64")(
    lambda c: two_input_case(c, spec=two_input_spec(feedback={"x_next": "u"}, initial={"u": "u0"}, per_step={},
                                                    fixed={"x": "x0"}),
                             contexts={"x0": np.zeros((2, 1, 16), np.float32), "u0": np.zeros((2, 1, 16), np.int64)},
                             u_dim=16, u_type=TensorProto.INT64))
case("spec constant that is not a number", "u")(
    lambda c: two_input_case(c, spec=two_input_spec(per_step={}, constants={"u": "abc"})))

# Contexts.
case("contexts missing", "no such file")(lambda c: c.sweep(None, None, c.path("nope.npz")))
case("contexts not an npz", "not a readable .npz")(lambda c: c.sweep(None, None, c.write("c.npz", b"PK\x03\x04junk")))
case("contexts holding pickled objects", "holds Python objects (pickled)")(
    lambda c: c.sweep(None, None, c.npz("c.npz", x0=np.array([{"a": 1}] * 3, dtype=object))))
case("contexts missing an array", "missing array 'x0'")(
    lambda c: c.sweep(None, None, c.npz("c.npz", y0=np.zeros((3, 1, 16), np.float32))))
case("contexts of the wrong shape", "x0", "shape")(
    lambda c: c.sweep(None, None, c.npz("c.npz", x0=np.zeros((3, 16), np.float32))))
case("contexts of the wrong dtype", "x0", "int64")(
    lambda c: c.sweep(None, None, c.npz("c.npz", x0=np.zeros((3, 1, 16), np.int64))))
case("zero contexts", "contexts")(
    lambda c: c.sweep(None, None, c.npz("c.npz", x0=np.zeros((0, 1, 16), np.float32))))
case("NaN contexts", "non-finite")(
    lambda c: c.sweep(None, None, c.npz("c.npz", x0=np.full((3, 1, 16), np.nan, np.float32))))
case("contexts disagreeing on the number of contexts", "disagree")(
    lambda c: two_input_case(c, contexts={**two_input_contexts(), "x0": np.zeros((2, 1, 16), np.float32)}))
case("per-step data shorter than the horizon", "per-step array 'u'")(
    lambda c: two_input_case(c, contexts=two_input_contexts(t=4)))

# Options.
case("negative --horizon", "--horizon")(lambda c: c.sweep(None, None, None, "--horizon", "-3"))
case("zero --horizon", "--horizon")(lambda c: c.sweep(None, None, None, "--horizon", "0"))
case("--horizon beyond the per-step data", "horizon")(
    lambda c: two_input_case(c) + ["--horizon", "50"])
case("unknown --blocks mode", "unknown block mode")(lambda c: ["inspect", c.copy("model"), "--blocks", "rows"])
case("--blocks fixed:0", "K >= 1")(lambda c: c.sweep(None, None, None, "--blocks", "fixed:0"))
case("unknown sweep tier", "unknown tier 'fp8'")(lambda c: c.sweep(None, None, None, "--tiers", "fp8"))
case("unknown allocate tier", "unknown tier 'int3'")(lambda c: c.allocate(None, "--tiers", "fp32,int3"))
case("bad tier option", "unknown option")(lambda c: c.allocate(None, "--tiers", "fp32,int4/rows"))
case("--probes 0", "--probes")(lambda c: c.sweep(None, None, None, "--probes", "0"))
case("--bits 1", "--bits")(lambda c: c.sweep(None, None, None, "--bits", "1"))
case("--fp32-share above 1", "--fp32-share")(lambda c: c.allocate(None, "--fp32-share", "1.5"))
case("negative --margin", "--margin")(lambda c: c.allocate(None, "--margin", "-1"))
case("negative compression", ">= 1")(
    lambda c: ["allocate", c.copy("scores"), "--compression", "-2", "-o", c.path("p.json")])
case("NaN compression", ">= 1")(
    lambda c: ["allocate", c.copy("scores"), "--compression", "nan", "-o", c.path("p.json")])
case("infeasible target", "not reachable", "achievable")(
    lambda c: ["allocate", c.copy("scores"), "--compression", "1000", "-o", c.path("p.json")])
case("tier without measured damage", "measured damage")(lambda c: c.allocate(None, "--tiers", "fp32,int2"))
case("--verify-model without a rollout", "--rollout")(lambda c: c.allocate(None, "--verify-model", c.copy("model")))
case("--verify-model of another model", "not the model")(
    lambda c: c.allocate(None, "--verify-model", c.save(recurrent_mlp(seed=7), "other.onnx"), "--rollout",
                         c.copy("spec"), "--contexts", c.copy("contexts")))
case("invalid --device choice", "--device")(lambda c: c.sweep(None, None, None, "--device", "tpu"))
case("missing required option", "--compression")(lambda c: ["allocate", c.copy("scores"), "-o", c.path("p.json")])
case("non-integer option", "--probes")(lambda c: c.sweep(None, None, None, "--probes", "many"))
case("unknown subcommand", "frobnicate")(lambda c: ["frobnicate", c.copy("model")])

# Outputs.
case("sweep output is a folder", "folder")(
    lambda c: ((c.d / "out").mkdir(), c.sweep(out="out"))[1])
case("allocate output is a folder", "folder")(
    lambda c: ((c.d / "p").mkdir(), ["allocate", c.copy("scores"), "--compression", "2", "-o", str(c.d / "p")])[1])
case("apply output is a folder", "folder")(
    lambda c: ((c.d / "q").mkdir(), ["apply", c.copy("model"), c.copy("plan"), "-o", str(c.d / "q")])[1])
case("apply report is a folder", "folder")(lambda c: ((c.d / "r").mkdir(), c.apply(None, None, "--report", str(c.d / "r")))[1])
case("inspect output under a file", "not a folder")(
    lambda c: ["inspect", c.copy("model"), "-o", str(Path(c.copy("spec")) / "i.json")])
case("eval output is a folder", "folder")(
    lambda c: ((c.d / "e").mkdir(), ["eval", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"),
                                      "--contexts", c.copy("contexts"), "-o", str(c.d / "e")])[1])
case("apply over its own input", "overwrite the input")(
    lambda c: ["apply", c.copy("model"), c.copy("plan"), "-o", c.copy("model"), "--force"])
case("existing checkpoint without --resume", "--resume")(
    lambda c: (c.write("out.json.ckpt.jsonl", '{"fingerprint": "x"}\n'), c.sweep())[1])
case("checkpoint of another sweep", "another run")(
    lambda c: (c.write("out.json.ckpt.jsonl", '{"fingerprint": "x"}\n'), c.sweep(None, None, None, "--resume"))[1])

# Scores and plans.
case("scores not JSON", "not a readable scores JSON")(lambda c: c.allocate(c.write("s.json", "{not json")))
case("scores truncated mid-write", "not a readable scores JSON")(
    lambda c: c.allocate(c.write("s.json", c.base["scores"].read_text()[:200])))
case("plan given as scores", "not a tqs-onnx scores file")(
    lambda c: c.allocate(c.write("plan_as_scores.json", c.base["plan"].read_text())))
case("scores given as plan", "not a tqs-onnx plan")(lambda c: c.apply(None, c.copy("scores")))
case("scores of another schema version", "schema")(
    lambda c: c.allocate(edited_json(c, "scores", "s.json", lambda d: d.update(schema_version=99))))
case("scores without blocks", "blocks")(
    lambda c: c.allocate(edited_json(c, "scores", "s.json", lambda d: d.pop("blocks"))))
case("scores with a block naming no weight entry", "W9")(
    lambda c: c.allocate(edited_json(c, "scores", "s.json", lambda d: d["blocks"][0]["weights"].append("W9"))))
# Hostile inputs (nineteenth session's trial): memory, hangs, log injection.
case("external data with no length runs to a file far larger than the tensor", "W1", "need")(
    lambda c: (c.write("w1.bin", w1_bytes() + bytes(1 << 20)), ["inspect", external_w1(c, "w1.bin")])[1])
case("a name holding terminal escapes and a line break", "control characters")(
    lambda c: ["inspect", c.save(_renamed_weight("W1\x1b[2J\n::error::injected"))])
case("two nodes writing one value", "two nodes write the value")(lambda c: ["inspect", c.save(_two_writers())])
case("a node reading a value nothing defines", "reads 'nowhere'")(
    lambda c: ["inspect", c.save(_reading("nowhere"))])
case("spec path is a folder", "not a regular file")(lambda c: c.sweep(None, str(c.d)))
case("contexts declaring arrays larger than memory", "more than this machine's memory allows")(
    lambda c: c.sweep(None, None, _npz_declaring(c, "x0", (1 << 40, 1, 16))))
case("scores with a negative block size", "size must be a positive")(
    lambda c: c.allocate(edited_json(c, "scores", "s.json", lambda d: d["blocks"][0].update(size=-5))))
case("plan of a newer schema", "plan schema 999")(
    lambda c: c.apply(None, edited_json(c, "plan", "p.json", lambda d: d.update(schema_version=999))))
case("plan not JSON", "not a readable plan JSON")(lambda c: c.apply(None, c.write("p.json", "[1,")))
case("plan without a model entry", "model")(lambda c: c.apply(None, edited_json(c, "plan", "p.json", lambda d: d.pop("model"))))
case("plan with malformed weight_info", "weight_info")(
    lambda c: c.apply(None, edited_json(c, "plan", "p.json", lambda d: d.update(weight_info=[1, 2]))))
case("plan with an axis the weight does not have", "W1", "invalid axes")(
    lambda c: c.apply(None, edited_json(c, "plan", "p.json", lambda d: d["weight_info"]["W1"].update(channel_axis=5))))
case("plan naming an unknown tier", "unknown tier 'int3'")(
    lambda c: c.apply(None, edited_json(c, "plan", "p.json", lambda d: d["weights"].update(W1="int3"))))
case("plan for another model", "another model")(lambda c: c.apply(c.save(recurrent_mlp(n=8, h=8, seed=5))))
case("plan for another model, forced", "another model", "W1")(
    lambda c: c.apply(c.save(recurrent_mlp(n=8, h=8, seed=5)), None, "--force"))
case("eval candidate not a model", "ONNX")(
    lambda c: ["eval", c.copy("model"), c.write("r.onnx", b"\x08\x07garbage"), "--rollout", c.copy("spec"),
               "--contexts", c.copy("contexts")])
case("eval candidate failing at run time", "cand.onnx", "Gather")(
    lambda c: ["eval", c.copy("model"), c.save(failing_at_run_time(), "cand.onnx"), "--rollout", c.copy("spec"),
               "--contexts", c.copy("contexts")])
case("model failing at run time in sweep", "Gather")(
    lambda c: c.sweep(c.save(failing_at_run_time())))
case("eval candidate with other outputs", "output 'x_next'")(
    lambda c: ["eval", c.copy("model"), c.save(_set_output(recurrent_mlp(), "y0", rename=True), "cand.onnx"),
               "--rollout", c.copy("spec"), "--contexts", c.copy("contexts")])


# Outputs that are the command's own inputs (the input would be replaced by the output).
case("sweep output over its model", "overwrite the input")(
    lambda c: c.sweep(None, None, None, out=Path(c.copy("model")).name))
case("sweep output over its contexts", "overwrite the input")(
    lambda c: c.sweep(None, None, None, out=Path(c.copy("contexts")).name))
case("sweep checkpoint over its spec", "overwrite the input")(
    lambda c: c.sweep(None, None, None, "--checkpoint", c.copy("spec")))
case("eval output over its candidate", "overwrite the input")(
    lambda c: ["eval", c.copy("model"), c.save(recurrent_mlp(), "cand.onnx"), "--rollout", c.copy("spec"),
               "--contexts", c.copy("contexts"), "-o", c.path("cand.onnx")])
case("apply output over its spec", "overwrite the input")(
    lambda c: c.apply(None, None, "--rollout", c.copy("spec"), "--contexts", c.copy("contexts"), "-o", c.copy("spec")))
case("gate junit over its reference", "overwrite the input")(
    lambda c: ["gate", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--contexts",
               c.copy("contexts"), "--max-mae", "1", "--junit", c.copy("model")])

# Options checked before any work (a late failure would leave a checkpoint that blocks the rerun).
case("negative --seed", "--seed")(lambda c: c.sweep(None, None, None, "--seed", "-1"))
case("NaN --early-stop", "--early-stop")(lambda c: c.sweep(None, None, None, "--early-stop", "nan"))
case("negative --early-stop", "--early-stop")(lambda c: c.sweep(None, None, None, "--early-stop", "-1"))
case("--early-window 0", "--early-window")(lambda c: c.sweep(None, None, None, "--early-window", "0"))
case("negative --min-size", "--min-size")(lambda c: c.sweep(None, None, None, "--min-size", "-1"))
case("NaN --gamma-min", "--gamma-min")(lambda c: c.sweep(None, None, None, "--gamma-min", "nan"))
case("gate --max-mae NaN", "--max-mae")(
    lambda c: ["gate", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--contexts",
               c.copy("contexts"), "--max-mae", "nan"])
case("gate --max-size 0", "--max-size")(
    lambda c: ["gate", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--contexts",
               c.copy("contexts"), "--max-mae", "1", "--max-size", "0"])
case("gate --min-compression 0", "--min-compression")(
    lambda c: ["gate", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--contexts",
               c.copy("contexts"), "--max-mae", "1", "--min-compression", "0"])
case("apply with --rollout but no --contexts", "--contexts")(
    lambda c: c.apply(None, None, "--rollout", c.copy("spec")))
case("allocate --rollout without --verify-model", "--verify-model")(
    lambda c: c.allocate(None, "--rollout", c.copy("spec"), "--contexts", c.copy("contexts")))

# Options that would do nothing in the combination given (they were accepted without a word).
case("--probes with --probe quant", "--probes", "--probe quant draws none")(
    lambda c: c.sweep(None, None, None, "--probe", "quant"))
case("--early-window without --early-stop", "--early-window", "--early-stop TOL")(
    lambda c: c.sweep(None, None, None, "--early-window", "2"))
case("--fp32-share with the measured objective", "--fp32-share", "--objective paper")(
    lambda c: c.allocate(None, "--fp32-share", "0.2"))
case("--gamma-min with the measured objective, no joint check", "--gamma-min", "--objective paper")(
    lambda c: c.allocate(None, "--gamma-min", "-3"))
case("--margin without --verify-model", "--margin", "--verify-model")(lambda c: c.allocate(None, "--margin", "2"))
case("--max-rollouts without --verify-model", "--max-rollouts", "--verify-model")(
    lambda c: c.allocate(None, "--max-rollouts", "4"))
case("paper --probe of a probe not swept", "--probe gauss", "no gauss gamma")(
    lambda c: c.allocate(c.json("q.json", _without_probe(c, "gauss")), "--objective", "paper", "--probe", "gauss"))
case("demo --out an existing file", "existing file")(lambda c: ["demo", "--out", c.copy("model"), "--quiet"])
case("demo --compression 0", "--compression", ">= 1")(lambda c: ["demo", "--out", c.path("d"), "--compression", "0"])

# Specs and contexts the rollout would misread.
case("fractional horizon in spec", "horizon must be an integer")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "horizon": 2.7})))
case("boolean horizon in spec", "horizon must be an integer")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "horizon": True})))
case("initial state for an input not fed back", "initial state", "ghost")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "initial": {"x": "x0", "ghost": "x0"}})))
case("spec reading no array from the contexts", "reads no array")(
    lambda c: c.sweep(None, c.json("s.json", {"horizon": 3, "trajectory": ["x_next"], "constants": {"x": 0.5}})))
case("channel_axis outside the output", "channel_axis")(
    lambda c: ["eval", c.copy("model"), c.copy("model"), "--contexts", c.copy("contexts"),
               "--rollout", c.json("s.json", {**recurrent_spec(), "channel_axis": {"x_next": 7}})])
case("contexts member that is not .npy", "x0", "not a numpy array")(
    lambda c: c.sweep(None, None, _zip_member(c, "c.npz", "x0.npy", b"garbage")))
case("truth broadcastable to the output", "truth", "rolled out")(
    lambda c: ["eval", c.copy("model"), c.copy("model"), "--rollout", c.json("s.json", _truth_spec()),
               "--contexts", c.npz("c.npz", **recurrent_contexts(), truth=np.zeros((3, 8, 1, 1), np.float32))])
case("truth shorter than the horizon", "truth", "at least 8 steps")(
    lambda c: ["eval", c.copy("model"), c.copy("model"), "--rollout", c.json("s.json", _truth_spec()),
               "--contexts", c.npz("c.npz", **recurrent_contexts(), truth=np.zeros((3, 5, 1, 16), np.float32))])
case("non-finite reference rollout in gate", "reference model", "non-finite")(
    lambda c: ["gate", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--max-mae", "1",
               "--contexts", c.npz("c.npz", x0=np.full((3, 1, 16), np.nan, np.float32))])
case("gate error names the reference file", "m.onnx", "x0")(
    lambda c: ["gate", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--max-mae", "1",
               "--contexts", c.npz("c.npz", x0=np.zeros((3, 1, 9), np.float32))])


@pytest.mark.parametrize("name", ["TQS_GPU_STREAM", "TQS_CUDA_GRAPH", "TQS_TF32", "TQS_CUDNN_ALGO_SEARCH"])
def test_cuda_only_settings_are_checked_on_the_cpu_too(name, base, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(name, "bogus")
    rc, err = run_cli(["inspect", str(base["model"])], capfd)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and name in lines[0], err


case("checkpoint and scores the same file", "two files")(
    lambda c: c.sweep(None, None, None, "--checkpoint", c.path("out.json")))
case("empty --ray-address", "--ray-address")(lambda c: c.sweep(None, None, None, "--ray-address", ""))
case("spec horizon a malformed number", "horizon must be an integer")(
    lambda c: c.sweep(None, c.json("s.json", {**recurrent_spec(), "horizon": "--5"})))


def test_contexts_may_carry_members_the_spec_does_not_read(base, tmp_path, capfd):
    import zipfile

    ctx = tmp_path / "c.npz"
    shutil.copy(base["contexts"], ctx)
    with zipfile.ZipFile(ctx, "a") as z:
        z.writestr("provenance.json", "{}")
    rc, err = run_cli(["eval", str(base["model"]), str(base["model"]), "--rollout", str(base["spec"]),
                       "--contexts", str(ctx), "--quiet"], capfd)
    assert rc == 0, err


def test_truth_only_checked_where_it_is_used(base, tmp_path, capfd):
    # sweep contexts whose truth is shorter than the spec's horizon: the sweep never reads truth
    ctx = tmp_path / "c.npz"
    np.savez(ctx, **recurrent_contexts(), truth=np.zeros((3, 2, 1, 16), np.float32))
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(_truth_spec()))
    rc, err = run_cli(["sweep", str(base["model"]), "--rollout", str(spec), "--contexts", str(ctx), "-o",
                       str(tmp_path / "o.json"), "--quiet", "--min-size", "16", "--probes", "1", "--tiers", "int8"], capfd)
    assert rc == 0, err


def test_truth_of_an_output_whose_rank_onnx_runtime_does_not_know(tmp_path, capfd):
    """y = Squeeze(x_next, axes) with axes fed as an input: ORT reports y's shape as []."""
    w, = rng_weights(0, (3, 3))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["x_next"]),
             helper.make_node("Squeeze", ["x_next", "axes"], ["y"])]
    g = helper.make_graph(nodes, "g", [vec("x", 3), helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                          [vec("x_next", 3), helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [init("W", w)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    spec = {"horizon": 4, "feedback": {"x_next": "x"}, "initial": {"x": "x0"}, "trajectory": ["y"], "constants": {"axes": [0]},
            "truth": {"y": "truth"}}
    ctx = {"x0": np.ones((2, 1, 3), np.float32), "truth": np.zeros((2, 4, 3), np.float32)}
    paths = save_case(tmp_path, m, spec, ctx)
    rc, err = run_cli(["eval", str(paths["model"]), str(paths["model"]), "--rollout", str(paths["spec"]),
                       "--contexts", str(paths["contexts"]), "-o", str(tmp_path / "e.json")], capfd)
    assert rc == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["outputs"]["y"]["mae_vs_truth"] > 0


def test_scalar_trajectory_output_is_evaluated(tmp_path, capfd):
    w, = rng_weights(0, (4, 4))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["x_next"]),
             helper.make_node("ReduceSum", ["x_next"], ["total"], keepdims=0)]
    g = helper.make_graph(nodes, "g", [vec("x", 4)], [vec("x_next", 4),
                          helper.make_tensor_value_info("total", TensorProto.FLOAT, [])], [init("W", w)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    paths = save_case(tmp_path, m, {"horizon": 3, "feedback": {"x_next": "x"}, "initial": {"x": "x0"},
                                          "trajectory": ["total"]},
                      {"x0": np.ones((2, 1, 4), np.float32)})
    rc, err = run_cli(["eval", str(paths["model"]), str(paths["model"]), "--rollout", str(paths["spec"]),
                       "--contexts", str(paths["contexts"]), "--quiet"], capfd)
    assert rc == 0, err


def test_unreachable_target_with_one_tier_names_the_one_size(base, tmp_path, capfd):
    rc, err = run_cli(["allocate", str(base["scores"]), "--compression", "50", "--tiers", "int8", "-o",
                       str(tmp_path / "p.json")], capfd)
    assert rc == 2 and "achievable only" in err, err


def test_ort_messages_keep_their_cause_not_their_cpp_signature():
    from tqs_onnx.util import first_line

    msg = ("[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
           "model.cc:181 onnxruntime::Model::Model(onnx::ModelProto&&, const PathString&, const "
           "IOnnxRuntimeOpSchemaRegistryList*, const onnxruntime::logging::Logger&, const onnxruntime::ModelOptions&) "
           "Unsupported model IR version: 14, max supported IR version: 13")
    line = first_line(RuntimeError(msg))
    assert line.endswith("Unsupported model IR version: 14, max supported IR version: 13") and "::" not in line


def test_model_written_with_onnx_default_ir_14_is_swept(tmp_path, capfd):
    m = recurrent_mlp()
    m.ir_version = 14  # what onnx 1.23 writes by default; onnxruntime 1.31 loads at most 13
    paths = save_case(tmp_path, m, recurrent_spec(), recurrent_contexts())
    rc, err = run_cli(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts",
                       str(paths["contexts"]), "-o", str(tmp_path / "s.json"), "--quiet", "--min-size", "16",
                       "--probes", "1", "--tiers", "int8"], capfd)
    assert rc == 0, err


def test_external_data_file_gets_the_models_mode(tmp_path):
    from tqs_onnx.rewrite import save_model

    out = tmp_path / "q.onnx"
    files = save_model(recurrent_mlp(n=64, h=64), out, True)  # 16 KB weights: moved to the data file
    assert Path(f"{out}.data") in files
    assert (os.stat(f"{out}.data").st_mode & 0o777) == (os.stat(out).st_mode & 0o777) == 0o666 & ~util_umask()


def test_apply_report_names_its_kind(base, tmp_path, capfd):
    rc, err = run_cli(["apply", str(base["model"]), str(base["plan"]), "-o", str(tmp_path / "q.onnx"), "--quiet",
                       "--report", str(tmp_path / "r.json")], capfd)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and doc["kind"] == "tqs-apply-report" and doc["schema_version"] == 1, err


def util_umask() -> int:
    from tqs_onnx.util import umask

    return umask()


def test_device_auto_keeps_stdout_clean_for_json(base, tmp_path):
    # onnxruntime-gpu on a machine without a GPU prints CUDA load failures to stdout while probing
    proc = subprocess.run([sys.executable, "-m", "tqs_onnx.cli", "gate", str(base["model"]), str(base["model"]),
                           "--rollout", str(base["spec"]), "--contexts", str(base["contexts"]), "--max-mae", "1",
                           "--device", "auto", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"]


def _truth_spec() -> dict:
    return {**recurrent_spec(), "truth": {"x_next": "truth"}}


def _zip_member(c: Case, name: str, member: str, data: bytes) -> str:
    import zipfile

    with zipfile.ZipFile(c.d / name, "w") as z:
        z.writestr(member, data)
    return str(c.d / name)


def _params():
    for name, (build, needles, xfail) in CASES.items():
        marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
        yield pytest.param(build, needles, id=name, marks=marks)


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("build,needles", _params())
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(build, needles, base, tmp_path, capfd):
    c = Case(tmp_path, base)
    argv = build(c)
    before = listing(tmp_path)
    watch = OpenWatch(c.outside)
    try:
        rc, err = run_cli(argv, capfd)
        touched_outside = watch.events()
    finally:
        watch.close()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, f"rc={rc}\n{err}"
    for n in needles:
        assert n in lines[0], lines[0]
    assert listing(tmp_path) == before
    assert not touched_outside, "opened or read a file outside the folders it was given"


@pytest.mark.parametrize("argv_tail,needle", [
    (["inspect", "{d}/r.onnx"], "ONNX"),
    (["sweep", "{d}/r.onnx", "--rollout", "x", "--contexts", "y", "-o", "{d}/o.json", "--blocks"], "--blocks"),
], ids=["random bytes", "option missing its value"])
def test_bad_input_in_a_fresh_process_prints_one_line(tmp_path, argv_tail, needle):
    (tmp_path / "r.onnx").write_bytes(np.random.default_rng(1).bytes(512))
    before = listing(tmp_path)
    argv = [a.format(d=tmp_path) for a in argv_tail]
    proc = subprocess.run([sys.executable, "-m", "tqs_onnx.cli", *argv], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert listing(tmp_path) == before


def test_weight_holding_inf_is_reported_and_left_out_of_the_sweep(tmp_path, capsys):
    # Masks legitimately hold -inf, so such a weight is not an error, but no integer grid can hold it.
    m = _with_init(recurrent_mlp(), "W1", _nan_at(_w("W1"), -math.inf))
    paths = save_case(tmp_path, m, recurrent_spec(), recurrent_contexts())
    assert main(["inspect", str(paths["model"]), "--json", "--min-size", "16"]) == 0
    weights = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    assert not weights["W1"]["quantizable"] and "NaN/inf" in weights["W1"]["reason"]
    out = tmp_path / "s.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(out), "--quiet", "--min-size", "16", "--probes", "1", "--tiers", "int8"]) == 0
    assert [b["weights"] for b in json.loads(out.read_text())["blocks"]] == [["W2"]]


# ------------------------------------------------------------------------------ kill -9 and resume

def deep_chain(layers: int = 12, n: int = 32) -> onnx.ModelProto:
    """x_next = 0.9 x + 0.1 tanh(... tanh(x W0) ... W{L-1}): many blocks, each rollout cheap but not free."""
    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(rng_weights(3, *[(n, n)] * layers, scale=1.0)):
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        inits.append(init(f"W{i}", w))
        cur = f"t{i}"
    nodes += [helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Mul", [cur, "b"], ["tb"]),
              helper.make_node("Add", ["xa", "tb"], ["x_next"])]
    inits += [init("a", np.float32(0.9)), init("b", np.float32(0.1))]
    g = helper.make_graph(nodes, "deep", [vec("x", n)], [vec("x_next", n)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


TIMING = ("seconds", "forward_passes")


def without_timing(doc):
    if isinstance(doc, dict):
        return {k: without_timing(v) for k, v in doc.items() if k not in TIMING}
    if isinstance(doc, list):
        return [without_timing(v) for v in doc]
    return doc


def test_sweep_killed_with_sigkill_resumes_to_the_same_scores(tmp_path):
    # T=300: each block takes long enough (~0.2 s here) that the kill lands mid-sweep; at T=30 the
    # replayed blocks could all finish inside the random wait below.
    paths = save_case(tmp_path, deep_chain(), recurrent_spec(horizon=300), recurrent_contexts(n=32, s=4))
    argv = ["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
            "--blocks", "tensor", "--probes", "4", "--tiers", "int8,int4", "--quiet"]
    out = tmp_path / "killed.json"
    ckpt = Path(f"{out}.ckpt.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "tqs_onnx.cli", *argv, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (ckpt.exists() and ckpt.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no block checkpointed within 60 s"
            time.sleep(0.005)
        time.sleep(random.uniform(0, 0.3))  # anywhere in the next block, even mid-append
        assert proc.poll() is None, "the sweep finished before it could be killed; make it slower"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    lines = ckpt.read_bytes().split(b"\n")
    assert 2 <= len(lines) - 1 < 1 + 12, "killed too late to leave blocks to resume"
    assert not out.exists()

    assert main([*argv, "-o", str(out), "--resume"]) == 0
    assert not ckpt.exists()
    assert main([*argv, "-o", str(tmp_path / "whole.json")]) == 0
    resumed, whole = json.loads(out.read_text()), json.loads((tmp_path / "whole.json").read_text())
    assert len(whole["blocks"]) == 12
    assert without_timing(resumed) == without_timing(whole)
    assert out.read_bytes() == (tmp_path / "whole.json").read_bytes()  # byte-identical, pass counts included


def test_interrupted_sweep_says_how_to_resume(base, tmp_path, capfd, monkeypatch):
    import tqs_onnx.sweep as sweep_module

    real = sweep_module.score_block
    calls = []

    def interrupt_second_block(*args, **kw):  # Ctrl-C while the second block is scored
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(sweep_module, "score_block", interrupt_second_block)
    out = tmp_path / "s.json"
    argv = ["sweep", str(base["model"]), "--rollout", str(base["spec"]), "--contexts", str(base["contexts"]),
            "-o", str(out), "--quiet", "--min-size", "16", "--probes", "1", "--tiers", "int8"]
    rc, err = run_cli(argv, capfd)
    assert rc == 130 and "--resume" in err and f"{out}.ckpt.jsonl" in err and not out.exists()
    monkeypatch.setattr(sweep_module, "score_block", real)
    assert run_cli([*argv, "--resume"], capfd)[0] == 0 and out.exists()


def test_progress_in_logs_is_a_line_now_and_then(capfd, monkeypatch):
    import tqs_onnx.util as util

    monkeypatch.setattr(util, "LOG_EVERY_S", 0.0)  # stderr is captured, so not a terminal: plain lines
    assert list(util.progress(range(3), "sweep", unit="block")) == [0, 1, 2]
    assert capfd.readouterr().err.splitlines()[-1].startswith("sweep: 3/3 blocks done")
    assert list(util.progress(range(3), "sweep", quiet=True)) == [0, 1, 2]
    assert capfd.readouterr().err == ""


def test_eval_notes_a_truth_array_the_contexts_lack(base, tmp_path, capfd):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({**recurrent_spec(), "truth": {"x_next": "nokey"}}))
    rc, _ = run_cli(["eval", str(base["model"]), str(base["model"]), "--rollout", str(spec),
                     "--contexts", str(base["contexts"]), "-o", str(tmp_path / "e.json")], capfd)
    doc = json.loads((tmp_path / "e.json").read_text())
    assert rc == 0 and any("'nokey'" in n for n in doc["notes"])
    assert "mae_vs_truth" not in doc["outputs"]["x_next"]


# --------------------------------------------------------------------------------- atomic outputs

def _partial_save(written: list):
    import errno

    def save_model(model, path, *args, **kwargs):
        data = model.SerializeToString()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return save_model


@pytest.mark.parametrize("external", [False, True])
def test_apply_interrupted_mid_write_leaves_no_partial_model(base, tmp_path, monkeypatch, capfd, external):
    from tqs_onnx.encoding import ModelEncoding

    written = []
    monkeypatch.setattr(onnx, "save_model", _partial_save(written))  # external data
    monkeypatch.setattr(ModelEncoding, "write", lambda self, path: _partial_save(written)(self.model, path))  # inline
    before = listing(tmp_path)
    argv = ["apply", str(base["model"]), str(base["plan"]), "-o", str(tmp_path / "q.onnx"), "--quiet"]
    rc, err = run_cli(argv + (["--external-data"] if external else []), capfd)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "No space left" in err, err
    assert written, "the write was not reached"
    assert listing(tmp_path) == before  # no output, no temporary file or folder


def test_apply_failing_its_checks_keeps_the_previous_output(base, tmp_path, monkeypatch, capfd):
    import tqs_onnx.evaluate

    out = tmp_path / "q.onnx"
    assert main(["apply", str(base["model"]), str(base["plan"]), "-o", str(out), "--quiet"]) == 0
    previous = out.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqs_onnx.evaluate, "verify_written", interrupted)
    before = listing(tmp_path)
    rc, _ = run_cli(["apply", str(base["model"]), str(base["plan"]), "-o", str(out), "--quiet"], capfd)
    assert rc == 130
    assert listing(tmp_path) == before and out.read_bytes() == previous


def test_json_outputs_are_written_whole_or_not_at_all(base, tmp_path, monkeypatch):
    import tqs_onnx.util

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqs_onnx.util.os, "fsync", crash)
    out = tmp_path / "p.json"
    out.write_text("previous")
    assert main(["allocate", str(base["scores"]), "--compression", "2", "-o", str(out), "--quiet"]) == 130
    assert out.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["p.json"]


# ---------------------------------------------------------------------------------- determinism

def test_same_inputs_and_seed_give_identical_files_apart_from_timing(base, tmp_path):
    common = ["--rollout", str(base["spec"]), "--contexts", str(base["contexts"])]
    files = {}
    d = tmp_path / "run"
    for run in ("a", "b"):
        d.mkdir()
        assert main(["sweep", str(base["model"]), *common, "-o", str(d / "s.json"), "--probes", "3", "--seed", "5",
                     "--min-size", "16", "--tiers", "int8,int4,int4/channel", "--quiet"]) == 0
        assert main(["allocate", str(d / "s.json"), "--compression", "3", "-o", str(d / "p.json"), "--quiet",
                     "--verify-model", str(base["model"]), *common]) == 0
        assert main(["apply", str(base["model"]), str(d / "p.json"), "-o", str(d / "q.onnx"), "--quiet"]) == 0
        assert main(["eval", str(base["model"]), str(d / "q.onnx"), *common, "-o", str(d / "e.json"),
                     "--quiet"]) == 0
        files[run] = {p.name: p.read_bytes() for p in d.iterdir()}
        d.rename(tmp_path / run)  # the second run writes to the very same paths
    a, b = files["a"], files["b"]
    assert a["p.json"] == b["p.json"] and a["q.onnx"] == b["q.onnx"]
    assert a["s.json"] == b["s.json"]  # scores carry no wall-clock fields
    for name in ("e.json",):
        differing = [(x, y) for x, y in zip(a[name].splitlines(), b[name].splitlines()) if x != y]
        assert all(b'"seconds"' in x and b'"seconds"' in y for x, y in differing), differing[:3]
        assert without_timing(json.loads(a[name])) == without_timing(json.loads(b[name]))


# ------------------------------------------------------------------------------ non-finite probes

def exploding_model() -> onnx.ModelProto:
    """recurrent_mlp plus exp(1e30 * max(We - We_ref)) - 1, with We_ref an int8 copy of We.

    Nominally We - We_ref is exactly 0 and the branch adds nothing; any change to We (quantization,
    Gaussian noise) makes the rollout infinite at once.
    """
    m = recurrent_mlp()
    ints = np.random.default_rng(4).integers(-100, 101, (16, 16)).astype(np.int8)
    ints[0, 0] = 100  # max |We| = 100: off the 8-bit grid (scale 100/127), so RTN changes it
    nodes = [helper.make_node("Cast", ["We_ref"], ["ref"], to=TensorProto.FLOAT, name="/blow/Cast"),
             helper.make_node("Sub", ["We", "ref"], ["dw"], name="/blow/Sub"),
             helper.make_node("ReduceMax", ["dw"], ["mx"], keepdims=0, name="/blow/ReduceMax"),
             helper.make_node("Mul", ["mx", "big"], ["mb"], name="/blow/Mul"),
             helper.make_node("Exp", ["mb"], ["e"], name="/blow/Exp"),
             helper.make_node("Sub", ["e", "one"], ["e1"], name="/blow/Sub1")]
    last = m.graph.node[-1]  # Identity(y0) -> x_next
    last.op_type, last.input[0] = "Add", "y0"
    last.input.append("e1")
    nodes_all = nodes + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes_all)
    m.graph.initializer.extend([init("We", ints.astype(np.float32)), init("We_ref", ints),
                                init("big", np.float32(1e30)), init("one", np.float32(1.0))])
    onnx.checker.check_model(m)
    return m


def test_probe_that_blows_up_is_recorded_and_the_sweep_goes_on(tmp_path):
    paths = save_case(tmp_path, exploding_model(), recurrent_spec(), recurrent_contexts())
    out = tmp_path / "s.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(out), "--quiet", "--min-size", "16", "--blocks", "tensor", "--probes", "2",
                 "--tiers", "bf16,int8,int4"]) == 0
    blocks = {b["weights"][0]: b for b in json.loads(out.read_text())["blocks"]}
    assert set(blocks) == {"W1", "W2", "We"}
    blown = blocks["We"]
    assert blown["nonfinite"] and not blown["dead"]
    assert blown["quant"]["gamma_task"] == math.inf and blown["gauss"]["gamma_task"] == math.inf
    assert blown["damage"]["int8"] == math.inf and blown["damage"]["bf16"] == 0.0  # integers <= 100 are exact in bf16
    for name in ("W1", "W2"):
        b = blocks[name]
        assert not b["nonfinite"] and math.isfinite(b["quant"]["gamma_task"]) and math.isfinite(b["damage"]["int4"])
    assert main(["allocate", str(out), "--compression", "1.5", "-o", str(tmp_path / "p.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["weights"]["We"] in ("fp32", "bf16")


# ------------------------------------------------------------------------ outputs and leftovers

def test_an_output_that_is_a_fifo_or_too_long_a_name_is_refused_before_any_work(base, tmp_path, capfd):
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    rc, err = run_cli(["apply", str(base["model"]), str(base["plan"]), "-o", str(fifo)], capfd)
    assert rc == 2 and "not a regular file" in err and len(err.strip().splitlines()) == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO
    long = tmp_path / ("s" * 250 + ".json")
    rc, err = run_cli(["allocate", str(base["scores"]), "--compression", "2", "-o", str(long)], capfd)
    assert rc == 2 and "file name too long" in err and not long.exists()


def test_leftovers_of_a_killed_run_are_removed_and_a_live_runs_kept(base, tmp_path, capfd):
    """Temporaries name their host and process: the next write beside them removes this host's whose
    process is gone, and keeps a live run's and another host's (whose processes it cannot see)."""
    from tqs_onnx.util import host_tag

    out = tmp_path / "m.onnx"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = host_tag()
    stale_dir = tmp_path / f".m.onnx.{tag}-{dead.pid}.abcd1234"
    stale_dir.mkdir()
    (stale_dir / "m.onnx").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".m.onnx.{tag}-{dead.pid}.wxyz_987.tmp"
    stale_file.write_bytes(b"y")
    older = tmp_path / f".m.onnx.{dead.pid}.wxyz_988.tmp"  # written before the host tag
    older.write_bytes(b"y")
    live = tmp_path / f".m.onnx.{tag}-{os.getppid()}.abcd1234"  # a running process's work
    live.mkdir()
    other = "0" * 8 if tag != "0" * 8 else "1" * 8
    elsewhere = tmp_path / f".m.onnx.{other}-{dead.pid}.abcd1234"  # another host's: its pid means nothing here
    elsewhere.mkdir()
    rc, _ = run_cli(["apply", str(base["model"]), str(base["plan"]), "-o", str(out), "--quiet"], capfd)
    assert rc == 0 and out.is_file()
    assert not stale_dir.exists() and not stale_file.exists() and not older.exists()
    assert live.is_dir() and elsewhere.is_dir()


def test_apply_refuses_to_write_over_its_plans_codes_file(tmp_path, capfd):
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    scores, plan = tmp_path / "s.json", tmp_path / "p.json"
    rollout = ["--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"])]
    assert main(["sweep", str(paths["model"]), *rollout, "-o", str(scores), "--probes", "1", "--min-size", "16",
                 "--quiet", "--tiers", "int4/channel,int4/channel/gptq"]) == 0
    assert main(["allocate", str(scores), "--compression", "1", "--tiers", "int4/channel/gptq", "-o", str(plan),
                 "--verify-model", str(paths["model"]), *rollout, "--quiet"]) == 0
    codes = tmp_path / json.loads(plan.read_text())["rounding"]["file"]
    before = codes.read_bytes()
    rc, err = run_cli(["apply", str(paths["model"]), str(plan), "-o", str(codes)], capfd)
    assert rc == 2 and "refusing to overwrite the input" in err and codes.read_bytes() == before


def test_the_demo_removes_what_an_earlier_demo_wrote_under_other_names_and_nothing_else(tmp_path):
    from tqs_onnx.demo import DEMO, MANIFEST, run_demo

    out = tmp_path / "demo"
    out.mkdir()
    old = [out / "plan-uniform-int1.json", out / "plan-uniform-int1.0123456789ab.codes.npz",
           out / f"{DEMO}.uniform-int1.onnx"]
    mine = [out / "notes.txt", out / "plan-mine.json", out / "plan-mine.0123456789ab.codes.npz",
            out / f"{DEMO}.mine.onnx"]  # the user's own, in the same folder and with the demo's patterns
    for p in old + mine:
        p.write_text("earlier")
    (out / MANIFEST).write_text(json.dumps({"files": ["plan-uniform-int1.json", f"{DEMO}.uniform-int1.onnx",
                                                      "../outside.json", "scores.json", "notes.json"]}))
    (out / "notes.json").write_text("a name the demo never writes, listed by a hand-edited manifest")
    (tmp_path / "outside.json").write_text("not the demo's")
    run_demo(out, quiet=True)
    assert not any(p.exists() for p in old) and all(p.exists() for p in mine)
    assert (out / "scores.json").is_file() and (out / "notes.json").is_file()
    assert (tmp_path / "outside.json").exists() and (out / "plan-tqs-measured.json").is_file()
    assert "plan-tqs-measured.json" in json.loads((out / MANIFEST).read_text())["files"]


def test_apply_notes_an_on_disk_size_that_is_not_the_planned_one(base, tmp_path, capfd):
    plan = json.loads(base["plan"].read_text())
    rc, err = run_cli(["apply", str(base["model"]), str(base["plan"]), "-o", str(tmp_path / "a.onnx"), "--quiet"],
                      capfd)
    assert rc == 0 and "note:" not in err and (tmp_path / "a.onnx").stat().st_size == plan["planned_bytes"]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**plan, "planned_bytes": plan["planned_bytes"] // 2}))
    rc, err = run_cli(["apply", str(base["model"]), str(edited), "-o", str(tmp_path / "b.onnx"), "--quiet"], capfd)
    assert rc == 0 and "against" in err and "planned" in err and "edited" in err
    # external data adds its references' bytes per tensor: no note there
    rc, err = run_cli(["apply", str(base["model"]), str(base["plan"]), "-o", str(tmp_path / "c.onnx"), "--quiet",
                       "--external-data"], capfd)
    assert rc == 0 and "note:" not in err


def test_temporaries_named_like_no_process_and_names_long_in_bytes(base, tmp_path, capfd):
    odd = tmp_path / ".p.json.99999999999999999999.abcdefgh.tmp"  # no pid fits: kept, no traceback
    odd.write_text("x")
    rc, err = run_cli(["allocate", str(base["scores"]), "--compression", "2", "-o", str(tmp_path / "p.json"),
                       "--quiet"], capfd)
    assert rc == 0 and odd.exists()
    wide = tmp_path / ("\u00e9" * 100 + ".json")  # 205 bytes in 105 characters
    rc, err = run_cli(["allocate", str(base["scores"]), "--compression", "2", "-o", str(wide)], capfd)
    assert rc == 2 and "file name too long (205 bytes)" in err


def test_a_write_that_fails_without_a_file_name_is_named_by_its_output(tmp_path, capsys):
    """A full disk raises from write() with no file name: the one-line error named no file (a CI trial)."""
    import errno

    from tqs_onnx.util import atomic_write

    def write(p):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as exc:
        atomic_write(tmp_path / "out.json", write)
    assert exc.value.filename == str(tmp_path / "out.json") and listing(tmp_path) == {}


def test_a_gate_threshold_missed_by_a_hair_prints_digits_that_show_it():
    from tqs_onnx.gate import _digits

    assert _digits(4.03175, 4.0318) == "4.0317"  # was '4.032x < 4.0318x'
    assert _digits(4.5, 4.0) == "4.500" and _digits(0.73541, 0.7354, 4, "g") == "0.73541"
    assert _digits(1.23e-5, 1e-4, 4, "g") == "1.23e-05"


def test_quiet_prints_nothing_json_included_and_a_resume_without_checkpoint_says_so(base, tmp_path, capfd):
    c = Case(tmp_path, base)
    for argv in (["eval", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--contexts",
                  c.copy("contexts"), "--json", "--quiet"],
                 ["gate", c.copy("model"), c.copy("model"), "--rollout", c.copy("spec"), "--contexts",
                  c.copy("contexts"), "--max-mae", "1", "--json", "--quiet"]):
        capfd.readouterr()
        assert main(argv) == 0
        out, err = capfd.readouterr()
        assert out == "" and err == "", argv[0]
    rc, err = run_cli(c.sweep(None, None, None, "--resume", "--checkpoint", c.path("typo.jsonl")), capfd)
    assert rc == 0 and "--resume found no checkpoint" in err and "typo.jsonl" in err


def test_the_paper_objective_ranks_by_the_swept_probe_and_says_so(base, tmp_path):
    from tqs_onnx.allocate import allocate
    from tqs_onnx.errors import TqsError

    c = Case(tmp_path, base)
    doc = _without_probe(c, "quant")
    _, alloc = allocate(doc, 2.0, objective="paper")
    assert any("ranked by the gauss gamma" in n for n in alloc.notes)
    _, alloc = allocate(json.loads(Path(c.copy("scores")).read_text()), 2.0, objective="paper")
    assert not any("ranked by" in n for n in alloc.notes)
    with pytest.raises(TqsError, match="no quant gamma"):
        allocate(doc, 2.0, objective="paper", probe="quant")


def test_a_spec_without_feedback_follows_its_trajectory(base, tmp_path, capfd):
    c = Case(tmp_path, base)
    spec = c.json("s.json", {"horizon": 3, "trajectory": ["x_next"], "fixed": {"x": "x0"}})
    rc, err = run_cli(c.sweep(None, spec), capfd)
    assert rc == 0, err


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_a_model_and_its_data_file_are_never_left_a_mismatched_pair(tmp_path, monkeypatch, fail_at):
    """apply --external-data renamed the data file, then the model: a run killed between them left the
    earlier model reading the new weights (ORT loaded it; eval: another model's error, silently), and
    Ctrl-C there deleted the data file already in place under the earlier model."""
    from tqs_onnx import rewrite

    out = tmp_path / "q.onnx"
    rewrite.save_model(recurrent_mlp(n=64, h=64, seed=1), out, True)
    before = (out.read_bytes(), Path(f"{out}.data").read_bytes())
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at + 1:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(rewrite.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        rewrite.save_model(recurrent_mlp(n=64, h=64, seed=2), out, True)
    monkeypatch.undo()
    # The earlier pair as it was, or no model at all (the data file alone loads nothing): never a mix.
    if out.exists():
        assert (out.read_bytes(), Path(f"{out}.data").read_bytes()) == before
    else:
        assert fail_at > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_sigterm_stops_a_sweep_with_a_message_and_ctrl_c_after_the_scores_are_written_is_success(
        base, tmp_path, capfd, monkeypatch):
    """SIGTERM (a scheduler's stop) ended the sweep silently with 143; Ctrl-C just after the scores were
    written reported a failure (130) for a finished run."""
    import tqs_onnx.sweep as sweep_module
    import tqs_onnx.tables as tables

    real = sweep_module.score_block
    calls = []

    def terminate_second_block(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(sweep_module, "score_block", terminate_second_block)
    out = tmp_path / "s.json"
    argv = ["sweep", str(base["model"]), "--rollout", str(base["spec"]), "--contexts", str(base["contexts"]),
            "-o", str(out), "--min-size", "16", "--probes", "1", "--tiers", "int8"]
    before = signal.getsignal(signal.SIGTERM)
    rc, err = run_cli([*argv, "--quiet"], capfd)
    assert rc == 143 and "terminated (SIGTERM)" in err and "--resume" in err and not out.exists()
    assert signal.getsignal(signal.SIGTERM) == before  # main() puts the caller's handler back
    monkeypatch.setattr(sweep_module, "score_block", real)
    monkeypatch.setattr(tables, "format_ranking", lambda doc: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, err = run_cli([*argv, "--resume"], capfd)
    assert rc == 0 and "interrupted after writing" in err and out.exists()


def test_a_slow_set_up_says_what_it_does_and_a_quick_one_prints_nothing(capfd):
    from tqs_onnx.util import slow_note

    capfd.readouterr()
    with slow_note("preparing", after=0.05):
        time.sleep(0.3)
    with slow_note("quick", after=0.5):
        pass
    with slow_note("quiet", quiet=True, after=0.0):
        time.sleep(0.1)
    time.sleep(0.6)
    assert capfd.readouterr().err == "preparing\n"


def test_signals_are_held_during_the_renames_even_with_other_threads_running():
    """A thread's signal mask did not hold SIGINT: numpy's and ORT's threads took it and Python raised
    KeyboardInterrupt between the model's rename and its record."""
    import threading

    from tqs_onnx.rewrite import _signals_deferred

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=True)
    worker.start()
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            steps.append("renames done")
    stop.set()
    assert steps == ["renames done"]


def test_an_interrupt_right_after_the_models_rename_keeps_the_new_pair(tmp_path, monkeypatch):
    from tqs_onnx import rewrite

    out = tmp_path / "q.onnx"
    rewrite.save_model(recurrent_mlp(n=64, h=64, seed=1), out, True)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst) == out and Path(src).parent != out.parent:  # the new model, just renamed into place
            raise KeyboardInterrupt

    monkeypatch.setattr(rewrite.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        rewrite.save_model(recurrent_mlp(n=64, h=64, seed=2), out, True)
    monkeypatch.undo()
    assert Path(f"{out}.data").exists()  # the new model's data stays with it
    import onnxruntime

    assert onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()


def test_a_probe_the_sweep_never_ran_is_refused_with_the_measured_objective_too(base, tmp_path):
    """With --verify-model the joint check ranks its paper challengers by --probe: a probe not swept
    fell back to the other one silently."""
    from tqs_onnx.allocate import allocate
    from tqs_onnx.errors import TqsError

    doc = _without_probe(Case(tmp_path, base), "gauss")
    with pytest.raises(TqsError, match="no gauss gamma"):
        allocate(doc, 2.0, objective="measured", probe="gauss")
    allocate(doc, 2.0, objective="measured")  # not named: the measured objective does not rank by it


def test_a_signal_held_during_the_renames_says_the_model_was_written(tmp_path, monkeypatch):
    """Ctrl-C during the renames is taken once they are done: the new pair is in place, and the
    interrupt says so (it read as if the earlier model were still there)."""
    from tqs_onnx import rewrite

    out = tmp_path / "q.onnx"
    rewrite.save_model(recurrent_mlp(n=64, h=64, seed=1), out, True)
    real, sent = os.replace, []

    def replace(src, dst):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    monkeypatch.setattr(rewrite.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt) as info:
        rewrite.save_model(recurrent_mlp(n=64, h=64, seed=2), out, True)
    monkeypatch.undo()
    assert info.value.written[-1] == out and Path(f"{out}.data").exists()


def test_a_single_file_model_written_over_an_external_data_output_removes_its_data_file(tmp_path):
    from tqs_onnx.rewrite import save_model

    out = tmp_path / "q.onnx"
    save_model(recurrent_mlp(n=64, h=64), out, True)
    assert Path(f"{out}.data").exists()
    save_model(recurrent_mlp(n=64, h=64), out, False)
    assert out.exists() and not Path(f"{out}.data").exists()
