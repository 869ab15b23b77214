"""DICOM slices -> 8-bit grey: Hounsfield units from the rescale tags, then a lung window.

One slice per file. Pixel data in any transfer syntax pydicom decodes: uncompressed (implicit / explicit VR
little endian, explicit big endian, deflated) and RLE Lossless with numpy alone; JPEG baseline, extended and
lossless and JPEG-LS with pylibjpeg-libjpeg; JPEG 2000 and HTJ2K with pylibjpeg-openjpeg (Pillow also decodes
JPEG baseline and JPEG 2000). A syntax without an installed decoder is an error naming the file and what to
install.

Greyscale (MONOCHROME2, MONOCHROME1), 8 to 32 bit, signed or unsigned: stored values become
HU = value * RescaleSlope + RescaleIntercept (a missing tag: slope 1 / intercept 0, with a warning), then the
window [level - width / 2, level + width / 2] maps linearly onto 0..255, clipped (defaults: the lung window,
width 1500 HU, level -600 HU). MONOCHROME1 is inverted after the window, so that dense tissue is white as in
MONOCHROME2.

- Another modality than CT (MR, CR, ...): decoded exactly the same way, with a warning: its values are not HU,
  so the lung window rarely suits it and the model never saw such images.
- Colour (RGB or YBR, e.g. a secondary capture of a viewer's screen): made grey by luma (ITU-R 601, as for a
  colour PNG), without rescale or window, with a warning. Palette colour is refused.
- Several frames in one file: refused (labels, patients and predictions are per slice); a file that declares one
  frame is a slice.
- A file without the DICOM file header (raw dataset): read, its transfer syntax taken from its encoding.
- Non-conformant values (UIDs, odd tags, wrong VRs) are read with pydicom's warnings, never errors; only the
  tags this module computes with (rescale, frames) must parse as numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fl_covid.errors import DataError

log = logging.getLogger(__name__)

# the lung window in HU, the default of Preprocessing and of the config's dicom-window-width / -level
WINDOW_WIDTH, WINDOW_LEVEL = 1500.0, -600.0
FIX = ("replace or remove the file (or set skip-unreadable=true / pass --skip-unreadable to skip such files "
       "with a warning)")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")


def apply_window(values: np.ndarray, width: float = WINDOW_WIDTH, level: float = WINDOW_LEVEL) -> np.ndarray:
    """Linear window: ``level - width / 2`` -> 0, ``level + width / 2`` -> 255, clipped, rounded to uint8."""
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    scaled = (np.asarray(values, dtype=np.float64) - (level - width / 2)) / width
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _dcmread(path: Path, **kwargs: object) -> Dataset:
    """pydicom's reader in its warning mode (its default, set at every read so that nothing makes it strict):
    non-conformant values warn; ``force``: a raw dataset without the file header is read too."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    return pydicom.dcmread(path, force=True, **kwargs)


def _number(ds: Dataset, keyword: str, path: Path) -> float | None:
    """A numeric tag's value, None when absent or empty; DataError naming file and tag when it is no number."""
    try:
        value = ds.get(keyword)
        return None if value is None or str(value).strip() == "" else float(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"DICOM file {path}: tag {keyword} is not a number ({e}); {FIX}") from e


def _tags(ds: Dataset) -> dict[str, str]:
    return {"patient_id": str(ds.get("PatientID", "") or "").strip(),
            "series_uid": str(ds.get("SeriesInstanceUID", "") or "").strip()}


def dicom_tags(path: str | Path) -> dict[str, str]:
    """``patient_id`` (PatientID) and ``series_uid`` (SeriesInstanceUID) of a file's header, '' when absent.

    Never raises: an unreadable file gives empty tags and is reported when its pixels are decoded."""
    try:
        ds = _dcmread(Path(path), stop_before_pixels=True, specific_tags=["PatientID", "SeriesInstanceUID"])
        return _tags(ds)
    except Exception:  # the decode step names the problem
        return {"patient_id": "", "series_uid": ""}


def _transfer_syntax(ds: Dataset, path: Path) -> UID:
    """The file's transfer syntax, or the one its dataset was read with (a raw dataset has no file header)."""
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if ts is None:
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError as e:
        raise DataError(f"DICOM file {path}: transfer syntax {UID(ts).name} ({ts}) cannot be decoded by pydicom; "
                        "convert the file to an uncompressed transfer syntax (e.g. Explicit VR Little Endian) "
                        "or JPEG / JPEG 2000 / RLE") from e
    if not decoder.is_available:
        raise DataError(f"DICOM file {path}: no decoder is installed for transfer syntax {UID(ts).name} ({ts}); "
                        f"install one of: {'; '.join(decoder.missing_dependencies)}")
    return UID(ts)


def read_dicom(path: str | Path, window_width: float = WINDOW_WIDTH,
               window_level: float = WINDOW_LEVEL) -> tuple[np.ndarray, dict[str, str]]:
    """The one slice in ``path`` as (H, W) uint8 grey (see the module doc) and its tags (``dicom_tags``).

    DataError naming the file for anything that is not a decodable single greyscale or colour slice."""
    path = Path(path)
    try:
        ds = _dcmread(path)
    except Exception as e:  # pydicom raises many types on damaged files
        raise DataError(f"cannot read DICOM file {path}: {type(e).__name__}: {e}; {FIX}") from e
    if "PixelData" not in ds:
        raise DataError(f"DICOM file {path} has no pixel data (PixelData); it is not an image or is damaged; {FIX}")
    ts = _transfer_syntax(ds, path)
    frames = _number(ds, "NumberOfFrames", path) or 1
    if frames != 1:
        raise DataError(f"DICOM file {path} holds {frames:g} frames; one slice per file is expected: export the "
                        "series as single-frame files (one per slice)")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") + COLOUR:
        raise DataError(f"DICOM file {path}: photometric interpretation {photometric or '(none)'!r} is not "
                        "supported (expected MONOCHROME2, MONOCHROME1 or RGB/YBR colour); export greyscale slices")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # decoders raise many types on damaged data
        raise DataError(f"cannot decode the pixels of DICOM file {path} ({ts.name}): {type(e).__name__}: {e}; "
                        f"{FIX}") from e
    if photometric in COLOUR:
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise DataError(f"DICOM file {path}: colour pixels of shape {pixels.shape}, expected (rows, cols, 3)")
        log.warning("DICOM file %s: colour image (%s) made grey by luma, without rescale or window", path,
                    photometric)
        top = float(2 ** int(_number(ds, "BitsStored", path) or 8) - 1)
        luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) * (255.0 / top)
        return np.rint(np.clip(luma, 0, 255)).astype(np.uint8), _tags(ds)
    if pixels.ndim != 2:
        raise DataError(f"DICOM file {path}: greyscale pixels of shape {pixels.shape}, expected (rows, cols); "
                        "one slice per file is expected")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality != "CT":
        log.warning("DICOM file %s: modality is %s, not CT: its values are not Hounsfield units, decoded with the "
                    "same rescale and window all the same", path, modality or "not given")
    slope, intercept = _number(ds, "RescaleSlope", path), _number(ds, "RescaleIntercept", path)
    if slope is None or intercept is None:
        missing = " and ".join(k for k, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept)) if v is None)
        log.warning("DICOM file %s has no %s: taking slope 1 / intercept 0 where missing (stored values as "
                    "Hounsfield units)", path, missing)
    hu = pixels.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    grey = apply_window(hu, window_width, window_level)
    return (255 - grey if photometric == "MONOCHROME1" else grey), _tags(ds)
