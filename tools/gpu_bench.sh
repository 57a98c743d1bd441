#!/usr/bin/env bash
# Both performance benchmarks on one CUDA GPU, in one command; every result is one JSON file in $OUT
# and is printed as it finishes.
#
#   tools/gpu_bench.sh                      # bf16, the issue's shapes (about 20-30 minutes on an H100)
#   QUICK=1 tools/gpu_bench.sh              # one repeat, fewer batches: a first look in a few minutes
#   PYTHON=.venv/bin/python OUT=/tmp/gpu-bench tools/gpu_bench.sh
#
# 1. training step (tools/bench_train.py), batch 32 x chat lengths up to 1024, bf16: our default path
#    (packed rows, logits at masked positions only, fused AdamW) against the naive padded
#    full-logits path, interleaved in one process, for ModernBERT-base and mmBERT-base sizes (random
#    init; a naive run that does not fit is reported as out_of_memory), then ours with torch.compile;
# 2. sampling (tools/bench_sample.py), a ModernBERT-base-size model (random init, EOS suppressed so
#    every row fills its canvas), 64-token prompts, 256 answer slots, batch 1, 16 and 64: the naive
#    loop, our presets (vectorised and plain step) and GPT-2 generate with its KV cache, eager, then
#    again with the encoder compiled.
# A step that fails is reported and the others still run; the exit code is the number of failures.
set -uo pipefail

PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/gpu-bench}
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
mkdir -p "$OUT"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
REPEATS=3
BATCHES=3
if [[ -n "${QUICK:-}" ]]; then REPEATS=1; BATCHES=1; fi
failures=0

run() {  # run NAME ARGS...: one benchmark, its JSON in $OUT/NAME.json
    local name=$1
    shift
    echo "== $name: $*" >&2
    if "$PYTHON" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"; then
        cat "$OUT/$name.json"
    else
        echo "== $name FAILED (see $OUT/$name.err)" >&2
        tail -5 "$OUT/$name.err" >&2
        failures=$((failures + 1))
    fi
}

TRAIN=(--device cuda --precision bf16 --batch 32 --max-length 1024 --batches "$BATCHES" --repeats "$REPEATS")
run train_modernbert-base tools/bench_train.py --size modernbert-base "${TRAIN[@]}"
run train_mmbert-base tools/bench_train.py --size mmbert-base "${TRAIN[@]}"
run train_modernbert-base_compiled tools/bench_train.py --size modernbert-base "${TRAIN[@]}" --compile \
    --variants ours
run train_mmbert-base_compiled tools/bench_train.py --size mmbert-base "${TRAIN[@]}" --compile --variants ours

SAMPLE=(--scratch modernbert-base --device cuda --precision bf16 --batch-sizes 1 16 64 --prompts 4
        --repeats "$REPEATS")
run sample_eager tools/bench_sample.py "${SAMPLE[@]}"
run sample_compiled tools/bench_sample.py "${SAMPLE[@]}" --compile --variants naive greedy fast gpt2

echo "== done: $failures failed; JSON in $OUT" >&2
exit "$failures"
