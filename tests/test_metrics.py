"""Metrics of docs/method.md §9 against numbers computed by hand."""

import dataclasses
import json
import math

import pytest
import torch

from ensc.evaluation.metrics import (
    Metrics,
    accuracy,
    agreement,
    apply_temperature,
    brier,
    dee_to_json,
    deep_ensemble_equivalent,
    disagreement,
    ece,
    ensemble_nll_curve,
    evaluate_predictions,
    fit_temperature,
    format_dee,
    nll,
    pairwise_kl,
)

# Two examples, three classes: the first is right (argmax 0 = label 0), the second wrong
# (argmax 1, label 2).
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
LABELS = torch.tensor([0, 2])


def test_accuracy_is_percent() -> None:
    # 1 of 2 correct -> 50 %
    assert accuracy(PROBS, LABELS) == pytest.approx(50.0)


def test_nll() -> None:
    # -(ln 0.7 + ln 0.3) / 2 = (0.356675 + 1.203973) / 2 = 0.780324
    assert nll(PROBS, LABELS) == pytest.approx(0.780324, abs=1e-6)


def test_nll_floors_zero_probability() -> None:
    # p_y = 0 is floored at 1e-12: -ln 1e-12 = 27.631021
    probs = torch.tensor([[1.0, 0.0]])
    assert nll(probs, torch.tensor([1])) == pytest.approx(27.631021, abs=1e-6)


def test_brier_sums_over_classes() -> None:
    # ex 1: (0.7-1)² + 0.2² + 0.1² = 0.09 + 0.04 + 0.01 = 0.14
    # ex 2: 0.2² + 0.5² + (0.3-1)² = 0.04 + 0.25 + 0.49 = 0.78
    # mean = 0.46
    assert brier(PROBS, LABELS) == pytest.approx(0.46)


def test_ece_two_bins() -> None:
    # 15 bins of width 1/15. Confidence 0.95 -> bin (14/15, 1]; 0.55 -> bin (8/15, 9/15].
    # high bin: two correct at 0.95 -> |1 - 0.95| = 0.05, weight 2/4
    # low bin:  two correct at 0.55 -> |1 - 0.55| = 0.45, weight 2/4
    # ECE = 0.5 * 0.05 + 0.5 * 0.45 = 0.25
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 0, 1])
    assert ece(probs, labels) == pytest.approx(0.25)


def test_ece_bins_are_right_closed() -> None:
    # n_bins=2: bins (0, 0.5] and (0.5, 1].
    # conf 0.5 (correct) sits in the LOW bin:  |1 - 0.5| * 1/2 = 0.25
    # conf 0.9 (wrong) in the high bin:        |0 - 0.9| * 1/2 = 0.45   -> ECE 0.70
    # (were 0.5 put in the high bin, ECE would be |0.5 - 0.7| = 0.20)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    labels = torch.tensor([0, 1])
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.70)


