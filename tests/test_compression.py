"""Transfer of shared weights: one flat vector in a layout both sides derive from the model, optionally float16
(config key ``compression``): exact round trip, fp16 error bound, sizes, refusals, and the real ServerApp /
ClientApp exchanging float16 weights while averaging in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_covid import records as R
from fl_covid.checkpoint import ServerState
from fl_covid.config import load_config
from fl_covid.federated import shared_keys
from fl_covid.model import create_model
from fl_covid.transport import INT8_BLOCK, dequantize, encode, quantize, weights_digest
from tests.inprocess import run_dir, run_federation


def _shared() -> dict[str, torch.Tensor]:
    """A real model's shared tensors plus awkward ones (float16 subnormal range, zeros, near float16's maximum)."""
    torch.manual_seed(0)
    model = create_model("redesigned", 0.125, 1, image_size=32)
    state = model.state_dict()
    shared = {k: state[k] for k in shared_keys(model, load_config("configs/smoke.yaml"))}
    shared["tiny"] = torch.randn(257) * 1e-6
    shared["zeros"] = torch.zeros(3, 3)
    shared["wide"] = torch.cat([torch.randn(100), torch.tensor([6e4, -6e4])])
    return shared


def test_flatten_round_trip_is_exact_and_keeps_names_and_shapes() -> None:
    shared = _shared()
    layout = R.layout_of(shared)
    flat = R.flatten(shared, layout)
    assert flat.dtype == np.float32 and flat.shape == (sum(v.numel() for v in shared.values()),)
    back = R.unflatten(flat, layout)
    assert list(back) == list(shared)
    assert all(back[k].shape == v.shape and torch.equal(back[k], v) for k, v in shared.items())
    with pytest.raises(ValueError, match="layout needs"):
        R.unflatten(flat[:-1], layout)
    with pytest.raises(ValueError, match="only float32"):
        R.layout_of({"counter": torch.tensor(3)})


def test_fp16_round_trip_is_within_half_an_ulp() -> None:
    flat = R.flatten(_shared(), R.layout_of(_shared()))
    record = R.weights_record(flat, "fp16")
    assert record[R.FLAT].numpy().dtype == np.float16
    decoded = R.read_weights(record, len(flat), "fp16")
    assert decoded.dtype == np.float32
    # float16 keeps 11 significant bits; below 2**-14 the spacing is 2**-24
    assert np.all(np.abs(decoded - flat) <= np.maximum(np.abs(flat) * 2.0 ** -11, 2.0 ** -25))


def test_none_is_exact_and_bytes_halve_for_fp16() -> None:
    flat = R.flatten(_shared(), R.layout_of(_shared()))
    plain, half = R.weights_record(flat, "none"), R.weights_record(flat, "fp16")
    assert np.array_equal(R.read_weights(plain, len(flat), "none"), flat)
    assert half.count_bytes() / plain.count_bytes() == pytest.approx(0.5, abs=0.001)


def test_a_record_of_the_other_compression_is_refused() -> None:
    flat = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="has dtype float16, expected float32"):
        R.read_weights(R.weights_record(flat, "fp16"), 10, "none")
    with pytest.raises(ValueError, match="has shape"):
        R.read_weights(R.weights_record(flat, "none"), 11, "none")


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="compression 'int4' is not one of"):
        encode(np.zeros(2, np.float32), "int4")
    for bad in (np.array([1.0, np.nan], np.float32), np.array([1e5], np.float32)):
        with pytest.raises(ValueError, match="cannot be sent as fp16.*compression=none"):
            encode(bad, "fp16")


def test_federation_sends_fp16_both_ways_and_averages_in_float32(tmp_path: Path) -> None:
    """Real ServerApp and ClientApps (in process, over Flower's wire format), fedbn, two rounds, fp16."""
    grid = run_federation(tmp_path, method="fedbn", overrides="compression=fp16 fedavg-weights=equal eval-every=1",
                          **{"num-server-rounds": 2})
    float16 = np.dtype(np.float16)
    for msg in grid.sent:  # server -> site: the summaries carry the weights, the train messages their digest
        if R.WEIGHTS in msg.content:
            assert msg.content[R.WEIGHTS][R.FLAT].numpy().dtype == float16
    summary = grid.delivery(0, 2, "evaluate").message.content[R.WEIGHTS][R.FLAT].numpy()
    assert grid.delivery(0, 2).message.content[R.CONFIG][R.DIGEST] == weights_digest(summary.astype(np.float32))
    replies = [d.reply for d in grid.deliveries if d.kind == "train" and d.round == 2]
    assert len(replies) == 2
    for reply in replies:  # site -> server
        assert reply.content[R.WEIGHTS][R.FLAT].numpy().dtype == float16
    decoded = [r.content[R.WEIGHTS][R.FLAT].numpy().astype(np.float64) for r in replies]
    saved = ServerState.load(run_dir(tmp_path) / "checkpoint")
    assert saved is not None
    averaged = R.flatten(saved.shared, R.layout_of(saved.shared))
    # averaged in float32 from the decoded replies (equal weights): closer than float16 could hold the mean
    np.testing.assert_allclose(averaged, (decoded[0] + decoded[1]) / 2, rtol=1e-6, atol=1e-9)


def test_int8_quantisation_error_is_bounded_per_block() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1e-3, INT8_BLOCK), rng.normal(0, 10, INT8_BLOCK),
                             np.zeros(7)]).astype(np.float32)
    q, scales = quantize(values)
    assert q.dtype == np.int8 and scales.shape == (3,) and scales[2] == 0
    back = dequantize(q, scales)
    for b in range(3):  # at most half a step of each block's own scale
        block = slice(b * INT8_BLOCK, (b + 1) * INT8_BLOCK)
        assert np.all(np.abs(back[block] - values[block]) <= scales[b] / 2 * (1 + 1e-5) + 1e-12)
    record = R.difference_record(q, scales)
    assert np.array_equal(R.read_difference(record, len(values)), back)
    with pytest.raises(ValueError, match="has dtype"):
        R.read_difference(R.difference_record(q.astype(np.int16), scales), len(values))


