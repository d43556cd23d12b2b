#!/usr/bin/env bash
# The foundation's real-data runs (issue: "selectune train runs end to end on real GLUE data"):
# full FT on MRPC and RTE, one epoch of SST-2 full FT, and BitFit / LoRA / linear probe on MRPC,
# all with the offline MiniLM and seed 42, then the results table in docs/results.md.
#
#   SELECTUNE_DATA=../shared/data bash scripts/reproduction/glue_baselines.sh [runs root, default runs/baselines]
#
# Run time on the 2-core CPU machine this was measured on: about 70 minutes in total.
set -euo pipefail
root="${1:-runs/baselines}"
: "${SELECTUNE_DATA:?set SELECTUNE_DATA to the folder holding glue/<TASK>/train.tsv}"
run() {  # run <name> <selectune train args...>: skip runs that already finished
  local name="$1"; shift
  if [[ -f "$root/$name/results.json" ]]; then echo "skip $name (done)"; return; fi
  selectune train "$@" out_dir="$root/$name" trainer.resume=true
}
run mrpc_full   recipe=glue/mrpc_full
run rte_full    recipe=glue/rte_full
run mrpc_bitfit recipe=glue/mrpc_bitfit
run mrpc_lora   recipe=glue/mrpc_lora
run mrpc_linear recipe=glue/mrpc_linear
run sst2_full_1epoch recipe=glue/sst2_full trainer.epochs=1
python scripts/analysis/results_table.py "$root" --title "GLUE baselines, offline MiniLM, seed 42" \
  --command "SELECTUNE_DATA=../shared/data bash scripts/reproduction/glue_baselines.sh $root"
