#!/usr/bin/env bash
# One-shot GPU check: on a machine with an NVIDIA GPU, CUDA PyTorch and no network, in under 10 minutes,
#   1. install the packed onnxruntime-gpu wheel and the service's wheels (../shared/tools/README.md),
#   2. bench/engine.py on CUDA: EAT-base fp32 and fp16, batch 1-256, IO binding (and PyTorch eager),
#   3. bench/load.py: the service on CUDA with the fp16 file from step 2 against its own engine,
#   4. bench/train_throughput.py: bf16 pre-training + fine-tuning steps, torch.compile off, then on,
# and write every JSON (plus the two plots, a log and a summary) under the output folder.
# Each step runs under its own time limit taken from one overall budget; a step that fails or runs
# out of time is recorded in gpu_check.json and the next one still runs.
#
# Usage (from the project root): bash bench/gpu_check.sh [--pack DIR] [--out DIR] [options]; -h for all.
# Exit codes: 0 all steps passed, 1 some step failed, 2 bad arguments, 3 no GPU / no CUDA PyTorch here,
# 4 the pack is missing, incomplete or gives no CUDA provider.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: bash bench/gpu_check.sh [--pack DIR] [--out DIR] [--python PY] [--site DIR] [--budget-s N] [--dry-run]

  --pack DIR     the device pack: ort1..ortN/ (wheel parts + ort-wheel-name) and deps/ as
                 ../shared/tools/device-pack.sh writes them, or all of it flat in one folder
                 (part-*, ort-wheel-name, *.whl) as its README copies it (default: .devicepack)
  --out DIR      where the JSON goes (default: $OUT)
  --python PY    the Python that holds CUDA PyTorch (default: python3)
  --site DIR     where the wheels are installed, put first on PYTHONPATH (default: /tmp/eat-gpu-site)
  --budget-s N   seconds for the whole check, install included (default: 570, under 10 minutes)
  --dry-run      print the steps and their time limits, check nothing, run nothing
  -h, --help     this text
EOF
}

die() { echo "gpu_check: $2" >&2; exit "$1"; }

pack=.devicepack
out=${OUT:-}
py=python3
site=/tmp/eat-gpu-site
budget_s=570
dry_run=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --pack | --out | --python | --site | --budget-s)
      (($# >= 2)) || die 2 "$1 needs a value"
      case $1 in
        --pack) pack=$2 ;; --out) out=$2 ;; --python) py=$2 ;; --site) site=$2 ;; --budget-s) budget_s=$2 ;;
      esac
      shift 2 ;;
    *) usage >&2; die 2 "unknown argument: $1" ;;
  esac
done
[[ $budget_s =~ ^[0-9]+$ ]] && ((budget_s >= 120)) || die 2 "--budget-s must be a whole number of seconds >= 120"
[[ -n $out ]] || die 2 "no output folder: set OUT or pass --out DIR"
out=$(realpath -m "$out")  # the benches run from the project root
pack=$(realpath -m "$pack")

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
batches=1,2,4,8,16,32,64,128,256
models=$out/models  # the engine bench keeps its files here for the load bench; not copied back
# Step name, its share of the budget (seconds at the default 570), and its command.
steps=(
  "engine_cuda|200|$py bench/engine.py --models base --providers cuda --precisions fp32,fp16 --batch-sizes $batches --repeats 5 --warmup 2 --keep-models $models --out $out/engine_cuda.json"
  "load_cuda|110|$py bench/load.py --model $models/eat-base-fp16.onnx --concurrency 1,4,16,64 --seconds 8 --max-batch 32 --out $out/load_cuda.json"
  "train_bf16_eager|70|$py bench/train_throughput.py --device cuda --dtype bf16 --which both --steps 10 --warmup-steps 2 --out $out/train_bf16_eager.json"
  "train_bf16_compile|160|$py bench/train_throughput.py --device cuda --dtype bf16 --which both --steps 10 --warmup-steps 3 --compile --out $out/train_bf16_compile.json"
)
install_s=30  # the rest of the default budget

if ((dry_run)); then
  echo "install: pack $pack -> $site (limit ${install_s} s)"
  for step in "${steps[@]}"; do
    IFS='|' read -r name share cmd <<<"$step"
    echo "$name (limit $((share * budget_s / 570)) s): $cmd"
  done
  exit 0
