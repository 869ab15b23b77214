"""NT-Xent (SPEC section 3) against pytorch-metric-learning and against a plain double loop of the definition."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from fl_covid.losses import NTXentLoss

LABEL_PATTERNS = {
    "balanced": [0, 0, 0, 0, 1, 1, 1, 1],
    "imbalanced": [0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "interleaved": [1, 0, 1, 0, 0, 1, 1],
    "three_classes": [0, 0, 1, 1, 1, 2, 2, 0, 2],
    "one_positive_pair": [0, 0, 1, 2, 3],
}


def reference_ntxent(z: list[list[float]], labels: list[int], tau: float,
                     candidates: list[list[float]] = (), candidate_labels: list[int] = ()) -> float:
    """SPEC definition, literally: anchors are the batch; positives and negatives are the batch (minus the anchor
    itself) plus the candidates; mean over (anchor, positive) pairs; 0 without a positive or a negative pair."""

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def cos(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v))

    anchors = [unit(v) for v in z]
    others = anchors + [unit(v) for v in candidates]
    other_labels = list(labels) + list(candidate_labels)
    pair_losses = []
    any_negative = False
    for a, za in enumerate(anchors):
        negatives = [math.exp(cos(za, others[n]) / tau) for n in range(len(others))
                     if other_labels[n] != labels[a]]
        any_negative = any_negative or bool(negatives)
        for p in range(len(others)):
            if p == a or other_labels[p] != labels[a]:
                continue
            pos = math.exp(cos(za, others[p]) / tau)
            pair_losses.append(-math.log(pos / (pos + sum(negatives))))
    if not pair_losses or not any_negative:
        return 0.0
    return sum(pair_losses) / len(pair_losses)


def embeddings(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("pattern", LABEL_PATTERNS)
def test_matches_pytorch_metric_learning(pattern: str, tau: float) -> None:
    labels = torch.tensor(LABEL_PATTERNS[pattern])
    z = embeddings(len(labels), seed=len(pattern))
    ours = NTXentLoss(tau)(z, labels)
    theirs = pml_losses.NTXentLoss(temperature=tau)(z, labels)
    assert ours.item() > 0
    torch.testing.assert_close(ours, theirs.to(ours), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pattern", LABEL_PATTERNS)
def test_matches_double_loop(pattern: str) -> None:
    labels = LABEL_PATTERNS[pattern]
    z = embeddings(len(labels), seed=7)
    ours = NTXentLoss(0.05)(z, torch.tensor(labels)).item()
    assert ours == pytest.approx(reference_ntxent(z.tolist(), labels, 0.05), rel=1e-9)


@pytest.mark.parametrize("labels", [[1, 1, 1, 1], [0, 1, 2, 3]], ids=["all_same", "all_different"])
def test_zero_without_positive_or_negative_pairs(labels: list[int]) -> None:
    z = embeddings(len(labels)).requires_grad_(True)
    loss = NTXentLoss(0.05)(z, torch.tensor(labels))
    theirs = pml_losses.NTXentLoss(temperature=0.05)(z, torch.tensor(labels))
    assert loss.item() == 0.0 == theirs.item()
    loss.backward()  # still part of the graph: a zero loss must not break a training step
    assert torch.equal(z.grad, torch.zeros_like(z))


CANDIDATE_CASES = {
    # batch labels, candidate labels
    "both_classes": ([0, 0, 1, 1, 1, 0], [0, 1, 0, 1]),
    "positives_only_from_candidates": ([0, 1], [0, 1]),
    "negatives_only_from_candidates": ([0, 0, 0], [1, 1]),
    "one_candidate_class": ([0, 1, 1, 0], [1]),
}


@pytest.mark.parametrize("case", CANDIDATE_CASES)
def test_candidates_match_double_loop(case: str) -> None:
    labels, candidate_labels = CANDIDATE_CASES[case]
    z, cands = embeddings(len(labels), seed=1), embeddings(len(candidate_labels), seed=2)
    ours = NTXentLoss(0.05)(z, torch.tensor(labels), cands, torch.tensor(candidate_labels)).item()
    expected = reference_ntxent(z.tolist(), labels, 0.05, cands.tolist(), candidate_labels)
    assert expected > 0
    assert ours == pytest.approx(expected, rel=1e-9)


def test_candidates_are_never_anchors() -> None:
    """With candidates, the number of pairs averaged is (batch anchors) x (positives), not more."""
    labels, candidate_labels = [0, 1], [0, 0, 0, 1]
    z, cands = embeddings(2, seed=3), embeddings(4, seed=4)
    loss = NTXentLoss(0.1)(z, torch.tensor(labels), cands, torch.tensor(candidate_labels)).item()
    # Anchor 0 has 3 positives (candidates), anchor 1 has 1: 4 pairs, all with the batch as the only anchors.
    assert loss == pytest.approx(reference_ntxent(z.tolist(), labels, 0.1, cands.tolist(), candidate_labels))
    symmetric = reference_ntxent(z.tolist() + cands.tolist(), labels + candidate_labels, 0.1)
    assert loss != pytest.approx(symmetric)


def test_empty_candidates_are_ignored() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    z = embeddings(4)
    torch.testing.assert_close(NTXentLoss()(z, labels, torch.empty(0, 16, dtype=torch.float64),
                                            torch.empty(0, dtype=torch.int64)), NTXentLoss()(z, labels))


def test_gradient_is_finite_and_nonzero_and_candidates_get_none() -> None:
    z = embeddings(8).float().requires_grad_(True)
    cands = embeddings(4, seed=9).float().requires_grad_(True)
    loss = NTXentLoss(0.05)(z, torch.tensor([0, 1] * 4), cands, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert cands.grad is None


def test_numerically_stable_at_small_temperature() -> None:
    z = embeddings(6).float()
    loss = NTXentLoss(0.01)(z, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference_ntxent(z.double().tolist(), [0, 0, 0, 1, 1, 1], 0.01), rel=1e-4)


@pytest.mark.parametrize("tau", [0.0, -0.1])
def test_temperature_must_be_positive(tau: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(tau)


@pytest.mark.parametrize(
    "z, labels, cands, cand_labels",
    [
        (torch.randn(4), torch.tensor([0, 1, 0, 1]), None, None),  # z not (B, D)
        (torch.randn(4, 8), torch.tensor([0, 1, 0]), None, None),  # labels of the wrong length
        (torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), torch.randn(2, 5), torch.tensor([0, 1])),  # D mismatch
        (torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), torch.randn(2, 8), None),  # candidate labels missing
        (torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), torch.randn(2, 8), torch.tensor([0, 1, 1])),  # P mismatch
    ],
    ids=["z_1d", "labels_length", "candidate_dim", "candidate_labels_missing", "candidate_labels_length"],
)
def test_shape_errors_raise(z, labels, cands, cand_labels) -> None:
    with pytest.raises(ValueError):
        NTXentLoss()(z, labels, cands, cand_labels)


@pytest.mark.parametrize("weight", [1, 2, 5])
def test_candidate_weight_equals_replicated_candidates(weight: int) -> None:
    """A candidate weight of w is w copies of every candidate (as positives and among the negatives)."""
    z = embeddings(6).float()
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    cands = embeddings(3, seed=7).float()
    cand_labels = torch.tensor([0, 1, 1])
    weighted = NTXentLoss(0.1)(z, labels, cands, cand_labels, candidate_weight=weight)
    copies = NTXentLoss(0.1)(z, labels, cands.repeat(weight, 1), cand_labels.repeat(weight))
    assert weighted.item() == pytest.approx(copies.item(), rel=1e-6)
    assert weighted.item() == pytest.approx(reference_ntxent(
        z.double().tolist(), labels.tolist(), 0.1, cands.double().tolist() * weight, cand_labels.tolist() * weight),
        rel=1e-5)
    with pytest.raises(ValueError, match="candidate_weight"):
        NTXentLoss(0.1)(z, labels, cands, cand_labels, candidate_weight=0.0)
