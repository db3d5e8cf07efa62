#!/usr/bin/env bash
# Ablation on the embedded default (issue 3): what training, key whitening and the edit memory
# each add.
# One hypernetwork per row (trained on the world's train split unless untrained), scored end of
# stream on held-out edits after 10 x 20 (200 edits) and 100 x 20 (2,000 edits).
#
#   bench/ablation_rledit.sh            -> bench/results/ablation_rledit.{json,md}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
"$PY" bench/sweep_rledit.py --threads "${THREADS:-1}" --turns 10,100 --batch 20 \
  --config 'key_whitening=False,edit_memory=0.0,n_trajectories=0' \
  --config 'key_whitening=False,edit_memory=0.0,n_trajectories=1,steps_per_trajectory=1,reg_mode=reference' \
  --config 'key_whitening=False,edit_memory=0.0' \
  --config 'key_whitening=True,edit_memory=0.0,n_trajectories=0' \
  --config 'key_whitening=True,edit_memory=0.0,n_trajectories=1,steps_per_trajectory=1,reg_mode=reference' \
  --config 'key_whitening=True,edit_memory=0.0' \
  --config 'key_whitening=True,n_trajectories=0' \
  --config 'key_whitening=True,n_trajectories=1,steps_per_trajectory=1,reg_mode=reference' \
  --config 'key_whitening=True' \
  --out "$OUT/ablation_rledit.json" | tee "$OUT/ablation_rledit.log"
grep '^|' "$OUT/ablation_rledit.log" > "$OUT/ablation_rledit.md"
