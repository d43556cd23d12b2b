#!/usr/bin/env bash
# The GLUE reproduction sweep behind docs/results.md: every method on the offline GLUE tasks with the
# offline MiniLM, 3 seeds, Hydra multirun, then `selectune report` and the docs table.
#
#   SELECTUNE_DATA=../shared/data bash scripts/reproduce_glue.sh [runs/reproduce] ["mrpc rte cola stsb"] ["42,43,44"]
#
# Budgets: the selective methods at 0.5% of the backbone (head counted); LoRA both at its own r=8 and at
# 0.5% (rank derived from the budget); SPT at LoRA r=8's count (its recipes); AdaLoRA at b(T)=144.
# Selection rule: last evaluation on the dev split. Run time on the 2-core CPU machine: about 1 hour per
# (method, seed) over MRPC + RTE + CoLA + STS-B, i.e. ~30 hours for the whole sweep; SST-2 adds ~40 min
# per (method, seed) and epoch. Resumable: finished jobs are skipped on a second call.
set -euo pipefail
root="${1:-runs/reproduce}"; tasks="${2:-mrpc rte cola stsb}"; seeds="${3:-42,43,44}"
: "${SELECTUNE_DATA:?set SELECTUNE_DATA to the folder holding glue/<TASK>/train.tsv}"
sweep() {  # sweep <name> <overrides...>: one multirun over the tasks and seeds
  local name="$1"; shift
  local recipes=""
  for task in $tasks; do recipes+="${recipes:+,}glue/${task}_${name}"; done
  if ls "$root/$name"/*/results.json > /dev/null 2>&1 && \
     [[ $(ls "$root/$name"/*/results.json | wc -l) -ge $(( $(wc -w <<< "$tasks") * $(tr ',' ' ' <<< "$seeds" | wc -w) )) ]]; then
    echo "skip $name (done)"; return
  fi
  selectune train -m "recipe=$recipes" "trainer.seed=$seeds" "$@" trainer.progress=false \
    "hydra.sweep.dir=$root/$name" 'hydra.sweep.subdir=${task.name}_s${trainer.seed}'
}
sweep full
sweep linear
sweep bitfit
sweep lora
sweep sara
sweep udiff
sweep sdiff
sweep spt_lora
sweep adalora
selectune report "$root" "out=$root"
python scripts/results_table.py "$root" --section reproduce \
  --title "GLUE reproduction sweep: every method, offline MiniLM, seeds $seeds" \
  --command "SELECTUNE_DATA=../shared/data bash scripts/reproduce_glue.sh $root \"$tasks\" \"$seeds\""
