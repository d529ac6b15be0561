"""Distributed sweeps on a local Ray cluster (CPU): same scores, one checkpoint, lost workers retried.

The Ray tests skip when ray is not installed (pip install 'tqs-onnx[distributed]').
"""

import dataclasses
import json
import sys

import pytest

from tiny import recurrent_contexts, recurrent_mlp, recurrent_spec, save_case
from tqs_onnx.cli import main
from tqs_onnx.distributed import (BlockWorker, WorkerJob, WorkerPool, require_ray, run_distributed_sweep,
                                  worker_device, worker_resources)
from tqs_onnx.errors import TqsError
from tqs_onnx.graph import load_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.runtime import Device
from tqs_onnx.sweep import SweepConfig, run_sweep

def _have_ray() -> bool:
    try:
        require_ray()
    except TqsError:
        return False
    return True


needs_ray = pytest.mark.skipif(not _have_ray(), reason="ray not installed (pip install 'tqs-onnx[distributed]')")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # A Ray of its own: a cluster someone started on this machine must not be joined (ray.init refuses
    # num_cpus then).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def case(tmp_path):
    """Four blocks (W1, W2, a dead and a damped branch) and what a sweep needs to run on them."""
    paths = save_case(tmp_path, recurrent_mlp(dead_branch=True, damp=1e-3), recurrent_spec(), recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    config = SweepConfig(probes=2, min_size=16, blocks="tensor", tiers=["int8", "int4"], seed=3)
    return paths, load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec), config


def blocks_without_timing(doc):
    return [{k: v for k, v in b.items() if k not in ("seconds", "forward_passes")} for b in doc["blocks"]]


# ------------------------------------------------------------------------------ without a cluster

def test_missing_ray_is_one_line_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(TqsError, match=r"pip install 'tqs-onnx\[distributed\]'"):
        require_ray()
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    out = tmp_path / "scores.json"
    rc = main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
               "--workers", "2", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "tqs-onnx[distributed]" in err
    assert not out.exists() and not (tmp_path / "scores.json.ckpt.jsonl").exists()


def test_worker_resources_split_cpus_or_take_one_gpu_each():
    assert worker_resources(2, "cpu", {"CPU": 16.0}) == ({"num_cpus": 8.0}, 8)
    assert worker_resources(3, "cpu", {"CPU": 8.0}) == ({"num_cpus": 2.0}, 2)
    assert worker_resources(4, "cpu", {"CPU": 2.0}) == ({"num_cpus": 0.5}, 1)
    assert worker_resources(4, "cuda", {"CPU": 64.0, "GPU": 8.0}) == ({"num_gpus": 1, "num_cpus": 1}, 0)
    with pytest.raises(TqsError, match="needs 4 GPUs; the Ray cluster has 2"):
        worker_resources(4, "cuda", {"CPU": 64.0, "GPU": 2.0})
    assert worker_device("auto", {"CPU": 8.0, "GPU": 2.0}) == "cuda"
    assert worker_device("auto", {"CPU": 8.0}) == "cpu"


# ---------------------------------------------------------------------------------- on a cluster

@needs_ray
@pytest.mark.parametrize("options", [{}, {"probes": 6, "early_stop": 0.05, "early_window": 2, "early_horizon": True}],
                         ids=["plain", "early-stop"])
def test_two_workers_give_the_single_process_scores(ray_cluster, case, tmp_path, options):
    _, model, spec, contexts, config = case
    config = dataclasses.replace(config, **options)
    single = run_sweep(model, spec, contexts, Device("cpu"), config, quiet=True)
    ckpt = tmp_path / "dist.ckpt.jsonl"
    dist = run_distributed_sweep(model, spec, contexts, "cpu", config, ckpt, quiet=True, workers=2)
    assert blocks_without_timing(dist) == blocks_without_timing(single)
    assert {k: v for k, v in dist.items() if k not in ("blocks", "seconds", "forward_passes")} == \
           {k: v for k, v in single.items() if k not in ("blocks", "seconds", "forward_passes")}
    # Each started worker rolled out the nominal trajectories once; the blocks' passes are the same.
    nominal = single["nominal_forward_passes"]
    assert (dist["forward_passes"] - single["forward_passes"]) % nominal == 0
    assert single["forward_passes"] <= dist["forward_passes"] <= single["forward_passes"] + nominal
    assert len(ckpt.read_text().splitlines()) == 1 + len(single["blocks"])


