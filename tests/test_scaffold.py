"""SCAFFOLD through the method home: the control-variate updates against the paper's option II, the correction's
gradient, a real two-site federation in process (what a site sends besides its weights is computable from what
the server already holds; the site keeps c_i; the server's c is the mean of the sites' deltas and is
checkpointed), a malformed payload rejected as that site's failure, and the configs SCAFFOLD refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from fl_covid import records as R
from fl_covid.algorithms.scaffold import CONTROL, DELTA, OWN, ControlCorrection, Scaffold
from fl_covid.checkpoint import ServerState
from fl_covid.config import Config
from fl_covid.errors import ConfigError
from fl_covid.federated import LocalState
from fl_covid.objective import StepOutput
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import SMOKE, RecordingGrid, run_dir, run_federation

SITES = (SITE_A, SITE_B)


def test_the_correction_term_adds_its_direction_to_the_gradient() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    directions = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    term = ControlCorrection(dict(directions))(model, StepOutput(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))
    term.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, directions[name])


def test_site_and_server_updates_follow_option_two() -> None:
    rng = np.random.default_rng(0)
    x, y, c, own = (rng.normal(size=5).astype(np.float32) for _ in range(4))
    algorithm = Scaffold(Config(method="scaffold"), 5)
    sent, kept = algorithm.site_update({CONTROL: c}, {OWN: torch.from_numpy(own)}, x, y, steps=4, lr=0.1)
    updated = own - c + (x - y) / (4 * 0.1)
    np.testing.assert_allclose(kept[OWN].numpy(), updated, rtol=1e-6)
    np.testing.assert_allclose(sent[DELTA], updated - own, rtol=1e-5, atol=1e-6)
    sent0, kept0 = algorithm.site_update({CONTROL: c}, {}, x, y, steps=4, lr=0.1)  # a first round: c_i = 0
    np.testing.assert_allclose(sent0[DELTA], kept0[OWN].numpy())
    d0, d1 = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    algorithm.server_update({1: {DELTA: d1}, 0: {DELTA: d0}})
    np.testing.assert_allclose(algorithm.server_payload()[CONTROL], (d0 + d1) / 2, rtol=1e-6)
    algorithm.server_update({0: {DELTA: d0}})  # a site missing: still divided by all N sites
    np.testing.assert_allclose(algorithm.server_payload()[CONTROL], (d0 + d1) / 2 + d0 / 2, rtol=1e-6)
    restored = Scaffold(Config(method="scaffold"), 5)
    restored.restore(algorithm.state())
    np.testing.assert_array_equal(restored.server_payload()[CONTROL], algorithm.server_payload()[CONTROL])


def _trained_from(grid: RecordingGrid, partition: int, server_round: int) -> np.ndarray:
    """The flat weights a site trained from in a round: in the train message, else in the round's summary."""
    train = grid.delivery(partition, server_round).message
    source = train if R.WEIGHTS in train.content else grid.delivery(partition, server_round, "evaluate").message
    return R.read_weights(source.content[R.WEIGHTS], len(train.content[R.PAYLOAD][CONTROL].numpy()), "none")


def test_a_federation_sends_only_what_the_server_could_compute_and_keeps_c_i_at_the_site(tmp_path: Path) -> None:
    rounds, steps = 2, int(SMOKE["local-steps"])
    grid = run_federation(tmp_path, method="fedbn-proto-scaffold", **{"num-server-rounds": rounds})
    assert (run_dir(tmp_path) / "final_metrics.json").is_file()
    deltas: dict[tuple[int, int], np.ndarray] = {}
    for partition in (0, 1):
        for rnd in range(1, rounds + 1):
            d = grid.delivery(partition, rnd)
            c = d.message.content[R.PAYLOAD][CONTROL].numpy()
            assert set(d.reply.content[R.PAYLOAD].keys()) == {DELTA}  # c_i itself never travels
            x = _trained_from(grid, partition, rnd)
            y = R.read_weights(d.reply.content[R.WEIGHTS], len(c), "none")
            delta = d.reply.content[R.PAYLOAD][DELTA].numpy()
            lr = float(d.message.content[R.CONFIG][R.LR])
            # the site's delta c_i from the server's own copies of x, y_i and c: nothing beyond the update
            np.testing.assert_allclose(delta, (x - y) / (steps * lr) - c, rtol=1e-4, atol=1e-4)
            deltas[partition, rnd] = delta
        state = LocalState.load(run_dir(tmp_path) / f"site-{SITES[partition]}" / "state")
        assert state is not None
        np.testing.assert_allclose(state.algorithm[OWN].numpy(), deltas[partition, 1] + deltas[partition, 2],
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grid.delivery(0, 1).message.content[R.PAYLOAD][CONTROL].numpy(), 0)
    c2 = grid.delivery(0, 2).message.content[R.PAYLOAD][CONTROL].numpy()
    np.testing.assert_allclose(c2, (deltas[0, 1] + deltas[1, 1]) / 2, rtol=1e-5, atol=1e-6)
    saved = ServerState.load(run_dir(tmp_path) / "checkpoint")
    assert saved is not None and saved.round == rounds
    np.testing.assert_allclose(saved.optimizer[f"algorithm.{CONTROL}"].numpy(),
                               c2 + (deltas[0, 2] + deltas[1, 2]) / 2, rtol=1e-5, atol=1e-6)


def test_a_malformed_payload_rejects_that_site_only(tmp_path: Path) -> None:
    def nan_payload(partition: int, reply: Message) -> Message:
        if partition == 1 and reply.metadata.message_type == "train" and R.PAYLOAD in reply.content:
            bad = reply.content[R.PAYLOAD][DELTA].numpy().copy()
            bad[0] = np.nan
            reply.content[R.PAYLOAD] = ArrayRecord({DELTA: Array(bad)})
        return reply

    grid = run_federation(tmp_path, tamper=nan_payload, method="scaffold", **{"num-server-rounds": 1},
                          overrides="min-sites=1")
    saved = ServerState.load(run_dir(tmp_path) / "checkpoint")
    assert saved is not None
    reply_a = grid.delivery(0, 1).reply.content
    # only site A counted: the global weights are its weights, c its delta over both sites
    np.testing.assert_array_equal(R.flatten(saved.shared, R.layout_of(saved.shared)),
                                  R.read_weights(reply_a[R.WEIGHTS], len(reply_a[R.PAYLOAD][DELTA].numpy()), "none"))
    np.testing.assert_allclose(saved.optimizer[f"algorithm.{CONTROL}"].numpy(), reply_a[R.PAYLOAD][DELTA].numpy() / 2,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_compressed_runs_are_refused_before_training(tmp_path: Path, compression: str) -> None:
    with pytest.raises(ConfigError, match=f"compression is '{compression}'"):
        run_federation(tmp_path, method="scaffold", overrides=f"compression={compression}")
    assert not list(tmp_path.glob("*/site-*"))  # no site trained
