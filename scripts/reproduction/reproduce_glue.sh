#!/usr/bin/env bash
# The GLUE reproduction sweep behind docs/results.md: every method on the offline GLUE tasks with the
# offline MiniLM, 3 seeds, Hydra multirun, then `selectune report` and the docs table.
#
#   SELECTUNE_DATA=../shared/data bash scripts/reproduction/reproduce_glue.sh [runs/reproduce] ["mrpc rte cola stsb"] \
#       ["42,43,44"] ["full linear bitfit lora lora_0.5pct sara udiff sdiff spt_lora adalora"] ["overrides"]
#
# The fifth argument is passed to every run, e.g. "model=tiny_random trainer.max_steps=4" for a smoke run.
# Budgets: the selective methods at 0.5% of the backbone (head counted); LoRA both at its own r=8 and at
# 0.5% (`lora_0.5pct`: rank derived from the budget, the count SaRA and diff pruning store); SPT at LoRA
# r=8's count (its recipes); AdaLoRA at LoRA r=8's count too (its recipes: b(T) derived from it, trimmed delta).
# `lora_adalora_count` (not in the default list) is the comparison from before that, at AdaLoRA's old preset
# (b(T)=144, i.e. adalora with method.target_total=144 method.trim=false budget=none): LoRA on AdaLoRA's 36
# matrices at rank b(T)/36 = 4, with that preset's lr and scale (lora_alpha 32 / initial rank 6 = 21.33 / 4) —
# the same final count, only the rank schedule differs. Selection rule: last evaluation on the dev split.
# Run time on the 2-core CPU machine, one core per run with another beside it (OMP_NUM_THREADS=1), one-phase
# methods: MRPC 9-20 minutes, RTE 11-16, STS-B 12-14, CoLA 6-8 (the range over sessions), i.e. 40-60
# minutes per (method, seed) over the four tasks; ~60 per MRPC run for diff pruning's 8 epochs at batch 8;
# ~30 hours for the whole sweep.
# With the sweep's recipes written: `python scripts/reproduction/adopt_winners.py <clone>/results/sweeps/glue <root>`
# first, on the machine that ran the studies, makes each chosen candidate its recipe's seed-42 run (checked equal,
# dev scored on its delta), so only seeds 43 and 44 train.
# Resumable: one run per (method, seed, task) into <root>/<method>/<task>_s<seed>, a finished one skipped; a
# killed run continues from its checkpoint. Two calls with disjoint method lists may share a root (one per core, with
# OMP_NUM_THREADS=1); the table is rebuilt from every finished run below the root after a call that trained one
# (REPORT=0: never, e.g. when the runs' table is made elsewhere; REPORT=1: always).
set -euo pipefail
root="${1:-runs/reproduce}"; tasks="${2:-mrpc rte cola stsb}"; seeds="${3:-42,43,44}"
methods="${4:-full linear bitfit lora lora_0.5pct sara udiff sdiff spt_lora adalora}"
read -ra overrides <<< "${5:-}"
trained=0
: "${SELECTUNE_DATA:?set SELECTUNE_DATA to the folder holding glue/<TASK>/train.tsv}"
for method in $methods; do
  recipe="${method%_0.5pct}"; extra=()
  [[ "$method" == *_0.5pct ]] && extra=(budget=0_5pct)
  if [[ "$method" == lora_adalora_count ]]; then  # LoRA as AdaLoRA's recipes run it, at its final count
    recipe=lora; extra=(method.r=4 method.alpha=21.333333 trainer.lr=1e-3
                        'method.targets=[query,key,value,attention.output.dense,intermediate.dense,output.dense]')
  fi
  for seed in ${seeds//,/ }; do
    for task in $tasks; do
      out="$root/$method/${task}_s${seed}"
      [[ -f "$out/results.json" ]] && { echo "skip $out (done)"; continue; }
      selectune train "recipe=glue/${task}_${recipe}" "trainer.seed=$seed" "${extra[@]}" "${overrides[@]}" \
        trainer.progress=false trainer.resume=true "out_dir=$out"
      trained=1
    done
  done
done
report="${REPORT:-$trained}"
[[ "$report" == 1 ]] || exit 0
selectune report "$root" "out=$root"
python scripts/analysis/results_table.py "$root" --section reproduce \
  --title "GLUE reproduction sweep: offline MiniLM, seeds $seeds" \
  --command "SELECTUNE_DATA=../shared/data bash scripts/reproduction/reproduce_glue.sh $root \"$tasks\" \"$seeds\" \"$methods\"${5:+ \"$5\"}"
