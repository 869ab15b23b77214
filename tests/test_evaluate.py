"""An unseen hospital: the three BN choices on a real leave-one-site-out run, BN re-estimation, leak guards."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fl_covid.centralized import run_central
from fl_covid.config import load_config, project_root
from fl_covid.data import Site, eval_input, load_site, make_split
from fl_covid.engine import entropy_adapt_bn
from fl_covid.errors import DataError
from fl_covid.experiments.trained import TrainedRun
from fl_covid.experiments.unseen import average_bn, evaluate_unseen, main, model_for_unseen
from fl_covid.metrics import METRIC_NAMES
from fl_covid.model import bn_keys, create_model, one_site_state

SITE_A, SITE_B = "site_a_sarscov2", "site_b_covidct"
DATA = project_root() / "data"
MODES = ("adapt", "average", f"site:{SITE_A}")


@pytest.fixture(scope="module")
def loso_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run trained on Site A only (24 embedded images, contrastive: per-site BN and a projection head)."""
    out = tmp_path_factory.mktemp("loso")
    config = load_config("configs/smoke.yaml", {"sites": SITE_A, "output-dir": str(out)})
    return run_central(config, "contrastive", show_progress=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_three_bn_modes_give_metrics_on_the_unseen_site(loso_run: Path, tmp_path: Path) -> None:
    probs = {}
    for bn in MODES:
        out = evaluate_unseen(loso_run, DATA / SITE_B, bn, tmp_path / bn.replace(":", "-"), max_per_class=12)
        final = json.loads((out / "final_metrics.json").read_text())
        assert (final["protocol"], final["bn"], final["trained_sites"]) == ("unseen-site", bn, [SITE_A])
        metrics = final["sites"][SITE_B]
        assert metrics["n"] == 24 and all(0.0 <= metrics[k] <= 1.0 for k in METRIC_NAMES)
        assert len(final["roc_tpr"][SITE_B]) == 101
        rows = read_csv(out / "predictions.csv")
        probs[bn] = np.array([float(r["prob_covid"]) for r in rows])
        # per patient: the mean probability of that patient's images (ids from the manifest)
        ids = {r["path"]: r["patient_id"] for r in read_csv(DATA / SITE_B / "manifest.csv")}
        by_patient: dict[str, list[float]] = {}
        for r in rows:
            by_patient.setdefault(ids[r["path"]], []).append(float(r["prob_covid"]))
        patients = read_csv(out / "patients.csv")
        assert {p["patient_id"] for p in patients} == set(by_patient)
        for p in patients:
            assert float(p["mean_prob_covid"]) == pytest.approx(np.mean(by_patient[p["patient_id"]]))
            assert int(p["n_images"]) == len(by_patient[p["patient_id"]])
        if final["patient_level"] is not None:
            assert final["patient_level"]["n"] == sum(p["label"] != "mixed" for p in patients)
    # one training site: its BN and the average of all training sites' BN are the same model
    assert np.array_equal(probs["average"], probs[f"site:{SITE_A}"])
    assert not np.allclose(probs["adapt"], probs["average"])  # re-estimated statistics change the outputs


def test_adapt_re_estimates_statistics_from_the_new_images(loso_run: Path) -> None:
    run = TrainedRun.load(loso_run)
    site = load_site(DATA / SITE_B, run.config.cache_size, max_per_class=12, seed=0)
    model = model_for_unseen(run, "adapt", site, batch_size=8)  # 24 images: three chunks of 8
    trained = run.site_bn(SITE_A)
    stem_bn = model.stem[1].bns[0]
    with torch.no_grad():
        a = model.stem[0](eval_input(site.images, run.config.image_size))  # the stem BN's input
    chunks = a.split(8)
    assert torch.allclose(stem_bn.running_mean, a.mean((0, 2, 3)), atol=1e-5)
    expected_var = torch.stack([c.transpose(0, 1).flatten(1).var(1, unbiased=True) for c in chunks]).mean(0)
    assert torch.allclose(stem_bn.running_var, expected_var, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(stem_bn.running_mean, trained["stem.1.bns.0.running_mean"])
    # affine parameters: the training sites' average (here the one site's), untouched by adaptation
    assert torch.equal(stem_bn.weight.detach(), trained["stem.1.bns.0.weight"])
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, _BatchNorm))
    assert not model.training


