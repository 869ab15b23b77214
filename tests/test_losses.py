"""The loss terms against references: NT-Xent (SPEC section 3) against pytorch-metric-learning and a plain double
loop of the definition, MS-Net's term against the formula in numpy, FedProx's term and its gradient against the
definition; the objective each method builds from its record."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from fl_covid.config import Config
from fl_covid.losses import MSNetLoss, NTXentLoss, ProximalTerm
from fl_covid.methods import METHODS
from fl_covid.objective import StepOutput, build_objective

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
    loss = NTXentLoss(Config.temperature)
    torch.testing.assert_close(loss(z, labels, torch.empty(0, 16, dtype=torch.float64),
                                    torch.empty(0, dtype=torch.int64)), loss(z, labels))


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
        NTXentLoss(Config.temperature)(z, labels, cands, cand_labels)


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


# --- MS-Net's term and FedProx's term -------------------------------------------------------------------------------

def test_msnet_loss_matches_a_reference() -> None:
    g = torch.Generator().manual_seed(0)
    for labels in (torch.tensor([0, 1, 1, 0, 1]), torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)):
        logits, aux = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g) * 3
        for t, w in ((2.0, 0.5), (1.0, 1.0), (4.0, 0.0)):
            p_t = np.exp(aux.numpy() / t) / np.exp(aux.numpy() / t).sum(1, keepdims=True)
            log_p_s = logits.numpy() / t - np.log(np.exp(logits.numpy() / t).sum(1, keepdims=True))
            kl = float((p_t * (np.log(p_t) - log_p_s)).sum(1).mean())
            log_p_aux = aux.numpy() - np.log(np.exp(aux.numpy()).sum(1, keepdims=True))
            ce = float(-log_p_aux[np.arange(5), labels.numpy()].mean())
            assert float(MSNetLoss(t, w)(logits, aux, labels)) == pytest.approx(ce + w * t * t * kl, rel=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        MSNetLoss(0.0, Config.msnet_weight)


def test_proximal_term_and_its_gradient_match_the_definition() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    reference = {k: v.detach() + torch.randn_like(v) for k, v in model.named_parameters() if k.startswith("0.")}
    mu = 0.3
    term = ProximalTerm(mu, reference)(model)
    params = dict(model.named_parameters())
    expected = mu / 2 * sum(float(((params[k].detach() - r) ** 2).sum()) for k, r in reference.items())
    assert float(term.detach()) == pytest.approx(expected, rel=1e-6)
    term.backward()
    for k, p in params.items():  # d/dw = mu (w - w_ref) on the named parameters, nothing elsewhere
        want = mu * (p.detach() - reference[k]) if k in reference else torch.zeros_like(p)
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), want)
    with pytest.raises(ValueError, match="proximal-mu must be >= 0"):
        ProximalTerm(-1.0, reference)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_builds_the_terms_its_record_names(method: str) -> None:
    spec, config = METHODS[method], Config(method=method)
    reference = {"w": torch.zeros(1)}
    candidates = (torch.nn.functional.normalize(torch.randn(2, 8), dim=1), torch.tensor([0, 1]))
    objective = build_objective(config, candidates, reference)
    assert (objective.contrastive is not None) == spec.contrastive
    assert (objective.candidates is not None) == spec.contrastive
    assert (objective.msnet is not None) == spec.auxiliary
    assert (objective.proximal is not None) == spec.proximal
    assert build_objective(config.replace(alpha=0.0), candidates, reference).contrastive is None


def test_objective_sums_its_terms() -> None:
    g = torch.Generator().manual_seed(1)
    out = StepOutput(torch.randn(6, 2, generator=g), torch.tensor([0, 1, 0, 1, 1, 0]),
                     torch.randn(6, 8, generator=g), torch.randn(6, 2, generator=g))
    model = torch.nn.Linear(2, 2)
    reference = {k: v.detach() + 1 for k, v in model.named_parameters()}
    config = Config(method="contrastive", alpha=0.7)
    loss, ce, con = build_objective(config)(model, out)
    assert float(ce) == pytest.approx(float(torch.nn.functional.cross_entropy(out.logits, out.labels)))
    assert float(con) == pytest.approx(float(NTXentLoss(config.temperature)(out.projections, out.labels)))
    assert float(loss) == pytest.approx(float(ce) + 0.7 * float(con))
    prox = build_objective(Config(method="fedprox"), reference=reference)
    loss, ce, con = prox(model, out)
    assert float(con) == 0
    assert float(loss.detach()) == pytest.approx(float(ce) + float(ProximalTerm(prox.proximal.mu, reference)(model).detach()))
    with pytest.raises(ValueError, match="needs the weights the round started from"):
        build_objective(Config(method="fedprox"))
