#!/usr/bin/env bash
# Copy the small record of every finished run below a runs folder into the repository (results.json,
# config.yaml, metrics.jsonl gzip-compressed, AdaLoRA's final ranks; no deltas, no checkpoints), so the docs tables can
# be regenerated from committed files and later sessions add seeds to the same table.
#
#   bash scripts/reproduction/keep_runs.sh /work/runs/mrpc42 results/glue_minilm
#   python scripts/analysis/results_table.py results/glue_minilm --section reproduce --title ... --command ...
set -euo pipefail
src="${1:?runs folder}"; dest="${2:?destination folder}"
find "$src" -name results.json | while read -r result; do
  run="$(dirname "$result")"; rel="${run#"$src"/}"
  mkdir -p "$dest/$rel"
  for f in results.json config.yaml adalora_ranks.json; do
    [[ -f "$run/$f" ]] && cp "$run/$f" "$dest/$rel/$f"
  done
  # the curves, compressed (-n: no name or time in the header, so the same file gives the same bytes)
  [[ -f "$run/metrics.jsonl" ]] && gzip -9 -n -c "$run/metrics.jsonl" > "$dest/$rel/metrics.jsonl.gz"
  echo "kept $rel"
done
