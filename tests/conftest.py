"""Shared fixtures: the real CT data, a small real-image site, and synthetic image folders for mechanics."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_covid.data import CLASSES, Site, load_site

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE_B = "site_b_covidct"
SITE_A = "site_a_sarscov2"
SUBSET_PER_CLASS = 12


EMBEDDED = REPO_ROOT / "data"  # both real sites at 112 px, in the repository


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real full-resolution data (both sites) in $FL_COVID_SHARED_DATA (.ci/run points it at ../shared/data);
    the tests that need it are skipped without it. Every other test uses the embedded copy in data/."""
    env = os.environ.get("FL_COVID_SHARED_DATA", "")
    path = Path(env).expanduser().resolve() if env else None
    if path is None or not all((path / s / "manifest.csv").is_file() for s in (SITE_A, SITE_B)):
        pytest.skip("the full-resolution data is not here: set FL_COVID_SHARED_DATA to the folder holding "
                    f"{SITE_A}/ and {SITE_B}/ (got {env!r})")
    return path


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv as dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows (all with the same keys) as a UTF-8 manifest.csv."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="session")
def real_site_b_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder with 12 real Site B images per class (embedded copy; seeded, stratified) and the matching
    manifest rows. Images whose duplicate group carries both labels are left out, so every row is a clean example.
    """
    source = EMBEDDED / SITE_B
    rows = [r for r in read_manifest(source / "manifest.csv") if not r["dup_group"]]
    rng = np.random.default_rng(0)
    dest = tmp_path_factory.mktemp("real_site") / SITE_B
    chosen = []
    for label in CLASSES:
        candidates = [r for r in rows if r["label"] == label]
        chosen += [candidates[i] for i in sorted(rng.choice(len(candidates), SUBSET_PER_CLASS, replace=False))]
    for row in chosen:
        (dest / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / row["path"], dest / row["path"])
    write_manifest(dest / "manifest.csv", chosen)
    return dest


@pytest.fixture(scope="session")
def site_b() -> Site:
    """The whole real Site B (746 images, 742 after dropping the 4 label-conflict duplicates) from the embedded
    copy, cached at 40 px."""
    return load_site(EMBEDDED / SITE_B, 40)


@pytest.fixture(scope="session")
def site_a() -> Site:
    """The whole real Site A (2481 images) from the embedded copy (fast to decode), cached at 16 px."""
    return load_site(EMBEDDED / SITE_A, 16)


def _synthetic_image(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")


@pytest.fixture
def make_image_site(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a site folder of random grey PNGs, ``counts`` per class, optionally with a manifest.csv.

    ``make_image_site(counts={"COVID": 3, "NonCOVID": 3}, size=32, manifest=False, name="site")`` -> folder.
    A class with count None gets no folder at all; count 0 gives an empty folder.
    """

    def make(counts: dict[str, int | None] | None = None, size: int = 32, manifest: bool = False,
             name: str = "site", seed: int = 0) -> Path:
        counts = counts if counts is not None else {label: 3 for label in CLASSES}
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        root.mkdir()
        rows = []
        for label, n in counts.items():
            if n is None:
                continue
            (root / label).mkdir()
            for i in range(n):
                rel = f"{label}/{label.lower()}_{i:03d}.png"
                _synthetic_image(rng, size).save(root / rel)
                rows.append({"path": rel, "label": label})
        if manifest:
            write_manifest(root / "manifest.csv", rows)
        return root

    return make
