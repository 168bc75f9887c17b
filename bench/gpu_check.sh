#!/usr/bin/env bash
# What CI cannot check, on a machine with a GPU: one command, a table ready for bench/RESULTS.md.
#
#   pip install torch==<a CUDA build> && pip install -e ".[bench,onnx]" && bash bench/gpu_check.sh
#
# 1. the smoke preset on cuda with --amp auto, bf16 and fp16 (GradScaler): trains, finite losses,
#    KorSTS test figures in the usual range of the tiny model (~60 cosine Spearman)
# 2. evaluate.py on cuda (TF32) against evaluate.py on cpu for the same checkpoint: same figures
#    and evaluate.py on cuda with --dtype bfloat16 and float16 beside float32: the figures each costs, the speed
# 3. with 2+ GPUs: the same run under torchrun on 2 GPUs with NCCL
# 4. training throughput of the DeBERTa-v2-base shape, kfdeb (bf16) vs the reference old_fit (fp16
#    AMP), 50 steps each, one after the other
# Everything goes to $WORK (default: a fresh temporary folder); nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d -t kfdeb-gpu-check-XXXX)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rows=()
fail=0

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device (torch $(python -c 'import torch; print(torch.__version__)')); nothing to check" >&2
  exit 2
fi
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
describe=$(python -c "
import torch
p = torch.cuda.get_device_properties(0)
print(f'{torch.cuda.device_count()} x {p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB), '
      f'torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}')")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

# test figures and the startup line of a finished run
summary() {  # $1: output dir, $2: log
  python - "$1" "$2" <<'EOF'
import json, re, sys
from pathlib import Path
meta = json.loads((Path(sys.argv[1]) / "best" / "kfdeb.json").read_text())
log = Path(sys.argv[2]).read_text()
amp = re.search(r"amp (.*)", log)
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
rates = [r["examples_per_s"] for r in rows if "examples_per_s" in r]
print(f"{meta['test']['cosine_pearson']:.2f} / {meta['test']['cosine_spearman']:.2f} | "
      f"{sum(rates) / len(rates):.0f} ex/s | {amp.group(1) if amp else '?'}")
EOF
}

train_row() {  # $1: label, $2...: command
  local label=$1; shift
  local out=$WORK/$label log=$WORK/$label.log start end
  start=$(date +%s)
  if "$@" --output_dir "$out" --progress false >"$log" 2>&1; then
    end=$(date +%s)
    rows+=("| $label | ok | $((end - start)) s | $(summary "$out" "$log") |")
  else
    rows+=("| $label | FAILED (see $log) | | | | |"); fail=1
    tail -5 "$log" >&2
  fi
}

train_row "smoke cuda amp auto" python train.py --preset smoke --device cuda --amp auto
train_row "smoke cuda bf16" python train.py --preset smoke --device cuda --amp bf16
train_row "smoke cuda fp16" python train.py --preset smoke --device cuda --amp fp16
if [ "$gpus" -ge 2 ]; then
  train_row "smoke 2 GPUs NCCL bf16" python -m torch.distributed.run --nproc_per_node=2 train.py --preset smoke --amp bf16
else
  rows+=("| smoke 2 GPUs NCCL | not run: $gpus GPU | | | | |")
fi

eval_rows=()
if [ -f "$WORK/smoke cuda bf16/best/kfdeb.json" ]; then
  for device in cuda cpu; do
    if python evaluate.py "$WORK/smoke cuda bf16" --device "$device" --json "$WORK/eval-$device.json" >"$WORK/eval-$device.log" 2>&1; then
      eval_rows+=("| evaluate.py on $device | $(grep -o 'encoded.*' "$WORK/eval-$device.log") |")
    else
      eval_rows+=("| evaluate.py on $device | FAILED (see $WORK/eval-$device.log) |"); fail=1
    fi
  done
  gap=$(python -c "
import json
a, b = (json.load(open('$WORK/eval-' + d + '.json')) for d in ('cuda', 'cpu'))
print(f'{max(abs(a[k] - b[k]) for k in a):.4f}')" 2>/dev/null || echo "?")
  eval_rows+=("| max difference cuda (TF32) vs cpu, 8 figures x100 | $gap |")
  for dtype in bfloat16 float16; do  # inference dtypes on the GPU (issue 35): figures against cuda float32's
    if python evaluate.py "$WORK/smoke cuda bf16" --device cuda --dtype "$dtype" --json "$WORK/eval-$dtype.json" \
        >"$WORK/eval-$dtype.log" 2>&1; then
      gap=$(python -c "
import json
a, b = (json.load(open('$WORK/eval-' + d + '.json')) for d in ('cuda', '$dtype'))
print(f'{max(abs(a[k] - b[k]) for k in a):.4f}')" 2>/dev/null || echo "?")
      eval_rows+=("| evaluate.py on cuda --dtype $dtype | $(grep -o 'encoded.*' "$WORK/eval-$dtype.log"); max difference to float32, 8 figures x100: $gap |")
    else
      eval_rows+=("| evaluate.py on cuda --dtype $dtype | FAILED (see $WORK/eval-$dtype.log) |"); fail=1
    fi
  done
fi

python bench/train_vs_reference.py --model deberta-base-random --device cuda --amp bf16 --reference_amp \
  --max_steps 50 --reps 1 >"$WORK/throughput.log" 2>&1 || { echo "throughput bench failed: $WORK/throughput.log" >&2; fail=1; }

echo
echo "## $(date -u +%F) — GPU check, commit $commit"
echo
echo "Machine: $describe. Command: \`bash bench/gpu_check.sh\` (logs in $WORK)."
echo
echo "| run | status | wall | KorSTS test cos Pearson / Spearman | mean examples/s | amp (startup line) |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "| evaluation | result |"
echo "|---|---|"
printf '%s\n' "${eval_rows[@]}"
echo
echo "Throughput, DeBERTa-v2-base shape (bench/train_vs_reference.py, 50 steps):"
echo
grep -E '^\|' "$WORK/throughput.log" || tail -5 "$WORK/throughput.log"
exit $fail
