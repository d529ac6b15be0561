"""Distributed sweeps: Ray actors score blocks, the driver keeps the one checkpoint.

Each worker is a Ray actor that rebuilds the sweep once with `prepare()` (its own ORT session) from
small values: the model path, the spec and config as dicts, and the contexts shared through Ray's
object store. The driver hands out one block id at a time and appends every finished block to the
same checkpoint `run_sweep` writes, so `--resume` works across both paths. A worker that dies loses
only the block it held, which goes to another worker. The probes are seeded per (seed, block, probe,
tensor), so the scores do not depend on which worker scored a block.

Ray is optional (`pip install 'tqs-onnx[distributed]'`); this module imports without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import sys
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import LoadedModel, load_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.sweep import (BlockScore, Checkpoint, SweepConfig, _fingerprint, _from_row, checked_checkpoint,
                            conclude, document_versions, engine_summary, note_resumed, prepare, resumed_scores,
                            score_block, scores_document, sweep_notes)
from tqs_onnx.tiers import parse_tier
from tqs_onnx.util import first_line, progress, slow_note

MAX_LOSSES = 3  # a block that takes down this many workers kills them itself; retrying would not help
STARTING_NOTE_S = 30.0  # no worker started after this long: say what the cluster has free


def require_ray() -> Any:
    """The `ray` module, or a one-line TqsError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise TqsError("--workers > 1 and --ray-address need Ray: pip install 'tqs-onnx[distributed]'") from None
    return ray


# ------------------------------------------------------------------------------------------ worker

@dataclass(frozen=True)
class WorkerJob:
    """What a worker needs to rebuild the sweep: small picklable values, no model or session."""

    model_path: str  # absolute; every node must read the same file (checked by sha256)
    model_sha256: str
    spec: dict[str, Any]
    config: dict[str, Any]
    device: str  # cpu | cuda | auto (resolved on the worker)
    threads: int = 0  # ORT intra-op threads; 0 is ORT's default