def test_tent_moves_only_bn_affine_parameters_and_lowers_the_entropy(loso_run: Path) -> None:
    run = TrainedRun.load(loso_run)
    site = load_site(DATA / SITE_B, run.config.cache_size, max_per_class=12, seed=0)
    adapted = model_for_unseen(run, "adapt", site, batch_size=24)
    model = run.model(run.site_bn(SITE_A))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entropies = entropy_adapt_bn(model, site.images, run.config.image_size, steps=30, lr=0.01, batch_size=24)
    assert len(entropies) == 30 and entropies[-1] < entropies[0]  # full batches: the objective itself goes down
    bn = bn_keys(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= bn  # nothing outside BN moves
    assert any(k.endswith(".weight") for k in changed) and any(k.endswith(".running_mean") for k in changed)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    x = eval_input(site.images, run.config.image_size)
    with torch.no_grad():
        def entropy(m: torch.nn.Module) -> float:
            q = m.forward_head(m.forward_features(x, 0), 0).softmax(1)
            return float(-(q * q.clamp_min(1e-12).log()).sum(1).mean())
        assert entropy(model) < entropy(adapted)  # in eval mode too, below plain statistics re-estimation
    again = run.model(run.site_bn(SITE_A))  # seeded: the same batches, the same parameters
    entropy_adapt_bn(again, site.images, run.config.image_size, steps=30, lr=0.01, batch_size=24)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="at least 2 images"):
        entropy_adapt_bn(model, site.images[:1], run.config.image_size)
    with pytest.raises(ValueError, match="steps >= 1"):
        entropy_adapt_bn(model, site.images, run.config.image_size, steps=0)


def test_average_bn_is_the_elementwise_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    avg = average_bn([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and int(avg["n"]) == 5
    with pytest.raises(ValueError, match="different tensor names"):
        average_bn([a, {"w": torch.zeros(2)}])


def test_per_site_bn_is_stored_under_one_site_names() -> None:
    model = create_model("redesigned", 0.125, num_sites=2, image_size=32)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.fill_(7.0 if m is model.stem[1].bns[1] else 0.0)
    state = one_site_state(model, 1)
    one_site = create_model("redesigned", 0.125, num_sites=1, image_size=32)
    assert set(state) == set(one_site.state_dict())  # loads strictly into a one-site model
    one_site.load_state_dict(state)
    assert torch.all(state["stem.1.bns.0.running_mean"] == 7.0)
    assert torch.all(one_site_state(model, 0)["stem.1.bns.0.running_mean"] == 0.0)
    assert bn_keys(one_site) <= set(state)


def test_cli_and_its_errors(loso_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = ["--run", str(loso_run), "--data", str(DATA / SITE_B), "--max-per-class", "12", "--out", str(out)]
    assert main([*args, "--bn", f"site:{SITE_A}"]) == 0
    assert json.loads((out / "final_metrics.json").read_text())["sites"][SITE_B]["n"] == 24
    assert main([*args, "--bn", "median"]) == 2
    assert main([*args, "--bn", "site:nowhere"]) == 2
    assert main([*args, "--bn", "tent:0"]) == 2
    assert main([*args, "--bn", "tent:3"]) == 0
    assert json.loads((out / "final_metrics.json").read_text())["bn"] == "tent:3"
    # a training site is not unseen: its images include the run's training folds
    assert main(["--run", str(loso_run), "--data", str(DATA / SITE_A), "--bn", "average"]) == 2
    assert "not unseen" in capsys.readouterr().err
    assert main(["--run", str(loso_run), "--data", str(DATA / SITE_A), "--name", "renamed", "--bn", "adapt"]) == 2


def test_make_split_refuses_a_planted_leak(site_b: Site) -> None:
    """Move one image of a patient with several training images into the official test part: the leak check
    inside make_split must refuse the split."""
    official = list(site_b.official)
    counts: dict[str, int] = {}
    for g, part in zip(site_b.groups, official):
        if part == "train":
            counts[g] = counts.get(g, 0) + 1
    victim = next(i for i, (g, part) in enumerate(zip(site_b.groups, official)) if part == "train" and counts[g] > 1)
    make_split(site_b, "official")  # the real official split is clean
    official[victim] = "test"
    leaky = dataclasses.replace(site_b, official=tuple(official))
    with pytest.raises(DataError, match="leakage"):
        make_split(leaky, "official")
