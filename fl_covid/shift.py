"""Is an input far from what a site's model learned? The site's shift profile (in its model card) and the shift
scores that ``fl-covid-predict`` and ``fl-covid-evaluate`` give every input image and the inputs as a whole.

Inside each public dataset trivial image statistics predict the label, and a model trained on one scores about
chance on the other (``docs/audit/audit.md``); its scores there look as confident as at home. The profile describes
the training split of the site with aggregates only (no per-image value, no per-image embedding):

- the cue statistics of ``fl_covid.cues`` on the cached images: per statistic mean, standard deviation and
  quantiles, and a Gaussian mixture of the standardised statistics (at most MAX_COMPONENTS components, each
  summarising at least MIN_COMPONENT_IMAGES images);
- the pooled embedding (``forward_features`` with the site's own BN) through a fixed Gaussian projection to
  PROJECTION_DIM dimensions, regenerated from its seed: per dimension mean and standard deviation, and one Gaussian
  with its covariance shrunk towards the identity (REGULARISATION on the standardised scale).

Per image, the cue distance (Mahalanobis distance to the nearest mixture component) and the embedding distance are
each divided by their median on the site's validation split and combined as their root mean square; the image's
``shift_score`` is that over its 1 - ALPHA quantile on the validation split, and an image with a score above 1 is
flagged: about ALPHA of the site's own images are. (One combined score with one threshold: flagging when either
distance passes its own threshold flags also every image on which only one of them drifts.) The inputs as a whole (at least MIN_BATCH images) are compared with the profile by
Kolmogorov-Smirnov tests of every cue statistic against the training quantiles and of both distances against the
validation quantiles (Bonferroni at BATCH_ALPHA): this catches a hospital whose images are each unremarkable but,
together, unlike the training site's (a narrow source inside a broad training distribution).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import kstwobign
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from fl_covid.cues import PIXEL_FEATURES, image_statistics
from fl_covid.data import eval_input
from fl_covid.engine import to_device

log = logging.getLogger(__name__)

PROFILE_FORMAT = 1
ALPHA = 0.05  # the fraction of the site's own validation images flagged
BATCH_ALPHA = 0.01  # family-wise false-alarm rate of the batch test on a batch of the site's own images
LEVELS = (0.01, *(round(0.05 * k, 2) for k in range(1, 20)), 0.99)  # recorded quantile levels
PROJECTION_DIM = 64
PROJECTION_SEED = 0
REGULARISATION = 1e-2  # added to the diagonal of every covariance of standardised values
MAX_COMPONENTS = 4
IMAGES_PER_COMPONENT = 100  # the mixture gets one component per this many training images (at most MAX_COMPONENTS)
MIN_COMPONENT_IMAGES = 20  # every recorded mean and covariance summarises at least this many images
MIN_TRAIN_IMAGES = 50
MIN_VALIDATION_IMAGES = 10
MIN_BATCH = 20
MOST_SHIFTED = 5  # statistics named by the batch test


def _round(a: np.ndarray | float) -> Any:
    """Floats to 6 significant digits as (nested) lists: a compact, JSON-friendly card."""
    return np.vectorize(lambda v: float(f"{v:.6g}"), otypes=[float])(np.asarray(a, dtype=np.float64)).tolist()


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture of standardised features: ``weights`` (K,), ``means`` (K, F), ``covariances`` (K, F, F)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    _precisions: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_precisions", np.linalg.inv(self.covariances))

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``x`` (N, F) to the nearest component: (N,)."""
        d = x[None, :, :] - self.means[:, None, :]  # (K, N, F)
        squared = np.einsum("knf,kfg,kng->kn", d, self._precisions, d)
        return np.sqrt(np.maximum(squared.min(axis=0), 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"weights": _round(self.weights), "means": _round(self.means),
                "covariances": _round(self.covariances)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Mixture:
        return Mixture(np.asarray(d["weights"], dtype=np.float64), np.asarray(d["means"], dtype=np.float64),
                       np.asarray(d["covariances"], dtype=np.float64))


def fit_mixture(x: np.ndarray, components: int, seed: int = 0) -> Mixture:
    """Gaussian mixture of ``x`` (N, F) standardised values, with fewer components until each holds at least
    MIN_COMPONENT_IMAGES images (by their responsibilities)."""
    for k in range(max(1, components), 0, -1):
        with threadpool_limits(limits=1):
            gm = GaussianMixture(k, covariance_type="full", reg_covar=REGULARISATION, random_state=seed).fit(x)
        if k == 1 or gm.weights_.min() * len(x) >= MIN_COMPONENT_IMAGES:
            return Mixture(gm.weights_, gm.means_, gm.covariances_)
    raise AssertionError("unreachable: one component always fits")


def projection(dim: int, out_dim: int = PROJECTION_DIM, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """The fixed Gaussian projection (dim, out_dim), entries N(0, 1 / out_dim): no data in it, so the card records
    only its seed."""
    return torch.randn(dim, out_dim, generator=torch.Generator().manual_seed(seed)) / math.sqrt(out_dim)


@torch.no_grad()
def embeddings(model: torch.nn.Module, images: torch.Tensor, image_size: int, site: int = 0, batch_size: int = 128,
               device: torch.device | str = "cpu", out_dim: int = PROJECTION_DIM,
               seed: int = PROJECTION_SEED) -> np.ndarray:
    """Projected pooled embeddings of uint8 (N, 1, R, R) images under the model's current BN, eval transform, float32
    (no autocast): (N, out_dim) float64."""
    device = torch.device(device)
    model.to(device).eval()
    out, proj = [], None
    for start in range(0, len(images), batch_size):
        features = model.forward_features(eval_input(to_device(images[start:start + batch_size], device),
                                                     image_size), site).float()
        if proj is None:
            proj = projection(features.shape[1], out_dim, seed).to(device)
        out.append((features @ proj).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros((0, out_dim))


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std with NaN (a statistic that could not be measured) at the training mean: (N, F)."""
    return np.nan_to_num((x - mean) / std, nan=0.0)


def _ks(x: np.ndarray, values: np.ndarray, m: int) -> tuple[float, float]:
    """Kolmogorov-Smirnov statistic and asymptotic two-sample p-value of sample ``x`` (n,) against a reference of
    ``m`` values known only by its quantiles ``values`` at LEVELS.

    Between two recorded quantiles the reference CDF is unknown, so the statistic is the smallest one the quantiles
    allow (at most 0.05 below the exact one; exact for ties, e.g. grey levels): the test errs towards no alarm."""
    x = np.sort(x[~np.isnan(x)])
    if not x.size:
        return 0.0, 1.0
    q, levels = np.asarray(values, dtype=np.float64), np.asarray((0.0, *LEVELS, 1.0))
    u = np.unique(x)
    at_most = np.searchsorted(x, u, side="right") / x.size  # empirical CDF at u
    below = np.searchsorted(x, u, side="left") / x.size  # ... just below u
    ref_at_most = levels[np.searchsorted(q, u, side="right") + 1]  # the reference CDF at u is at most this
    ref_below = levels[np.searchsorted(q, u, side="left")]  # ... and just below u at least this
    d = float(max(np.max(at_most - ref_at_most), np.max(ref_below - below), 0.0))
    n_eff = x.size * m / (x.size + m)
    return d, float(kstwobign.sf(d * math.sqrt(n_eff)))


def shift_profile(model: torch.nn.Module, train: torch.Tensor, val: torch.Tensor, image_size: int, *, site: int = 0,
                  seed: int = 0, batch_size: int = 128, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The shift profile of a site (see the module docstring) from its training and validation images, uint8
    (N, 1, R, R), under ``model`` with the site's BN (index ``site``); None (logged) with fewer than MIN_TRAIN_IMAGES
    training or MIN_VALIDATION_IMAGES validation images."""
    if len(train) < MIN_TRAIN_IMAGES or len(val) < MIN_VALIDATION_IMAGES:
        log.info("no shift profile: %d training and %d validation images (at least %d and %d needed)", len(train),
                 len(val), MIN_TRAIN_IMAGES, MIN_VALIDATION_IMAGES)
        return None
    cues_train, cues_val = image_statistics(train), image_statistics(val)
    keep = np.isfinite(cues_train).all(axis=0) & (cues_train.std(axis=0) > 0)
    features = [f for f, k in zip(PIXEL_FEATURES, keep) if k]
    cues_train, cues_val = cues_train[:, keep], cues_val[:, keep]
    emb_train = embeddings(model, train, image_size, site, batch_size, device)
    emb_val = embeddings(model, val, image_size, site, batch_size, device)
    parts: dict[str, Any] = {}
    for name, x_train, x_val, components in (
            ("cues", cues_train, cues_val, min(MAX_COMPONENTS, len(train) // IMAGES_PER_COMPONENT)),
            ("embedding", emb_train, emb_val, 1)):
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        mixture = fit_mixture(_standardise(x_train, mean, std), components, seed)
        distances = mixture.distance(_standardise(x_val, mean, std))
        parts[name] = {"mean": _round(mean), "std": _round(std), "mixture": mixture.to_dict(),
                       "scale": _round(np.median(distances)),
                       "validation_quantiles": _round(np.quantile(distances, LEVELS))}
    parts["cues"] |= {"features": features, "quantiles": _round(np.quantile(cues_train, LEVELS, axis=0).T)}
    parts["embedding"] |= {"projection": {"dim": PROJECTION_DIM, "seed": PROJECTION_SEED}}
    profile = {"format": PROFILE_FORMAT, "train_images": len(train), "validation_images": len(val),
               "alpha": ALPHA, "batch_alpha": BATCH_ALPHA, "levels": list(LEVELS), **parts}
    *_, combined = _distances(profile, cues_val, emb_val)
    profile["threshold"] = _round(np.quantile(combined, 1 - ALPHA))
    profile["validation_flagged"] = round(float((combined > profile["threshold"]).mean()), 4)
    return profile


@dataclass(frozen=True)
class ImageScores:
    """Per image (N,): the cue and embedding distances, and the shift score (their root mean square, each over its
    validation median, over the profile's threshold; flagged above 1)."""

    cue: np.ndarray
    embedding: np.ndarray
    score: np.ndarray

    @property
    def flagged(self) -> np.ndarray:
        return self.score > 1.0


def _distances(profile: dict[str, Any], cues: np.ndarray, emb: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cue, embedding and combined distances (N,) of images from their cue statistics (N, F: the profile's
    features) and projected embeddings (N, P)."""
    distances = []
    for name, x in (("cues", cues), ("embedding", emb)):
        part = profile[name]
        mixture = Mixture.from_dict(part["mixture"])
        distances.append(mixture.distance(_standardise(x, np.asarray(part["mean"]), np.asarray(part["std"]))))
    cue, embedding = distances
    combined = np.sqrt(((cue / profile["cues"]["scale"]) ** 2 + (embedding / profile["embedding"]["scale"]) ** 2) / 2)
    return cue, embedding, combined


def score_images(profile: dict[str, Any], cues: np.ndarray, emb: np.ndarray) -> ImageScores:
    """Scores of images from their cue statistics (N, F: the profile's features) and projected embeddings (N, P)."""
    cue, embedding, combined = _distances(profile, cues, emb)
    return ImageScores(cue, embedding, combined / profile["threshold"])


def batch_test(profile: dict[str, Any], cues: np.ndarray, scores: ImageScores) -> dict[str, Any]:
    """KS tests of the inputs against the profile: every cue statistic (cues: (N, F)) against the training quantiles
    and both distances against the validation quantiles. ``shifted`` when the smallest Bonferroni-adjusted p-value is
    below BATCH_ALPHA; not tested with fewer than MIN_BATCH images."""
    n = len(scores.score)
    if n < MIN_BATCH:
        return {"tested": False, "images": n, "note": f"the batch test needs at least {MIN_BATCH} images"}
    tests = [(f, *_ks(cues[:, j], np.asarray(q), profile["train_images"]))
             for j, (f, q) in enumerate(zip(profile["cues"]["features"], profile["cues"]["quantiles"]))]
    for name, x in (("cue distance", scores.cue), ("embedding distance", scores.embedding)):
        part = profile["cues" if name == "cue distance" else "embedding"]
        tests.append((name, *_ks(x, np.asarray(part["validation_quantiles"]), profile["validation_images"])))
    tests.sort(key=lambda t: (t[2], -t[1]))
    p = min(1.0, tests[0][2] * len(tests))
    return {"tested": True, "images": n, "shifted": p < BATCH_ALPHA, "p_value": p,
            "most_shifted": [{"statistic": name, "ks": round(d, 4), "p_value": min(1.0, pv * len(tests))}
                             for name, d, pv in tests[:MOST_SHIFTED]]}


@dataclass(frozen=True)
class ShiftCheck:
    """The shift check of a set of inputs against one training site's profile: per-image scores and the batch
    test."""

    site: str
    scores: ImageScores
    batch: dict[str, Any]


def check_shift(profile: dict[str, Any], site: str, model: torch.nn.Module, images: torch.Tensor, image_size: int,
                batch_size: int = 128, device: torch.device | str = "cpu") -> ShiftCheck:
    """Score uint8 (N, 1, R, R) inputs against ``site``'s profile under its ``model`` (the site's own BN: the one
    the profile was measured with, not BN re-estimated on the inputs)."""
    if profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"unknown shift profile format {profile.get('format')!r} in the model card of site {site!r}")
    keep = [PIXEL_FEATURES.index(f) for f in profile["cues"]["features"]]
    cues = image_statistics(images)[:, keep]
    proj = profile["embedding"]["projection"]
    emb = embeddings(model, images, image_size, batch_size=batch_size, device=device, out_dim=proj["dim"],
                     seed=proj["seed"])
    scores = score_images(profile, cues, emb)
    return ShiftCheck(site, scores, batch_test(profile, cues, scores))


def far_from_all(checks: list[ShiftCheck]) -> tuple[np.ndarray, dict[str, Any]]:
    """Combine the checks against every training site: an image's score is its smallest (it is flagged when it is
    far from every site), and the inputs are shifted when every site's batch test says so. Returns the scores (N,)
    and the JSON summary."""
    if not checks:
        raise ValueError("no shift checks to combine")
    score = np.min([c.scores.score for c in checks], axis=0)
    tested = all(c.batch["tested"] for c in checks)
    summary = {
        "images": int(score.size), "flagged": int((score > 1).sum()), "flagged_fraction": float((score > 1).mean()),
        "expected_fraction_at_home": ALPHA,
        "batch_shifted": tested and all(c.batch["shifted"] for c in checks),
        "sites": {c.site: {"flagged": int(c.scores.flagged.sum()), "batch": c.batch} for c in checks},
    }
    return score, summary


def image_columns(score: np.ndarray) -> list[dict[str, float | int]]:
    """The CSV columns of each image's score (N,): ``shift_score`` and ``shift_flag`` (1 above 1)."""
    return [{"shift_score": round(s, 4), "shift_flag": int(s > 1)} for s in score.tolist()]


def group_flags(keys: list[str], flagged: np.ndarray) -> dict[str, tuple[float, bool]]:
    """Per non-empty key (a series or patient): the fraction of its images flagged and whether most are."""
    groups: dict[str, list[bool]] = {}
    for key, f in zip(keys, flagged.tolist()):
        if key:
            groups.setdefault(key, []).append(bool(f))
    return {k: (sum(v) / len(v), sum(v) / len(v) > 0.5) for k, v in groups.items()}


def warning_text(summary: dict[str, Any], unseen_auc: dict[str, Any] | None = None) -> str | None:
    """One line for the console when the inputs look shifted (per image beyond twice the expected rate, or the
    batch test), else None."""
    per_image = summary["flagged_fraction"] > 2 * summary["expected_fraction_at_home"]
    if not (per_image or summary["batch_shifted"]):
        return None
    parts = [(f"{summary['flagged']} of {summary['images']} images ({summary['flagged_fraction']:.0%}) lie outside "
              f"the training images' range (about {summary['expected_fraction_at_home']:.0%} of the training site's "
              "own images do)")]
    if summary["batch_shifted"]:
        named = {s["statistic"] for site in summary["sites"].values() for s in site["batch"].get("most_shifted", [])}
        parts.append(f"the inputs as a whole differ from the training images (most in: {', '.join(sorted(named))})")
    text = "SHIFT: " + "; ".join(parts) + ". The model's scores may mean nothing on these images"
    if unseen_auc:
        text += " (measured at an unseen site: " + ", ".join(
            f"{site} AUC {m['auc']:.2f}" for site, m in unseen_auc.items()) + ")"
    return text + "."
