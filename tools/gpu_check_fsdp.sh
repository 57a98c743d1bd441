#!/usr/bin/env bash
# FSDP end to end on a GPU machine, in one command: train, resume, validate, export, generate.
#
#   tools/gpu_check_fsdp.sh                 # all GPUs of this machine (1 is enough), bf16-mixed
#   DEVICES=2 OUT=/tmp/fsdp-check tools/gpu_check_fsdp.sh
#   ACCELERATOR=cpu DEVICES=2 PRECISION=32-true tools/gpu_check_fsdp.sh   # the same steps on CPU (gloo)
#
# The model is the demo recipe's (a small ModernBERT from a config, the bundled tokenizer, the
# chatterbot dialogs: no download), with an EMA, sharded by diffusion_lm.distributed.EncoderFSDPStrategy:
#   1. sharded checkpoints: fit 30 steps (last.ckpt is a folder of shards), resume from `last` to 60
#      (the resumed run must start at step 30), validate the last checkpoint folder, export it
#      (EMA and trained weights), generate from the export;
#   2. full checkpoints (state_dict_type: full, one .ckpt file; GPU only): fit 20 steps, resume to
#      30, export the file.
# Every step must exit 0; the last line is "FSDP CHECK PASSED" and the summary is in $OUT/summary.txt.
set -euo pipefail

PYTHON=${PYTHON:-python}
ACCELERATOR=${ACCELERATOR:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
OUT=${OUT:-runs/fsdp-check}
if [[ -z "${DEVICES:-}" ]]; then
    DEVICES=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
HERE=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$OUT"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
say() { echo "== $*" | tee -a "$SUMMARY"; }

common=(
    --config "$HERE/configs/demo.yaml"
    --trainer.accelerator="$ACCELERATOR" --trainer.devices="$DEVICES" --trainer.precision="$PRECISION"
    --trainer.val_check_interval=10 --trainer.limit_val_batches=2 --trainer.log_every_n_steps=5
    --trainer.enable_progress_bar=false
    --trainer.callbacks+=diffusion_lm.ema.EMA --trainer.callbacks.decay=0.9
)
last_step() {  # global_step of a checkpoint file or sharded folder
    "$PYTHON" - "$1" <<'EOF'
import sys, torch
from pathlib import Path
p = Path(sys.argv[1])
meta = torch.load(p / "meta.pt" if p.is_dir() else p, map_location="cpu", weights_only=False)
print(meta["global_step"])
EOF
}

say "$(date -Is) $("$PYTHON" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
say "devices=$DEVICES accelerator=$ACCELERATOR precision=$PRECISION"

# 1. sharded checkpoints -------------------------------------------------------------------------
S="$OUT/sharded"
say "fit 30 steps, sharded checkpoints"
"$PYTHON" -m diffusion_lm fit "${common[@]}" --config "$HERE/configs/strategy/fsdp.yaml" \
    --trainer.accelerator="$ACCELERATOR" --trainer.precision="$PRECISION" \
    --trainer.default_root_dir="$S" --trainer.max_steps=30 2>&1 | tee "$S.fit1.log" | tail -n 3
CKPT=$(ls -d "$S"/lightning_logs/version_0/checkpoints/last.ckpt)
test -f "$CKPT/meta.pt" || { echo "no sharded last.ckpt folder"; exit 1; }
say "saved $CKPT at step $(last_step "$CKPT")"

say "resume from last to 60 steps"
"$PYTHON" -m diffusion_lm fit "${common[@]}" --config "$HERE/configs/strategy/fsdp.yaml" \
    --trainer.accelerator="$ACCELERATOR" --trainer.precision="$PRECISION" \
    --trainer.default_root_dir="$S" --trainer.max_steps=60 --ckpt_path=last 2>&1 | tee "$S.fit2.log" | tail -n 3
grep -q "resuming from .* at step 30" "$S.fit2.log" || { echo "the resumed run did not start at step 30"; exit 1; }
CKPT=$(ls -td "$S"/lightning_logs/version_*/checkpoints/last.ckpt | head -n 1)
STEP=$(last_step "$CKPT")
[[ "$STEP" == 60 ]] || { echo "last checkpoint at step $STEP, expected 60"; exit 1; }
say "resumed to step $STEP: $CKPT"

say "validate the sharded checkpoint"
"$PYTHON" -m diffusion_lm validate "${common[@]}" --config "$HERE/configs/strategy/fsdp.yaml" \
    --trainer.accelerator="$ACCELERATOR" --trainer.precision="$PRECISION" \
    --trainer.default_root_dir="$S/validate" --ckpt_path="$CKPT" 2>&1 | tee "$S.validate.log" | tail -n 12
grep -E "│ +val/nelbo +│" "$S.validate.log" | tee -a "$SUMMARY" || { echo "no val/nelbo from validate"; exit 1; }

say "export the sharded checkpoint folder (EMA weights, then the trained ones)"
"$PYTHON" -m diffusion_lm export --ckpt_path "$CKPT" --output_dir "$OUT/export-ema" | tee -a "$SUMMARY"
"$PYTHON" -m diffusion_lm export --ckpt_path "$CKPT" --output_dir "$OUT/export-current" --weights current | tee -a "$SUMMARY"
grep -q '"weights": "ema"' "$OUT/export-ema/diffusion_config.json"
"$PYTHON" -m diffusion_lm generate --model "$OUT/export-ema" --prompt "Hello" --prompt "Привет!" --preset fast \
    | tee -a "$SUMMARY"

# 2. full checkpoints (gathered on rank 0; torch's FSDP cannot gather a CPU-sharded model) -----------
if [[ "$ACCELERATOR" != cpu ]]; then
    F="$OUT/full"
    say "fit 20 steps, full checkpoints"
    "$PYTHON" -m diffusion_lm fit "${common[@]}" --config "$HERE/configs/strategy/fsdp.yaml" \
        --trainer.accelerator="$ACCELERATOR" --trainer.precision="$PRECISION" \
        --trainer.strategy.state_dict_type=full --trainer.default_root_dir="$F" --trainer.max_steps=20 \
        2>&1 | tee "$F.fit1.log" | tail -n 3
    "$PYTHON" -m diffusion_lm fit "${common[@]}" --config "$HERE/configs/strategy/fsdp.yaml" \
        --trainer.accelerator="$ACCELERATOR" --trainer.precision="$PRECISION" \
        --trainer.strategy.state_dict_type=full --trainer.default_root_dir="$F" --trainer.max_steps=30 \
        --ckpt_path=last 2>&1 | tee "$F.fit2.log" | tail -n 3
    grep -q "resuming from .* at step 20" "$F.fit2.log" || { echo "the full-checkpoint run did not resume at 20"; exit 1; }
    CKPT=$(ls -td "$F"/lightning_logs/version_*/checkpoints/last.ckpt | head -n 1)
    test -f "$CKPT" || { echo "no full last.ckpt file"; exit 1; }
    say "full checkpoint $CKPT at step $(last_step "$CKPT")"
    "$PYTHON" -m diffusion_lm export --ckpt_path "$CKPT" --output_dir "$OUT/export-full" | tee -a "$SUMMARY"
fi

say "FSDP CHECK PASSED"
