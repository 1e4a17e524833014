"""Unit tests of the distillation loss, the optimizer groups and the fast-weight gradient hook.

Every expected value is computed here from the formulas (explicit exp/log/sum in float64, hand-
derived gradients, or autograd of an independently written penalty), never by calling the code
under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ensc.compress.distill import fast_weight_hook, param_groups
from ensc.compress.losses import DistillationLoss
from ensc.engine.loop import OptimConfig, make_optimizer
from ensc.models import build_model
from ensc.models.batchensemble import to_batchensemble

MS, MT, B, K = (
    2,
    3,
    5,
    4,
)  # student members, teacher members (≠ MS: the "mean" case), batch, classes


# --------------------------------------------------------------------------- references


def _probs(logits: torch.Tensor, t: float) -> torch.Tensor:
    """softmax(z / T) written out: exp(z/T − max) / Σ exp(z/T − max), in float64."""
    z = logits.double() / t
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def _ref_kd(student: torch.Tensor, teacher: torch.Tensor, t: float, target: str) -> torch.Tensor:
    """T² · mean over (m, b) of −Σ_k p_k log q_k, with p teacher m's (or the teachers' mean)
    softmax at T and q student m's softmax at T, looped over members and examples."""
    p_teacher = _probs(teacher, t)  # [Mt, B, K]
    q = _probs(student, t)  # [Ms, B, K]
    total = 0.0
    for m in range(student.shape[0]):
        p = p_teacher[m] if target == "member" else p_teacher.mean(0)
        for b in range(student.shape[1]):
            total += -sum(float(p[b, k]) * math.log(float(q[m, b, k])) for k in range(K))
    return torch.tensor(t * t * total / (student.shape[0] * student.shape[1]), dtype=torch.float64)


