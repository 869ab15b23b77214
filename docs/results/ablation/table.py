"""Validation (and test) AUC of every ablation variant: mean +- std over fold-runs, per site.

Usage: python docs/results/ablation/table.py runs/ablation > docs/results/ablation/table.md
"""

import json
import sys
from pathlib import Path

import numpy as np

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ablation")
sites = ("site_a_sarscov2", "site_b_covidct")
print("| variant | n | " + " | ".join(f"val AUC {s[5]}" for s in sites) + " | "
      + " | ".join(f"val sens/spec {s[5]}" for s in sites) + " |")
print("|---|---|" + "---|" * (2 * len(sites)))
for variant in sorted(p for p in root.iterdir() if p.is_dir()):
    finals = [json.loads(f.read_text()) for f in sorted(variant.glob("fold*-seed0/*/final_metrics.json"))]
    if not finals:
        continue
    cells, ss = [], []
    for s in sites:
        v = [f["validation"][s] for f in finals if s in f.get("validation", {})]
        auc = np.array([m["auc"] for m in v]) * 100
        cells.append(f"{auc.mean():.1f} +- {auc.std(ddof=1) if len(auc) > 1 else 0:.1f}" if len(auc) else "-")
        ss.append(f"{np.mean([m['sensitivity'] for m in v]) * 100:.0f} / {np.mean([m['specificity'] for m in v]) * 100:.0f}"
                  if v else "-")
    print(f"| {variant.name} | {len(finals)} | " + " | ".join(cells) + " | " + " | ".join(ss) + " |")
