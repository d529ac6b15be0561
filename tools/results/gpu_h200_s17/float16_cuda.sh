# float16 model on CUDA: sweep, allocate --verify-model, apply, eval (a health check)
set -u
d=$(mktemp -d)
python3 - "$d" <<'PY'
import sys; sys.path.insert(0, "tests")
from test_float16 import half_mlp
from tiny import save_case, recurrent_spec, recurrent_contexts
from pathlib import Path
save_case(Path(sys.argv[1]), half_mlp(), recurrent_spec(12), recurrent_contexts(16, s=3))
PY
C="python3 -m tqs_onnx.cli"
$C sweep $d/m.onnx --rollout $d/m.rollout.json --contexts $d/m.npz -o $d/s.json --device cuda 2>&1 | tail -7
$C allocate $d/s.json --compression 1.8 -o $d/p.json --verify-model $d/m.onnx --rollout $d/m.rollout.json --contexts $d/m.npz --device cuda 2>&1 | tail -5
$C apply $d/m.onnx $d/p.json -o $d/q.onnx --rollout $d/m.rollout.json --contexts $d/m.npz --device cuda 2>&1 | tail -3
$C eval $d/m.onnx $d/q.onnx --rollout $d/m.rollout.json --contexts $d/m.npz --device cuda 2>&1 | tail -3
python3 -c "import json; print('joint check:', json.load(open('$d/p.json'))['verification']['joint_divergence'])"
