"""Feasibility of ORT CUDA graphs for the sweep: plain vs captured replay, on the original graph and on
the sweep's graph (weights as inputs + divergence outputs). Prints ms per run (median of rounds)."""
import sys, time, json
import numpy as np
import onnx
import onnxruntime as ort
from tqs_onnx.graph import load_model, weight_table, make_blocks
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.passes.expose_weights import ExposeWeights
from tqs_onnx.passes.divergence import AddDivergenceOutputs
from tqs_onnx.rollout import RolloutSpec, Contexts

path, spec_path, ctx_path = sys.argv[1:4]
N = int(sys.argv[4]) if len(sys.argv) > 4 else 500
spec = RolloutSpec.load(spec_path)
ctx = Contexts.load(ctx_path, spec)
loaded = load_model(path)
prepared = prepare_graph(loaded.model, True)
weights = weight_table(prepared.model, 256, prepared.origins)
blocks = make_blocks(weights, "auto")
names = [n for b in blocks for n in b.weights]
exposed = ExposeWeights(names).run(prepared.model)
values = exposed.report["values"]
measured = AddDivergenceOutputs(spec.trajectory).run(exposed.model)
pairs = measured.report["pairs"]
sweep_model = measured.model.SerializeToString()
orig_model = loaded.model.SerializeToString()

def session(model, graph):
    so = ort.SessionOptions(); so.log_severity_level = 3; so.use_deterministic_compute = True
    opts = {"use_tf32": "0"}
    if graph:
        opts["enable_cuda_graph"] = "1"
    return ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", opts), "CPUExecutionProvider"])

def feeds0():
    f = {}
    for inp, key in [*spec.initial.items(), *spec.fixed.items()]:
        f[inp] = np.ascontiguousarray(ctx.arrays[key][0], dtype=np.float32)
    for inp, key in spec.per_step.items():
        f[inp] = np.ascontiguousarray(ctx.arrays[key][0, 0], dtype=np.float32)
    return f

def setup(sess, extra):
    io = sess.io_binding()
    vals = {}
    host = feeds0()
    plain = ort.InferenceSession  # noqa
    # output shapes from a first plain run on CPU-bound outputs
    for i in sess.get_inputs():
        if i.name in host:
            a = host[i.name]
        elif i.name in extra:
            a = extra[i.name]
        else:
            raise SystemExit(f"no value for input {i.name}")
        vals[i.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0)
        io.bind_ortvalue_input(i.name, vals[i.name])
    return io, vals

def run_case(label, model, extra, graph):
    try:
        sess = session(model, graph)
    except Exception as e:
        print(f"{label}: session failed: {str(e).splitlines()[0][:300]}"); return None
    io, vals = setup(sess, extra)
    # output buffers: shapes from a run on a non-graph twin
    twin = session(model, False)
    tio, _ = setup(twin, extra)
    for o in twin.get_outputs():
        tio.bind_output(o.name, "cuda")
    twin.run_with_iobinding(tio)
    outs = {o.name: v for o, v in zip(twin.get_outputs(), tio.get_outputs())}
    bufs = {}
    for name, v in outs.items():
        bufs[name] = ort.OrtValue.ortvalue_from_shape_and_type(v.shape(), np.float32, "cuda", 0)
        io.bind_ortvalue_output(name, bufs[name])
    ref = {n: v.numpy() for n, v in outs.items()}
    try:
        for _ in range(5):
            sess.run_with_iobinding(io)
    except Exception as e:
        print(f"{label}: run failed: {str(e).splitlines()[0][:300]}"); return None
    same = all(np.array_equal(bufs[n].numpy(), ref[n]) for n in ref)
    maxdiff = max(float(np.max(np.abs(bufs[n].numpy() - ref[n]))) if ref[n].size else 0.0 for n in ref)
    times = []
    for r in range(5):
        t0 = time.perf_counter()
        for _ in range(N):
            sess.run_with_iobinding(io)
        times.append((time.perf_counter() - t0) / N * 1e3)
    print(f"{label}: {np.median(times):.4f} ms/run (rounds {', '.join(f'{t:.4f}' for t in times)}); equal to non-graph run: {same} (max |diff| {maxdiff:.3g})")
    return sess, io, vals, bufs, ref

print(ort.__version__, ort.get_device())
res = {}
for model, label, extra in [(orig_model, "original", {}), (sweep_model, "sweep graph", dict(values))]:
    if label == "sweep graph":
        # reference inputs: zeros of trajectory shape from a plain run
        s = session(orig_model, False)
        out = s.run(None, feeds0())
        names_o = [o.name for o in s.get_outputs()]
        for k, (refin, sq) in pairs.items():
            extra[refin] = out[names_o.index(k)]
    for graph in (False, True, False, True):
        run_case(f"{label}, cuda_graph={graph}", model, extra, graph)

# does a captured graph see updated input contents (weights swapped in place)?
extra = dict(values)
s = session(orig_model, False); out = s.run(None, feeds0()); names_o = [o.name for o in s.get_outputs()]
for k, (refin, sq) in pairs.items():
    extra[refin] = out[names_o.index(k)]
r = run_case("sweep graph, cuda_graph=True (update test)", sweep_model, extra, True)
if r:
    sess, io, vals, bufs, ref = r
    w = names[0]
    before = {n: b.numpy().copy() for n, b in bufs.items()}
    vals[w].update_inplace(np.ascontiguousarray(values[w] * 1.01, dtype=np.float32))
    sess.run_with_iobinding(io)
    changed = {n: not np.array_equal(before[n], bufs[n].numpy()) for n in bufs}
    vals[w].update_inplace(np.ascontiguousarray(values[w], dtype=np.float32))
    sess.run_with_iobinding(io)
    back = all(np.array_equal(before[n], bufs[n].numpy()) for n in bufs)
    print(f"update in place of {w}: outputs changed {changed}; restored equal {back}")
    # two graph ids
    ro = ort.RunOptions(); ro.add_run_config_entry("gpu_graph_id", "1")
    try:
        sess.run_with_iobinding(io, ro); sess.run_with_iobinding(io, ro); sess.run_with_iobinding(io, ro)
        print("gpu_graph_id=1 ok; equal", all(np.array_equal(before[n], bufs[n].numpy()) for n in bufs))
    except Exception as e:
        print("gpu_graph_id=1 failed:", str(e).splitlines()[0][:300])