@needs_ray
def test_checkpoint_resumes_across_single_and_distributed(ray_cluster, case, tmp_path):
    _, model, spec, contexts, config = case
    full = blocks_without_timing(run_sweep(model, spec, contexts, Device("cpu"), config, quiet=True))
    for first, then in (("dist", "single"), ("single", "dist")):
        ckpt = tmp_path / f"{first}.ckpt.jsonl"
        sweep(first, model, spec, contexts, config, ckpt)
        lines = ckpt.read_text().splitlines()
        # The header and one block, then half a line: as if killed while writing the second block.
        ckpt.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
        with pytest.raises(TqsError, match="--resume"):
            sweep(then, model, spec, contexts, config, ckpt)
        assert blocks_without_timing(sweep(then, model, spec, contexts, config, ckpt, resume=True)) == full
        assert len(ckpt.read_text().splitlines()) == 1 + len(full)


def sweep(path: str, model, spec, contexts, config, ckpt, resume: bool = False):
    if path == "single":
        return run_sweep(model, spec, contexts, Device("cpu"), config, ckpt, resume, quiet=True)
    return run_distributed_sweep(model, spec, contexts, "cpu", config, ckpt, resume, quiet=True, workers=2)


@needs_ray
def test_killed_worker_loses_only_its_block(ray_cluster, tmp_path):
    # Long rollouts, so the block handed to the killed worker is still running when the kill lands.
    paths = save_case(tmp_path, recurrent_mlp(dead_branch=True, damp=1e-3), recurrent_spec(horizon=64),
                      recurrent_contexts(s=8))
    spec = RolloutSpec.load(paths["spec"])
    contexts = Contexts.load(paths["contexts"], spec)
    config = SweepConfig(probes=8, min_size=16, blocks="tensor", tiers=["int8", "int4", "int2"])
    model = load_model(paths["model"])
    reference = blocks_without_timing(run_sweep(model, spec, contexts, Device("cpu"), config, quiet=True))
    job = WorkerJob(str(model.path), model.sha256, spec.to_dict(), dataclasses.asdict(config), "cpu", 1)
    pool = WorkerPool.launch(ray_cluster, job, contexts.arrays, 2, {"num_cpus": 1})
    try:
        ids = pool.wait_started(every=True)["blocks"]
        rows = []
        for row in pool.scores(ids):
            if not rows:
                ray_cluster.kill(pool.idle[0])  # the worker that is handed the next block
            rows.append(row)
    finally:
        pool.close()
    assert sum(pool.losses.values()) == 1 and pool.started == 2
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(ids) == len(by_id)
    assert blocks_without_timing({"blocks": [by_id[i] for i in ids]}) == reference


@needs_ray
def test_worker_errors_come_back_as_one_line(ray_cluster, case):
    _, model, spec, contexts, config = case
    other = dataclasses.replace(model, sha256="0" * 64)  # as if a node held another file at this path
    with pytest.raises(TqsError, match="sha256 differs") as info:
        run_distributed_sweep(other, spec, contexts, "cpu", config, quiet=True, workers=2)
    assert "\n" not in str(info.value)


@needs_ray
def test_cli_workers_two_writes_the_same_scores(ray_cluster, case, tmp_path):
    paths, *_ = case
    args = ["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
            "--probes", "2", "--min-size", "16", "--blocks", "tensor", "--tiers", "int8", "--quiet"]
    docs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.json"
        assert main([*args, "--workers", workers, "-o", str(out)]) == 0
        assert not (tmp_path / f"w{workers}.json.ckpt.jsonl").exists()
        docs[workers] = json.loads(out.read_text())
    assert blocks_without_timing(docs["2"]) == blocks_without_timing(docs["1"])
    assert docs["2"]["model"] == docs["1"]["model"]


def test_block_worker_imports_without_ray():
    # The actor class is plain Python: ray wraps it at run time, so this module imports anywhere.
    assert not hasattr(BlockWorker, "remote")


def test_unreachable_ray_address_fails_at_once(tmp_path, monkeypatch):
    """ray.init retries an address where nothing listens for many minutes; ray_session asks first."""
    import socket
    import time

    import tqs_onnx.distributed as distributed

    class NoRay:  # ray.init must not be reached
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kw):
            raise AssertionError("ray.init called for an address where nothing listens")

    monkeypatch.setattr(distributed, "require_ray", lambda: NoRay)
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(TqsError, match="nothing answers"):
            with distributed.ray_session(f"127.0.0.1:{port}"):
                pass
    assert time.monotonic() - t0 < 30


