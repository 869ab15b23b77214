"""Sites on disk -> decoded, cached uint8 tensors; leakage-free grouped K-fold splits; tensor augmentation.

A site is a folder with ``COVID/`` and ``NonCOVID/`` images (PNG, JPEG, BMP or TIFF; any size; grey, RGB or
RGBA; 8 or 16 bit; or DICOM slices, see ``fl_covid.dicom``) and an optional ``manifest.csv`` with columns
``path, label`` and optionally ``patient_id``, ``dup_group`` and ``split``. Images are decoded once, converted to
grey and resized to a square cache; the three input channels are made at batch time. A DICOM file's PatientID and
SeriesInstanceUID group its slices like the manifest's ``patient_id`` (which wins when given) and ``dup_group``.
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold

from fl_covid.config import Config
from fl_covid.dicom import dicom_tags, read_dicom
from fl_covid.errors import DataError
from fl_covid.preprocess import Preprocessing

log = logging.getLogger(__name__)

CLASSES = ("NonCOVID", "COVID")  # index = label: COVID is the positive class 1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
MIN_SIDE = 16


# The licences of the two public datasets (data/README.md); another site's data is its owner's to state, in a
# LICENSE or LICENCE file beside its images.
DATASET_LICENCES = {
    "site_a_sarscov2": "CC BY-NC-SA 4.0 (SARS-CoV-2 CT-scan dataset, Soares et al. 2020): non-commercial, "
                       "share-alike",
    "site_b_covidct": "no open licence (COVID-CT, Zhao et al. 2020): copyright of the source papers' authors and "
                      "publishers; research use only, not to be redistributed",
}


def data_licence(site: str, root: Path | None = None) -> str:
    """The licence of a site's images: the first line of a LICENSE / LICENCE file in its folder, else the known
    public dataset's, else a note that the data owner has to state it."""
    for name in ("LICENSE", "LICENCE", "LICENSE.txt", "LICENCE.txt"):
        if root is not None and (file := Path(root) / name).is_file():
            lines = file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            return lines[0][:300] if lines else "an empty licence file"
    return DATASET_LICENCES.get(site, "not stated: ask the owner of this site's data")


@dataclass(frozen=True)
class Site:
    """One hospital's images, decoded once. ``images``: (N, 1, R, R) uint8; ``labels``: (N,) int64; per image its
    ``groups`` key (``group_keys``), ``patient_ids`` (the manifest's, else the DICOM header's; '' when neither
    gives one) and ``official`` split (the manifest's ``split`` column, '' without one)."""

    name: str
    root: Path
    paths: tuple[str, ...]
    images: torch.Tensor
    labels: torch.Tensor
    groups: tuple[str, ...]
    patient_ids: tuple[str, ...]
    official: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Split:
    """Indices into a ``Site`` for one fold: train, validation (inside the training folds) and test."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    protocol: str


def read_manifest(file: Path) -> list[dict[str, str]]:
    """The rows of a ``manifest.csv`` (UTF-8, a BOM allowed), each a dict of its columns; DataError naming the file
    when it is not UTF-8 CSV. Which columns it needs is for its reader to check."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from e
    except csv.Error as e:
        raise DataError(f"{file} is not CSV ({e}); save it as UTF-8 CSV") from e


def _site_manifest(root: Path, name: str) -> list[dict[str, str]]:
    """A site's manifest rows, checked: labels among CLASSES, every path once and an existing file."""
    file = root / "manifest.csv"
    try:
        rows = read_manifest(file)
    except DataError as e:
        raise DataError(f"site '{name}': {e}") from e
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"site '{name}': {file} needs a header with at least 'path' and 'label' and one row")
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):
        path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if label not in CLASSES:
            raise DataError(f"site '{name}': {file} line {i}: label {label!r} for {path!r} is not one of "
                            f"{CLASSES}")
        if path in seen:
            raise DataError(f"site '{name}': {file} line {i}: path {path!r} is listed twice")
        if not (root / path).is_file():
            raise DataError(f"site '{name}': {file} line {i}: file {path!r} does not exist under {root}")
        seen.add(path)
    return rows


def _scan_folders(root: Path, name: str) -> list[dict[str, str]]:
    rows = []
    for label in CLASSES:
        folder = root / label
        if not folder.is_dir():
            raise DataError(f"site '{name}' has no {label}/ folder under {root} "
                            f"(expected {CLASSES[1]}/ and {CLASSES[0]}/ folders of images)")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if is_image_file(p)]
        for p in sorted(set(files) - set(images)):
            log.warning("site '%s': skipping %s (not an image file type: %s, or DICOM with the DICM marker at "
                        "byte 128)", name, p, ", ".join(sorted(IMAGE_SUFFIXES)))
        rows += [{"path": p.relative_to(root).as_posix(), "label": label} for p in images]
    return rows


