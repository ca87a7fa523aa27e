#!/usr/bin/env bash
# One-call GPU build of the MiniCanvas world (device machine: one H100/H200, no network).
# Usage on the device: bash bench/gpu_world_build.sh [STAGES...]   (default: every stage)
# Needs the wheels in .whl/ (diffusers, pydantic, open_clip for its BPE file) that the device image lacks.
# Returns under $OUT: world.tar.part-* (the built world folder, split under the 16 MB file limit),
# build.log and verify.json.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
STAGES=${*:-classifier clip sd gan}
# Start from the world in the checkout, so a later stage (sd needs clip) can build on shipped ones.
rm -rf /tmp/world && mkdir -p /tmp/world && cp -r generators/minicanvas/world/. /tmp/world/ 2>/dev/null

pack() { (cd /tmp && tar cf world.tar world && rm -f "$OUT"/world.tar.part-* && split -b 15M world.tar "$OUT/world.tar.part-"); }
for stage in $STAGES; do
  python3 - "$stage" <<'PY' 2>&1 | tr '\r' '\n' | grep -v "it/s]$" | tee -a "$OUT/build.log"
import os, sys, time
from generators.minicanvas import world
from generators.minicanvas.train import WorldSettings
settings = WorldSettings.model_validate_json(os.environ.get("WORLD_SETTINGS") or "{}")
t = time.time()
world.build(only=[sys.argv[1]], device=os.environ.get("DEVICE", "cuda"), out_dir="/tmp/world",
            work_dir="/tmp/work", settings=settings)
print(f"STAGE {sys.argv[1]} done in {time.time() - t:.1f} s", flush=True)
PY
  pack
done
python3 - <<'PY' 2>&1 | tail -40 | tee -a "$OUT/build.log"
import json
from pathlib import Path
from generators.minicanvas import world
import os
r = world.verify(tier=os.environ.get("TIER", "full"), device=os.environ.get("DEVICE", "cuda"), root=Path("/tmp/world"))
Path(__import__("os").environ["OUT"], "verify.json").write_text(json.dumps(r, indent=2))
print(json.dumps(r, indent=2))
PY
