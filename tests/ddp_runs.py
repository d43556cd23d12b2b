"""Run several `selectune train` jobs inside one torchrun launch (tests only: one start-up for all).

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_runs.py '<json: [[out_dir, [overrides]], ...]>'
"""

import json
import sys
from pathlib import Path

from selectune.commands import train
from selectune.config import compose
from selectune.distributed import finish

for out_dir, overrides in json.loads(sys.argv[1]):
    train(compose("train", overrides), Path(out_dir), explicit_out_dir=True)
finish()