def _ref_ce(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean over (m, b) of −log softmax(s_m(x)_b)_y, y = labels[b] or labels[m, b]."""
    q = _probs(student, 1.0)
    total = 0.0
    for m in range(student.shape[0]):
        for b in range(student.shape[1]):
            y = int(labels[m, b] if labels.dim() == 2 else labels[b])
            total += -math.log(float(q[m, b, y]))
    return torch.tensor(total / (student.shape[0] * student.shape[1]), dtype=torch.float64)


def _logits(seed: int, target: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    mt = MS if target == "member" else MT
    student_pert = torch.randn(MS, B, K, generator=gen) * 3
    teacher = torch.randn(mt, B, K, generator=gen) * 3
    student_clean = torch.randn(MS, B, K, generator=gen) * 3
    labels = torch.randint(0, K, (B,), generator=gen)
    return student_pert, teacher, student_clean, labels


# --------------------------------------------------------------------------- DistillationLoss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("target", ["member", "mean"])
def test_loss_matches_the_formula(target: str, alpha: float, temperature: float) -> None:
    """L = α·T²·KD_T(s(x̃), t(x̃)) + (1 − α)·CE(s(x), y); "mean": Mt ≠ Ms, every student member
    learns the mean of the teachers' probabilities at T."""
    s_pert, teacher, s_clean, labels = _logits(0, target)
    loss = DistillationLoss(alpha, temperature)(s_pert, teacher, s_clean, labels)
    expected = alpha * _ref_kd(s_pert, teacher, temperature, target)
    expected = expected + (1 - alpha) * _ref_ce(s_clean, labels)
    torch.testing.assert_close(torch.as_tensor(loss).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_term_is_scaled_by_t_squared(temperature: float) -> None:
    """KD alone against the formula (T² included): leaving T² out would be 16× off at T = 4."""
    s_pert, teacher, _, _ = _logits(1, "member")
    kd = DistillationLoss(1.0, temperature).kd(s_pert, teacher)
    torch.testing.assert_close(kd.double(), _ref_kd(s_pert, teacher, temperature, "member"))


def test_mean_target_equals_a_single_mean_prediction_target() -> None:
    """Mt ≠ Ms averages the teachers' probabilities: the same as one target [1, B, K] whose
    softmax is that mean (log of the mean probability, times T)."""
    s_pert, teacher, _, _ = _logits(2, "mean")
    t = 4.0
    mean_logits = (t * _probs(teacher, t).mean(0).log()).float().unsqueeze(0)  # [1, B, K]
    loss_fn = DistillationLoss(1.0, t)
    torch.testing.assert_close(loss_fn.kd(s_pert, teacher), loss_fn.kd(s_pert, mean_logits))
    torch.testing.assert_close(
        loss_fn.kd(s_pert, teacher).double(), _ref_kd(s_pert, teacher, t, "mean")
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_alpha_zero_is_pure_cross_entropy(temperature: float) -> None:
    """α = 0: the loss is CE on the labels at T = 1, whatever the teacher says or T is."""
    s_pert, teacher, s_clean, labels = _logits(3, "member")
    loss_fn = DistillationLoss(0.0, temperature)
    loss = loss_fn(s_pert, teacher, s_clean, labels)
    torch.testing.assert_close(torch.as_tensor(loss).double(), _ref_ce(s_clean, labels))
    other_teacher = torch.randn_like(teacher) * 10
    assert float(loss_fn(s_pert, other_teacher, s_clean, labels)) == float(loss)
    s_pert = s_pert.clone().requires_grad_(True)
    s_clean = s_clean.clone().requires_grad_(True)
    loss_fn(s_pert, teacher, s_clean, labels).backward()
    assert s_pert.grad is None  # the perturbed pass does not enter the loss at all
    assert s_clean.grad is not None and s_clean.grad.abs().sum() > 0


def test_cross_entropy_with_per_member_labels() -> None:
    """labels [Ms, B]: member m is scored on its own labels (the "split" member batches)."""
    _, _, s_clean, _ = _logits(4, "member")
    labels = torch.randint(0, K, (MS, B), generator=torch.Generator().manual_seed(4))
    ce = DistillationLoss.ce(s_clean, labels)
    torch.testing.assert_close(ce.double(), _ref_ce(s_clean, labels))
    shared = labels[0]  # [B] labels are shared by every member
    torch.testing.assert_close(
        DistillationLoss.ce(s_clean, shared).double(), _ref_ce(s_clean, shared)
    )


@pytest.mark.parametrize("target", ["member", "mean"])
@pytest.mark.parametrize("alpha, temperature", [(0.9, 1.0), (1.0, 4.0), (0.5, 4.0)])
def test_gradient_flows_to_the_student_logits_only(
    target: str, alpha: float, temperature: float
) -> None:
    """Teacher logits get no gradient; the student's are the hand-derived ones:
    ∂L/∂s̃ = α·T·(softmax(s̃/T) − p)/(Ms·B),  ∂L/∂s = (1 − α)·(softmax(s) − onehot(y))/(Ms·B)."""
    s_pert, teacher, s_clean, labels = (t.clone() for t in _logits(5, target))
    for t in (s_pert, teacher, s_clean):
        t.requires_grad_(True)
    DistillationLoss(alpha, temperature)(s_pert, teacher, s_clean, labels).backward()
    assert teacher.grad is None
    n = MS * B
    p = _probs(teacher.detach(), temperature)
    p = p if target == "member" else p.mean(0, keepdim=True).expand(MS, -1, -1)
    want_pert = alpha * temperature * (_probs(s_pert.detach(), temperature) - p) / n
    onehot = torch.nn.functional.one_hot(labels, K).double().expand(MS, -1, -1)
    want_clean = (1 - alpha) * (_probs(s_clean.detach(), 1.0) - onehot) / n
    torch.testing.assert_close(s_pert.grad.double(), want_pert, rtol=1e-4, atol=1e-7)
    if alpha == 1:  # no CE term: the clean pass does not enter the loss
        assert s_clean.grad is None
    else:
        torch.testing.assert_close(s_clean.grad.double(), want_clean, rtol=1e-4, atol=1e-7)


def test_alpha_and_temperature_must_be_given_and_valid() -> None:
    """No defaults (the configured ones live in DistillConfig and the CLI), and bad values fail."""
    with pytest.raises(TypeError):
        DistillationLoss()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        DistillationLoss(0.9)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(1.5, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(0.9, 0.0)
    s_pert, teacher, _, _ = _logits(6, "member")
    with pytest.raises(ValueError, match="labels"):  # α < 1 needs the clean pass and labels
        DistillationLoss(0.9, 1.0)(s_pert, teacher)


# --------------------------------------------------------------------------- param_groups

M = 3


def _tiny_be(bias: bool = True, seed: int = 0):
    """Conv(no bias)-BN-ReLU-Conv(bias?)-BN-ReLU-pool-Linear(bias?) as a BE-3, members differing."""
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=bias),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, K, bias=bias),
    )
    be = to_batchensemble(base, members=M, init="ones")
    with torch.no_grad():
        for name, p in be.named_parameters():
            if name.endswith((".r", ".s")):
                p.normal_(1.0, 0.3)
            elif name.endswith(".member_bias"):
                p.normal_(0.0, 0.3)
    return be


def _names(be: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in be.named_parameters() if id(p) in ids}


def _by_kind(be: nn.Module) -> dict[str, set[str]]:
    """Parameter names by what they are, read off the names alone."""
    names = {n for n, _ in be.named_parameters()}
    fast = {n for n in names if n.endswith((".r", ".s"))}
    bias = {n for n in names if n.endswith(".member_bias")}
    return {"fast": fast, "bias": bias, "shared": names - fast - bias}


def _assert_partition(be: nn.Module, groups: list[dict]) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in be.parameters()}, "a parameter is in no group"