def test_ece_zero_when_calibrated() -> None:
    # 10 examples at confidence 0.8, 8 right: acc 0.8 = conf 0.8 -> ECE 0 (up to round-off)
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # confidence 1.0, all right: exactly 0
    assert ece(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0.0


def test_rejects_logits_and_bad_labels() -> None:
    with pytest.raises(ValueError, match="softmax"):
        nll(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        nll(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
    with pytest.raises(TypeError):
        nll(torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]))


def test_apply_temperature() -> None:
    # log-probs of (1/4, 3/4) at T = 0.5 -> softmax(2·log p) ∝ (1/16, 9/16) -> (0.1, 0.9)
    log_probs = torch.tensor([[math.log(0.25), math.log(0.75)]], dtype=torch.float64)
    out = apply_temperature(log_probs, 0.5)
    assert out.dtype == torch.float64
    assert out.tolist()[0] == pytest.approx([0.1, 0.9], abs=1e-12)


def test_fit_temperature_closed_form() -> None:
    # Identical examples with log-probs (ln 0.2, ln 0.8); 3 of 4 labelled class 1.
    # softmax(z/T)_1 = σ(ln4 / T); the NLL is minimal when it equals 3/4, i.e. 4^(1/T) = 3,
    # T = ln 4 / ln 3 = 1.261860
    z = torch.tensor([[math.log(0.2), math.log(0.8)]] * 4)
    labels = torch.tensor([1, 1, 1, 0])
    assert fit_temperature(z, labels) == pytest.approx(1.261860, abs=1e-5)


def _sampled(t0: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """20000 random logits [20000, 5] and labels drawn from softmax(z / t0)."""
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(20000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial((z / t0).softmax(-1), 1, generator=g).squeeze(1)
    return z, y


def test_fit_temperature_recovers_known_temperature() -> None:
    z, y = _sampled(2.0, seed=0)
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.04)
    # labels drawn from softmax(z) itself: T = 1 is (near) optimal
    z, y = _sampled(1.0, seed=1)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.03)


def test_fit_temperature_is_clamped() -> None:
    # Labels opposite to the argmax everywhere: the NLL keeps falling as T grows -> T_MAX.
    z = torch.tensor([[0.0, 1.0]] * 4)
    assert fit_temperature(z, torch.zeros(4, dtype=torch.int64)) == pytest.approx(20.0)


def test_calibrated_nll_not_worse_on_validation() -> None:
    z, y = _sampled(2.0, seed=2)
    probs = z.softmax(-1)  # overconfident by a factor 2 in log space
    t = fit_temperature(probs.log(), y)
    calibrated = nll(apply_temperature(probs.log(), t), y)
    assert calibrated <= nll(probs, y) + 1e-12
    assert calibrated < nll(probs, y) - 0.01  # and clearly better for a miscalibrated model


# --------------------------------------------------------------------------- DEE

CURVE = [0.30, 0.25, 0.22, 0.20]  # NLL of DE-1 .. DE-4


def test_dee_on_node() -> None:
    assert deep_ensemble_equivalent(0.30, CURVE) == 1.0
    assert deep_ensemble_equivalent(0.22, CURVE) == pytest.approx(3.0)
    assert deep_ensemble_equivalent(0.20, CURVE) == pytest.approx(4.0)


def test_dee_between_nodes() -> None:
    # between m=2 (0.25) and m=3 (0.22): 2 + (0.25 - 0.235) / (0.25 - 0.22) = 2 + 0.5 = 2.5
    assert deep_ensemble_equivalent(0.235, CURVE) == pytest.approx(2.5)
    # between m=1 and m=2: 1 + (0.30 - 0.26) / 0.05 = 1.8
    assert deep_ensemble_equivalent(0.26, CURVE) == pytest.approx(1.8)


def test_dee_out_of_range() -> None:
    worse = deep_ensemble_equivalent(0.31, CURVE)
    better = deep_ensemble_equivalent(0.19, CURVE)
    assert worse == 0.0 and better == math.inf
    assert format_dee(worse, 4) == "<1" and dee_to_json(worse, 4) == "<1"
    assert format_dee(better, 4) == ">4" and dee_to_json(better, 4) == ">4"
    assert format_dee(2.4666, 4) == "2.47" and dee_to_json(2.46666, 4) == 2.467


def test_dee_non_monotone_curve_takes_first_crossing() -> None:
    curve = [1.0, 0.8, 0.9, 0.7]
    # 0.85 is crossed on segment 1->2 first: 1 + (1.0 - 0.85) / 0.2 = 1.75 (also on 2->3, 3->4)
    assert deep_ensemble_equivalent(0.85, curve) == pytest.approx(1.75)
    # 0.75 is below 0.8, so only the last segment reaches it: 3 + (0.9 - 0.75) / 0.2 = 3.75
    assert deep_ensemble_equivalent(0.75, curve) == pytest.approx(3.75)
    # a rising curve above the first node is still "worse than one member"
    assert deep_ensemble_equivalent(1.05, [1.0, 1.1, 0.9]) == 0.0


def test_dee_single_member_curve() -> None:
    assert deep_ensemble_equivalent(0.5, [0.5]) == 1.0
    assert deep_ensemble_equivalent(0.6, [0.5]) == 0.0
    assert deep_ensemble_equivalent(0.4, [0.5]) == math.inf
    assert format_dee(math.inf, 1) == ">1"


def test_dee_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        deep_ensemble_equivalent(0.3, [])
    with pytest.raises(ValueError):
        deep_ensemble_equivalent(float("nan"), CURVE)
    with pytest.raises(ValueError):
        dee_to_json(5.0, 4)


# --------------------------------------------------------------------------- diversity


def test_pairwise_kl() -> None:
    # Example 1: p1 = (0.5, 0.5), p2 = (0.9, 0.1); example 2: both (0.6, 0.4) -> KL 0.
    # KL(p1‖p2) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5 ln(25/9)       = 0.510826
    # KL(p2‖p1) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.529008 - 0.160944 = 0.368064
    # mean over the 2 ordered pairs and the 2 examples: (0.510826 + 0.368064) / 4 = 0.219722
    member_probs = torch.tensor([[[0.5, 0.5], [0.6, 0.4]], [[0.9, 0.1], [0.6, 0.4]]])
    assert pairwise_kl(member_probs) == pytest.approx(0.219722, abs=1e-6)
    assert pairwise_kl(member_probs[:1]) == 0.0


def test_disagreement() -> None:
    # argmax of members: m1 (0,1,1,0), m2 (0,1,0,0), m3 (1,1,0,0)
    # pairs: (1,2) differ at ex 3 -> 1/4; (1,3) at ex 1, 3 -> 2/4; (2,3) at ex 1 -> 1/4
    # mean = (0.25 + 0.5 + 0.25) / 3 = 1/3
    a, b = [0.8, 0.2], [0.3, 0.7]
    member_probs = torch.tensor([[a, b, b, a], [a, b, a, a], [b, b, a, a]])
    assert disagreement(member_probs) == pytest.approx(1 / 3)
    assert disagreement(member_probs[:1]) == 0.0
    # top-1 agreement of m1 and m3: same argmax on ex 2, 4 -> 50 %
    assert agreement(member_probs[0], member_probs[2]) == pytest.approx(50.0)


# --------------------------------------------------------------------------- summary


def test_ensemble_nll_curve() -> None:
    # one example, label 0. DE-1 = (0.5, 0.5): -ln 0.5 = 0.693147
    # DE-2 = mean((0.5, 0.5), (0.9, 0.1)) = (0.7, 0.3): -ln 0.7 = 0.356675
    member_probs = torch.tensor([[[0.5, 0.5]], [[0.9, 0.1]]])
    curve = ensemble_nll_curve(member_probs, torch.tensor([0]))
    assert curve == pytest.approx([0.693147, 0.356675], abs=1e-6)


def test_calibrated_ensemble_nll_curve_on_its_validation_data() -> None:
    z, y = _sampled(2.0, seed=3)
    z = z[:2000]  # [N, K]
    y = y[:2000]
    # three overconfident members: the same logits plus different fixed noise
    g = torch.Generator().manual_seed(4)
    noisy = [z + 0.5 * torch.randn(z.shape, generator=g, dtype=z.dtype) for _ in range(3)]
    members = torch.stack([logits.softmax(-1) for logits in noisy])  # [3, N, K]
    plain = ensemble_nll_curve(members, y)
    calibrated = ensemble_nll_curve(members, y, val_member_probs=members, val_labels=y)
    assert len(calibrated) == 3
    assert all(c < p for c, p in zip(calibrated, plain, strict=True))


def test_evaluate_predictions_and_json() -> None:
    z, y = _sampled(2.0, seed=5)
    probs = z.softmax(-1)
    g = torch.Generator().manual_seed(6)
    noise = 2.0 * torch.randn(z.shape, generator=g, dtype=z.dtype)
    members = torch.stack([z.softmax(-1), (z + noise).softmax(-1)])  # [2, N, K]
    val, test = slice(0, 10000), slice(10000, 20000)
    result = evaluate_predictions(
        probs[test],
        y[test],
        val_probs=probs[val],
        val_labels=y[val],
        member_probs=members[:, test],
        de_nll_curve=[10.0, 9.0],  # every real model beats this -> ">2"
    )
    assert result.temperature == pytest.approx(2.0, rel=0.05)
    assert result.cnll < result.nll
    assert result.kl_div > 0 and 0 < result.disagreement < 1
    assert result.dee == math.inf
    d = result.to_dict()
    assert d["dee"] == ">2" and d["acc"] == pytest.approx(accuracy(probs[test], y[test]))
    json.loads(json.dumps(d, allow_nan=False))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.acc = 0.0  # type: ignore[misc]


def test_evaluate_predictions_minimal() -> None:
    result = evaluate_predictions(PROBS, LABELS)
    assert result == Metrics(acc=50.0, nll=result.nll, bs=result.bs, ece=result.ece)
    assert result.cnll is None and result.dee is None
    assert json.loads(json.dumps(result.to_dict()))["cnll"] is None
    with pytest.raises(ValueError, match="both"):
        evaluate_predictions(PROBS, LABELS, val_probs=PROBS)


def test_evaluate_predictions_dee_uses_nll_without_validation() -> None:
    # nll = 0.780324 sits halfway between 0.880324 (m=1) and 0.680324 (m=2) -> DEE 1.5
    curve = [0.880324, 0.680324]
    result = evaluate_predictions(PROBS, LABELS, de_nll_curve=curve)
    assert result.dee == pytest.approx(1.5, abs=1e-4)
    assert result.to_dict()["dee"] == 1.5 and result.to_dict()["dee_members"] == 2


def test_dee_snaps_round_off_to_the_node():
    # the same DE-3 evaluated with float32 means differs from the curve by ~1e-8: still DEE 3, not ">3"
    curve = [0.50, 0.47, 0.46]
    assert deep_ensemble_equivalent(0.46 - 1e-8, curve) == 3.0
    assert deep_ensemble_equivalent(0.50 + 1e-8, curve) == 1.0
    assert deep_ensemble_equivalent(0.46 - 1e-3, curve) == math.inf
