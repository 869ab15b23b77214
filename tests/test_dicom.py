"""DICOM slices: Hounsfield units and the lung window, every transfer syntax claimed, the refusals, DICOM sites.

Real files are pydicom's own test data (``pydicom.data.get_testdata_file``, shipped with the package):
CT_small.dcm (CT, explicit VR little endian), 693_J2KI.dcm (CT, JPEG 2000), J2K_pixelrep_mismatch.dcm (CT,
JPEG 2000 lossless), the MR_small family (one MR slice in explicit / implicit VR little endian, explicit big
endian, RLE Lossless, JPEG 2000 lossless and JPEG-LS lossless), JPGExtended.dcm (NM, 12-bit JPEG extended),
SC_rgb_jpeg_gdcm.dcm (colour bars, JPEG Lossless SV1), image_dfl.dcm (deflated) and SC_rgb_rle_2frame.dcm
(two frames). Synthetic slices are written with pydicom: a CT phantom in HU, in several encodings.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from fl_covid.config import Config, load_config
from fl_covid.data import CLASSES, check_no_leak, decode_image, load_configured_site, load_site, make_split
from fl_covid.dicom import WINDOW_LEVEL, WINDOW_WIDTH, dicom_tags, read_dicom
from fl_covid.errors import DataError
from tests.conftest import write_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
MR_SMALL = ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
            "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm")
MPEG2 = UID("1.2.840.10008.1.2.4.100")


def lung_window(hu: np.ndarray, width: float = WINDOW_WIDTH, level: float = WINDOW_LEVEL) -> np.ndarray:
    """Reference: [level - width/2, level + width/2] -> [0, 255], clipped, rounded."""
    return np.rint(np.clip((hu.astype(np.float64) - level + width / 2) / width, 0, 1) * 255).astype(np.uint8)


def phantom(size: int = 64, seed: int = 0) -> np.ndarray:
    """A CT-like slice in HU (int): air, a soft-tissue body, two lungs, a bone ring, noise; -1024..~1400."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    body = xx ** 2 / 0.2 + yy ** 2 / 0.14 < 1
    hu[body] = 40
    hu[((xx + 0.18) ** 2 + yy ** 2 < 0.02) | ((xx - 0.18) ** 2 + yy ** 2 < 0.02)] = -850
    hu[body & (xx ** 2 / 0.2 + yy ** 2 / 0.14 > 0.85)] = 1300
    hu += np.random.default_rng(seed).normal(0, 20, hu.shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int64)


def write_slice(path: Path, hu: np.ndarray, *, signed: bool = True, slope: float = 1.0, intercept: float = -1024.0,
                rescale: bool = True, modality: str = "CT", photometric: str = "MONOCHROME2",
                syntax: UID = ExplicitVRLittleEndian, patient_id: str = "", series_uid: str = "",
                frames: int = 1) -> Path:
    """A single-frame (or ``frames``-frame) 16-bit slice storing ``hu`` through the rescale tags."""
    stored = np.rint((hu - (intercept if rescale else 0.0)) / (slope if rescale else 1.0))
    info = np.iinfo(np.int16 if signed else np.uint16)
    assert info.min <= stored.min() and stored.max() <= info.max, "HU do not fit the stored type"
    pixels = np.repeat(stored[None], frames, 0).astype(np.int16 if signed else np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax if not syntax.is_compressed else ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = modality
    if patient_id:
        ds.PatientID = patient_id
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.tobytes()
    if syntax.is_compressed:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def warnings_about(caplog: pytest.LogCaptureFixture, path: Path) -> str:
    return " ".join(r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and r.name == "fl_covid.dicom" and str(path) in r.getMessage())


# ---------------------------------------------------------------------------------------------- real CT files


def test_ct_small_hounsfield_units_and_lung_window() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0) and hu.min() == -896
    grey, tags = read_dicom(path)
    assert grey.shape == (128, 128) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, lung_window(hu))
    # a 255 HU wide window from 0 HU shows the HU themselves: an intercept or slope error shifts every value
    np.testing.assert_array_equal(read_dicom(path, 255.0, 127.5)[0], np.clip(hu, 0, 255).astype(np.uint8))
    assert tags == {"patient_id": "1CT1", "series_uid": str(ds.SeriesInstanceUID)} == dicom_tags(path)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_real_jpeg2000_ct_slices(name: str) -> None:
    path = Path(get_testdata_file(name))
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    grey, tags = read_dicom(path)
    np.testing.assert_array_equal(grey, lung_window(hu))
    assert grey.shape == (512, 512) and (grey == 0).mean() > 0.05 and (grey == 255).mean() > 0.05  # air, body
    assert tags["patient_id"] == str(ds.PatientID)