@pytest.mark.parametrize("regime", ["wa", "dm"])
def test_param_groups_put_each_parameter_in_its_group(regime: str) -> None:
    be = _tiny_be()
    groups = param_groups(be, regime, 5e-4)
    _assert_partition(be, groups)
    kinds = _by_kind(be)
    assert [_names(be, g) for g in groups] == [kinds["shared"], kinds["fast"], kinds["bias"]]
    # BN affine parameters, shared conv/linear weights and shared biases are all "shared"
    assert {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "net.8.bias"} <= kinds[
        "shared"
    ]
    assert {"net.0.r", "net.0.s", "net.8.r", "net.8.s"} <= kinds["fast"]
    assert kinds["bias"] == {"net.3.member_bias", "net.8.member_bias"}


def test_wa_groups_leave_decay_of_fast_weights_to_the_hook() -> None:
    """[WA]: shared weights and member biases decay with the optimizer's λ (no override), r and s
    have no plain decay towards 0 (the hook pulls them towards 1), every group at the base lr."""
    shared, fast, bias = param_groups(_tiny_be(), "wa", 5e-4)
    assert "weight_decay" not in shared and "lr_scale" not in shared
    assert fast["weight_decay"] == 0.0 and "lr_scale" not in fast
    assert "weight_decay" not in bias and "lr_scale" not in bias


def test_dm_groups_halve_lr_and_drop_decay_for_fast_weights_and_member_biases() -> None:
    shared, fast, bias = param_groups(_tiny_be(), "dm", 5e-4)
    assert "weight_decay" not in shared and "lr_scale" not in shared
    assert fast["weight_decay"] == 0.0 and fast["lr_scale"] == 0.5
    assert bias["weight_decay"] == 0.0 and bias["lr_scale"] == 0.5


@pytest.mark.parametrize(
    "regime, want",
    [
        ("wa", {"shared": (0.2, 1e-3), "fast": (0.2, 0.0), "bias": (0.2, 1e-3)}),
        ("dm", {"shared": (0.2, 1e-3), "fast": (0.1, 0.0), "bias": (0.1, 0.0)}),
    ],
)
def test_optimizer_lr_and_decay_per_parameter(regime: str, want: dict) -> None:
    """What SGD ends up with for every parameter (lr, weight decay), through make_optimizer."""
    be = _tiny_be()
    optimizer = make_optimizer(
        param_groups(be, regime, 1e-3), OptimConfig(lr=0.2, weight_decay=1e-3)
    )
    kinds = _by_kind(be)
    params = dict(be.named_parameters())
    seen = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            (name,) = [n for n, q in params.items() if q is p]
            kind = next(k for k, names in kinds.items() if name in names)
            assert (group["lr"], group["weight_decay"]) == pytest.approx(want[kind]), name
            seen += 1
    assert seen == len(params)


def test_param_groups_drop_empty_groups_and_refuse_unknown_regimes() -> None:
    be = _tiny_be(bias=False)  # no biased layer: no member biases
    groups = param_groups(be, "wa", 5e-4)
    assert len(groups) == 2 and not list(be.member_bias_parameters())
    _assert_partition(be, groups)
    with pytest.raises(ValueError, match="wa, dm"):
        param_groups(be, "adam", 5e-4)


