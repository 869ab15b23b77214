"""Rebuild the embedded default data from full-resolution site folders.

Each image is converted to 8-bit grey, resized (Lanczos) to a 112 x 112 square and stored as JPEG (quality 90),
which keeps both sites under 20 MB; ``manifest.csv`` keeps labels, patient ids, duplicate groups and the
official split. Usage: ``python data/make_embedded.py SOURCE_ROOT [DEST_ROOT]``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image

SITES = ("site_a_sarscov2", "site_b_covidct")
SIZE = 112
QUALITY = 90
KEPT_COLUMNS = ("path", "label", "patient_id", "dup_group", "split", "source_file", "source_sha256")


def embed_site(source: Path, dest: Path) -> int:
    """Write the compact copy of one site folder; returns the number of images written."""
    with open(source / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out_rows = []
    for row in rows:
        rel = Path(row["path"]).with_suffix(".jpg")
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        with Image.open(source / row["path"]) as im:
            im.convert("L").resize((SIZE, SIZE), Image.LANCZOS).save(dest / rel, "JPEG", quality=QUALITY)
        out_rows.append({**{k: row[k] for k in KEPT_COLUMNS}, "path": rel.as_posix()})
    with open(dest / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=KEPT_COLUMNS)
        writer.writeheader()
        writer.writerows(out_rows)
    return len(out_rows)


if __name__ == "__main__":
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent
    for name in SITES:
        print(name, embed_site(src / name, dst / name))
