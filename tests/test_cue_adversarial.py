"""Cue-adversarial training: the batch cue statistics against the audit's, the gradient reversal, the term in a
real training step, a real federation (smoke config, embedded CT images) in which the cue head stays at its site,
and the linear probe that measures what cue information an embedding keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_covid import records as R
from fl_covid.centralized import main as central_main
from fl_covid.config import ConfigError, load_config
from fl_covid.cues import CUE_TARGETS, batch_cues, image_features
from fl_covid.engine import Chunk, make_optimizer, train_steps
from fl_covid.experiments.cue_probe import main as probe_main
from fl_covid.experiments.cue_probe import probe_r2
from fl_covid.federated import LocalState, shared_keys
from fl_covid.losses import CueAdversarialLoss
from fl_covid.model import CueHead, build_model, create_model, local_keys
from fl_covid.objective import Objective, build_objective
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import run_dir, run_federation

SIZE = 64
GREY = ("mean", "std", "p05", "p50", "p95", "border_mean", "centre_mean", "border_minus_centre")  # grey levels


def test_batch_cues_are_the_audit_statistics_of_each_crop() -> None:
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (5, 1, 48, 48), dtype=torch.uint8, generator=g)
    crops[0, 0, :6] = 0  # a dark letterbox
    crops[1, 0, :, :7] = 255  # a bright side border
    crops[2] = 128  # flat
    got = batch_cues(crops).numpy()
    assert got.shape == (5, len(CUE_TARGETS)) and got.dtype == np.float32
    for i in range(5):
        ref = image_features(crops[i, 0].numpy())
        expected = [ref[k] / 255 if k in GREY else ref[k] for k in CUE_TARGETS]
        np.testing.assert_allclose(got[i], expected, atol=1e-5)


def test_batch_cues_refuse_what_is_not_a_uint8_batch() -> None:
    with pytest.raises(ValueError, match="uint8"):
        batch_cues(torch.rand(2, 1, 8, 8))


def test_the_reversal_flips_and_scales_the_gradient_below_the_head_only() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 3)
    features = torch.randn(4, 6, requires_grad=True)
    targets = torch.randn(4, 3)
    term = CueAdversarialLoss(0.3)
    term(head(term.reverse(features)), targets).backward()
    reversed_grad, head_grad = features.grad.clone(), head.weight.grad.clone()
    features.grad, head.weight.grad = None, None
    term(head(features), targets).backward()
    torch.testing.assert_close(reversed_grad, -0.3 * features.grad)
    torch.testing.assert_close(head_grad, head.weight.grad)  # the head itself learns to predict the cues


def test_targets_are_standardised_per_chunk_and_a_constant_cue_is_zero() -> None:
    g = torch.Generator().manual_seed(1)
    crops = torch.randint(1, 255, (8, 1, 32, 32), dtype=torch.uint8, generator=g)  # never black nor white
    t = CueAdversarialLoss.targets(crops)
    assert torch.isfinite(t).all()
    k = CUE_TARGETS.index("mean")
    assert abs(float(t[:, k].mean())) < 1e-5 and float(t[:, k].std(correction=0)) == pytest.approx(1, abs=1e-4)
    assert torch.equal(t[:, CUE_TARGETS.index("black")], torch.zeros(8))


def test_weight_must_be_positive_and_config_refuses_negative() -> None:
    with pytest.raises(ValueError, match="> 0"):
        CueAdversarialLoss(0.0)
    with pytest.raises(ConfigError, match="cue-adversarial"):
        load_config("configs/smoke.yaml", {"cue-adversarial": -1})


def test_the_config_builds_the_head_and_the_term_and_the_head_is_site_specific() -> None:
    config = load_config("configs/smoke.yaml", {"cue-adversarial": 0.5})
    model = build_model(config, num_sites=2)
    assert isinstance(model.cue_head, CueHead) and len(model.cue_head.heads) == 2
    assert {k for k in model.state_dict() if k.startswith("cue_head.")} <= local_keys(model)
    assert build_objective(config).needs_cues
    off = load_config("configs/smoke.yaml")
    assert build_model(off).cue_head is None and not build_objective(off).needs_cues
    # built last: the rest of the network starts from the same weights with and without the head
    torch.manual_seed(0)
    with_head = build_model(config).state_dict()
    torch.manual_seed(0)
    without = build_model(off).state_dict()
    assert all(torch.equal(with_head[k], v) for k, v in without.items())


def _chunks() -> list[Chunk]:
    g = torch.Generator().manual_seed(2)
    return [Chunk(s, torch.randint(0, 256, (6, 1, 72, 72), dtype=torch.uint8, generator=g),
                  torch.tensor([0, 1, 1, 0, 1, 0])) for s in (0, 1)]


def test_train_steps_adds_the_term_trains_the_head_and_refuses_a_model_without_one() -> None:
    torch.manual_seed(0)
    model = create_model("redesigned", 0.125, 2, image_size=SIZE, num_cues=len(CUE_TARGETS))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cue_head.")}
    objective = Objective(cue_adversarial=CueAdversarialLoss(1.0))
    stats = train_steps(model, make_optimizer(model, 1e-3), _chunks, 2, objective, image_size=SIZE, grad_clip=5.0,
                        generator=torch.Generator().manual_seed(3))
    assert stats["loss"] > stats["ce"]  # the regression adds a positive term
    after = model.state_dict()
    for site in (0, 1):  # each site's head learned from its own chunk
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"cue_head.heads.{site}."))
    plain = create_model("redesigned", 0.125, 2, image_size=SIZE)
    with pytest.raises(ValueError, match="no cue head"):
        train_steps(plain, make_optimizer(plain, 1e-3), _chunks, 1, objective, image_size=SIZE, grad_clip=5.0,
                    generator=torch.Generator().manual_seed(3))


def test_in_a_federation_the_cue_head_trains_and_never_leaves_its_site(tmp_path: Path) -> None:
    grid = run_federation(tmp_path, method="fedbn-proto", overrides="cue-adversarial=0.5",
                          **{"num-server-rounds": 1})
    config = load_config("configs/smoke.yaml", {"cue-adversarial": 0.5})
    model = build_model(config)
    head = {k for k in model.state_dict() if k.startswith("cue_head.")}
    keys = shared_keys(model, config)
    assert head and not head & set(keys)
    size = sum(model.state_dict()[k].numel() for k in keys)
    trains = [d for d in grid.deliveries if d.kind == "train"]
    assert len(trains) == 2
    for d in trains:
        assert d.reply.content[R.WEIGHTS][R.FLAT].numpy().shape == (size,)  # no room for the head
        name = (SITE_A, SITE_B)[d.partition]
        saved = LocalState.load(run_dir(tmp_path) / f"site-{name}" / "state")
        assert saved is not None and head <= set(saved.bn)  # kept at the site, with its BN


def test_the_probe_reads_a_linear_cue_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    cues = rng.normal(size=(200, 3))
    encoded = np.concatenate([cues @ rng.normal(size=(3, 8)), rng.normal(size=(200, 8))], axis=1)
    assert probe_r2(encoded, cues).min() > 0.95
    assert probe_r2(rng.normal(size=(200, 16)), cues).max() < 0.1
    assert np.isnan(probe_r2(encoded, np.ones((200, 1))))[0]  # a constant cue has no R^2


def test_the_probe_runs_on_a_trained_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert central_main(["--config", "configs/smoke.yaml", "--method", "sepnorm", "--quiet", "--set", "epochs=1",
                         "--set", "cue-adversarial=1", "--set", f"output-dir={tmp_path}"]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "probe.md"
    assert probe_main([str(run), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["site"] for r in rows] == [SITE_A, SITE_B]
    assert all(r["cue_adversarial"] == 1 and np.isfinite(r["mean_r2"]) and r["images"] > 0 for r in rows)
    assert "| mean R^2 |" in out.read_text()
