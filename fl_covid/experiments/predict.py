"""Score unlabelled CT slices with a site's trained model: P(COVID) per image, and means per series and patient.

``fl-covid-predict --model RUN/site-NAME/model --input SCANS/ --out predictions.csv`` decodes every image under
the inputs (PNG, JPEG, TIFF, BMP or DICOM; folders recursively, hidden files skipped) exactly as the model's
training did (the model card's cache size, image size, DICOM window and preprocessing) and writes one row per image: ``path``,
``prob_covid``, ``prediction`` (COVID when prob_covid >= the threshold: --threshold, else the card's), and
``patient_id`` / ``series_uid`` when DICOM tags or a ``manifest.csv`` (columns path, patient_id) in an input
folder give them; the manifest's patient_id wins over the DICOM tag. With ids, ``<out stem>_patients.csv`` and
``<out stem>_series.csv`` hold each group's mean P(COVID), number of images and decision at the same threshold
(a slice-level threshold applied to a mean: not calibrated for patients).

Shift: when the model card holds a shift profile (``fl_covid.shift``), every image gets ``shift_score`` and
``shift_flag`` (1 when the score exceeds 1: the image lies outside what the model's training site looks like, which
about 5% of that site's own images do), each patient / series the fraction of its images flagged and a majority
flag, and ``<out stem>_shift.json`` the summary: images flagged, the batch test of the inputs as a whole against
the training images, and the AUC measured at unseen sites when the card has one. A console warning says when the
inputs look shifted: the scores may then mean nothing.

BN: ``site`` keeps the model's own BatchNorm statistics; ``adapt`` re-estimates them on the inputs (a hospital that
did not train: unlabelled images of one source, a few dozen at least, are needed). ``--gradcam DIR`` writes a
Grad-CAM map of the COVID logit per image. Research use only, not for diagnosis (see the model card).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fl_covid.cli import run_command
from fl_covid.data import CLASSES, decode_image, eval_input, is_dicom, is_image_file, read_manifest
from fl_covid.dicom import dicom_tags
from fl_covid.engine import predict, recalibrate_bn, select_device
from fl_covid.errors import DataError
from fl_covid.experiments.gradcam import grad_cam, plot_grid
from fl_covid.preprocess import Preprocessing
from fl_covid.reporting import write_csv, write_json
from fl_covid.shift import ShiftCheck, check_shift, far_from_all, group_flags, image_columns, warning_text
from fl_covid.site_model import load_site_model

log = logging.getLogger(__name__)

BN_CHOICES = ("site", "adapt")
ID_COLUMNS = ("patient_id", "series_uid")


class NothingScored(DataError):
    """No input image could be decoded."""


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given (decoded whatever their type), and the image files under folders, recursively, sorted;
    hidden files and folders are skipped; each file once."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            images = [f for f in files if is_image_file(f)]
            if other := sorted(set(files) - set(images) - {p / "manifest.csv"}):
                log.warning("%s: ignoring %d files that are not images (an image suffix, or DICOM with the DICM "
                            "marker), e.g. %s", p, len(other), other[0])
            out += images
        else:
            raise DataError(f"input {p} does not exist")
    unique: dict[Path, Path] = {}
    for f in out:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def manifest_patient_ids(inputs: Sequence[str | Path]) -> dict[Path, str]:
    """patient_id per resolved file path from the ``manifest.csv`` (columns path, patient_id) of input folders."""
    ids: dict[Path, str] = {}
    for item in inputs:
        file = Path(item).expanduser() / "manifest.csv"
        if not file.is_file():
            continue
        rows = read_manifest(file)
        if rows and not {"path", "patient_id"} <= set(rows[0]):
            log.warning("%s has no 'path' and 'patient_id' columns; not used for patient ids", file)
            continue
        for row in rows:
            if pid := (row.get("patient_id") or "").strip():
                ids[(file.parent / (row.get("path") or "").strip()).resolve()] = pid
    return ids


def decode_inputs(files: list[Path], cache_size: int, prep: Preprocessing, skip_unreadable: bool,
                  workers: int = 4, show_progress: bool = True) -> tuple[list[Path], torch.Tensor, list[dict]]:
    """Decode ``files`` (the training preprocessing): kept paths, uint8 (N, 1, R, R) and DICOM tags per image.

    An unreadable file raises its DataError, or with ``skip_unreadable`` is logged and left out."""
    def one(path: Path) -> tuple[np.ndarray | None, dict]:
        try:
            image = decode_image(path, cache_size, prep)
        except DataError as e:
            if not skip_unreadable:
                raise
            log.warning("skipping unreadable image (--skip-unreadable): %s", e)
            return None, {}
        if is_dicom(path):
            return image, dicom_tags(path)
        return image, {}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = list(tqdm(pool.map(one, files), total=len(files), desc="decode", unit="image",
                            disable=not show_progress))
    kept = [i for i, (image, _) in enumerate(decoded) if image is not None]
    if not kept:
        raise NothingScored(f"nothing could be scored: none of the {len(files)} input files could be decoded")
    if len(kept) < len(files):
        log.warning("%d of %d input files skipped as unreadable", len(files) - len(kept), len(files))
    images = torch.from_numpy(np.stack([decoded[i][0] for i in kept])).unsqueeze(1)
    return [files[i] for i in kept], images, [decoded[i][1] for i in kept]


def aggregate(rows: list[dict], key: str, threshold: float) -> list[dict]:
    """Mean P(COVID), number of images and decision per value of ``key`` (rows without one are left out); with
    shift flags, the fraction of the group's images flagged and whether most are."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row.get(key):
            groups.setdefault(row[key], []).append(row)
    shift = (group_flags([r.get(key, "") for r in rows], np.array([r["shift_flag"] for r in rows]))
             if rows and "shift_flag" in rows[0] else {})
    out = []
    for value, members in sorted(groups.items()):
        mean = float(np.mean([r["prob_covid"] for r in members]))
        entry = {key: value}
        if key == "series_uid":
            entry["patient_id"] = ";".join(sorted({r.get("patient_id", "") for r in members} - {""}))
        out.append({**entry, "n_images": len(members), "mean_prob_covid": mean,
                    "prediction": CLASSES[int(mean >= threshold)]})
        if value in shift:
            out[-1] |= {"shift_fraction": shift[value][0], "shift_flag": int(shift[value][1])}
    return out


