#!/usr/bin/env bash
# Run bench/sweep_rledit.py once per configuration line of a file, JOBS processes at a time
# (1 torch thread each), and gather every result row into one JSON-lines file.
#
#   JOBS=14 TURNS=100 bench/sweep_parallel.sh configs.txt results.jsonl
#
# A line is a sweep_rledit.py --config string, e.g.  key_whitening=True,meta_lr=3e-4
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIGS=$1; RESULTS=$2
JOBS=${JOBS:-$(nproc)}; TURNS=${TURNS:-100}; BATCH=${BATCH:-20}; PY=${PY:-python3}
LIMIT=${LIMIT:-0}                          # seconds per configuration, 0 = no limit
work=$(mktemp -d)
i=0
while IFS= read -r cfg; do
  [ -z "$cfg" ] && continue
  case "$cfg" in \#*) continue ;; esac
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
  i=$((i + 1))
  ( if [ "$LIMIT" -gt 0 ]; then t=(timeout "$LIMIT"); else t=(); fi
    "${t[@]}" "$PY" bench/sweep_rledit.py --threads 1 --turns "$TURNS" --batch "$BATCH" \
      --config "$cfg" --out "$work/$i.json" > "$work/$i.log" 2>&1
    grep '^{' "$work/$i.log" || echo "{\"overrides\": \"$cfg\", \"error\": \"exit $? (see log)\"}" ) \
    >> "$work/rows.$i" &
done < "$CONFIGS"
wait
cat "$work"/rows.* > "$RESULTS"
tail -n 3 "$work"/*.log > "${RESULTS%.jsonl}.logs.txt" 2>/dev/null || true
echo "$i configurations -> $RESULTS"