def has_dicom_marker(path: Path) -> bool:
    """True when ``path`` starts like a DICOM file: a 128-byte preamble, then ``DICM``."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    """A file a folder scan takes: an image suffix, or a DICOM file (by its marker, whatever its name)."""
    return path.suffix.lower() in IMAGE_SUFFIXES or has_dicom_marker(path)


def is_dicom(path: Path) -> bool:
    """Decode ``path`` as DICOM: a .dcm / .dicom suffix, or the DICM marker on a file without an image suffix."""
    suffix = path.suffix.lower()
    return suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and has_dicom_marker(path))


def _finish(im: Image.Image, path: Path, size: int, prep: Preprocessing) -> np.ndarray:
    """Grey image -> (preprocessed, ``prep``) ``size x size`` uint8."""
    if min(im.size) < MIN_SIDE:
        raise DataError(f"image {path} is only {im.size[0]}x{im.size[1]} px (< {MIN_SIDE}); "
                        "remove it or supply the full-resolution slice")
    if prep.changes_pixels:
        im = Image.fromarray(np.ascontiguousarray(prep(np.asarray(im.convert("L")))))
    return np.asarray(im.convert("L").resize((size, size), Image.BILINEAR, reducing_gap=2.0))


def decode_image(path: Path, size: int, prep: Preprocessing = Preprocessing()) -> np.ndarray:
    """Read one image file as grey, preprocess it (``prep``) and resize it (bilinear, antialiased) to
    ``size x size`` uint8; DataError if bad. DICOM files go through ``fl_covid.dicom.read_dicom``."""
    if is_dicom(path):
        return _finish(Image.fromarray(read_dicom(path, *prep.window)[0]), path, size, prep)
    try:
        with Image.open(path) as im:
            im.draft("L", (size, size))  # JPEG: decode at reduced scale when the file is much larger
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float32)
                lo, hi = float(a.min()), float(a.max())
                im = Image.fromarray(((a - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8))
            elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            return _finish(im, path, size, prep)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}; replace or remove the file "
                        "(or set skip-unreadable=true to skip such files with a warning)") from e


def site_rows(root: Path, name: str, exclude_label_conflicts: bool = True) -> list[dict[str, str]]:
    """A site folder's images as rows (``path``, ``label`` and the manifest's other columns): its ``manifest.csv``
    (checked) when it has one, else the image files under its COVID/ and NonCOVID/ folders; without the images
    whose duplicate group holds both labels (logged), unless ``exclude_label_conflicts`` is False."""
    rows = _site_manifest(root, name) if (root / "manifest.csv").is_file() else _scan_folders(root, name)
    if exclude_label_conflicts and (bad := _label_conflicts(rows)):
        log.warning("site '%s': excluding %d images whose duplicate group has both labels: %s", name, len(bad),
                    ", ".join(rows[i]["path"] for i in sorted(bad)))
        rows = [r for i, r in enumerate(rows) if i not in bad]
    return rows


def class_subset(rows: list[dict[str, str]], max_per_class: int, seed: int) -> list[int]:
    """Indices (ascending) of a seeded random subset of at most ``max_per_class`` rows of each class."""
    rng = np.random.default_rng(seed)
    return sorted(i for label in CLASSES
                  for i in rng.permutation([j for j, r in enumerate(rows) if r["label"] == label])[:max_per_class])


def group_keys(rows: list[dict[str, str]]) -> list[str]:
    """Group key per row: connected components of the rows sharing a patient_id, dup_group or series_uid, so that
    a patient's images and a near-duplicate cluster are one group."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        for col in ("patient_id", "dup_group", "series_uid"):
            if v := (row.get(col) or "").strip():
                j = first.setdefault((col, v), i)
                parent[find(i)] = find(j)
    return [f"g{find(i)}" for i in range(len(rows))]


