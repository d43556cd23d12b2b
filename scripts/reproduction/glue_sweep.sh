#!/usr/bin/env bash
# The GLUE selection sweep behind docs/results.md ("Choosing on the carved split"): `selectune sweep` for each
# method on CoLA, MRPC, STS-B and RTE at seed 42, the default grid of each method (3 learning rates, one long
# schedule evaluated every epoch, median pruning), on 90% of train with `val` the other 10%; GLUE dev never scored.
#
#   SELECTUNE_DATA=../shared/data OMP_NUM_THREADS=1 bash scripts/reproduction/glue_sweep.sh \
#       ["lora bitfit linear ia3 full sara spt_lora adalora"] ["rte mrpc stsb cola"] [write]
#
# Resumable and shareable: each study is results/sweeps/glue/<task>_<method>/ (study.journal and sweep.json are
# committed; runs/ below it is not), so a killed or unfinished sweep continues in a fresh clone from the committed
# journal; two calls with the same lists may run at once (one per core), each taking candidates the other has not
# claimed. With "write", each finished study puts its winner into recipes/glue/<task>_<method>.yaml, with the
# two cheaper-step settings every candidate ran with (bf16 where the CPU has it, length-grouped batches), so the
# final runs train as the candidates did.
set -euo pipefail
methods="${1:-lora bitfit linear ia3 full sara spt_lora adalora}"; tasks="${2:-rte mrpc stsb cola}"; write="${3:-}"
: "${SELECTUNE_DATA:?set SELECTUNE_DATA to the folder holding glue/<TASK>/train.tsv}"
for task in $tasks; do
  for method in $methods; do
    study="results/sweeps/glue/${task}_${method}"
    selectune sweep "glue/${task}_${method}" trainer.precision=auto trainer.group_by_length=true "study=$study" ${write:+write=true}
  done
done
