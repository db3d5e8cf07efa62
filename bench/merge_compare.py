"""Merge `rledit compare` runs of the same stream into one table and plot.

Long streams are often run one method (or group of methods) at a time; this checks that the
runs share model, data, turns and batch size, then writes one JSON / markdown / PNG with
every method (a later file's method replaces an earlier one's of the same name).

    python bench/merge_compare.py runs/a/compare.json runs/b/compare.json --out bench/results --name compare_100x20
"""
from __future__ import annotations

import argparse
import json

from rledit_plugin.compare_report import write_comparison

SAME = ("model", "turns", "batch", "data")


def merge(paths):
    results, runs, first = {}, [], None
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        meta = payload.get("meta", {})
        if first is None:
            first = meta
        for key in SAME:
            if meta.get(key) != first.get(key):
                raise SystemExit(f"{path}: meta '{key}' is {meta.get(key)!r}, but {paths[0]} has "
                                 f"{first.get(key)!r}: not the same stream")
        results.update(payload["results"])
        # a merged file brings the runs it was merged from (their commands stay on record)
        runs.extend(meta.get("merged_runs") or
                    [{"file": path, "argv": meta.get("argv"), "methods": list(payload["results"])}])
    meta = {k: first.get(k) for k in SAME}
    meta["merged_runs"] = runs
    return results, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="compare")
    args = ap.parse_args()
    results, meta = merge(args.files)
    paths = write_comparison(results, args.out, args.name, meta=meta)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