def write_gradcams(model: torch.nn.Module, images: torch.Tensor, paths: list[Path], probs: np.ndarray,
                   image_size: int, folder: Path, batch_size: int, device: torch.device,
                   show_progress: bool = True) -> list[Path]:
    """One PNG per image in ``folder``: the image above its Grad-CAM of the COVID logit at the last stage."""
    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / f"{i:05d}-{p.stem}.png" for i, p in enumerate(paths)]
    with tqdm(total=len(paths), desc="grad-cam", unit="image", disable=not show_progress) as bar:
        for start in range(0, len(paths), batch_size):
            x = eval_input(images[start:start + batch_size].to(device), image_size)
            cams = grad_cam(model, model.last_stage, x, target=1)
            for j in range(len(x)):
                i = start + j
                plot_grid(out[i], x[j:j + 1], cams[j:j + 1], [f"p(COVID)={probs[i]:.2f}"], paths[i].name)
            bar.update(len(x))
    return out


def report_shift(out: Path, check: ShiftCheck, rows: list[dict], id_columns: list[str],
                 unseen_auc: dict[str, Any]) -> Path:
    """Write ``<out stem>_shift.json`` (the summary, groups flagged, the card's unseen-site AUC) and warn on the
    console when the inputs look shifted; returns the JSON file."""
    _, summary = far_from_all([check])
    for key in id_columns:
        groups = group_flags([r[key] for r in rows], np.array([r["shift_flag"] for r in rows]))
        summary[f"{key.split('_')[0]}s"] = {"n": len(groups), "flagged": sum(f for _, f in groups.values())}
    summary["unseen_site_auc"] = unseen_auc
    file = out.with_name(f"{out.stem}_shift.json")
    write_json(file, summary)
    if text := warning_text(summary, unseen_auc):
        log.warning("%s (details: %s)", text, file)
    else:
        log.info("shift check: %d of %d images flagged, the inputs as a whole %s (%s)", summary["flagged"],
                 summary["images"], "not tested" if not check.batch["tested"] else "like the training images", file)
    return file


