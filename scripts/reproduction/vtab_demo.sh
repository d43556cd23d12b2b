#!/usr/bin/env bash
# The vision path on real images, offline: scikit-learn's digits and the shared dtd10 textures in the
# VTAB-1k layout, a randomly initialised ViT (no pretrained ViT installs offline), two methods each,
# the final protocol (train800val200 -> test), the short schedule (10 epochs), then both averages.
#
#   SELECTUNE_DATA is set by the script; bash scripts/reproduction/vtab_demo.sh runs/vtab   (about 10 minutes on 2 cores)
set -euo pipefail
root="${1:-runs/vtab}"
python scripts/reproduction/vtab_digits.py "$root/data"
export SELECTUNE_DATA="$root/data"
for method in full lora; do
  [[ -f "$root/digits_$method/results.json" ]] || selectune train recipe=vtab/dtd_$method model=vit_micro_random \
    task=vtab/custom task.name=digits task.num_classes=10 task.protocol=final trainer=vtab_short \
    out_dir="$root/digits_$method"
  [[ -f "$root/dtd10_$method/results.json" ]] || selectune train recipe=vtab/dtd_$method model=vit_micro_random \
    task=vtab/custom task.name=dtd10 task.num_classes=10 task.protocol=final trainer=vtab_short \
    'model.config_overrides.image_size=64' 'model.config_overrides.patch_size=8' out_dir="$root/dtd10_$method"
done
python scripts/analysis/results_table.py "$root" --section vtab_demo \
  --title "VTAB-1k layout on real images (digits, dtd10), random-init ViT, 10 epochs, final protocol" \
  --command "bash scripts/reproduction/vtab_demo.sh $root"
