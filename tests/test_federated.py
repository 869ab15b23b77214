"""Federated rounds of the real ServerApp and ClientApp (in process, tests/inprocess.py), smoke config on the
embedded CT images: which tensors leave a site under each method, BN restored from a site's state and its
statistics re-estimated under the received weights, the exact prototype round trip, the contrastive term fed by
the other site's prototypes, and a three-site federation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fl_covid import records as R
from fl_covid.config import load_config, project_root
from fl_covid.federated import LocalState, shared_keys
from fl_covid.metrics import METRIC_NAMES
from fl_covid.model import COVIDNet, bn_keys, create_model
from fl_covid.prototypes import class_prototypes
from fl_covid.seeding import derive
from tests.conftest import SITE_A, SITE_B, read_manifest, write_manifest
from tests.inprocess import Delivery, RecordingGrid, run_dir, run_federation, shared_run, wire

METHODS = ("fedavg", "fedbn", "fedbn-proto")
SITES = (SITE_A, SITE_B)


def smoke_model() -> COVIDNet:
    config = load_config("configs/smoke.yaml")
    return create_model(config.arch, config.width, 1, image_size=config.image_size)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes and bits."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def raw(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def trains(grid: RecordingGrid) -> list[Delivery]:
    return [d for d in grid.deliveries if d.kind == "train"]


@pytest.mark.parametrize("method", METHODS)
def test_bn_leaves_a_site_only_under_fedavg(method: str) -> None:
    grid, _ = shared_run(method)
    model = smoke_model()
    state = model.state_dict()
    bn = bn_keys(model)
    floats = {k for k, v in state.items() if v.is_floating_point()}
    expected = shared_keys(model, load_config("configs/smoke.yaml").replace(method=method))
    assert set(expected) == (floats if method == "fedavg" else floats - bn)
    size = sum(state[k].numel() for k in expected)
    assert len(bn) > 20 and len(trains(grid)) == 4  # 2 sites x 2 rounds
    for d in trains(grid):
        assert list(d.reply.content[R.WEIGHTS].keys()) == [R.FLAT]
        assert d.reply.content[R.WEIGHTS][R.FLAT].numpy().shape == (size,)
    for d in grid.deliveries:
        if d.kind == "evaluate":  # a summary: metrics, and prototypes where the method exchanges them
            final = bool(d.message.content[R.CONFIG][R.FINAL])
            assert set(d.reply.content.keys()) == {R.METRICS} | (
                {R.PROTOTYPES} if method == "fedbn-proto" and not final else set())
    for msg in grid.sent:  # the server sends exactly the shared subset, once per round: with the summary, and
        if R.DIGEST in msg.content[R.CONFIG]:  # a train message after a summary names those weights by digest
            assert msg.metadata.message_type == "train" and R.WEIGHTS not in msg.content
        else:
            assert msg.content[R.WEIGHTS][R.FLAT].numpy().shape == (size,)
    if method != "fedbn-proto":  # no prototypes and nothing to evaluate yet: round 1 starts with the train message
        assert R.WEIGHTS in grid.delivery(0, 1).message.content


def affine(bn: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in bn.items() if k.endswith((".weight", ".bias"))}


def statistics(bn: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in bn.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("method", ("fedbn", "fedbn-proto"))
def test_fedbn_site_restores_its_own_bn_and_re_estimates_its_statistics(method: str) -> None:
    grid, output = shared_run(method)
    model = smoke_model()
    bn = bn_keys(model)
    fresh = {k: v for k, v in model.state_dict().items() if k in bn}
    stored = {}
    for p in (0, 1):
        first = next(d for d in grid.deliveries if d.partition == p)
        assert same(first.loaded_bn, fresh)  # no state yet: a freshly built BN
        saved_1 = LocalState.load(run_dir(output) / f"site-{SITES[p]}" / "state", max_round=1)
        assert saved_1 is not None and saved_1.round == 1  # what the round-1 training saved
        stored[p] = saved_1.bn
        assert stored[p].keys() == bn and not same(stored[p], fresh)
        # round 2 starts from it: the summary loads it as it is ...
        assert same(grid.delivery(p, 2, "evaluate").loaded_bn, stored[p]), "not the BN the site stored"
        # ... and trains with its own affine parameters and statistics re-estimated under the new weights
        trained_with = grid.delivery(p, 2).loaded_bn
        assert same(affine(trained_with), affine(stored[p]))
        assert not same(statistics(trained_with), statistics(stored[p]))
    assert not same(stored[0], stored[1])  # each site keeps its own BN


def test_bn_transform_train_re_estimates_from_training_crops_at_the_named_site_only(tmp_path: Path) -> None:
    """bn-transform=SITE_A=train: site A's statistics come from the training transform, site B's stay those of the
    evaluation transform, bitwise as without the key (round 2: both runs received the same weights)."""
    grid, _ = shared_run("fedbn")
    named = run_federation(tmp_path, method="fedbn", overrides=f"bn-transform={SITE_A}=train",
                           **{"num-server-rounds": 2})
    for p, changed in ((0, True), (1, False)):
        before, after = grid.delivery(p, 2).loaded_bn, named.delivery(p, 2).loaded_bn
        assert same(affine(before), affine(after))
        assert same(statistics(before), statistics(after)) is not changed


def test_sites_keep_their_test_and_validation_predictions() -> None:
    _, output = shared_run("fedbn")
    for site in SITES:
        folder = run_dir(output) / f"site-{site}"
        test = {row["path"] for row in read_manifest(folder / "predictions.csv")}
        val = read_manifest(folder / "val_predictions.csv")
        assert test and val and not test & {row["path"] for row in val}
        assert {row["label"] for row in val} == {"0", "1"} and all(0 <= float(r["prob_covid"]) <= 1 for r in val)


def test_fedavg_sites_use_the_global_bn() -> None:
    grid, _ = shared_run("fedavg")
    model = smoke_model()
    config = load_config("configs/smoke.yaml").replace(method="fedavg")
    layout = R.layout_of({k: v for k, v in model.state_dict().items() if k in shared_keys(model, config)})
    received = R.unflatten(grid.delivery(0, 2, "evaluate").message.content[R.WEIGHTS][R.FLAT].numpy(), layout)
    travelled = bn_keys(model) & set(received)  # BN parameters and statistics; the step counters stay home
    assert travelled and all(not k.endswith("num_batches_tracked") for k in travelled)
    loaded = [{k: v for k, v in grid.delivery(p, 2).loaded_bn.items() if k in travelled} for p in (0, 1)]
    assert same(loaded[0], {k: received[k] for k in travelled}) and same(loaded[0], loaded[1])


def test_prototypes_round_trip_bitwise() -> None:
    """Each round's bank holds, bit for bit, the prototypes the sites computed in that round's summary (in the
    network every site starts the round from), and reaches every site with the train message."""
    grid, _ = shared_run("fedbn-proto")
    for rnd in (1, 2):
        sent = {p: raw(grid.delivery(p, rnd, "evaluate").reply.content[R.PROTOTYPES]) for p in (0, 1)}
        bank = grid.banks[rnd]
        for p in (0, 1):
            rows = (bank.sites == p).numpy()
            assert bitwise_equal(bank.vectors.numpy()[rows], sent[p][R.P_VECTORS])
            assert bitwise_equal(bank.counts.numpy()[rows], sent[p][R.P_COUNTS])
            received = raw(grid.delivery(p, rnd).message.content[R.PROTOTYPES])
            assert bitwise_equal(received[R.P_VECTORS], bank.vectors.numpy())
            other = received[R.P_SITES] == 1 - p
            assert bitwise_equal(received[R.P_VECTORS][other], sent[1 - p][R.P_VECTORS])
    assert R.PROTOTYPES not in grid.delivery(0, 3, "evaluate").reply.content  # the final summary sends none


def test_sub_prototypes_with_a_run_derived_seed() -> None:
    """prototypes-per-class > 1: k-means sub-prototypes of each class, seeded by the 63-bit seeds a run derives,
    each row the unit mean of at least min_count images, the same for the same seed."""
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    z = torch.nn.functional.normalize(centres.repeat_interleave(30, 0) + 0.1 * torch.randn(120, 16, generator=g),
                                      dim=1)
    y = torch.tensor([0] * 60 + [1] * 60)
    seed = derive(0, "prototypes", 1, 5)
    assert seed >= 2**32  # beyond what scikit-learn takes as a seed
    vectors, labels, counts = class_prototypes(z, y, per_class=2, min_count=20, seed=seed)
    assert labels.tolist() == [0, 0, 1, 1] and counts.tolist() == [30, 30, 30, 30]
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4))
    assert torch.equal(vectors, class_prototypes(z, y, per_class=2, min_count=20, seed=seed)[0])


def test_prototypes_through_the_training_transform_at_the_named_site_only(tmp_path: Path) -> None:
    """bn-transform=SITE_A=train: site A's round-1 prototypes come from training crops under statistics of
    training crops, site B's are bit for bit those of the default run (both started from the same weights)."""
    grid, _ = shared_run("fedbn-proto")
    named = run_federation(tmp_path, method="fedbn-proto", overrides=f"bn-transform={SITE_A}=train",
                           **{"num-server-rounds": 1})
    for p, changed in ((0, True), (1, False)):
        before, after = (raw(g.delivery(p, 1, "evaluate").reply.content[R.PROTOTYPES])[R.P_VECTORS]
                         for g in (grid, named))
        assert bitwise_equal(before, after) is not changed