def test_a_worker_running_other_code_is_refused():
    """A worker's scores document names the code that made it; another version must not add rows."""
    from tqs_onnx.distributed import check_worker_versions
    from tqs_onnx.sweep import SweepConfig, document_versions

    config = SweepConfig()
    check_worker_versions(dict(document_versions(config)), config)  # the same code: accepted
    for key in document_versions(config):
        with pytest.raises(TqsError, match=f"other tqs-onnx code than the driver: {key}"):
            check_worker_versions({**document_versions(config), key: "another"}, config)
    quant = SweepConfig(probe="quant")
    assert "probes" not in document_versions(quant) and "probes" in document_versions(config)


@needs_ray
def test_a_distributed_sweep_prints_the_notes_of_a_local_one(ray_cluster, case, capsys):
    _, model, spec, contexts, config = case
    config = SweepConfig(probes=1, min_size=16, blocks="tensor", tiers=["int8/channel/gptq"], seed=3)
    run_sweep(model, spec, contexts, resolve_device("cpu"), config)
    local = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert any("round to nearest at the /gptq tiers" in line for line in local)  # few rows: a note to print
    run_distributed_sweep(model, spec, contexts, "cpu", config, workers=2)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("note:")] == local
    assert "sweep engine: 2 Ray worker(s), each " in err


def test_why_a_worker_died_is_the_error_not_rays_preamble():
    from tqs_onnx.distributed import _ray_cause

    text = ("The actor died because of an error raised in its creation task, \x1b[36mray::BlockWorker.__init__()"
            "\x1b[39m (pid=1, actor_id=ab, repr=x)\n  File \"x.py\", line 1, in <module>\n"
            "ImportError: cannot import name 'prepare' from 'tqs_onnx.sweep'")
    assert _ray_cause(Exception(text)) == "ImportError: cannot import name 'prepare' from 'tqs_onnx.sweep'"
    assert _ray_cause(Exception("\x1b[33mworker lost\x1b[0m")) == "worker lost"


def test_a_worker_whose_source_files_differ_is_refused():
    """Two checkouts of one version string compute different scores: the version check passed a
    cluster started from another folder, whose workers ran its code under the driver's version."""
    from tqs_onnx.distributed import code_digest
    from tqs_onnx.sweep import document_versions

    config = SweepConfig()
    info = {"document": dict(document_versions(config)), "blocks": [0], "weights": [["w"]], "code": "another"}

    class FakeRay:
        class exceptions:
            RayActorError = type("RayActorError", (Exception,), {})
            RayTaskError = type("RayTaskError", (Exception,), {})

        def get(self, ref):
            return dict(info)

    pool = WorkerPool(FakeRay(), config=config)
    pool.starting["ref"] = "handle"
    with pytest.raises(TqsError, match="other tqs-onnx source files than the driver"):
        pool._take_started("ref")
    info["code"] = code_digest()
    pool.starting["ref"] = "handle"
    pool._take_started("ref")
    assert pool.idle == ["handle"]


@needs_ray
def test_workers_open_a_symlinked_model_where_the_driver_does(ray_cluster, tmp_path):
    """Workers opened the symlink's target (Path.resolve), whose folder lacks the external data that
    sits beside the link: the driver and --workers 1 worked, --workers 2 said the data was missing."""
    import os
    import shutil

    import onnx

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    blobs, links = tmp_path / "blobs", tmp_path / "links"
    blobs.mkdir()
    links.mkdir()
    onnx.save_model(onnx.load(str(paths["model"])), str(blobs / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    shutil.move(str(blobs / "m.onnx.data"), str(links / "m.onnx.data"))
    os.symlink(blobs / "m.onnx", links / "m.onnx")
    spec = RolloutSpec.load(paths["spec"])
    config = SweepConfig(probes=1, min_size=16, blocks="tensor", tiers=["int8"])
    doc = run_distributed_sweep(load_model(links / "m.onnx"), spec, Contexts.load(paths["contexts"], spec), "cpu",
                                config, workers=2, quiet=True)
    assert len(doc["blocks"]) >= 2


def test_without_an_address_ray_starts_its_own_instead_of_joining_one_running_here(monkeypatch):
    """ray.init(address=None) joins a cluster already running on the machine (or RAY_ADDRESS's): its
    workers ran that cluster's code and the sweep hung where its CPUs were taken."""
    from tqs_onnx import distributed

    calls = []

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kw):
            calls.append(kw)

        def shutdown(self):
            pass

    monkeypatch.setattr(distributed, "require_ray", lambda: FakeRay())
    with distributed.ray_session(None):
        pass
    assert calls[0]["address"] == "local"
