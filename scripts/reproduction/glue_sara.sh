#!/usr/bin/env bash
# SaRA at 0.5% of the backbone next to LoRA at the same stored count (budget=0_5pct derives r=12 on
# query/value), offline MiniLM, GLUE dev, last-step selection. Seeds and tasks are arguments because a
# full 3-seed x 4-task sweep takes ~5 CPU hours on 2 cores (about 10 minutes per MRPC/RTE run).
#
#   SELECTUNE_DATA=../shared/data bash scripts/reproduction/glue_sara.sh runs/sara "mrpc rte cola stsb" "42 43 44"
set -euo pipefail
root="${1:-runs/sara}"; tasks="${2:-mrpc rte}"; seeds="${3:-42}"
: "${SELECTUNE_DATA:?set SELECTUNE_DATA to the folder holding glue/<TASK>/train.tsv}"
for seed in $seeds; do
  for task in $tasks; do
    for method in sara lora; do
      name="${task}_${method}_0.5pct_s${seed}"
      [[ -f "$root/$name/results.json" ]] && { echo "skip $name (done)"; continue; }
      selectune train recipe=glue/${task}_${method} budget=0_5pct trainer.seed=$seed out_dir="$root/$name" \
        trainer.resume=true
    done
  done
done
python scripts/analysis/results_table.py "$root" --title "SaRA vs LoRA at 0.5% of the backbone, offline MiniLM" \
  --command "SELECTUNE_DATA=../shared/data bash scripts/reproduction/glue_sara.sh $root \"$tasks\" \"$seeds\""