def test_federation_sends_int8_differences_both_ways_with_error_feedback(tmp_path: Path) -> None:
    """compression=int8: after a first whole copy, the server sends the change of the global weights since the
    sites' copy and the sites the change their training made, both as int8 blocks; each side carries its
    quantisation error into its next difference, so the weights the sites hold track the server's closely."""
    grid = run_federation(tmp_path, method="fedbn-proto", overrides="compression=int8", **{"num-server-rounds": 3})
    summaries = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    first, later = summaries[:2], summaries[2:]
    assert all(R.BASE not in m.content[R.CONFIG] and m.content[R.WEIGHTS][R.FLAT].numpy().dtype == np.float32
               for m in first)
    assert later and all(m.content[R.WEIGHTS][R.FLAT].numpy().dtype == np.int8 and R.BASE in m.content[R.CONFIG]
                         for m in later)
    for d in grid.deliveries:
        if d.kind == "train":
            assert d.reply.content[R.WEIGHTS][R.FLAT].numpy().dtype == np.int8
    # the copy a site kept at the start of round 3 (received/) is within one quantisation step of the server's
    # weights after round 2 (checkpoint.previous): the server's error went into its next difference
    after_2 = ServerState.load(run_dir(tmp_path) / "checkpoint.previous")
    assert after_2 is not None and after_2.round == 2
    exact = R.flatten(after_2.shared, R.layout_of(after_2.shared))
    kept = np.load(run_dir(tmp_path) / "site-site_a_sarscov2" / "received" / "weights.npz")["flat"]
    assert kept.shape == exact.shape and 0 < np.abs(kept - exact).max() < 1e-3 * np.abs(exact).max()
    residual = np.load(run_dir(tmp_path) / "site-site_a_sarscov2" / "state" / "residual.npz")["flat"]
    assert residual.shape == exact.shape and np.abs(residual).max() > 0  # the site's error, for its next reply
