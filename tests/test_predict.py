"""fl-covid-predict on a real trained site model: real CT images and DICOM slices in, probabilities out."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl_covid.centralized import run_central
from fl_covid.config import load_config
from fl_covid.data import decode_image
from fl_covid.engine import predict, recalibrate_bn
from fl_covid.experiments.predict import main
from fl_covid.site_model import load_site_model
from tests.conftest import write_manifest
from tests.test_dicom import phantom, write_slice

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE_B = REPO_ROOT / "data" / "site_b_covidct"
DICOM = {"scan/P1/IM0001.dcm": ("P1", "1.2.3.1"), "scan/P1/IM0002.dcm": ("P1", "1.2.3.1"),
         "scan/P2/IM0001": ("P2", "1.2.3.2")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real model: the smoke config, one epoch on 12 + 12 images of the embedded Site A."""
    out = tmp_path_factory.mktemp("runs")
    config = load_config("configs/smoke.yaml", {"sites": "site_a_sarscov2", "output-dir": str(out)})
    run = run_central(config, "single", show_progress=False)
    return run / "site-site_a_sarscov2" / "model"


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """4 real Site B images (2 per class) and 3 synthetic DICOM slices of 2 patients, plus a text file."""
    folder = tmp_path / "in"
    for label in ("COVID", "NonCOVID"):
        (folder / label).mkdir(parents=True)
        for src in sorted((SITE_B / label).iterdir())[:2]:
            shutil.copyfile(src, folder / label / src.name)
    for i, (rel, (patient, series)) in enumerate(DICOM.items()):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        write_slice(folder / rel, phantom(seed=i), patient_id=patient, series_uid=series)
    (folder / "README.txt").write_text("scans of 2024\n", encoding="utf-8")
    (folder / ".hidden.png").write_bytes(b"not an image")
    return folder


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def engine_probs(model_dir: Path, paths: list[Path], adapt: bool = False) -> np.ndarray:
    """P(COVID) straight from the engine on the same files, decoded with the card's preprocessing."""
    site_model = load_site_model(model_dir)
    cfg = site_model.config
    images = torch.from_numpy(np.stack([decode_image(p, cfg.cache_size, cfg.preprocessing) for p in paths]))
    images = images.unsqueeze(1)
    if adapt:
        recalibrate_bn(site_model.model, images, cfg.image_size, batch_size=64)
    return predict(site_model.model, images, 0, cfg.image_size, 64)[0]


