#!/usr/bin/env bash
# The replay engine on a GPU (measured in the ninth session: tools/results/gpu_h100_s9/).
# Writes into OUT (default ./gpu-replay-out): bench_replay.py (replay vs step loop vs plain forward,
# rotating rounds) and bench_sweep.py --compare-replay on the transformer forecaster and the small
# Pangu replica. Run from the repository root with onnxruntime-gpu and tqs_onnx importable:
#     bash tools/bench_gpu_replay.sh [OUT]      (DEVICE=cpu: the same on the CPU provider)
# Every step runs even when one fails; the script then names the failed steps and exits 1.
set -u
case "${1:-}" in -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0;; -*) echo "unknown option $1 (--help)" >&2; exit 2;; esac
dev=${DEVICE:-cuda}  # DEVICE=cpu runs the same on the CPU provider
out=${1:-${OUT:-gpu-replay-out}}
mkdir -p "$out" || exit 1
z=models/zoo
pg=$(mktemp -d) || exit 1
trap 'rm -rf "$pg"' EXIT
failed=()
# step LOG CMD...: run CMD with stdout and stderr into $out/LOG; remember LOG when CMD fails.
step() {
    local log=$1
    shift
    "$@" > "$out/$log" 2>&1 || { echo "failed ($?): $* (see $out/$log)" >&2; failed+=("$log"); }
}
step pgs_build.txt python3 models/pangu_replica.py --grid small -o "$pg" --contexts 4
p=$pg/pangu_replica_small
if [ "$dev" = cuda ]; then step gpu.txt nvidia-smi --query-gpu=name,memory.total --format=csv; fi
step replay_transformer.txt python3 tools/bench_replay.py $z/patch_transformer.onnx $z/patch_transformer.rollout.json \
    $z/patch_transformer_sweep.npz --device "$dev" --rounds 5
step replay_pgs.txt python3 tools/bench_replay.py "$p.onnx" "$p.rollout.json" "$p.contexts.npz" --device "$dev" --rounds 5
step sweep_transformer.txt python3 tools/bench_sweep.py $z/patch_transformer.onnx --device "$dev" --compare-replay \
    --json "$out/sweep_transformer.json"
step sweep_pgs.txt python3 tools/bench_sweep.py "$p.onnx" --spec "$p.rollout.json" --contexts "$p.contexts.npz" \
    --device "$dev" --compare-replay --json "$out/sweep_pgs.json"
for f in "$out"/replay_*.txt "$out"/sweep_*.txt; do echo "== $f"; tail -n 9 "$f"; done
if [ ${#failed[@]} -gt 0 ]; then
    echo "bench_gpu_replay.sh: ${#failed[@]} step(s) failed: ${failed[*]}" >&2
    exit 1
fi