def test_mr_small_in_six_transfer_syntaxes_decodes_identically(caplog: pytest.LogCaptureFixture) -> None:
    """One MR slice stored uncompressed (3 encodings), RLE, JPEG 2000 and JPEG-LS lossless: same grey image."""
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array  # 127..2145, no rescale tags
    window = (2100.0, 1136.0)
    with caplog.at_level(logging.WARNING, logger="fl_covid.dicom"):
        images = {name: read_dicom(get_testdata_file(name), *window)[0] for name in MR_SMALL}
    for name, grey in images.items():
        np.testing.assert_array_equal(grey, lung_window(reference, *window), err_msg=name)
        path = get_testdata_file(name)
        assert "modality is MR, not CT" in warnings_about(caplog, path), name
        assert "no RescaleSlope and RescaleIntercept" in warnings_about(caplog, path), name
    assert len(np.unique(images["MR_small.dcm"])) > 100


def test_real_jpeg_lossless_colour_file_is_grey_by_luma(caplog: pytest.LogCaptureFixture) -> None:
    """SC_rgb_jpeg_gdcm.dcm: JPEG Lossless colour bars (pydicom's documented values) -> ITU-R 601 luma."""
    path = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")
    with caplog.at_level(logging.WARNING, logger="fl_covid.dicom"):
        grey, _ = read_dicom(path)
    bars = [(255, 0, 0), (255, 128, 128), (0, 255, 0), (128, 255, 128), (0, 0, 255), (128, 128, 255), (0, 0, 0),
            (64, 64, 64), (192, 192, 192), (255, 255, 255)]
    expected = [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in bars]
    assert [int(grey[row, 50]) for row in range(5, 100, 10)] == expected
    assert "colour image (RGB) made grey" in warnings_about(caplog, path)


