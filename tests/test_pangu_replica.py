"""The Pangu-Weather replica (models/pangu_replica.py), built on its small grid.

The ONNX graph is compared with an independent numpy forward that reads the same weights but cuts
patches, windows and merges with strided slices and explicit loops instead of reshapes.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

WINDOW = (2, 6, 12)
WINDOW_TOKENS = 144


def _load_builder() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "models" / "pangu_replica.py"
    spec = importlib.util.spec_from_file_location("pangu_replica", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pr = _load_builder()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    return pr.build_pangu(tmp_path_factory.mktemp("pangu"), grid="small", seed=0)


@pytest.fixture(scope="module")
def model(small) -> onnx.ModelProto:
    return onnx.load(str(small.model))


@pytest.fixture(scope="module")
def session(small) -> ort.InferenceSession:
    return ort.InferenceSession(str(small.model), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# Files, names, shapes
# --------------------------------------------------------------------------------------------------


def test_build_writes_only_the_final_files(small):
    names = sorted(p.name for p in small.model.parent.iterdir())
    assert names == ["pangu_replica_small.contexts.npz", "pangu_replica_small.onnx",
                     "pangu_replica_small.rollout.json"]
    assert small.data is None


def test_io_names_shapes_and_versions(model):
    grid = pr.GRIDS["small"]
    upper = [5, 13, grid.lat, grid.lon]
    surface = [4, grid.lat, grid.lon]

    def shapes(values):
        return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    assert shapes(model.graph.input) == {"input": upper, "input_surface": surface}
    assert shapes(model.graph.output) == {"output": upper, "output_surface": surface}
    assert model.ir_version == 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    onnx.checker.check_model(model, full_check=True)


def test_weights_are_stored_like_the_real_export(model):
    """Linear weights pre-transposed into MatMul (no Gemm), tables into Add, the rest as b1.*."""
    ops = {n.op_type for n in model.graph.node}
    assert "Gemm" not in ops and "LayerNormalization" not in ops and "Erf" in ops
    consumers = _consumers(model)
    for t in model.graph.initializer:
        (consumer,) = consumers[t.name]
        if t.name.startswith("onnx::MatMul_"):
            assert consumer.op_type == "MatMul" and consumer.input[1] == t.name and len(t.dims) == 2
        elif t.name.startswith("onnx::Add_"):
            assert consumer.op_type == "Add" and len(t.dims) == 5
        else:
            assert t.name.startswith("b1."), t.name
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    initializers = {t.name for t in model.graph.initializer}
    assert not any(i in initializers for n in gathers for i in n.input)


def test_conv_patch_layers_are_kernel_1(model):
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    c = pr.GRIDS["small"].dim
    assert shapes["b1._input_layer.conv.weight"] == (c, 6 * 2 * 4 * 4, 1)
    assert shapes["b1._input_layer.conv_surface.weight"] == (c, 7 * 4 * 4, 1)
    assert shapes["b1._output_layer.conv.weight"] == (5 * 2 * 4 * 4, 2 * c, 1)
    assert shapes["b1._output_layer.conv_surface.weight"] == (4 * 4 * 4, 2 * c, 1)


# --------------------------------------------------------------------------------------------------
# Rollout through the spec
# --------------------------------------------------------------------------------------------------


def test_two_step_rollout_from_the_spec_stays_finite(small, session):
    spec = json.loads(small.spec.read_text())
    assert spec["feedback"] == {"output": "input", "output_surface": "input_surface"}
    assert spec["channel_axis"] == {"output": 0, "output_surface": 0}
    contexts = np.load(small.contexts)
    n_contexts = {contexts[key].shape[0] for key in spec["initial"].values()}
    assert n_contexts == {2}
    names = [o.name for o in session.get_outputs()]
    for s in range(2):
        feeds = {inp: contexts[key][s] for inp, key in spec["initial"].items()}
        for _ in range(spec["horizon"]):
            outputs = dict(zip(names, session.run(None, feeds)))
            for name in spec["trajectory"]:
                assert np.isfinite(outputs[name]).all(), name
            feeds = {inp: outputs[out] for out, inp in spec["feedback"].items()}
            assert {k: v.shape for k, v in feeds.items()} == {
                k: contexts[key].shape[1:] for k, key in spec["initial"].items()}


def test_contexts_are_in_physical_units(small):
    contexts = np.load(small.contexts)
    upper, surface = contexts["input"], contexts["input_surface"]
    assert 180 < upper[:, 2].min() and upper[:, 2].max() < 330  # temperature, K
    assert upper[:, 0, -1].mean() > 1.5e5  # geopotential at 50 hPa, m^2/s^2
    assert upper[:, 1].min() > 0  # specific humidity
    assert 9.5e4 < surface[:, 0].mean() < 1.05e5  # mean sea-level pressure, Pa


# --------------------------------------------------------------------------------------------------
# Earth-specific bias: stored expanded, a Gather of a (3312, T, H) table by the position index
# --------------------------------------------------------------------------------------------------


def _position_index() -> np.ndarray:
    """The pseudocode's index, written out per token pair (absolute level/lat, relative lon)."""
    wz, wh, ww = WINDOW
    tokens = list(itertools.product(range(wz), range(wh), range(ww)))
    index = np.empty((len(tokens), len(tokens)), np.int64)
    for (i, (zi, hi, wi)), (j, (zj, hj, wj)) in itertools.product(enumerate(tokens), repeat=2):
        index[i, j] = ((zi + wz * zj) * wh * wh + hi + wh * hj) * (2 * ww - 1) + wi - wj + ww - 1
    return index