def with_bank_rows_negated(delivery: Delivery, site: int) -> RecordDict:
    """The delivery's message content with the prototypes of ``site`` in its bank negated (still unit rows)."""
    content = wire(delivery.message).content
    bank = {k: torch.from_numpy(v.numpy().copy()) for k, v in content[R.PROTOTYPES].items()}
    bank[R.P_VECTORS][bank[R.P_SITES] == site] *= -1
    content[R.PROTOTYPES] = R.to_record(bank)
    return content


def test_contrastive_term_uses_the_other_sites_prototypes() -> None:
    grid, _ = shared_run("fedbn-proto")
    d = grid.delivery(0, 2)

    def con(content: RecordDict | None = None) -> float:
        return float(grid.replay(d, content).content[R.METRICS]["con"])

    original = float(d.reply.content[R.METRICS]["con"])
    assert con() == original  # a replay with the same inputs is exact
    assert con(with_bank_rows_negated(d, 0)) == original  # the site's own prototypes are not candidates
    changed = con(with_bank_rows_negated(d, 1))
    assert abs(changed - original) > 1e-4, "con did not react to the other site's prototypes"
    without = wire(d.message).content
    del without[R.PROTOTYPES]
    assert abs(con(without) - original) > 1e-4


@pytest.mark.parametrize("method", ("fedavg", "fedbn"))
def test_no_prototype_exchange_without_fedbn_proto(method: str) -> None:
    grid, _ = shared_run(method)
    assert all(R.PROTOTYPES not in m.content for m in grid.sent)
    assert all(R.PROTOTYPES not in d.reply.content for d in grid.deliveries)
    assert all(d.reply.content[R.METRICS]["con"] == 0.0 for d in trains(grid))