def test_real_jpeg_extended_12_bit_and_deflated_files_decode() -> None:
    for name in ("JPGExtended.dcm", "image_dfl.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        grey, _ = read_dicom(get_testdata_file(name), 4096.0, 2048.0)
        np.testing.assert_array_equal(grey, lung_window(ds.pixel_array, 4096.0, 2048.0), err_msg=name)


# ---------------------------------------------------------------------------------------------- synthetic slices


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                    RLELossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_lossless_syntaxes_give_the_windowed_hounsfield_units(tmp_path: Path, syntax: UID) -> None:
    hu = phantom()
    path = write_slice(tmp_path / "slice.dcm", hu, syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    grey, _ = read_dicom(path)
    np.testing.assert_array_equal(grey, lung_window(hu))
    assert grey.min() < 70 and grey.max() == 255 and len(np.unique(grey)) > 20  # air ~59, bone white


def test_jpeg_baseline_slice_matches_its_codestream(tmp_path: Path) -> None:
    """An 8-bit JPEG baseline slice (Pillow's codestream, encapsulated): HU = stored * 8 - 1024."""
    stored = np.clip((phantom() + 1024) // 8, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CT", *stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = 8, -1024
    ds.PixelData = encapsulate([buf.getvalue()])
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float64)
    grey, _ = read_dicom(tmp_path / "jpeg.dcm")
    assert np.abs(grey.astype(int) - lung_window(decoded * 8 - 1024).astype(int)).max() <= 2  # IDCTs differ by 1


def test_16_bit_signed_and_unsigned_store_the_same_slice(tmp_path: Path) -> None:
    hu = phantom()
    signed = write_slice(tmp_path / "signed.dcm", hu, signed=True, intercept=0.0)  # HU stored as they are
    unsigned = write_slice(tmp_path / "unsigned.dcm", hu, signed=False, intercept=-1024.0)
    scaled = write_slice(tmp_path / "scaled.dcm", hu, signed=False, slope=0.5, intercept=-1024.0)  # 2 per HU
    assert pydicom.dcmread(signed).pixel_array.min() < 0 <= pydicom.dcmread(unsigned).pixel_array.min()
    expected = lung_window(hu)
    for path in (signed, unsigned, scaled):
        np.testing.assert_array_equal(read_dicom(path)[0], expected, err_msg=path.name)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    hu = phantom()
    grey, _ = read_dicom(write_slice(tmp_path / "m1.dcm", hu, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(grey, 255 - lung_window(hu))


def test_missing_rescale_warns_and_takes_stored_values_as_hu(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    hu = phantom()
    path = write_slice(tmp_path / "norescale.dcm", hu, rescale=False)
    with caplog.at_level(logging.WARNING, logger="fl_covid.dicom"):
        grey, _ = read_dicom(path)
    np.testing.assert_array_equal(grey, lung_window(hu))
    assert "no RescaleSlope and RescaleIntercept" in warnings_about(caplog, path)


def test_non_ct_modality_warns_and_is_decoded_the_same_way(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    hu = phantom()
    path = write_slice(tmp_path / "cr.dcm", hu, modality="CR")
    with caplog.at_level(logging.WARNING, logger="fl_covid.dicom"):
        grey, _ = read_dicom(path)
    np.testing.assert_array_equal(grey, lung_window(hu))
    assert "modality is CR, not CT" in warnings_about(caplog, path)


def test_window_is_configurable(tmp_path: Path) -> None:
    assert (Config().dicom_window_width, Config().dicom_window_level) == (WINDOW_WIDTH, WINDOW_LEVEL) == (1500, -600)
    hu = phantom()
    path = write_slice(tmp_path / "slice.dcm", hu)
    np.testing.assert_array_equal(read_dicom(path, 400.0, 40.0)[0], lung_window(hu, 400.0, 40.0))
    assert not np.array_equal(read_dicom(path, 400.0, 40.0)[0], read_dicom(path)[0])


def test_non_conformant_uid_and_odd_tags_only_warn(tmp_path: Path) -> None:
    hu = phantom()
    path = write_slice(tmp_path / "odd.dcm", hu, patient_id="P 01")
    ds = pydicom.dcmread(path)
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SeriesInstanceUID = "1.2.840.abc.01"  # letters: not a valid UID
    with pytest.warns(UserWarning, match="Invalid value for VR AS"):
        ds.PatientAge = "forty"  # not an age string
    ds.add_new(0x00091010, "LO", "a private tag")
    ds.save_as(path, enforce_file_format=True)
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE  # a strict setting is overridden
    try:
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):
            grey, tags = read_dicom(path)
    finally:
        pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    np.testing.assert_array_equal(grey, lung_window(hu))
    assert tags == {"patient_id": "P 01", "series_uid": "1.2.840.abc.01"}


# ---------------------------------------------------------------------------------------------- refusals


def test_syntax_without_any_decoder_is_a_clear_error(tmp_path: Path) -> None:
    path = write_slice(tmp_path / "video.dcm", phantom())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: transfer syntax MPEG2 .* cannot be decoded by "
                                        "pydicom; convert the file"):
        read_dicom(path)


def test_syntax_whose_decoder_is_not_installed_names_the_packages() -> None:
    """JPEG Lossless needs pylibjpeg-libjpeg (or gdcm): hide pylibjpeg in a fresh interpreter."""
    path = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")
    code = ("import sys; sys.modules['pylibjpeg'] = None\n"
            "from fl_covid.errors import DataError\nfrom fl_covid.dicom import read_dicom\n"
            f"try:\n    read_dicom({path!r})\nexcept DataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"DICOM file {path}: no decoder is installed for transfer syntax JPEG Lossless" in out.stdout
    assert "pylibjpeg-libjpeg" in out.stdout


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])


CORRUPT = {
    "random_bytes": lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)),
    "zero_bytes": lambda p: p.write_bytes(b""),
    "marker_then_garbage": lambda p: p.write_bytes(bytes(128) + b"DICM" + np.random.default_rng(2).bytes(500)),
    "truncated_pixels": lambda p: (write_slice(p, phantom()), _truncate(p)),
    "no_pixels": lambda p: Dataset(PatientID="x").save_as(p, implicit_vr=True, little_endian=True),
}


@pytest.mark.parametrize("kind", CORRUPT)
def test_corrupt_file_is_an_error_naming_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.dcm"
    CORRUPT[kind](path)
    with pytest.raises(DataError, match=rf"(?s)DICOM file {re.escape(str(path))}\b.*(replace or remove|not an image)"):
        read_dicom(path)
    with pytest.raises(DataError, match=re.escape(str(path))):
        decode_image(path, 32)
    assert set(dicom_tags(path)) == {"patient_id", "series_uid"}  # a header that cannot be read gives no ids


def test_multi_frame_files_are_refused(tmp_path: Path) -> None:
    path = write_slice(tmp_path / "two.dcm", phantom(), frames=2)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} holds 2 frames; one slice per file"):
        read_dicom(path)
    with pytest.raises(DataError, match="holds 2 frames"):
        read_dicom(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    one = write_slice(tmp_path / "one.dcm", phantom(), frames=1)
    ds = pydicom.dcmread(one)
    ds.NumberOfFrames = 1  # a declared single frame is a slice
    ds.save_as(one, enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom(one)[0], lung_window(phantom()))


# ---------------------------------------------------------------------------------------------- DICOM sites


def make_dicom_site(root: Path, patients_per_class: int = 6, slices: int = 3, manifest: bool = False,
                    patient_ids: bool = True) -> dict[str, str]:
    """COVID/ and NonCOVID/ of phantom slices, one series per patient; half the files have no suffix.
    Returns {relative path: patient}."""
    owner = {}
    for label in CLASSES:
        for p in range(patients_per_class):
            patient, series = f"{label}-{p:02d}", generate_uid()
            for s in range(slices):
                rel = f"{label}/{patient}/IM{s:04d}" + (".dcm" if s % 2 else "")
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                write_slice(root / rel, phantom(seed=len(owner)), series_uid=series,
                            patient_id=patient if patient_ids else "")
                owner[rel] = patient
    if manifest:
        write_manifest(root / "manifest.csv", [{"path": rel, "label": rel.split("/")[0], "patient_id": ""}
                                               for rel in owner])
    return owner


def assert_patients_in_one_part(site, split, owner: dict[str, str]) -> None:
    part_of = {}
    for part, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
        for i in idx.tolist():
            assert part_of.setdefault(owner[site.paths[i]], part) == part, site.paths[i]
    assert set(part_of.values()) == {"train", "val", "test"}


@pytest.mark.parametrize("manifest", [False, True], ids=["folders", "manifest"])
def test_dicom_site_groups_slices_by_patient(tmp_path: Path, manifest: bool) -> None:
    owner = make_dicom_site(tmp_path / "site", manifest=manifest)
    if not manifest:
        (tmp_path / "site" / "COVID" / "notes.dcm").write_bytes(b"\0" * 200)  # no DICM marker: skipped in a scan
    site = load_site(tmp_path / "site", 36)
    assert len(site) == len(owner) == 36 and site.images.shape == (36, 1, 36, 36)
    assert site.labels.tolist().count(1) == 18
    groups = {}
    for path, group in zip(site.paths, site.groups):
        groups.setdefault(owner[path], set()).add(group)
    assert all(len(g) == 1 for g in groups.values()) and len(set(site.groups)) == 12
    assert list(site.patient_ids) == [owner[path] for path in site.paths]  # the headers' PatientID
    for fold in range(3):
        split = make_split(site, "grouped", folds=3, fold=fold, val_fraction=0.25)
        check_no_leak(site, split)
        assert_patients_in_one_part(site, split, owner)


def test_series_uid_groups_slices_without_patient_ids(tmp_path: Path) -> None:
    owner = make_dicom_site(tmp_path / "site", patient_ids=False)
    site = load_site(tmp_path / "site", 36)
    assert len(set(site.groups)) == 12
    split = make_split(site, "grouped", folds=3, fold=1, val_fraction=0.25)
    assert_patients_in_one_part(site, split, owner)


def test_manifest_patient_id_wins_over_the_dicom_tag(tmp_path: Path) -> None:
    owner = make_dicom_site(tmp_path / "site", patients_per_class=3, slices=2, patient_ids=True)
    rows = [{"path": rel, "label": rel.split("/")[0], "patient_id": "same-person"} for rel in owner]
    write_manifest(tmp_path / "site" / "manifest.csv", rows)
    site = load_site(tmp_path / "site", 36)
    assert len(set(site.groups)) == 1  # the manifest ties every slice to one person
    assert set(site.patient_ids) == {"same-person"}


def test_configured_window_reaches_the_decoded_site(tmp_path: Path) -> None:
    make_dicom_site(tmp_path / "site", patients_per_class=6, slices=2)
    images = []
    for width, level in ((1500, -600), (400, 40)):
        config = load_config(None, {"data-root": str(tmp_path), "sites": "site", "folds": 2, "val-fraction": 0.4,
                                    "dicom-window-width": width, "dicom-window-level": level, "image-size": 32})
        site, _ = load_configured_site(config, 0)
        images.append(site.images)
        expected = decode_image(tmp_path / "site" / site.paths[0], config.cache_size, config.preprocessing)
        assert config.preprocessing.window == (width, level)
        np.testing.assert_array_equal(site.images[0, 0].numpy(), expected)
    assert not np.array_equal(images[0].numpy(), images[1].numpy())
