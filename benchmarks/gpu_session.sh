#!/usr/bin/env bash
# Issue 17's GPU measurements in one run of about 9 minutes (a 15-minute H100/H200 lease, start-up included).
#
#   bash benchmarks/gpu_session.sh --prepare      # HERE, before the lease: wheels the device's Python lacks -> .whl/
#   bash benchmarks/gpu_session.sh                # ON THE DEVICE (the device tool's run, carry [".whl"]): results in $OUT
#   python benchmarks/merge_sections.py /path/to/fetched/BENCHMARKS.md      # HERE, after: the sections into BENCHMARKS.md
#   OUT=/tmp/gpu-smoke bash benchmarks/gpu_session.sh --size tiny --device cpu   # smoke run on a CPU (a few minutes)
#
# The device tool's command (one line): `bash benchmarks/gpu_session.sh` with timeout_s=600; every step below has its
# own time limit and the whole stays under --budget seconds (default 540), so the results come back even when a step
# is cut short. What comes back (the tool returns at most 8 files, 2 folders deep):
#   $OUT/BENCHMARKS.md  every section the steps wrote (merge it into the repository's with merge_sections.py)
#   $OUT/log.txt        each step's output; $OUT/summary.txt: each step's exit status and time; $OUT/env.txt
#
# Steps, most important first (a step that would start with less than 20 s left is skipped):
#   1. speed.py, the GPU plan: image embedding ViT-B/16 @384 x 128, text embedding x 256, ITM k=256 (577 image tokens)
#      and the COCO-5K projection, VQA 16 questions k=128 of 3,128, VQA re-scoring, pre-training step batch 64 @256
#      (AdamW loop / fused, fp32 / bf16 autocast, + gradient checkpointing), AdamW and EMA alone; fp32 / bf16 x eager /
#      sdpa; the fp32 eager original is each group's reference; agreement checks on the bundled trained models.
#   2. speed.py, torch.compile (inductor) of the host-bound paths, text, ITM, VQA: modes default and reduce-overhead
#      (CUDA graphs), bf16 + sdpa, against fp32 eager and bf16 sdpa eager; the generated code is checked for fused
#      SDPA (not matmul + softmax) and each output against eager's.
#   3. pretrain_profile.py: where a bf16 pre-training step's time goes, host and device, per phase and tower.
#   4. gpu_overhead.py: per call, wall / host issue / device busy time, kernels, device-to-host copies, syncs as CUDA
#      reports them, CUDA-graph replay.
#   5. pretrain_batch.py: peak memory and speed of the bf16 step at batch 64 ... with and without gradient
#      checkpointing, up to the largest batch that fits.
#   6. speed.py, torch.compile of the device-bound paths: image embedding (default, reduce-overhead) and the
#      pre-training step (forward compiled, default mode).
#   7. host_overhead.py on the device machine's CPU: the host time per call of the paths on that host.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZE=base
DEVICE=cuda
BUDGET=540
PREPARE=0
WHEELS="${WHEELS:-$ROOT/.whl}"
while (($#)); do
    case "$1" in
        --size) SIZE="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --prepare) PREPARE=1; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
cd "$ROOT" || exit 1

if ((PREPARE)); then
    # The device's Python (3.12) has torch, accelerate, timm, torchvision, huggingface_hub, tokenizers and
    # safetensors, and an older transformers than this package needs: carry this machine's transformers as a wheel.
    version="$("$PY" -c 'import transformers; print(transformers.__version__)')"
    mkdir -p "$WHEELS"
    if [[ "$WHEELS" == "$ROOT/.whl" ]] && ! grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null; then
        mkdir -p "$ROOT/.git/info" && echo '/.whl/' >> "$ROOT/.git/info/exclude"  # ignored: it travels by `carry`
    fi
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$WHEELS" \
        "transformers==$version" || exit 1
    ls -l "$WHEELS"
    echo "carry [\".whl\"] in the device run"
    exit 0
fi

OUT="${OUT:-/tmp/albef-gpu-session}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
RESULTS="$OUT/BENCHMARKS.md"
: > "$LOG"; : > "$SUMMARY"; : > "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}"
START=$(date +%s)

# ----- 0. environment: the package from this tree, a newer transformers from the carried wheels if needed --------
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import platform, sys, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
import transformers_albef
print("transformers_albef", transformers_albef.__version__, "from", transformers_albef.__file__)
EOF
    nproc; lscpu 2>/dev/null | grep -m1 "Model name" || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import transformers_albef" 2>> "$LOG"; then
    echo "transformers_albef does not import (see log.txt): run --prepare here and carry .whl" | tee -a "$SUMMARY"
    exit 1
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT COMMAND...: runs COMMAND with a time limit of LIMIT seconds (less if the budget is short).
step() {
    local name="$1" limit="$2" t0 rc remaining
    shift 2
    remaining=$(left)
    ((limit > remaining)) && limit=$remaining
    if ((limit < 20)); then
        echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
        return
    fi
    t0=$(date +%s)
    echo "===== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - t0)) s$( ((rc == 124)) && echo ' (time limit: its section holds what it finished)')" \
        | tee -a "$SUMMARY"
}

B=benchmarks
if [[ "$SIZE" == tiny ]]; then
    # Smoke run: the same steps on the tiny config (CPU or GPU), few repeats.
    Q=(--repeats 1 --warmup 1)
    PROFILE=(--size tiny --batch 4)
    BATCHES=(--size tiny --batches 2,4,8)
    HOST=(--size tiny --repeats 2)
else
    Q=()
    PROFILE=(--batch 64)
    BATCHES=(--batches 64,128,256,512,1024,2048)
    HOST=()
fi
if [[ "$DEVICE" == cuda ]]; then LOW=bf16 KEY=gpu; else LOW=fp32 KEY=cpu; fi

step speed-gpu 220 "$PY" $B/speed.py --size "$SIZE" --device "$DEVICE" --section "$KEY-$SIZE" --checkpointing \
    --incremental --time-budget 170 --output "$RESULTS" "${Q[@]}" \
    --note "one run of benchmarks/gpu_session.sh (issue 17)"
step compile-host-bound 170 "$PY" $B/speed.py --size "$SIZE" --device "$DEVICE" --section "$KEY-$SIZE-compiled" \
    --workloads text,itm,vqa --combos "fp32/eager,$LOW/sdpa" --compile default,reduce-overhead --compile-dtype "$LOW" \
    --no-checks --incremental --time-budget 110 --output "$RESULTS" "${Q[@]}"
step pretrain-profile 60 "$PY" $B/pretrain_profile.py --device "$DEVICE" --dtype "$LOW" "${PROFILE[@]}" \
    --output "$RESULTS"
if [[ "$DEVICE" == cuda ]]; then
    step gpu-overhead 60 "$PY" $B/gpu_overhead.py --size "$SIZE" --output "$RESULTS"
fi
step pretrain-batch 90 "$PY" $B/pretrain_batch.py --device "$DEVICE" --dtype "$LOW" "${BATCHES[@]}" --time-budget 55 \
    --output "$RESULTS"
step compile-device-bound 150 "$PY" $B/speed.py --size "$SIZE" --device "$DEVICE" \
    --section "$KEY-$SIZE-compiled-2" --workloads image,pretrain --combos "fp32/eager,$LOW/sdpa" \
    --compile default,reduce-overhead --compile-dtype "$LOW" --no-checks --incremental --time-budget 60 \
    --output "$RESULTS" "${Q[@]}"
step host-overhead 40 "$PY" $B/host_overhead.py --key "$KEY-host" --output "$RESULTS" "${HOST[@]}"

echo "total $(($(date +%s) - START)) s of a ${BUDGET} s budget" | tee -a "$SUMMARY"
ls -l "$OUT"