def test_position_index_matches_the_pseudocode():
    index = pr.earth_position_index()
    np.testing.assert_array_equal(index, _position_index())
    assert np.array_equal(np.unique(index), np.arange(3312))


def test_bias_tables_are_expanded_lookups(model):
    grid = pr.GRIDS["small"]
    index = _position_index()
    values, first = np.unique(index.ravel(), return_index=True)
    assert len(values) == 3312
    tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 5}
    assert len(tables) == sum(grid.depths)
    expected_types = {"layer1": 8, "layer2": 4, "layer3": 4, "layer4": 8}
    for name, bias in tables.items():
        (add,) = _consumers(model)[name]
        layer = add.name.split("/")[2]
        heads = grid.heads[int(layer[-1]) - 1]
        assert bias.shape == (1, expected_types[layer], heads, WINDOW_TOKENS, WINDOW_TOKENS)
        flat = bias.reshape(bias.shape[1], heads, -1)
        table = flat[:, :, first]  # one value per position pair: the (3312, T, H) table, transposed
        np.testing.assert_array_equal(table[:, :, index], bias[0])


def test_expanded_storage_repeats_each_table_6_26_times(small):
    counts = small.counts
    unique = counts["earth_bias"] // (WINDOW_TOKENS**2) * 3312
    assert counts["earth_bias"] / unique == pytest.approx(144 * 144 / 3312)


# --------------------------------------------------------------------------------------------------
# Parameter accounting
# --------------------------------------------------------------------------------------------------


def test_parameter_counts_by_class(small, model):
    grid = pr.GRIDS["small"]
    c, (d1, d2, d3, d4) = grid.dim, grid.depths
    counts = pr.parameter_counts(small.model)
    assert counts == small.counts
    assert sum(v for k, v in counts.items() if k != "constant") == sum(
        math.prod(t.dims) for t in model.graph.initializer)
    per_block = 12  # qkv 3C^2 + proj C^2 + MLP 8C^2, in units of width^2
    assert counts["linear"] == (per_block * c * c * (d1 + d4) + per_block * (2 * c) ** 2 * (d2 + d3)
                                + 4 * c * 2 * c + 2 * c * 4 * c + c * c)
    assert counts["norm_bias"] == 13 * c * (d1 + d4) + 13 * 2 * c * (d2 + d3) + 2 * 4 * c + 2 * c
    assert counts["patch_conv"] == (6 * 32 + 1 + 7 * 16 + 1) * c + (160 + 64) * (2 * c + 1)
    assert counts["earth_bias"] == 144 * 144 * (8 * 1 * d1 + 4 * 2 * (d2 + d3) + 8 * 1 * d4)
    assert counts["constant"] == 13 * 25 * 96 + 3 * 28 * 96 + 2 * (2 * 5 * 13 + 2 * 4)
    share = counts["earth_bias"] / sum(v for k, v in counts.items() if k != "constant")
    assert share > 0.8  # the tables dominate, as in the real export (91%)


