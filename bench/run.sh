#!/usr/bin/env bash
# dreampipe vs diffusers on the CPU, same weights, same thread count. One command:
#
#   bench/run.sh            # from anywhere; prints the markdown table, also in bench/out/bench.md
#
# What it does (each step is skipped when its result is already there):
#   1. bench/.venv: python3 venv with torch==2.11.0 diffusers==0.42.1 transformers==5.24.0
#      safetensors from PyPI (the reference side).
#   2. cargo build --release (LIBTORCH defaults to ~/.cache/dreampipe/libtorch-2.11.0-cpu).
#   3. Model folders in bench/.models (gitignored): sd15 = `dreampipe model init --like sd15`
#      (random weights, real SD 1.5 configs); sd15-half = the same with the UNet's channel widths
#      halved (diffusers_bench.py make-scaled: an SD-shaped model that trains in 24 GiB);
#      tiny = models/tiny-sd from the repo.
#   4. Runs every case once per implementation (dreampipe first, then diffusers, one process
#      each so peak memory is per case) and appends the JSON lines to bench/out/results.jsonl.
#   5. bench/report.py turns them into the table (ratios dreampipe / diffusers).
#
# Environment knobs: BENCH_THREADS (intra-op threads on both sides; default 1: on a shared or
# busy machine two OpenMP threads wait on each other at every op and the times swing by 5-10x,
# one thread gives stable ratios; use BENCH_THREADS=$(nproc) on an idle machine), BENCH_MODELS,
# BENCH_OUT, BENCH_ONLY (space-separated case names to run, e.g. "tiny-txt2img"; default all:
# tiny-txt2img sd15-txt2img tiny-dreambooth sd15half-dreambooth dreambooth-bf16 runner
# sdxl-tiny-txt2img; on request only: sdxl-txt2img, SDXL base's shapes at 256 px, which writes a
# 10 GB random-weight model into BENCH_MODELS and needs ~14 GB of memory per side;
# dreambooth-bf16 = the two DreamBooth cases with `--mixed-precision bf16` on both sides, i.e.
# autocast for the trained modules), BENCH_REPEAT (runs of
# each case per side, alternating; the table shows each side's fastest run; default 1),
# PYTHON (for the venv). Once the venv, the build and the models exist, the cases take about
# 6 minutes with 1 thread on a quiet 2-core machine (6 min 19 s measured on 2026-11-26),
# times BENCH_REPEAT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
THREADS=${BENCH_THREADS:-1}
MODELS=${BENCH_MODELS:-$ROOT/bench/.models}
OUT=${BENCH_OUT:-$ROOT/bench/out}
VENV=$ROOT/bench/.venv
ONLY=${BENCH_ONLY:-tiny-txt2img sd15-txt2img tiny-dreambooth sd15half-dreambooth dreambooth-bf16 runner sdxl-tiny-txt2img}
REPEAT=${BENCH_REPEAT:-1}
export LIBTORCH=${LIBTORCH:-$HOME/.cache/dreampipe/libtorch-2.11.0-cpu}
# Pin every thread pool both libraries might use to the same count.
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
wanted() { [[ " $ONLY " == *" $1 "* ]]; }

ensure_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch, diffusers, transformers, safetensors, peft" 2>/dev/null; then
        return
    fi
    log "creating $VENV (torch 2.11.0, diffusers 0.42.1, transformers 5.24.0, peft 0.21.2 from PyPI)"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch==2.11.0 diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 safetensors
}

ensure_binary() {
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet)
    BIN=$ROOT/target/release/dreampipe
}

ensure_models() {
    mkdir -p "$MODELS"
    TINY=$ROOT/models/tiny-sd
    SD15=$MODELS/sd15
    SD15_HALF=$MODELS/sd15-half
    if ! [ -f "$SD15/unet/diffusion_pytorch_model.safetensors" ]; then
        log "dreampipe model init --like sd15 --out $SD15"
        "$BIN" --device cpu model init --like sd15 --seed 0 --out "$SD15" >&2
    fi
    if ! [ -f "$SD15_HALF/unet/diffusion_pytorch_model.safetensors" ]; then
        log "making $SD15_HALF (sd15 UNet at half width)"
        "$VENV/bin/python" "$ROOT/bench/diffusers_bench.py" make-scaled --source "$SD15" --out "$SD15_HALF" --width-scale 0.5 >&2
    fi
}

# Runs one case on both sides: $1 = dreampipe bench verb, rest = shared arguments.
both() {
    local verb=$1
    shift
    for run in $(seq "$REPEAT"); do
        log "dreampipe bench $verb $* (run $run/$REPEAT)"
        "$BIN" --device cpu bench "$verb" --threads "$THREADS" "$@" | tee -a "$RESULTS" >&2
        log "diffusers_bench.py $verb $* (run $run/$REPEAT)"
        "$VENV/bin/python" "$ROOT/bench/diffusers_bench.py" "$verb" --device cpu --threads "$THREADS" "$@" \
            | tee -a "$RESULTS" >&2
    done
}

