#!/usr/bin/env bash
# SP vs AP detection transfer on the embedded world, on CPU: SimCLR-pretrained resnet18 backbones
# (semantic and augmented pairs) and a random-init one, each fine-tuned with the C4 detector on the
# world's VOC split (eval/voc_world.py) with two detection seeds; prints a table of AP50 / AP / AP75.
#
#   bash bench/detection_world.sh            # EPOCHS=20 SEEDS="0 1" OUT=runs/detection-world
#
# On a busy 2-core machine one thread per process is several times faster than two (OMP_NUM_THREADS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/detection-world}
EPOCHS=${EPOCHS:-20}
SEEDS=${SEEDS:-0 1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/r18-random"

"$PY" -c "import sys, torch; from common.backbones import build_backbone; torch.manual_seed(0); \
torch.save(build_backbone('resnet18')[0].state_dict(), sys.argv[1])" "$OUT/r18-random/backbone.pth"
for pairs in semantic augmented; do
  [ -f "$OUT/r18-$pairs/backbone.pth" ] || \
    "$PY" simclr.py --pairs "$pairs" --arch resnet18 --epochs "$EPOCHS" --eval-every 5 --out "$OUT/r18-$pairs"
done
for backbone in random semantic augmented; do
  for seed in $SEEDS; do
    [ -f "$OUT/det-$backbone-s$seed/results.json" ] || \
      "$PY" -m eval.detection --checkpoint "$OUT/r18-$backbone/backbone.pth" --voc-root embedded \
        --seed "$seed" --out "$OUT/det-$backbone-s$seed"
  done
done
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
print(f"{'backbone':<10} {'seed':>4} {'AP50':>6} {'AP':>6} {'AP75':>6}")
for run in sorted(Path(sys.argv[1]).glob("det-*/results.json")):
    r = json.loads(run.read_text())
    _, backbone, seed = run.parent.name.split("-")
    print(f"{backbone:<10} {seed[1:]:>4} {r['AP50']:6.2f} {r['AP']:6.2f} {r['AP75']:6.2f}")
EOF
