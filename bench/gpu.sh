#!/usr/bin/env bash
# The bench/run.sh table on one CUDA GPU, in half precision, as one call of the device machine
# (about 8 minutes at most). Writes $OUT/bench.md (and results.jsonl, logs).
#
# Prepare here (CPU machine), then carry the three paths:
#   cargo build --release && strip target/release/dreampipe target/release/dreampipe-torch   # carry limit: 64 MiB in all
#   bench/gpu.sh --prepare                    # bench/.wheels: diffusers, transformers + deps (cp312)
#   run: bash bench/gpu.sh   carry: ["target/release/dreampipe", "target/release/dreampipe-torch", "bench/.wheels"]
#
# On the device machine it uses the machine's PyTorch 2.11 (/opt/torch/.venv, Python 3.12) for
# both sides: its torch/lib goes on LD_LIBRARY_PATH, where dreampipe's dlopen of
# libtorch_cuda.so finds the CUDA backend, and the carried wheels are installed with
# pip --no-index --target into a scratch folder on PYTHONPATH.
# Knobs: GPU_DTYPE (f16|bf16, default f16), GPU_BUDGET_S (default 450: later cases are skipped
# when the elapsed time passes it), GPU_CASES (default: sd15-txt2img tiny-txt2img
# sd15-dreambooth sd15half-dreambooth tiny-dreambooth), TORCH_VENV.
# Dry run of the script's flow on a CPU machine (fake nvidia-smi on PATH, CPU device):
#   GPU_DEVICE=cpu GPU_MODELS=bench/.models GPU_PYTHON_VERSION=3.11 TORCH_VENV=bench/.venv \
#   GPU_WHEELS=/tmp/wheels311 GPU_CASES="tiny-txt2img tiny-dreambooth" OUT=/tmp/gpu-dry bash bench/gpu.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_WHEELS:-$ROOT/bench/.wheels}
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
PINNED=(diffusers==0.42.1 transformers==5.24.0 safetensors)

prepare() {
    # Wheels for the device machine's Python; torch itself is the machine's.
    rm -rf "$WHEELS"
    python3 -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
        --python-version "$PYTHON_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "${PINNED[@]}"
    # The carry limit is 64 MiB with the binary: drop the dependencies that the benchmark never
    # imports (huggingface_hub's CLI and Xet download stack, pydantic), keeping what an
    # import trace of diffusers_bench.py txt2img + dreambooth showed.
    local unused
    for unused in hf_xet pygments rich typer click markdown_it_py mdurl shellingham pydantic \
        pydantic_core annotated_doc annotated_types typing_inspection importlib_metadata zipp fsspec; do
        rm -f "$WHEELS/$unused"-*.whl
    done
    du -sh "$WHEELS"
}

if [ "${1:-}" = "--prepare" ]; then
    prepare
    exit $?
fi

OUT=${OUT:?the device machine sets OUT}
TORCH_VENV=${TORCH_VENV:-/opt/torch/.venv}
PY=$TORCH_VENV/bin/python
TORCH_LIB=$TORCH_VENV/lib/python$PYTHON_VERSION/site-packages/torch/lib
DTYPE=${GPU_DTYPE:-f16}
BUDGET_S=${GPU_BUDGET_S:-450}
BIN=$ROOT/target/release/dreampipe
SCRATCH=${TMPDIR:-/tmp}/dreampipe-gpu-bench
SITE=$SCRATCH/site
MODELS=${GPU_MODELS:-$SCRATCH/models}
DEVICE=${GPU_DEVICE:-cuda}
CASES=${GPU_CASES:-sd15-txt2img tiny-txt2img sd15-dreambooth sd15half-dreambooth tiny-dreambooth}
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DREAMPIPE_TORCH_CUDA_LIB=$TORCH_LIB/libtorch_cuda.so
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
THREADS=$(nproc)
export OMP_NUM_THREADS=$THREADS

log() { echo "[gpu $(date +%H:%M:%S) +$SECONDS s] $*" | tee -a "$LOG" >&2; }
over_budget() { [ "$SECONDS" -ge "$BUDGET_S" ]; }
wanted() { [[ " $CASES " == *" $1 "* ]]; }