def test_full_grid_geometry_matches_the_real_export():
    full = pr.GRIDS["full"]
    assert full.tokens_outer == (8, 181, 360) and full.tokens_inner == (8, 91, 180)
    outer, inner = pr.WindowGeometry(full.tokens_outer), pr.WindowGeometry(full.tokens_inner)
    assert (outer.padded, outer.window_types, outer.lon_windows) == ((8, 186, 360), 124, 30)
    assert (inner.padded, inner.window_types, inner.lon_windows) == ((8, 96, 180), 64, 15)


@pytest.mark.slow
def test_full_grid_build_matches_the_published_parameter_table(tmp_path):
    build = pr.build_pangu(tmp_path, grid="full", seed=0, n_contexts=0)
    assert build.counts["earth_bias"] == 252_813_312
    assert build.counts["linear"] == 23_629_824
    assert build.counts["patch_conv"] == 144_992
    assert build.counts["norm_bias"] == 71_808
    total = sum(v for k, v in build.counts.items() if k != "constant")
    assert abs(total - 277e6) / 277e6 < 0.05
    assert len(onnx.load(str(build.model), load_external_data=False).graph.initializer) == 223
    onnx.checker.check_model(str(build.model))
    ort.InferenceSession(str(build.model), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# The graph against an independent numpy forward
# --------------------------------------------------------------------------------------------------


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


class _Weights:
    """The model's tensors, found by the module path in node and initializer names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.named = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
        constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                     for n in model.graph.node if n.op_type == "Constant"}
        values = {**constants, **self.named}
        self.inputs = {n.name: [values[i] for i in n.input if i in values] for n in model.graph.node}
        self._model = model

    def linear(self, x: np.ndarray, path: str) -> np.ndarray:
        (w,) = self.inputs[f"{path}/MatMul"]
        bias = self.named.get(_dotted(path) + ".bias")
        return x @ w + (0 if bias is None else bias)

    def layer_norm(self, x: np.ndarray, path: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * self.named[_dotted(path) + ".weight"] + self.named[
            _dotted(path) + ".bias"]

    def conv(self, patches: np.ndarray, path: str) -> np.ndarray:
        """patches (..., c_in) -> (..., c_out) with the kernel-1 Conv's weight and bias."""
        weight, bias = (self.named[_dotted(path) + leaf] for leaf in (".weight", ".bias"))
        return patches @ weight[:, :, 0].T + bias

    def earth_bias(self, block: str) -> np.ndarray:
        (bias,) = [v for k, vs in self.inputs.items() for v in vs
                   if k.startswith(f"{block}/attention/") and v.shape[-2:] == (144, 144)]
        return bias[0]

    def field_constants(self) -> dict[str, np.ndarray]:
        """Normalisation tables, const_h and masks, found next to the graph inputs and outputs."""
        consumers = _consumers(self._model)
        producer = {o: n for n in self._model.graph.node for o in n.output}
        out = {}
        for name in ("input", "input_surface"):
            (sub,) = consumers[name]
            (div,) = consumers[sub.output[0]]
            out[name] = self.inputs[sub.name][0], self.inputs[div.name][0]
        for name in ("output", "output_surface"):
            add = producer[name]
            mul = producer[add.input[0]]
            out[name] = self.inputs[add.name][0], self.inputs[mul.name][0]
        concats = [v for k, vs in self.inputs.items() if "/_input_layer/Concat" in k for v in vs]
        out["const_h"] = next(v for v in concats if v.ndim == 6)
        out["masks"] = next(v for v in concats if v.ndim == 4)
        return out


def _dotted(path: str) -> str:
    return path.strip("/").replace("/", ".")


def _erf(x: np.ndarray) -> np.ndarray:
    return np.frompyfunc(math.erf, 1, 1)(x).astype(np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _patches(x: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """(C, *spatial) -> (*spatial/patch, C*prod(patch)) in (channel, offsets) order, by strided slices."""
    offsets = itertools.product(*(range(p) for p in patch))
    cols = [x[(slice(None),) + tuple(slice(o, None, p) for o, p in zip(off, patch))] for off in offsets]
    stacked = np.stack(cols, axis=1)  # (C, prod(patch), *counts)
    flat = stacked.reshape(-1, *stacked.shape[2:])
    return np.moveaxis(flat, 0, -1)


def _unpatch(y: np.ndarray, channels: int, patch: tuple[int, ...]) -> np.ndarray:
    """(*counts, channels*prod(patch)) -> (channels, *counts*patch), inverse of `_patches`."""
    counts = y.shape[:-1]
    y = y.reshape(*counts, channels, *patch)
    out = np.zeros((channels, *(c * p for c, p in zip(counts, patch))))
    for off in itertools.product(*(range(p) for p in patch)):
        target = (slice(None),) + tuple(slice(o, None, p) for o, p in zip(off, patch))
        out[target] = np.moveaxis(y[(Ellipsis, slice(None)) + off], -1, 0)
    return out


def _shift_mask(padded: tuple[int, int, int], iz: int, ih: int) -> np.ndarray:
    """-100 between tokens whose rolled level/lat strips differ (Swin's three strips per axis)."""

    def strip(coord: int, length: int, window: int) -> int:
        return 0 if coord < length - window else 1 if coord < length - window // 2 else 2

    labels = [(strip(2 * iz + dz, padded[0], WINDOW[0]), strip(6 * ih + dh, padded[1], WINDOW[1]))
              for dz, dh, _ in itertools.product(range(2), range(6), range(12))]
    same = np.array([[a == b for b in labels] for a in labels])
    return np.where(same, 0.0, -100.0)


def _attention(w: _Weights, tokens: np.ndarray, block: str, heads: int, bias: np.ndarray) -> np.ndarray:
    c = tokens.shape[-1]
    hd = c // heads
    qkv = w.linear(tokens, f"{block}/attention/linear1").reshape(WINDOW_TOKENS, 3, heads, hd)
    q, k, v = qkv.transpose(1, 2, 0, 3)
    probs = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd) + bias)
    return w.linear((probs @ v).transpose(1, 0, 2).reshape(WINDOW_TOKENS, c), f"{block}/attention/linear2")


def _block(w: _Weights, x: np.ndarray, block: str, heads: int, shifted: bool) -> np.ndarray:
    z, h, lon, c = x.shape
    padded = tuple(_ceil_to(n, s) for n, s in zip((z, h, lon), WINDOW))
    shift = tuple(s // 2 for s in WINDOW) if shifted else (0, 0, 0)
    grid = np.zeros((*padded, c))
    grid[:z, :h, :lon] = x
    grid = np.roll(grid, [-s for s in shift], axis=(0, 1, 2))
    bias = w.earth_bias(block)
    out = np.empty_like(grid)
    nh = padded[1] // 6
    for iz, ih, iw in itertools.product(range(padded[0] // 2), range(nh), range(padded[2] // 12)):
        window = np.s_[2 * iz:2 * iz + 2, 6 * ih:6 * ih + 6, 12 * iw:12 * iw + 12]
        logits_bias = bias[iz * nh + ih] + (_shift_mask(padded, iz, ih) if shifted else 0)
        attended = _attention(w, grid[window].reshape(WINDOW_TOKENS, c), block, heads, logits_bias)
        out[window] = attended.reshape(*WINDOW, c)
    out = np.roll(out, shift, axis=(0, 1, 2))[:z, :h, :lon]
    x = x + w.layer_norm(out, f"{block}/norm1")
    hidden = w.linear(x, f"{block}/linear/linear1")
    hidden = w.linear(0.5 * hidden * (1 + _erf(hidden / math.sqrt(2))), f"{block}/linear/linear2")
    return x + w.layer_norm(hidden, f"{block}/norm2")


def _layer(w: _Weights, x: np.ndarray, name: str, depth: int, heads: int) -> np.ndarray:
    for i in range(depth):
        x = _block(w, x, f"/b1/{name}/blocks.{i}", heads, shifted=i % 2 == 1)
    return x


def _reference_forward(w: _Weights, grid, upper: np.ndarray,
                       surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = w.field_constants()
    lat_pad, level_pad = _ceil_to(grid.lat, 4), _ceil_to(grid.levels, 2)
    up = (upper - f["input"][0]) / f["input"][1]
    up = np.concatenate([up, f["const_h"][0, 0]], axis=0)
    up = np.pad(up, ((0, 0), (0, level_pad - grid.levels), (0, lat_pad - grid.lat), (0, 0)))
    up = w.conv(_patches(up, (2, 4, 4)), "/b1/_input_layer/conv")
    sf = (surface - f["input_surface"][0]) / f["input_surface"][1]
    sf = np.concatenate([np.pad(sf, ((0, 0), (0, lat_pad - grid.lat), (0, 0))), f["masks"][0]], axis=0)
    sf = w.conv(_patches(sf, (4, 4)), "/b1/_input_layer/conv_surface")
    x = np.concatenate([sf[None], up], axis=0)  # (8, lat tokens, lon tokens, C)
    (d1, d2, d3, d4), (h1, h2, h3, h4) = grid.depths, grid.heads

    skip = x = _layer(w, x, "layer1", d1, h1)
    z, h, lon, c = x.shape
    merged = np.pad(x, ((0, 0), (0, h % 2), (0, 0), (0, 0)))
    merged = np.concatenate([merged[:, i::2, j::2] for i in range(2) for j in range(2)], axis=-1)
    x = w.linear(w.layer_norm(merged, "/b1/downsample/norm"), "/b1/downsample/linear")
    x = _layer(w, x, "layer2", d2, h2)
    x = _layer(w, x, "layer3", d3, h3)
    y = w.linear(x, "/b1/upsample/linear1")
    split = np.zeros((z, 2 * y.shape[1], lon, c))
    for i, j in itertools.product(range(2), range(2)):
        split[:, i::2, j::2] = y[..., (2 * i + j) * c:(2 * i + j + 1) * c]
    x = w.linear(w.layer_norm(split[:, :h], "/b1/upsample/norm"), "/b1/upsample/linear2")
    x = _layer(w, x, "layer4", d4, h4)
    x = np.concatenate([skip, x], axis=-1)

    up = _unpatch(w.conv(x[1:], "/b1/_output_layer/conv"), 5, (2, 4, 4))[:, :grid.levels, :grid.lat]
    sf = _unpatch(w.conv(x[0], "/b1/_output_layer/conv_surface"), 4, (4, 4))[:, :grid.lat]
    mean, std = f["output"]
    mean_s, std_s = f["output_surface"]
    return up * std + mean, sf * std_s + mean_s


def test_graph_matches_an_independent_numpy_forward(small, model, session):
    grid = pr.GRIDS["small"]
    contexts = np.load(small.contexts)
    upper, surface = contexts["input"][1], contexts["input_surface"][1]
    got = session.run(["output", "output_surface"], {"input": upper, "input_surface": surface})
    want = _reference_forward(_Weights(model), grid, upper.astype(np.float64), surface.astype(np.float64))
    f = _Weights(model).field_constants()
    for g, r, (_, std) in zip(got, want, (f["output"], f["output_surface"])):
        np.testing.assert_allclose(g / std, r / std, atol=1e-4, rtol=0)


def test_same_seed_gives_identical_files(small, tmp_path):
    again = pr.build_pangu(tmp_path, grid="small", seed=0, n_contexts=0)
    assert again.model.read_bytes() == small.model.read_bytes()
    other = pr.build_pangu(tmp_path / "other", grid="small", seed=1, n_contexts=0)
    assert other.model.read_bytes() != small.model.read_bytes()


def test_bench_moments_sums_in_the_session_what_the_host_sums(small):
    """tools/bench_moments.py on the replica: its MatMul statistics are summed in the session, and the
    host's sums of the copied activations agree with them."""
    import re
    import subprocess
    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_moments.py"
    out = subprocess.run([sys.executable, str(tool), str(small.model), str(small.spec), str(small.contexts),
                          "--host", "--tiers", "int4/channel/gptq"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    summed = int(re.search(r"(\d+) activations summed in the session", out).group(1))
    difference = float(re.search(r"largest relative difference of H: (\S+)", out).group(1))
    assert summed > 0 and difference < 1e-5
    assert re.search(r"rounding at int4/channel/gptq: \d+ weights in", out)