def run_predict(model_dir: str | Path, inputs: Sequence[str | Path], out: str | Path = "predictions.csv",
                threshold: float | None = None, bn: str = "site", gradcam: str | Path | None = None,
                skip_unreadable: bool = False, batch_size: int = 64, device: str = "auto",
                show_progress: bool = True) -> Path:
    """Score every image of ``inputs`` with the site model in ``model_dir``; returns the CSV written (``out``)."""
    if bn not in BN_CHOICES:
        raise ValueError(f"--bn must be one of {BN_CHOICES}, got {bn!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    site_model = load_site_model(model_dir)
    cfg, model = site_model.config, site_model.model
    threshold = site_model.threshold if threshold is None else threshold
    files = find_inputs(inputs)
    if not files:
        raise NothingScored(f"nothing could be scored: no image files under {', '.join(map(str, inputs))}")
    paths, images, tags = decode_inputs(files, cfg.cache_size, cfg.preprocessing,
                                        skip_unreadable, show_progress=show_progress)
    dev = select_device(device)
    check = None
    if (profile := site_model.card.get("shift")) is not None:  # under the site's own BN, before any adaptation
        check = check_shift(profile, site_model.card["site"], model, images, cfg.image_size, batch_size, dev)
    else:
        log.warning("the model card has no shift profile (a model trained on too few images, or written before "
                    "cards had one): the inputs are not checked against the training images")
    if bn == "adapt":
        if len(images) < 2:
            raise ValueError("--bn adapt re-estimates BN statistics from the inputs and needs at least 2 images")
        recalibrate_bn(model, images, cfg.image_size, batch_size=batch_size, device=dev)
    probs, _ = predict(model, images, 0, cfg.image_size, batch_size, dev)

    from_manifest = manifest_patient_ids([i for i in inputs if Path(i).expanduser().is_dir()])
    rows = []
    for path, p, t in zip(paths, probs.tolist(), tags):
        ids = {**t, **({"patient_id": pid} if (pid := from_manifest.get(path.resolve())) else {})}
        rows.append({"path": str(path), "prob_covid": p, "prediction": CLASSES[int(p >= threshold)], **ids})
    id_columns = [c for c in ID_COLUMNS if any(r.get(c) for r in rows)]
    rows = [{k: v for k, v in r.items() if k not in ID_COLUMNS} | {c: r.get(c, "") for c in id_columns}
            for r in rows]
    if check is not None:
        for row, columns in zip(rows, image_columns(check.scores.score)):
            row |= columns
    if gradcam:
        maps = write_gradcams(model, images, paths, probs, cfg.image_size, Path(gradcam), batch_size, dev,
                              show_progress)
        for row, m in zip(rows, maps):
            row["gradcam"] = str(m)
        log.info("Grad-CAM maps of %d images in %s", len(maps), gradcam)

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows)
    for key, suffix in (("patient_id", "_patients"), ("series_uid", "_series")):
        if key in id_columns:
            file = out.with_name(f"{out.stem}{suffix}.csv")
            write_csv(file, aggregate(rows, key, threshold))
            log.info("per-%s means -> %s", key.split("_")[0], file)
    if check is not None:
        report_shift(out, check, rows, id_columns, site_model.card.get("unseen_site_auc") or {})
    n_covid = sum(r["prediction"] == CLASSES[1] for r in rows)
    log.info("%d images scored (BN %s, threshold %.3f): %d COVID, %d NonCOVID", len(rows), bn, threshold, n_covid,
             len(rows) - n_covid)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-covid-predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="site model folder (RUN/site-NAME/model: model.pt, "
                                                       "model.json)")
    parser.add_argument("--input", required=True, nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    parser.add_argument("--threshold", type=float, help="P(COVID) at or above which an image is COVID (default: "
                                                        "the model card's)")
    parser.add_argument("--bn", choices=BN_CHOICES, default="site",
                        help="the model's own BN statistics (default) or re-estimated on the inputs")
    parser.add_argument("--gradcam", metavar="DIR", help="write a Grad-CAM PNG per image into DIR")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip unreadable files with a warning instead of stopping")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2")

    def work() -> int:
        print(run_predict(args.model, args.input, args.out, args.threshold, args.bn, args.gradcam,
                          args.skip_unreadable, args.batch_size, args.device))
        return 0

    return run_command(work, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
