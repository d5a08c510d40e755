#!/usr/bin/env bash
# A steps sweep trained once: wall time of a 3-value `max_train_steps` sweep of DreamBooth on
# the bundled tiny model (64 px, batch 1, constant schedule), shared (one run to the largest
# count, the others committed from its snapshots) against the three variants trained one by
# one (each a pipeline of its own, as before sharing). One libtorch thread, release build.
#
#   bench/steps-sweep.sh            # STEPS="50 100 200"
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=${STEPS:-50 100 200}
export LIBTORCH=${LIBTORCH:-$("$ROOT/scripts/setup-libtorch.sh")}
export OMP_NUM_THREADS=1
(cd "$ROOT" && cargo build --release -q)
WORK=$(mktemp -d /tmp/dreampipe-steps-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/pipelines/data/toy" "$WORK/photos"
pipeline() { # $1: the list of steps
    cat <<YAML
name: steps
stages:
  db:
    kind: dreambooth
    model: $ROOT/models/tiny-sd
    instance_images: photos
    instance_prompt: a photo of sks toy
    resolution: 64
    train_batch_size: 1
    learning_rate: 1.0e-4
    lr_scheduler: constant
    checkpointing_steps: 50
    matrix:
      max_train_steps: [$1]
YAML
}
seconds() { # runs dreampipe on $1 with cache $2, prints the wall time
    local start end
    start=$(date +%s.%N)
    "$ROOT/target/release/dreampipe" --device cpu --cache "$2" run "$1" --plain >"$1.log" 2>&1 \
        || { tail "$1.log"; exit 1; }
    end=$(date +%s.%N)
    echo "$end - $start" | bc
}
cd "$WORK"
pipeline "$(echo "$STEPS" | sed 's/ /, /g')" >sweep.yaml
shared=$(seconds sweep.yaml shared-cache)
separate=0 total=0
for steps in $STEPS; do
    pipeline "$steps" >"one-$steps.yaml"
    separate=$(echo "$separate + $(seconds "one-$steps.yaml" separate-cache)" | bc)
    total=$((total + steps))
done
largest=$(echo "$STEPS" | tr ' ' '\n' | sort -n | tail -1)
echo "| max_train_steps | steps trained: shared / one by one | wall: shared | wall: one by one | saved |"
echo "|---|---|---|---|---|"
printf '| %s | %d / %d | %.1f s | %.1f s | %.0f %% |\n' "$STEPS" "$largest" "$total" "$shared" \
    "$separate" "$(echo "100 * ($separate - $shared) / $separate" | bc -l)"
