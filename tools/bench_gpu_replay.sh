#!/usr/bin/env bash
# The replay engine on a GPU (measured in the ninth session: tools/results/gpu_h100_s9/).
# Writes into OUT (default ./gpu-replay-out): bench_replay.py (replay vs step loop vs plain forward,
# rotating rounds) and bench_sweep.py --compare-replay on the transformer forecaster and the small
# Pangu replica. Run from the repository root with onnxruntime-gpu and tqs_onnx importable:
#     bash tools/bench_gpu_replay.sh [OUT]      (DEVICE=cpu: the same on the CPU provider)
set -u
case "${1:-}" in -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0;; -*) echo "unknown option $1 (--help)" >&2; exit 2;; esac
dev=${DEVICE:-cuda}  # DEVICE=cpu runs the same on the CPU provider
out=${1:-${OUT:-gpu-replay-out}}
mkdir -p "$out"
z=models/zoo
pg=$(mktemp -d)
trap 'rm -rf "$pg"' EXIT
python3 models/pangu_replica.py --grid small -o "$pg" --contexts 4 > "$out/pgs_build.txt" 2>&1
p=$pg/pangu_replica_small
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 tools/bench_replay.py $z/patch_transformer.onnx $z/patch_transformer.rollout.json \
    $z/patch_transformer_sweep.npz --device $dev --rounds 5 > "$out/replay_transformer.txt" 2>&1
python3 tools/bench_replay.py $p.onnx $p.rollout.json $p.contexts.npz --device $dev --rounds 5 \
    > "$out/replay_pgs.txt" 2>&1
python3 tools/bench_sweep.py $z/patch_transformer.onnx --device $dev --compare-replay \
    --json "$out/sweep_transformer.json" > "$out/sweep_transformer.txt" 2>&1
python3 tools/bench_sweep.py $p.onnx --spec $p.rollout.json --contexts $p.contexts.npz --device $dev \
    --compare-replay --json "$out/sweep_pgs.json" > "$out/sweep_pgs.txt" 2>&1
for f in "$out"/replay_*.txt "$out"/sweep_*.txt; do echo "== $f"; tail -n 9 "$f"; done