class BlockWorker:
    """One sweep setup (one ORT session) inside a Ray actor; scores the blocks it is handed."""

    def __init__(self, job: WorkerJob, arrays: dict[str, np.ndarray]):
        self.job = job
        self.arrays = arrays
        self.setup = None

    def start(self) -> dict[str, Any]:
        """Load the model and roll out the nominal trajectories; return the block ids and a scores
        document without blocks (the driver fills them in)."""
        job = self.job
        loaded = load_model(job.model_path)
        if loaded.sha256 != job.model_sha256:
            raise TqsError(f"{job.model_path}: a worker reads another file than the driver (sha256 differs)")
        spec = RolloutSpec.from_dict(job.spec, "rollout spec")
        contexts = Contexts.from_arrays(self.arrays, spec)
        self.config = SweepConfig(**job.config)
        self.tiers = [parse_tier(t) for t in self.config.tiers]
        device = resolve_device(job.device)
        self.setup = prepare(loaded, spec, contexts, device, self.config, threads=job.threads)
        self.blocks = {b.id: b for b in self.setup.blocks}
        skeleton = scores_document(self.setup, spec, self.config, [], device)
        return {"blocks": [b.id for b in self.setup.blocks], "weights": [b.weights for b in self.setup.blocks],
                "document": skeleton, "engine": engine_summary(self.setup), "notes": sweep_notes(self.setup),
                "code": code_digest()}

    def score(self, block_id: int) -> dict[str, Any]:
        """One block's checkpoint row."""
        return asdict(score_block(self.setup, self.blocks[block_id], self.config, self.tiers))


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of tqs-onnx's own source files (the package and its passes), as this process imports
    them: two editable checkouts of one version string compute different scores (a cluster started
    from another checkout ran its code under the driver's version)."""
    import tqs_onnx
    import tqs_onnx.passes

    h = hashlib.sha256()
    for package in (tqs_onnx, tqs_onnx.passes):
        root = Path(package.__file__).parent
        for f in sorted(root.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ ray and pool

@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: an existing runtime in this process, the cluster at `address`, or a local one
    started here (and stopped on exit)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    local = {} if address else {"include_dashboard": False}
    if address:
        _check_reachable(address)
    try:
        # Without --ray-address a Ray of its own ("local"): address=None joined any cluster already
        # running here (or RAY_ADDRESS's), whose workers may run other code and whose CPUs may be taken.
        ray.init(address=address or "local", log_to_driver=False, logging_level=logging.ERROR, **local)
    except Exception as exc:  # Ray raises ConnectionError, ValueError or RuntimeError here
        raise TqsError(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'}: {first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port address must answer before Ray is asked: ray.init retries an unreachable one for
    many minutes. `auto`, `local` and ray:// addresses are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise TqsError(f"cannot join the Ray cluster at {address}: nothing answers there "
                       f"({exc.strerror or type(exc).__name__}); is `ray start --head` running?") from None


def worker_device(name: str, cluster: dict[str, float], workers: int = 1) -> str:
    """cpu or cuda for every worker's resources; `auto` means cuda when the cluster has a GPU for each
    worker (the workers are then told `auto` and use the GPU only where CUDA really works there)."""
    if name == "auto":
        return "cuda" if cluster.get("GPU", 0) >= max(workers, 1) else "cpu"
    if name not in ("cpu", "cuda"):
        raise TqsError(f"unknown device '{name}' (cpu, cuda, auto)")
    return name


def worker_resources(workers: int, device: str, cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """Ray resources of one worker and its ORT intra-op threads.

    cuda: one GPU each. cpu: an equal share of the cluster's CPUs, and as many ORT threads, so the
    workers do not fight over cores."""
    if device == "cuda":
        gpus = int(cluster.get("GPU", 0))
        if gpus < workers:
            raise TqsError(f"--workers {workers} --device cuda needs {workers} GPUs; the Ray cluster has {gpus}")
        return {"num_gpus": 1, "num_cpus": 1}, 0
    share = cluster.get("CPU", 1) / workers
    # Ray takes fractions below one CPU; above one, whole CPUs keep the threads and the share equal.
    cpus = float(int(share)) if share >= 1 else round(share, 4)
    return {"num_cpus": cpus}, max(1, int(share))


@dataclass
class WorkerPool:
    """Ray actors, each starting, idle or scoring one block; a lost one is dropped and its block retried."""

    ray: Any
    starting: dict[Any, Any] = field(default_factory=dict)  # start() ref -> actor
    running: dict[Any, tuple[Any, int]] = field(default_factory=dict)  # score() ref -> (actor, block id)
    idle: list[Any] = field(default_factory=list)
    started: int = 0  # workers whose setup finished (each rolled out the nominal trajectories once)
    losses: Counter = field(default_factory=Counter)  # block id -> workers lost while scoring it
    last_loss: str = ""  # why the last worker died, as Ray reported it
    info: dict[str, Any] | None = None  # the first worker's start(): block ids and document skeleton
    config: SweepConfig | None = None  # the driver's: workers must record the versions it would
    resources: dict[str, float] = field(default_factory=dict)  # what each worker asks Ray for

    @classmethod
    def launch(cls, ray: Any, job: WorkerJob, arrays: dict[str, np.ndarray], workers: int,
               resources: dict[str, float]) -> "WorkerPool":
        """Start `workers` actors; the contexts go into the object store once, for all of them."""
        actor = ray.remote(BlockWorker).options(max_restarts=0, **resources)
        arrays_ref = ray.put(arrays)
        pool = cls(ray, config=SweepConfig(**job.config), resources=resources)
        for _ in range(workers):
            handle = actor.remote(job, arrays_ref)
            pool.starting[handle.start.remote()] = handle
        return pool

    def wait_started(self, every: bool = False) -> dict[str, Any]:
        """Block until one worker is ready (the others join while blocks are scored), or every one."""
        while self.info is None or (every and self.starting):
            if not self.starting:
                raise TqsError(f"every Ray worker died while starting (importing tqs-onnx, loading the model)"
                               f"{self._why()}")
            self._take_started(self._next_ready())
        return self.info

    def scores(self, block_ids: list[int]) -> Iterator[dict[str, Any]]:
        """Score the blocks, yielding each checkpoint row as it finishes (in completion order)."""
        queue = deque(block_ids)
        while queue or self.running:
            self._dispatch(queue)
            if not self.running and not self.starting:
                raise TqsError(f"every Ray worker died with {len(queue)} blocks left{self._why()} "
                               "(finished blocks are in the checkpoint: --resume continues)")
            ref = self._next_ready()
            if ref in self.starting:
                self._take_started(ref)
                continue
            block, row = self._take_scored(ref)
            if row is _LOST:
                queue.appendleft(block)
            else:
                yield row

    def close(self) -> None:
        """Stop every worker still held (a runtime this process did not start outlives the sweep)."""
        handles = [*self.starting.values(), *(h for h, _ in self.running.values()), *self.idle]
        for handle in handles:
            self.ray.kill(handle)
        self.starting.clear()
        self.running.clear()
        self.idle.clear()

    def _dispatch(self, queue: deque) -> None:
        while queue and self.idle:
            handle, block = self.idle.pop(), queue.popleft()
            self.running[handle.score.remote(block)] = (handle, block)

    def _next_ready(self) -> Any:
        noted = False
        while True:
            ready, _ = self.ray.wait([*self.starting, *self.running], num_returns=1, timeout=STARTING_NOTE_S)
            if ready:
                return ready[0]
            if self.started == 0 and not noted:  # Ray waits silently for resources it may never get
                free = {k: v for k, v in self.ray.available_resources().items() if k in ("CPU", "GPU")}
                print(f"sweep: no Ray worker has started after {STARTING_NOTE_S:.0f} s; the cluster has free "
                      f"{free or 'nothing'} (each worker asks for {self.resources}); still waiting",
                      file=sys.stderr, flush=True)
                noted = True

    def _take_started(self, ref: Any) -> None:
        handle = self.starting.pop(ref)
        info = self._get(ref)
        if info is _LOST:
            return
        if self.config is not None:
            check_worker_versions(info["document"], self.config)
        if info.get("code") != code_digest():
            raise TqsError("a Ray worker runs other tqs-onnx source files than the driver (the same version "
                           "string, other code: another checkout or a cluster started from another folder); "
                           "start the cluster with the driver's installation")
        if self.info is None:
            self.info = info
        elif (info["blocks"], info["weights"]) != (self.info["blocks"], self.info["weights"]):
            raise TqsError("Ray workers disagree on the blocks of the model (different tqs-onnx versions?)")
        self.started += 1
        self.idle.append(handle)

    def _take_scored(self, ref: Any) -> tuple[int, Any]:
        handle, block = self.running.pop(ref)
        row = self._get(ref)
        if row is _LOST:
            self.losses[block] += 1
            if self.losses[block] >= MAX_LOSSES:
                raise TqsError(f"block {block} was in flight on {MAX_LOSSES} Ray workers that died{self._why()} "
                               "(finished blocks are in the checkpoint: --resume continues)")
        else:
            self.idle.append(handle)
        return block, row

    def _get(self, ref: Any) -> Any:
        """ray.get, with a dead worker as _LOST and a worker's TqsError raised as the driver's."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.last_loss = _ray_cause(exc)
            return _LOST
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, TqsError):
                raise TqsError(str(exc.cause)) from None
            raise

    def _why(self) -> str:
        return f" (last: {self.last_loss})" if self.last_loss else ""


_LOST = object()  # the result of a ref whose worker died

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _ray_cause(exc: BaseException) -> str:
    """Why a worker died, in one line: the last 'SomethingError: ...' line of Ray's report (its first
    200 characters were Ray's own preamble, with terminal color codes), else its first line."""
    text = _ANSI.sub("", str(exc))
    causes = [line.strip() for line in text.splitlines() if re.match(r"\s*\w+(Error|Exception)\b.*:", line)]
    return first_line(causes[-1] if causes else text, 300)


# ------------------------------------------------------------------------------------------- run

def check_worker_versions(document: dict[str, Any], config: SweepConfig) -> None:
    """A worker whose code computes other scores (another tool version, passes, draws, weight rules or
    figures) must not add rows to this sweep."""
    mine, theirs = document_versions(config), {k: document.get(k) for k in document_versions(config)}
    if theirs != mine:
        diff = ", ".join(f"{k} {theirs[k]!r} (here {mine[k]!r})" for k in mine if theirs[k] != mine[k])
        raise TqsError(f"a Ray worker runs other tqs-onnx code than the driver: {diff}; install the same version "
                       "on every node")


def run_distributed_sweep(loaded: LoadedModel, spec: RolloutSpec, contexts: Contexts, device: str,
                          config: SweepConfig, checkpoint: Path | None = None, resume: bool = False,
                          quiet: bool = False, workers: int = 2, address: str | None = None,
                          finish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`run_sweep` on `workers` Ray actors: the same checkpoint, the same scores document and `finish`.

    `device` is a name (cpu, cuda, auto) resolved against the Ray cluster, not this machine."""
    require_ray()
    if workers < 1:
        raise TqsError(f"--workers must be >= 1, not {workers}")
    if address is None and device == "cuda":  # a Ray of its own runs here: refused before Ray starts
        resolve_device("cuda")
    with slow_note(f"sweep: starting Ray and {workers} worker(s)", quiet, after=2.0) as starting, \
            ray_session(address) as ray:
        cluster = ray.cluster_resources()
        kind = worker_device(device, cluster, workers)
        # Checked before the workers start.
        ckpt = checked_checkpoint(checkpoint, _fingerprint(loaded, spec, contexts, config, kind), resume)
        try:
            resources, threads = worker_resources(workers, kind, cluster)
            # The path as given, made absolute, not resolved: through a symlink, the external data is the
            # one beside the link (as the driver read it), not beside its target.
            # --device auto stays auto on the workers: a GPU in the cluster's resources is no working CUDA
            # provider (a CPU-only onnxruntime there said '--device cuda: ... not usable' for auto).
            job = WorkerJob(os.path.abspath(loaded.path), loaded.sha256, spec.to_dict(), asdict(config),
                            "auto" if device == "auto" else kind, threads)
            pool = WorkerPool.launch(ray, job, contexts.arrays, workers, resources)
            try:
                info = pool.wait_started()
                starting.cancel()  # started: the bar takes over
                # Opened once a worker has the model, as run_sweep does after prepare(): a run that fails
                # to start leaves no checkpoint behind.
                done = resumed_scores(ckpt.start(resume) if ckpt else {}, dict(zip(info["blocks"], info["weights"])))
                note_resumed(len(done), len(info["blocks"]), quiet)
                fresh = _score_pending(pool, [b for b in info["blocks"] if b not in done], ckpt, quiet)
            finally:
                pool.close()
            scores = [done[b] if b in done else fresh[b] for b in info["blocks"]]
            doc = _document(info["document"], scores)
            doc["model"] = {**doc["model"], "path": str(loaded.path)}  # as given here, not the path workers open
            return conclude(doc, scores, spec, [o.name for o in loaded.model.graph.output],
                            f"{workers} Ray worker(s), each {info['engine']}", info["notes"], finish, quiet)
        finally:
            if ckpt:
                ckpt.release()


def _score_pending(pool: WorkerPool, block_ids: list[int], ckpt: Checkpoint | None,
                   quiet: bool) -> dict[int, BlockScore]:
    """Score the blocks on the pool, appending each to the checkpoint as it arrives."""
    fresh: dict[int, BlockScore] = {}
    for row in progress(pool.scores(block_ids), "sweep", quiet, unit="block", total=len(block_ids)):
        score = _from_row(row)
        fresh[score.id] = score
        if ckpt:
            ckpt.append(score)
    return fresh


def _document(skeleton: dict[str, Any], scores: list[BlockScore]) -> dict[str, Any]:
    """A worker's scores document with the blocks filled in, counted as run_sweep counts them."""
    passes = skeleton["nominal_forward_passes"] + sum(s.forward_passes for s in scores)
    return {**skeleton, "blocks": [asdict(s) for s in scores], "forward_passes": passes}
