#!/usr/bin/env bash
# Same-stream comparison on the embedded default: RLEdit vs MEMIT, MEND, FT, ROME, LoRA
# (EasyEdit PyPI release, CPU shim), all scored by the one harness.
#
#   bench/bench_compare.sh            # 20 x 20 and 100 x 20 edits
#   SIZES="20x20" bench/bench_compare.sh
#
# Needs a trained RLEdit archive (ARCHIVE, default runs/demo/archive: `rledit demo` writes it);
# without one RLEdit runs untrained and the table says so.  MEMIT/ROME statistics are computed
# from the world corpus and MEND is trained with EasyEdit's EditTrainer on the world train split,
# once per size (timed as set-up, not per edit).  Results: bench/results/compare_<T>x<B>.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARCHIVE=${ARCHIVE:-runs/demo/archive}
ALGS=${ALGS:-RLEdit,MEMIT,MEND,FT,ROME,LoRA}
SIZES=${SIZES:-"20x20 100x20"}
THREADS=${THREADS:-1}            # 1: other processes share this machine; timings comparable
OUT=${OUT:-bench/results}
WORK=${WORK:-runs/bench_compare}

archive_args=()
if [ -e "$ARCHIVE" ]; then archive_args=(--rledit-archive "$ARCHIVE"); else
  echo "warning: no RLEdit archive at $ARCHIVE: RLEdit will run untrained" >&2; fi

for size in $SIZES; do
  turns=${size%x*}; batch=${size#*x}
  curve=$(( turns >= 10 ? turns / 10 : 1 ))
  "$PY" -m rledit_plugin.compare --algs "$ALGS" --turns "$turns" --batch "$batch" \
    --curve-every "$curve" --threads "$THREADS" --out "$WORK/${turns}x${batch}" \
    --name "compare_${turns}x${batch}" "${archive_args[@]}" "$@" || true   # failures are in the table
  mkdir -p "$OUT"
  for ext in json md png; do
    [ -f "$WORK/${turns}x${batch}/compare_${turns}x${batch}.$ext" ] && \
      cp "$WORK/${turns}x${batch}/compare_${turns}x${batch}.$ext" "$OUT/"
  done
done
