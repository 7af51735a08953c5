"""Merge what a GPU check wrote into one DESIGN §5 results file and print a short table.

    python benchmarks/merge_results.py DIR      ->  DIR/<device>-<date>.json

Reads ``DIR/rows.jsonl`` (the timing stage's rows, its first line the environment) and ``DIR/stages.tsv`` (each
stage's name, seconds and exit status, written by gpu_check.sh), and older runs' per-stage JSON files where present.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def read(folder: Path) -> dict | None:
    rows, env = [], None
    lines = (folder / "rows.jsonl").read_text().splitlines() if (folder / "rows.jsonl").exists() else []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a stage killed mid-write
            continue
        if row.get("op") == "environment":
            env = {k: v for k, v in row.items() if k != "op"}
        else:
            rows.append(row)
    if env is None:
        return None
    stages = []
    if (folder / "stages.tsv").exists():
        for line in (folder / "stages.tsv").read_text().splitlines():
            name, seconds, status = line.split("\t")
            stages.append({"stage": name, "seconds": int(seconds), "exit": status})
    return {**env, "stages": stages, "rows": rows}


def _fmt(row: dict, key: str, spec: str = ".3f") -> str:
    return format(row[key], spec) if isinstance(row.get(key), (int, float)) else ""


def main(directory: str) -> Path | None:
    folder = Path(directory)
    merged = read(folder)
    if merged is None:
        print("no results (rows.jsonl missing or without its environment line)")
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", merged["device"]).strip("-").lower()
    out = folder / f"{slug}-{merged['date']}.json"
    out.write_text(json.dumps(merged, indent=1))
    dirty = " (dirty tree)" if merged.get("dirty") else ""
    print(f"{merged['device']}  torch {merged['torch']}  triton {merged.get('triton')}  "
          f"commit {merged['commit'][:10]}{dirty}")  # fmt: skip
    for row in merged["rows"]:
        if row["op"] == "sentinel":
            flag = "  DRIFT" if row.get("drift_flag") else ""
            print(f"sentinel {row['when']:<5} {row['name']:<18} {row['value']:10.2f}{flag}")
    print(f"{'op':<8}{'variant':<14}{'tokens×in×out base':<22}{'r':>3}{'p':>5}{'graph ms':>9}{'÷lin':>7}{'PEFT÷':>7}"
          f"{'PEFTc÷':>7}{'eager ms':>9}{'host ms':>8}")  # fmt: skip
    for row in merged["rows"]:
        if "ms" not in row or row.get("host_overhead") or row["op"] == "model_step":
            continue
        shape = (
            f"{row['tokens']}×{row['in']}×{row['out']}"
            + (f" {row['base']}" if row.get("base", "linear") != "linear" else "")
            + (f" {row['gemms']} GEMMs" if "gemms" in row else "")
            + (f" {row['reductions']} reductions" if "reductions" in row else "")
        )
        graph = "graph_" if "graph_ms" in row else ""
        print(f"{row['op']:<8}{row['variant']:<14}{shape:<22}{row['r']:>3}{row['dropout']:>5}"
              f"{_fmt(row, 'graph_ms'):>9}{_fmt(row, graph + 'slowdown_vs_linear'):>7}"
              f"{_fmt(row, graph + 'speedup_vs_peft'):>7}{_fmt(row, graph + 'speedup_vs_peft_compiled'):>7}"
              f"{_fmt(row, 'ms'):>9}{_fmt(row, 'host_bound_ms'):>8}")  # fmt: skip
    for row in merged["rows"]:
        if row["op"] == "model_step":
            what = f"{row['layers']} layers h{row['hidden']} {row['tokens']} tok p={row['dropout']}"
            ratios = [f"{label} {_fmt(row, key)}" for label, key in (("÷frozen", "slowdown_vs_frozen"),
                      ("PEFT÷", "speedup_vs_peft"), ("PEFTc÷", "speedup_vs_peft_compiled"))]  # fmt: skip
            print(f"model   {row['variant']:<14}{what}{_fmt(row, 'ms'):>10} ms  " + "  ".join(ratios))
    for stage in merged["stages"]:
        print(f"stage {stage['stage']:<28} {stage['seconds']:5d} s  exit {stage['exit']}")
    print(f"written: {out}")
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])