def _with_dicom_tags(root: Path, name: str, rows: list[dict[str, str]], workers: int) -> list[dict[str, str]]:
    """Rows with ``patient_id`` and ``series_uid`` from DICOM headers where the manifest gives none."""
    dicom = [i for i, r in enumerate(rows) if is_dicom(root / r["path"])]
    if not dicom:
        return rows
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        tags = list(pool.map(lambda i: dicom_tags(root / rows[i]["path"]), dicom))
    rows = [dict(r) for r in rows]
    for i, t in zip(dicom, tags):
        for col, value in t.items():
            if value and not (rows[i].get(col) or "").strip():
                rows[i][col] = value
    patients = {rows[i].get("patient_id") for i in dicom} - {"", None}
    log.info("site '%s': %d DICOM files, %d patients and %d series among their ids", name, len(dicom),
             len(patients), len({rows[i].get("series_uid") for i in dicom} - {"", None}))
    return rows


def _label_conflicts(rows: list[dict[str, str]]) -> set[int]:
    """Rows whose duplicate group holds both labels (the same image filed as COVID and NonCOVID)."""
    labels: dict[str, set[str]] = {}
    for row in rows:
        if g := (row.get("dup_group") or "").strip():
            labels.setdefault(g, set()).add(row["label"].strip())
    return {i for i, row in enumerate(rows) if len(labels.get((row.get("dup_group") or "").strip(), ())) > 1}


def load_site(
    root: str | Path,
    cache_size: int,
    name: str | None = None,
    max_per_class: int = 0,
    seed: int = 0,
    exclude_label_conflicts: bool = True,
    skip_unreadable: bool = False,
    workers: int = 4,
    prep: Preprocessing = Preprocessing(),
) -> Site:
    """Decode a site folder into memory at ``cache_size`` (preprocessed by ``prep``); optionally a seeded subset
    of ``max_per_class``."""
    root = Path(root).expanduser().resolve()
    name = name or root.name
    if not root.is_dir():
        raise DataError(f"site '{name}': folder {root} does not exist (check data-root and sites)")
    rows = _with_dicom_tags(root, name, site_rows(root, name, exclude_label_conflicts), workers)
    groups = group_keys(rows)
    if max_per_class:
        keep = class_subset(rows, max_per_class, seed)
        rows, groups = [rows[i] for i in keep], [groups[i] for i in keep]
    for label in CLASSES:
        if not any(r["label"] == label for r in rows):
            raise DataError(f"site '{name}' has no {label} images under {root} "
                            f"(a site needs both {CLASSES[1]} and {CLASSES[0]} images)")

    def decode(row: dict[str, str]) -> np.ndarray | None:
        try:
            return decode_image(root / row["path"], cache_size, prep)
        except DataError as e:
            if not skip_unreadable:
                raise
            log.warning("site '%s': skipping unreadable image (skip-unreadable=true): %s", name, e)
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(pool.map(decode, rows))
    kept = [i for i, a in enumerate(arrays) if a is not None]
    if len(kept) < len(rows):
        log.warning("site '%s': %d of %d images skipped as unreadable", name, len(rows) - len(kept), len(rows))
    images = torch.from_numpy(np.stack([arrays[i] for i in kept])).unsqueeze(1)
    labels = torch.tensor([CLASSES.index(rows[i]["label"].strip()) for i in kept], dtype=torch.int64)
    if labels.min() == labels.max():
        raise DataError(f"site '{name}': after skipping unreadable files only {CLASSES[int(labels[0])]} images "
                        f"remain under {root}")
    return Site(
        name=name, root=root, paths=tuple(rows[i]["path"] for i in kept), images=images, labels=labels,
        groups=tuple(groups[i] for i in kept),
        patient_ids=tuple((rows[i].get("patient_id") or "").strip() for i in kept),
        official=tuple((rows[i].get("split") or "").strip() for i in kept),
    )