# Mean and min wall seconds of a command run N times, as a runner record.
time_runs() {
    local what=$1 runs=$2
    shift 2
    local times=()
    for _ in $(seq "$runs"); do
        local start end
        start=$(date +%s.%N)
        "$@" >/dev/null
        end=$(date +%s.%N)
        times+=("$(echo "$end - $start" | bc -l)")
    done
    printf '%s\n' "${times[@]}" | "$VENV/bin/python" -c "
import json, sys
values = [float(v) for v in sys.stdin.read().split()]
print(json.dumps({'bench': 'runner', 'impl': 'dreampipe', 'what': sys.argv[1], 'runs': len(values),
                  'mean_s': sum(values) / len(values), 'min_s': min(values)}))" "$what" | tee -a "$RESULTS" >&2
}

runner_overhead() {
    time_runs "process start (dreampipe --version)" 10 "$BIN" --version
    # The runner's demo pipeline (CPU-only stages; from the runner branch).
    local demo=${BENCH_DEMO_PIPELINE:-$ROOT/pipelines/examples/runner-tour.yaml}
    if "$BIN" plan --help >/dev/null 2>&1 && [ -f "$demo" ]; then
        local cache=$OUT/runner-cache
        "$BIN" --cache "$cache" run "$demo" >&2
        time_runs "start + plan of $(basename "$demo"), all cached" 10 "$BIN" --cache "$cache" plan "$demo"
        time_runs "start + run of $(basename "$demo"), all cached" 10 "$BIN" --cache "$cache" run "$demo"
    else
        log "no 'plan' verb or no demo pipeline ($demo): runner plan overhead not measured"
    fi
}

versions_record() {
    local torch_version diffusers_version
    torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
    diffusers_version=$("$VENV/bin/python" -c "import diffusers, transformers; print(diffusers.__version__, transformers.__version__)")
    echo "{\"bench\": \"versions\", \"impl\": \"diffusers\", \"versions\": \"torch $torch_version, diffusers/transformers $diffusers_version\"}" >>"$RESULTS"
    echo "{\"bench\": \"versions\", \"impl\": \"dreampipe\", \"versions\": \"$("$BIN" --version), libtorch $(basename "$LIBTORCH")\"}" >>"$RESULTS"
}

main() {
    mkdir -p "$OUT"
    RESULTS=$OUT/results.jsonl
    : >"$RESULTS"
    ensure_venv
    ensure_binary
    ensure_models
    versions_record
    local started=$SECONDS
    if wanted tiny-txt2img; then
        for batch in 1 4; do
            both txt2img --model "$TINY" --label tiny --batch "$batch" --steps 20
        done
    fi
    if wanted tiny-dreambooth; then
        both dreambooth --model "$TINY" --label tiny --resolution 64 --steps 10
        both dreambooth --model "$TINY" --label tiny --resolution 64 --steps 10 --train-text-encoder
        both dreambooth --model "$TINY" --label tiny --resolution 64 --steps 10 --lora-rank 4
    fi
    if wanted sd15-txt2img; then
        both txt2img --model "$SD15" --label sd15 --size 256 --batch 1 --steps 3 --warmup-steps 1
    fi
    if wanted sd15half-dreambooth; then
        both dreambooth --model "$SD15_HALF" --label sd15-half --resolution 256 --steps 2
        both dreambooth --model "$SD15_HALF" --label sd15-half --resolution 256 --steps 2 --train-text-encoder
        both dreambooth --model "$SD15_HALF" --label sd15-half --resolution 256 --steps 2 --lora-rank 4
    fi
    if wanted dreambooth-bf16; then
        for te in "" --train-text-encoder; do
            both dreambooth --model "$TINY" --label tiny --resolution 64 --steps 10 --mixed-precision bf16 $te
            both dreambooth --model "$SD15_HALF" --label sd15-half --resolution 256 --steps 2 --mixed-precision bf16 $te
        done
    fi
    if wanted sd15-txt2img; then
        both txt2img --model "$SD15" --label sd15 --size 256 --batch 4 --steps 2 --warmup-steps 1
    fi
    if wanted sdxl-tiny-txt2img; then
        both txt2img --model "$ROOT/models/tiny-sdxl" --label sdxl-tiny --batch 1 --steps 20
    fi
    if wanted sdxl-txt2img; then   # not in the default list: writes a 10 GB model, ~14 GB per side
        if ! [ -f "$MODELS/sdxl/unet/diffusion_pytorch_model.safetensors" ]; then
            "$BIN" --device cpu model init --like sdxl --seed 0 --out "$MODELS/sdxl" >&2
        fi
        both txt2img --model "$MODELS/sdxl" --label sdxl --size 256 --batch 1 --steps 3 --warmup-steps 1
    fi
    if wanted runner; then
        runner_overhead
    fi
    log "cases took $((SECONDS - started)) s"
    python3 "$ROOT/bench/report.py" "$RESULTS" --title "dreampipe vs diffusers, CPU ($(nproc) cores)" \
        --note "same weights on both sides: models/tiny-sd, bench/.models/sd15 (dreampipe model init --like sd15), bench/.models/sd15-half" \
        --note "sd15-half: SD 1.5 UNet layout with block_out_channels halved (160/320/640/640), full SD 1.5 VAE and CLIP text encoder" \
        --note "the dreampipe DreamBooth step is built in src/bench/dreambooth.rs from sd::train building blocks, mirroring train_dreambooth.py" \
        >"$OUT/bench.md"
    cat "$OUT/bench.md"
}

main "$@"
