"""Merge the JSON files a run wrote into one DESIGN §5 results file and print a short table.

python benchmarks/merge_results.py DIR a.json b.json ...  ->  DIR/<device>-<date>.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(directory: str, *names: str) -> Path | None:
    folder = Path(directory)
    merged: dict | None = None
    for name in names:
        path = folder / name
        if not path.exists():
            print(f"(missing {name}: that stage failed or ran out of time; see its .log)")
            continue
        data = json.loads(path.read_text())
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "rows"} | {"rows": []}
        merged["rows"] += data["rows"]
    if merged is None:
        print("no results")
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", merged["device"]).strip("-").lower()
    out = folder / f"{slug}-{merged['date']}.json"
    merged.pop("command", None)
    out.write_text(json.dumps(merged, indent=1))
    print(f"{merged['device']}  torch {merged['torch']}  triton {merged.get('triton')}  commit {merged['commit'][:10]}")
    print(
        f"{'op':<15}{'variant':<15}{'tokens×in×out':<18}{'r':>4}{'p':>5}{'ms':>9}{'÷linear':>9}{'PEFT÷':>8}{'PEFTc÷':>8}"
    )
    for row in merged["rows"]:
        if "ms" not in row:
            continue
        shape = f"{row['tokens']}×{row['in']}×{row['out']}"

        lin, peft, peftc = (
            f"{row[k]:.3f}" if k in row else ""
            for k in ("slowdown_vs_linear", "speedup_vs_peft", "speedup_vs_peft_compiled")
        )
        head = f"{row['op']:<15}{row['variant']:<15}{shape:<18}{row['r']:>4}{row['dropout']:>5}{row['ms']:>9.3f}"
        print(f"{head}{lin:>9}{peft:>8}{peftc:>8}")
    print(f"written: {out}")
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])