fi

# ------------------------------------------------------------------ refuse cleanly without a GPU
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 ||
  die 3 "no NVIDIA GPU here (nvidia-smi is missing or sees no device); nothing was installed or run"
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 ||
  die 3 "$py has no CUDA PyTorch (torch.cuda.is_available() is false); nothing was installed or run"

started=$(date +%s)
mkdir -p "$out" "$models" || die 2 "cannot create $out"
log=$out/gpu_check.log
: >"$log"

# ------------------------------------------------------------------ install the pack
[[ -d $pack ]] || die 4 "no device pack at $pack (run ../shared/tools/device-pack.sh where there is network)"
shopt -s nullglob
parts=("$pack"/part-* "$pack"/ort*/part-*)
wheel_name_file=$(ls "$pack"/ort-wheel-name "$pack"/ort1/ort-wheel-name 2>/dev/null | head -n 1)
deps=("$pack"/*.whl "$pack"/deps/*.whl)
shopt -u nullglob
((${#parts[@]})) && [[ -n $wheel_name_file ]] || die 4 "$pack holds no onnxruntime-gpu parts (part-*) or no ort-wheel-name"
wheel_dir=$(mktemp -d)
wheel=$wheel_dir/$(cat "$wheel_name_file")
# Parts are named part-0, part-1, ... in order; sort by that number whatever folder holds them.
printf '%s\n' "${parts[@]}" | awk -F'part-' '{print $NF "\t" $0}' | sort -n | cut -f2- | xargs cat >"$wheel"
"$py" -m zipfile -t "$wheel" >>"$log" 2>&1 || die 4 "the joined wheel is not a valid zip: is a part missing? (${#parts[@]} found)"
timeout "$install_s" "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" "${deps[@]}" >>"$log" 2>&1 ||
  die 4 "pip could not install the pack into $site (see $log)"
rm -rf "$wheel_dir"
export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
export EAT_PROVIDER=cuda  # the service must fail at start-up rather than fall back to the CPU
"$py" -c '
import onnxruntime as ort, sys
ort.preload_dlls()
sys.exit(0 if "CUDAExecutionProvider" in ort.get_available_providers() else 1)' >>"$log" 2>&1 ||
  die 4 "onnxruntime from the pack has no CUDAExecutionProvider (see $log)"

# ------------------------------------------------------------------ the benches
cd "$root" || die 2 "cannot enter $root"
summary=()
failed=0
for step in "${steps[@]}"; do
  IFS='|' read -r name share cmd <<<"$step"
  left=$((budget_s - ($(date +%s) - started)))
  limit=$((share * budget_s / 570))
  ((limit > left - 5)) && limit=$((left - 5))
  if ((limit < 20)); then
    summary+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"budget spent\"}")
    failed=1
    continue
  fi
  echo "== $name (limit $limit s): $cmd" | tee -a "$log"
  t0=$(date +%s)
  # shellcheck disable=SC2086  # the command line is ours, split on spaces on purpose
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" $cmd >>"$log" 2>&1
  rc=$?
  seconds=$(($(date +%s) - t0))
  ((rc == 0)) || failed=1
  timed_out=false
  ((rc == 124 || rc == 137)) && timed_out=true
  echo "   rc $rc in $seconds s" | tee -a "$log"
  summary+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $seconds, \"limit_s\": $limit, \"timed_out\": $timed_out}")
done
rm -rf "$models"  # the ONNX files are large and can be rebuilt; only results go back

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
ort_version=$("$py" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null)
torch_version=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)
{
  echo "{"
  echo "  \"gpu\": \"$gpu\", \"onnxruntime\": \"$ort_version\", \"torch\": \"$torch_version\","
  echo "  \"budget_s\": $budget_s, \"total_s\": $(($(date +%s) - started)),"
  echo "  \"steps\": ["
  for i in "${!summary[@]}"; do
    sep=,
    ((i == ${#summary[@]} - 1)) && sep=
    echo "    ${summary[$i]}$sep"
  done
  echo "  ]"
  echo "}"
} >"$out/gpu_check.json"
echo "wrote $out/gpu_check.json"
exit "$failed"