def split_site_b_by_patient(data: Path) -> tuple[str, str]:
    """Two sites made of the embedded Site B's patients (alternating, rows of near-duplicate groups left out),
    JPEGs copied, plus Site A linked: three site folders under ``data``."""
    source = project_root() / "data" / SITE_B
    rows = [r for r in read_manifest(source / "manifest.csv") if not r["dup_group"]]
    patients = sorted({r["patient_id"] for r in rows})
    names = ("site_b_half1", "site_b_half2")
    for half, name in enumerate(names):
        keep = set(patients[half::2])
        subset = [r for r in rows if r["patient_id"] in keep]
        for r in subset:
            (data / name / r["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / r["path"], data / name / r["path"])
        write_manifest(data / name / "manifest.csv", subset)
    (data / SITE_A).symlink_to(project_root() / "data" / SITE_A, target_is_directory=True)
    return names


def test_three_sites(tmp_path: Path) -> None:
    names = (SITE_A, *split_site_b_by_patient(tmp_path / "data"))
    halves = [{r["patient_id"] for r in read_manifest(tmp_path / "data" / n / "manifest.csv")} for n in names[1:]]
    assert halves[0] and halves[1] and not halves[0] & halves[1]
    grid = run_federation(tmp_path / "runs", num_sites=3, method="fedbn-proto", overrides=f"sites={','.join(names)}",
                          **{"num-server-rounds": 2, "data-root": str(tmp_path / "data")})
    final = json.loads((run_dir(tmp_path / "runs") / "final_metrics.json").read_text())
    assert set(final["sites"]) == set(names)
    for m in final["sites"].values():
        assert m["n"] > 0 and all(0.0 <= m[k] <= 1.0 for k in METRIC_NAMES)
    for p in range(3):
        bank = R.read_bank(grid.delivery(p, 2).message.content[R.PROTOTYPES], 128, 12)  # the round-2 bank
        assert sorted(set(bank.sites.tolist())) == [0, 1, 2]
        _, labels = bank.candidates_for(p)
        assert len(labels) == 4  # two classes of each of the two other sites