setup() {
    mkdir -p "$OUT" "$SITE" "$MODELS"
    : >"$RESULTS"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        # A venv made without pip: a wheel is a zip of its site-packages files.
        log "pip unavailable or failed; unpacking the wheels into $SITE"
        "$PY" -c "
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])" "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 \
            || { log "cannot unpack the carried wheels (see log.txt)"; return 1; }
    fi
    export PYTHONPATH=$SITE
    "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
    "$BIN" --device "$DEVICE" doctor 2>&1 | tee -a "$LOG"
}

# Runs a command that prints one JSON line, sampling the GPU's used memory meanwhile; appends the
# line with "peak_memory_mib" (max over samples, whole GPU: both sides measured the same way).
with_gpu_peak() {
    local samples=$SCRATCH/memory.txt line
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$samples" 2>/dev/null &
    local sampler=$!
    line=$("$@" 2>>"$LOG" | tail -n 1)
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    if [ -z "$line" ]; then
        log "FAILED: $*"
        return 1
    fi
    echo "$line" | "$PY" -c "
import json, sys
record = json.loads(sys.stdin.read())
values = [float(v) for v in open(sys.argv[1]).read().split() if v.strip()]
record['peak_memory_mib'] = max(values) if values else None
print(json.dumps(record))" "$samples" | tee -a "$RESULTS"
}

# One case on both sides: $1 = verb, rest = shared arguments.
both() {
    local verb=$1
    shift
    if over_budget; then
        log "skipped (time budget): $verb $*"
        return
    fi
    log "dreampipe $verb $*"
    with_gpu_peak "$BIN" --device "$DEVICE" bench "$verb" --threads "$THREADS" "$@"
    log "diffusers $verb $*"
    with_gpu_peak "$PY" "$ROOT/bench/diffusers_bench.py" "$verb" --device "$DEVICE" --threads "$THREADS" "$@"
}

models() {
    TINY=$ROOT/models/tiny-sd
    SD15=$MODELS/sd15
    SD15_HALF=$MODELS/sd15-half
    [ -f "$SD15/unet/diffusion_pytorch_model.safetensors" ] \
        || "$BIN" --device cpu model init --like sd15 --seed 0 --out "$SD15" >>"$LOG" 2>&1 \
        || { log "model init failed"; return 1; }
    "$PY" "$ROOT/bench/diffusers_bench.py" make-scaled --source "$SD15" --out "$SD15_HALF" --width-scale 0.5 >>"$LOG" 2>&1
    log "models ready"
}

main() {
    setup || return 1
    models || return 1
    if wanted sd15-txt2img; then
        both txt2img --model "$SD15" --label sd15 --size 512 --batch 1 --steps 20 --dtype "$DTYPE"
        both txt2img --model "$SD15" --label sd15 --size 512 --batch 4 --steps 20 --dtype "$DTYPE"
    fi
    if wanted tiny-txt2img; then
        both txt2img --model "$TINY" --label tiny --batch 1 --steps 20 --dtype "$DTYPE"
        both txt2img --model "$TINY" --label tiny --batch 4 --steps 20 --dtype "$DTYPE"
    fi
    # Training runs in float32 on both sides (no autocast), at SD's 512 px.
    if wanted sd15-dreambooth; then
        both dreambooth --model "$SD15" --label sd15 --resolution 512 --steps 5
        both dreambooth --model "$SD15" --label sd15 --resolution 512 --steps 5 --train-text-encoder
    fi
    if wanted sd15half-dreambooth; then
        both dreambooth --model "$SD15_HALF" --label sd15-half --resolution 512 --steps 5
    fi
    if wanted tiny-dreambooth; then
        both dreambooth --model "$TINY" --label tiny --resolution 64 --steps 10
        both dreambooth --model "$TINY" --label tiny --resolution 64 --steps 10 --train-text-encoder
    fi
    "$PY" "$ROOT/bench/report.py" "$RESULTS" --title "dreampipe vs diffusers, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
        --note "txt2img in $DTYPE; DreamBooth in float32 without autocast on both sides; host threads $THREADS" \
        --note "peak memory: max of nvidia-smi memory.used sampled every 100 ms during each process (whole GPU)" \
        --note "models generated on the device: sd15 = dreampipe model init --like sd15; sd15-half = UNet widths halved" \
        >"$OUT/bench.md"
    log "done"
}

main
cat "$OUT/bench.md" 2>/dev/null
