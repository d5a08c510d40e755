#!/usr/bin/env bash
# Time and peak memory of the `evaluate` stage per 100 images on the CPU, next to transformers
# doing the same embeddings with the same threads (bench/evaluate_transformers.py).
#   bench/evaluate.sh [THREADS] [PYTHON]     (PYTHON: torch 2.11.0 + transformers 5.24.0)
# Makes random-weight ViT-L/14 CLIP and ViT-S/16 DINO folders (`model init`), 100 random 512x512
# images and 5 "real" 600x450 ones in a temporary folder; scores them with a one-stage pipeline.
set -euo pipefail
threads=${1:-2}
python=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${DREAMPIPE:-$root/target/release/dreampipe}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" - "$work" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
work = Path(sys.argv[1]); rng = np.random.default_rng(0)
for name, count, size in [("gen", 100, (512, 512)), ("real", 5, (450, 600))]:
    (work / name).mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(work / name / f"{i:04d}.png")
PY
"$bin" model init --like clip-l14 --out "$work/clip" >/dev/null
"$bin" model init --like dino-s16 --out "$work/dino" >/dev/null
cat > "$work/eval.yaml" <<YAML
stages:
  eval:
    kind: evaluate
    generated: gen
    prompt: a photo of sks dog
    identifier: sks
    real: real
    clip_model: clip
    dino_model: dino
    batch_size: 16
YAML
start=$(date +%s.%N)
OMP_NUM_THREADS=$threads /usr/bin/time -f "dreampipe peak RSS %M KiB" \
  "$bin" --device cpu --cache "$work/cache" run --plain "$work/eval.yaml" >/dev/null
end=$(date +%s.%N)
echo "dreampipe: evaluate of 100 images (load, 5 real + 100 generated embeddings, scores) $(echo "$end - $start" | bc) s"
OMP_NUM_THREADS=$threads "$python" "$root/bench/evaluate_transformers.py" "$work/clip" "$work/dino" "$work/gen" "$threads" 16