def test_predictions_match_the_engine_and_the_threshold(model_dir: Path, inputs: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "predictions.csv"
    assert main(["--model", str(model_dir), "--input", str(inputs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "prob_covid", "prediction", "patient_id", "series_uid"]
    paths = [Path(r["path"]) for r in rows]
    assert len(rows) == 7 and all(p.is_relative_to(inputs) and not p.name.startswith(".") for p in paths)
    probs = np.array([float(r["prob_covid"]) for r in rows])
    assert ((0 <= probs) & (probs <= 1)).all()
    np.testing.assert_allclose(probs, engine_probs(model_dir, paths), atol=1e-6)
    threshold = load_site_model(model_dir).threshold
    assert [r["prediction"] for r in rows] == ["COVID" if p >= threshold else "NonCOVID" for p in probs]
    ids = {Path(r["path"]).relative_to(inputs).as_posix(): (r["patient_id"], r["series_uid"]) for r in rows}
    assert {k: v for k, v in ids.items() if k in DICOM} == DICOM
    assert all(v == ("", "") for k, v in ids.items() if k not in DICOM)


def test_threshold_option_sets_the_decisions(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    first = read_rows(_run(model_dir, inputs, tmp_path / "a.csv"))
    probs = sorted(float(r["prob_covid"]) for r in first)
    threshold = (probs[2] + probs[3]) / 2  # 3 below, 4 above
    rows = read_rows(_run(model_dir, inputs, tmp_path / "b.csv", "--threshold", str(threshold)))
    assert sum(r["prediction"] == "COVID" for r in rows) == 4
    assert all((r["prediction"] == "COVID") == (float(r["prob_covid"]) >= threshold) for r in rows)
    assert main(["--model", str(model_dir), "--input", str(inputs), "--threshold", "1.5"]) == 2


def _run(model_dir: Path, inputs: Path, out: Path, *extra: str) -> Path:
    assert main(["--model", str(model_dir), "--input", str(inputs), "--out", str(out), *extra]) == 0
    return out


def test_patient_and_series_means(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    real = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.jpg"))
    write_manifest(inputs / "manifest.csv", [{"path": real[0], "patient_id": "P9"}, {"path": real[1],
                                                                                      "patient_id": "P9"},
                                             {"path": "scan/P2/IM0001", "patient_id": "P2-from-manifest"}])
    out = _run(model_dir, inputs, tmp_path / "p.csv", "--threshold", "0.5")
    rows = read_rows(out)
    by_patient: dict[str, list[float]] = {}
    for r in rows:
        if r["patient_id"]:
            by_patient.setdefault(r["patient_id"], []).append(float(r["prob_covid"]))
    assert sorted(by_patient) == ["P1", "P2-from-manifest", "P9"]  # the manifest wins over the DICOM tag
    patients = read_rows(tmp_path / "p_patients.csv")
    assert [(r["patient_id"], int(r["n_images"])) for r in patients] == [("P1", 2), ("P2-from-manifest", 1),
                                                                          ("P9", 2)]
    for r in patients:
        mean = float(np.mean(by_patient[r["patient_id"]]))
        assert float(r["mean_prob_covid"]) == pytest.approx(mean)
        assert r["prediction"] == ("COVID" if mean >= 0.5 else "NonCOVID")
    series = read_rows(tmp_path / "p_series.csv")
    assert [(r["series_uid"], r["patient_id"], int(r["n_images"])) for r in series] == [
        ("1.2.3.1", "P1", 2), ("1.2.3.2", "P2-from-manifest", 1)]


def test_no_ids_no_group_files(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    shutil.rmtree(inputs / "scan")
    rows = read_rows(_run(model_dir, inputs, tmp_path / "p.csv"))
    assert list(rows[0]) == ["path", "prob_covid", "prediction"] and len(rows) == 4
    assert not (tmp_path / "p_patients.csv").exists() and not (tmp_path / "p_series.csv").exists()


def test_bn_adapt_re_estimates_statistics_on_the_inputs(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    site = read_rows(_run(model_dir, inputs, tmp_path / "site.csv"))
    adapt = read_rows(_run(model_dir, inputs, tmp_path / "adapt.csv", "--bn", "adapt"))
    paths = [Path(r["path"]) for r in adapt]
    probs = np.array([float(r["prob_covid"]) for r in adapt])
    np.testing.assert_allclose(probs, engine_probs(model_dir, paths, adapt=True), atol=1e-5)
    assert not np.allclose(probs, [float(r["prob_covid"]) for r in site], atol=1e-4)


def test_unreadable_file_stops_the_run_or_is_skipped(model_dir: Path, inputs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    bad = inputs / "COVID" / "broken.png"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    assert main(["--model", str(model_dir), "--input", str(inputs), "--out", str(tmp_path / "p.csv")]) == 2
    assert re.search(rf"error: cannot read image {re.escape(str(bad))}", capsys.readouterr().err)
    assert not (tmp_path / "p.csv").exists()
    rows = read_rows(_run(model_dir, inputs, tmp_path / "p.csv", "--skip-unreadable"))
    assert len(rows) == 7 and str(bad) not in {r["path"] for r in rows}


def test_nothing_scored_exits_2(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG broken")
    write_slice(folder / "b.dcm", phantom(), frames=2)
    args = ["--model", str(model_dir), "--out", str(tmp_path / "p.csv"), "--skip-unreadable"]
    assert main([*args, "--input", str(folder)]) == 2
    assert "nothing could be scored: none of the 2 input files could be decoded" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*args, "--input", str(tmp_path / "empty")]) == 2
    assert "nothing could be scored: no image files" in capsys.readouterr().err
    assert main([*args, "--input", str(tmp_path / "nowhere")]) == 2
    assert f"input {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_gradcam_writes_a_png_per_image(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copyfile(sorted((SITE_B / "COVID").iterdir())[0], folder / "real.jpg")
    write_slice(folder / "slice.dcm", phantom(), patient_id="P1")
    rows = read_rows(_run(model_dir, folder, tmp_path / "p.csv", "--gradcam", str(tmp_path / "cams")))
    maps = [Path(r["gradcam"]) for r in rows]
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(p.name for p in maps)
    assert [p.name for p in maps] == ["00000-real.png", "00001-slice.png"]
    for p in maps:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_help_and_console_script() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["fl-covid-predict"] == "fl_covid.experiments.predict:main"
    out = subprocess.run([sys.executable, "-m", "fl_covid.experiments.predict", "--help"], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: fl-covid-predict")
    for option in ("--model", "--input", "--out", "--threshold", "--bn", "--gradcam", "--skip-unreadable",
                   "--batch-size"):
        assert option in out.stdout