def test_param_groups_on_a_registry_resnet() -> None:
    """build_model's resnet8: every BN parameter shared, every r/s fast, nothing lost."""
    be = to_batchensemble(build_model("resnet8", num_classes=10, in_channels=1), members=2)
    groups = param_groups(be, "wa", 5e-4)
    _assert_partition(be, groups)
    bn = {
        f"{mod_name}.{p_name}"
        for mod_name, mod in be.named_modules()
        if isinstance(mod, nn.BatchNorm2d)
        for p_name, _ in mod.named_parameters(recurse=False)
    }
    assert bn and bn <= _names(be, groups[0])
    assert _names(be, groups[1]) == _by_kind(be)["fast"]


# --------------------------------------------------------------------------- fast_weight_hook


def _backward(be: nn.Module, scale: float = 1.0) -> torch.Tensor:
    """One backward of a fixed loss on a fixed batch; returns the (unscaled) loss."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(M * 2, 3, 6, 6, generator=gen)
    y = torch.randint(0, K, (M * 2,), generator=gen)
    loss = nn.functional.cross_entropy(be(x), y)
    (scale * loss).backward()
    return loss.detach()


def test_wa_hook_gives_m_times_grad_plus_pull_towards_one() -> None:
    """r, s: g ← M·(g + (λ/M)(p − 1)) = M·g + λ(p − 1); member biases: M·g; shared: untouched."""
    wd = 0.01
    be = _tiny_be()
    _backward(be)
    before = {n: p.grad.clone() for n, p in be.named_parameters()}
    hook = fast_weight_hook(be, "wa", wd)
    assert hook is not None
    hook()
    kinds = _by_kind(be)
    for name, p in be.named_parameters():
        g = before[name]
        if name in kinds["fast"]:
            want = M * g + wd * (p.detach() - 1.0)
            torch.testing.assert_close(p.grad, want, msg=name)
        elif name in kinds["bias"]:
            torch.testing.assert_close(p.grad, M * g, msg=name)
        else:
            assert torch.equal(p.grad, g), name  # bit for bit: the hook never touched it


def test_wa_hook_is_the_gradient_of_m_times_loss_plus_penalty() -> None:
    """Independently by autograd: the hooked r, s gradients are those of
    M·L + (λ/2)·Σ(p − 1)² (i.e. M·(L + (λ/2M)·Σ(p − 1)²)), member biases' those of M·L."""
    wd = 0.05
    hooked, reference = _tiny_be(seed=1), _tiny_be(seed=1)
    _backward(hooked)
    fast_weight_hook(hooked, "wa", wd)()
    reference.zero_grad()
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(M * 2, 3, 6, 6, generator=gen)
    y = torch.randint(0, K, (M * 2,), generator=gen)
    loss = M * nn.functional.cross_entropy(reference(x), y)
    penalty = sum(((p - 1) ** 2).sum() for p in reference.fast_weight_parameters())
    (loss + wd / 2 * penalty).backward()
    ref = dict(reference.named_parameters())
    kinds = _by_kind(hooked)
    for name, p in hooked.named_parameters():
        if name in kinds["fast"] or name in kinds["bias"]:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_wa_hook_pulls_fast_weights_at_zero_gradient_and_skips_missing_grads() -> None:
    """With a zero loss gradient only the pull λ(p − 1) is left; a parameter without a gradient
    (e.g. frozen) keeps grad None."""
    be = _tiny_be()
    _backward(be, scale=0.0)  # every grad exists and is 0
    frozen = be.net[0].r
    frozen.grad = None
    fast_weight_hook(be, "wa", 0.1)()
    assert frozen.grad is None
    for name, p in be.named_parameters():
        if name.endswith((".r", ".s")) and p is not frozen:
            torch.testing.assert_close(p.grad, 0.1 * (p.detach() - 1.0), msg=name)
            assert p.grad.abs().max() > 0  # the members were drawn away from 1


def test_dm_has_no_hook() -> None:
    assert fast_weight_hook(_tiny_be(), "dm", 5e-4) is None
