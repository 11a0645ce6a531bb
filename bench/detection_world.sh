#!/usr/bin/env bash
# SP vs AP detection transfer on the embedded world, on CPU: SimCLR-pretrained resnet18 backbones
# (semantic and augmented pairs) and a random-init one, each fine-tuned with the C4 detector on the
# world's VOC split (eval/voc_world.py) with several detection seeds; prints AP50, AP and AP75 as
# mean ± std over the seeds, and of SP - AP per seed.
#
#   bash bench/detection_world.sh            # EPOCHS=20 SEEDS="0 1 2 3 4 5 6 7" OUT=runs/detection-world
#
# On a busy 2-core machine one thread per process is several times faster than two (OMP_NUM_THREADS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/detection-world}
EPOCHS=${EPOCHS:-20}
SEEDS=${SEEDS:-0 1 2 3 4 5 6 7}
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
import json, statistics, sys
from pathlib import Path
runs = {}  # backbone: {seed: results}
for path in sorted(Path(sys.argv[1]).glob("det-*/results.json")):
    _, backbone, seed = path.parent.name.split("-")
    runs.setdefault(backbone, {})[int(seed[1:])] = json.loads(path.read_text())
metrics = ("AP50", "AP", "AP75")
def spread(values):
    return f"{statistics.mean(values):6.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"
print(f"{'backbone':<10} {'seeds':>5} " + " ".join(f"{m:>12}" for m in metrics))
for backbone, by_seed in runs.items():
    print(f"{backbone:<10} {len(by_seed):>5}", *(spread([r[m] for r in by_seed.values()]) for m in metrics))
seeds = sorted(set(runs.get("semantic", {})) & set(runs.get("augmented", {})))
if seeds:  # per detection seed: the difference of two runs that share it
    print(f"{'SP - AP':<10} {len(seeds):>5}",
          *(spread([runs["semantic"][s][m] - runs["augmented"][s][m] for s in seeds]) for m in metrics))
EOF
