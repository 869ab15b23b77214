"""Compressed transfer of shared weights (config key ``compression``): error bound, untouched integers, sizes,
and the real ServerApp/ClientApp exchanging float16 weights while averaging in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_covid import records as R
from fl_covid.checkpoint import ServerState
from fl_covid.model import create_model
from tests.inprocess import run_dir, run_federation


def _state() -> dict[str, torch.Tensor]:
    """A real model's state (float weights, BN statistics, int64 counters) plus awkward float tensors."""
    torch.manual_seed(0)
    state = dict(create_model("redesigned", 0.125, 1, image_size=32).state_dict())
    state["tiny"] = torch.randn(257) * 1e-6  # float16 subnormal range
    state["zeros"] = torch.zeros(3, 3)
    state["wide"] = torch.cat([torch.randn(100), torch.tensor([6e4, -6e4])])
    state["counter-averaged"] = torch.tensor(1e6, dtype=torch.float64)  # FedAvg's mean of int64 counters
    return state


def test_fp16_round_trip_is_within_half_an_ulp() -> None:
    state = {k: v.numpy() for k, v in _state().items()}
    encoded = R.encode(state, "fp16")
    decoded = R.decode(encoded)
    assert list(encoded) == list(decoded) == list(state)
    assert encoded["counter-averaged"] is state["counter-averaged"]
    for k, a in state.items():
        if a.dtype == np.float32:
            assert encoded[k].dtype == np.float16 and decoded[k].dtype == np.float32
            # float16 keeps 11 significant bits; below 2**-14 the spacing is 2**-24
            bound = np.maximum(np.abs(a) * 2.0 ** -11, 2.0 ** -25)
            assert np.all(np.abs(decoded[k] - a) <= bound), k
    assert np.all(decoded["zeros"] == 0)


@pytest.mark.parametrize("compression", R.COMPRESSIONS)
def test_integer_tensors_pass_untouched(compression: str) -> None:
    state = _state()
    integers = {k for k, v in state.items() if not v.is_floating_point()}
    assert integers, "the model should hold integer BN counters"
    arrays = {k: v.numpy() for k, v in state.items()}
    encoded = R.encode(arrays, compression)
    assert all(encoded[k] is arrays[k] for k in integers)
    decoded = R.decode_tensors(R.to_record(state, compression))
    for k in integers:
        assert decoded[k].dtype == torch.int64 and torch.equal(decoded[k], state[k])


def test_none_is_exact_and_bytes_halve_for_fp16() -> None:
    state = _state()
    plain = R.to_record(state, "none")
    assert all(torch.equal(R.decode_tensors(plain)[k], v) for k, v in state.items())
    assert R.encode_record(plain, "none") is plain
    fp16 = R.to_record(state, "fp16")
    assert R.encode_record(plain, "fp16").count_bytes() == fp16.count_bytes()
    float_bytes = sum(v.numel() * 4 for v in state.values() if v.dtype == torch.float32)
    other = plain.count_bytes() - float_bytes  # integer tensors, keys and NumPy headers
    assert fp16.count_bytes() == pytest.approx(other + float_bytes / 2, rel=0.01)
    assert fp16.count_bytes() / plain.count_bytes() < 0.52
    assert R.decode_record(fp16).count_bytes() == plain.count_bytes()


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="compression 'int8' is not one of"):
        R.encode({"w": np.zeros(2, np.float32)}, "int8")
    for bad in (np.array([1.0, np.nan], np.float32), np.array([1e5], np.float32)):
        with pytest.raises(ValueError, match="tensor w .*compression=none"):
            R.encode({"w": bad}, "fp16")


def test_federation_sends_fp16_both_ways_and_averages_in_float32(tmp_path: Path) -> None:
    """Real ServerApp and ClientApps (in process, over Flower's wire format), fedbn, one round, fp16."""
    grid = run_federation(tmp_path, method="fedbn", overrides="compression=fp16", **{"num-server-rounds": 1})
    float16 = np.dtype(np.float16)  # fedbn shares no BN, hence no integer counters
    for msg in grid.sent:  # server -> site, train and evaluate
        assert {v.numpy().dtype for v in msg.content[R.WEIGHTS].values()} == {float16}
    replies = [d.reply for d in grid.deliveries if d.kind == "train"]
    assert len(replies) == 2
    decoded = []
    for reply in replies:  # site -> server
        assert {v.numpy().dtype for v in reply.content[R.WEIGHTS].values()} == {float16}
        decoded.append((R.decode_tensors(reply.content[R.WEIGHTS]), reply.content[R.METRICS][R.NUM_EXAMPLES]))
    saved = ServerState.load(run_dir(tmp_path) / "checkpoint")
    assert saved is not None
    total = sum(n for _, n in decoded)
    for k, v in saved.shared.items():
        if v.is_floating_point():
            # averaged in float32 from the decoded replies: closer than float16 could represent the mean
            assert v.dtype == torch.float32
            expected = sum(t[k].double() * n / total for t, n in decoded)
            torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-9)
