#!/usr/bin/env bash
# The GLUE selection sweep behind docs/results.md ("Choosing on the carved split"): `selectune sweep` for each
# method on CoLA, MRPC, STS-B and RTE at seed 42, the default grid of each method (3 learning rates, one long
# schedule evaluated every epoch, median pruning), on 90% of train with `val` the other 10%; GLUE dev never scored.
#
#   SELECTUNE_DATA=../shared/data OMP_NUM_THREADS=1 bash scripts/reproduction/glue_sweep.sh \
#       ["lora bitfit linear ia3 full sara spt_lora adalora"] ["rte mrpc stsb cola"] [write]
#
# A choice at an end of its grid is extended, one value beyond it in its own study (<study>_hi, _lo, ...), up to
# 2 values (extend=2; RTE full FT chose 5e-5 at its grid's top and was extended by hand before this).
#
# Resumable and shareable: each study is results/sweeps/glue/<task>_<method>/ (study.journal and sweep.json are
# committed; runs/ below it is not), so a killed or unfinished sweep continues in a fresh clone from the committed
# journal; two calls with the same lists may run at once (one per core), each taking candidates the other has not
# claimed. With "write", each finished study puts its winner into recipes/glue/<task>_<method>.yaml, with the
# two cheaper-step settings every candidate ran with (bf16 where the CPU has it, length-grouped batches), so the
# final runs train as the candidates did.
#
# Diff pruning (udiff, sdiff: not in the default list, hours a candidate) searches its penalty instead: lambda at
# half, one and two times the recipe's (method.l0_weight), at the recipe's lr and schedule (its epochs, not the
# sweep's 10), pruned from the first evaluation after the projection on (phase 1's scores are of the unprojected
# diff, and a larger lambda learns more slowly there).
set -euo pipefail
methods="${1:-lora bitfit linear ia3 full sara spt_lora adalora}"; tasks="${2:-rte mrpc stsb cola}"; write="${3:-}"
: "${SELECTUNE_DATA:?set SELECTUNE_DATA to the folder holding glue/<TASK>/train.tsv}"
setting() {  # setting <recipe> <section> <key>: the composed recipe's value
  selectune cat "$1" | awk -v s="$2:" -v k="$3:" '$0 == s {in_s = 1; next} /^[a-z]/ {in_s = 0} in_s && $1 == k {print $2; exit}'
}
for task in $tasks; do
  for method in $methods; do
    recipe="glue/${task}_${method}"; study="results/sweeps/glue/${task}_${method}"; search=()
    if [[ "$method" == udiff || "$method" == sdiff ]]; then
      lambda=$(setting "$recipe" method l0_weight)
      search=("method.l0_weight=$(python -c "import sys; l = float(sys.argv[1]); print(f'{l / 2:g},{l:g},{2 * l:g}')" "$lambda")"
              "trainer.epochs=$(setting "$recipe" trainer epochs)" "prune_after=$(( $(setting "$recipe" method phase1_epochs) + 1 ))")
    fi
    selectune sweep "$recipe" trainer.precision=auto trainer.group_by_length=true "${search[@]}" "study=$study" extend=2 \
      ${write:+write=true}
  done
done