def check_no_leak(site: Site, split: Split) -> None:
    """Raise if a patient / near-duplicate group or an image is in two parts of the split."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    owner: dict[str, str] = {}
    for part, idx in parts.items():
        if len(set(idx.tolist())) != len(idx):
            raise DataError(f"site '{site.name}': {part} lists an image twice")
        for i in idx.tolist():
            g = site.groups[i] if split.protocol != "image" else f"img{i}"
            if owner.setdefault(g, part) != part:
                raise DataError(f"site '{site.name}': leakage: {site.paths[i]} ({part}) shares its group "
                                f"(patient or near-duplicate) with an image in {owner[g]}")


def make_split(site: Site, protocol: str = "grouped", folds: int = 4, fold: int = 0, val_fraction: float = 0.1,
               seed: int = 0) -> Split:
    """Stratified fold ``fold`` of ``folds``; validation carved from the training folds; checked for leakage.

    ``grouped`` keeps each patient / near-duplicate group in one part (StratifiedGroupKFold), ``image`` is the
    paper's image-level protocol, ``official`` uses the manifest's ``split`` column (train/val/test).
    """
    y = site.labels.numpy()
    n = len(y)
    if protocol == "official":
        parts = {k: np.array([i for i in range(n) if site.official[i] == k], dtype=np.int64)
                 for k in ("train", "val", "test")}
        if not len(parts["train"]) or not len(parts["test"]):
            raise DataError(f"site '{site.name}' has no official train/test split in its manifest "
                            "('split' column); use protocol=grouped")
        split = Split(parts["train"], parts["val"], parts["test"], protocol)
        check_no_leak(site, split)
        return split
    groups = np.array(site.groups if protocol == "grouped" else [f"img{i}" for i in range(n)])
    for label in (0, 1):
        if len(set(groups[y == label])) < folds:
            raise DataError(f"site '{site.name}' has fewer than folds={folds} groups of {CLASSES[label]} "
                            "images; add images or lower folds")
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_val, test = list(outer.split(np.zeros(n), y, groups))[fold]
    n_inner = max(2, round(1 / val_fraction))
    inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed)
    tr, va = next(inner.split(np.zeros(len(train_val)), y[train_val], groups[train_val]))
    split = Split(np.sort(train_val[tr]), np.sort(train_val[va]), np.sort(test), protocol)
    check_no_leak(site, split)
    return split


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> normalised float (B, 3, H, W) with ImageNet constants (grey replicated).

    Runs on the images' device; the constants enter as Python numbers, so a GPU batch needs no host copy."""
    x = images.float().div_(255.0)
    return torch.cat([(x - m) / s for m, s in zip(MEAN.view(3).tolist(), STD.view(3).tolist())], dim=1)


def augment(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Train transform on a cached batch: random ``size`` crop, random H and V flips. (B,1,R,R) -> (B,3,S,S)."""
    return to_input(random_crops(images, size, generator))


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The geometric part of ``augment`` on uint8: (B, 1, R, R) -> (B, 1, S, S), 12x smaller to move to a GPU
    than the normalised 3-channel float batch."""
    b, _, r, _ = images.shape
    if size > r:
        raise ValueError(f"crop {size} is larger than the cached images ({r})")
    off = torch.randint(0, r - size + 1, (2, b), generator=generator)
    ar = torch.arange(size)
    rows = (off[0][:, None] + ar)[:, :, None]  # (B, S, 1)
    cols = (off[1][:, None] + ar)[:, None, :]  # (B, 1, S)
    crops = images[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)  # (B, 1, S, S)
    hflip, vflip = torch.rand(2, b, generator=generator) < 0.5
    crops = torch.where(hflip.view(b, 1, 1, 1), crops.flip(3), crops)
    return torch.where(vflip.view(b, 1, 1, 1), crops.flip(2), crops)


def eval_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Eval transform: resize the cached batch to ``size x size``. (B,1,R,R) uint8 -> (B,3,S,S) float."""
    x = to_input(images)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class IndexStream:
    """Endless seeded shuffles of a set of indices: a smaller site is re-sampled to match a larger one."""

    def __init__(self, indices: np.ndarray, generator: torch.Generator) -> None:
        if len(indices) == 0:
            raise ValueError("cannot sample from an empty set of training images")
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.int64)

    def next(self, n: int) -> torch.Tensor:
        """The next ``n`` indices; a new permutation starts whenever the current one runs out."""
        while len(self._order) < n:
            perm = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
            self._order = torch.cat([self._order, perm])
        out, self._order = self._order[:n], self._order[n:]
        return out


def load_configured_site(config: Config, index: int, root: str | Path | None = None) -> tuple[Site, Split]:
    """Site number ``index`` of ``config.sites`` (under ``root`` or the config's data root) and its split."""
    folder = Path(root) if root else config.resolved_data_root() / config.sites[index]
    site = load_site(folder, config.cache_size, name=config.sites[index], max_per_class=config.max_per_class,
                     seed=config.seed, exclude_label_conflicts=config.exclude_label_conflicts,
                     skip_unreadable=config.skip_unreadable,
                     prep=config.preprocessing)
    split = make_split(site, config.protocol, config.folds, config.fold, config.val_fraction, config.seed)
    log.info("site '%s': %d images, split train/val/test = %d/%d/%d (%s)", site.name, len(site),
             len(split.train), len(split.val), len(split.test), split.protocol)
    return site, split
