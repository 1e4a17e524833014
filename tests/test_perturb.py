"""Input perturbations (docs/method.md §5), each checked for its defining property on tiny nets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensc.compress.perturb import (
    PERTURBATIONS,
    PerturbConfig,
    epsilon,
    l2_direction,
    ods_direction,
    perturb,
    tdiv_sdiv_direction,
)

B, C, H, W, K = 4, 3, 8, 8, 5
D = C * H * W
GRADIENT_KINDS = ("ods", "confods", "tdiv-sdiv")
RANDOM_KINDS = ("gaussian", *GRADIENT_KINDS)


def _net(seed: int, *, bn: bool = False) -> nn.Module:
    """A small conv net (smooth activations, so first-order checks are clean), in eval mode."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(C, 6, 3, padding=1)]
    if bn:
        norm = nn.BatchNorm2d(6)
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
        layers.append(norm)
    layers += [nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(6 * 4, K)]
    return nn.Sequential(*layers).eval()


class Members:
    """Independently initialized networks stacked into member logits [M, B, K]."""

    def __init__(self, seeds: list[int], *, bn: bool = False, dtype=torch.float32) -> None:
        self.members = [_net(s, bn=bn).to(dtype) for s in seeds]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])  # [M, B, K]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.members for p in m.parameters()]


def _teacher(dtype=torch.float32) -> Members:
    return Members([1, 2, 3], dtype=dtype)


def _student(dtype=torch.float32) -> Members:
    return Members([11, 12, 13], bn=True, dtype=dtype)


def _x(seed: int = 0, dtype=torch.float32, shape=(B, C, H, W)) -> torch.Tensor:
    """Pixels in [0.3, 0.7], so small perturbations are never clipped."""
    return 0.3 + 0.4 * torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)  # [B]


def _ce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example CE(a ← b) = −Σ_k softmax(b)_k · log_softmax(a)_k, [B]."""
    return -(F.softmax(b, -1) * F.log_softmax(a, -1)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Config and the shared L2 scaling


def test_config_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="none, gaussian, ods, confods, tdiv-sdiv"):
        PerturbConfig(kind="fgsm")


@pytest.mark.parametrize("step", [-1.0, float("nan"), float("inf")])
def test_config_rejects_bad_step(step: float) -> None:
    with pytest.raises(ValueError, match="step"):
        PerturbConfig(kind="ods", step=step)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_config_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        PerturbConfig(kind="ods", temperature=temperature)


def test_default_step_is_one_level() -> None:
    # both papers use 1/255 (see PerturbConfig)
    assert PerturbConfig().step == 1.0


@pytest.mark.parametrize("step", [0.5, 1.0, 8.0])
def test_l2_direction_has_norm_step_sqrt_d(step: float) -> None:
    g = torch.randn(5, C, H, W, generator=_gen(0)) * torch.tensor(
        [1e-6, 1e-2, 1.0, 10.0, 1e4]
    ).view(5, 1, 1, 1)
    eps = l2_direction(g, step)
    expected = torch.full((5,), step / 255 * math.sqrt(D))
    torch.testing.assert_close(_norms(eps), expected, rtol=1e-6, atol=0)
    # same direction as g: cosine 1 per example
    cos = F.cosine_similarity(eps.reshape(5, -1), g.reshape(5, -1), dim=1)
    torch.testing.assert_close(cos, torch.ones(5))


def test_l2_direction_of_zero_gradient_is_zero() -> None:
    eps = l2_direction(torch.zeros(2, C, H, W), 1.0)
    assert torch.equal(eps, torch.zeros(2, C, H, W))


def test_l2_direction_rejects_negative_step_and_unbatched_input() -> None:
    with pytest.raises(ValueError, match="step"):
        l2_direction(torch.ones(2, 3), -1.0)
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        l2_direction(torch.ones(3), 1.0)


# ---------------------------------------------------------------------------------------------
# Every kind: shape, range, clipping, consistency with ε


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_every_kind_keeps_shape_dtype_and_range(kind: str) -> None:
    x = _x().requires_grad_()
    config = PerturbConfig(kind=kind, step=4.0)
    out = perturb(x, config, teacher=_teacher(), student=_student(), gen=_gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    if kind != "none":
        assert not out.requires_grad
        # x̃ = x + ε exactly (no clipping for x in [0.3, 0.7] and step 4/255·√D per example)
        eps = epsilon(x, config, teacher=_teacher(), student=_student(), gen=_gen(0))
        torch.testing.assert_close(out, x.detach() + eps)
        assert eps.abs().max() > 0


def test_none_returns_input_unchanged() -> None:
    x = _x()
    assert perturb(x, PerturbConfig(), teacher=_teacher()) is x
    assert torch.equal(epsilon(x, PerturbConfig(), teacher=_teacher()), torch.zeros_like(x))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_saturated_inputs_are_clipped(kind: str) -> None:
    x = (torch.rand(B, C, H, W, generator=_gen(5)) > 0.5).float()  # pixels exactly 0 or 1
    config = PerturbConfig(kind=kind, step=64.0)
    out = perturb(x, config, teacher=_teacher(), student=_student(), gen=_gen(0))
    assert out.min() >= 0 and out.max() <= 1
    raw = x + epsilon(x, config, teacher=_teacher(), student=_student(), gen=_gen(0))
    assert (raw < 0).any() and (raw > 1).any()  # the step really leaves [0, 1] ...
    torch.testing.assert_close(out, raw.clamp(0, 1))  # ... and is clipped back


# ---------------------------------------------------------------------------------------------
# gaussian


def test_gaussian_is_zero_mean_with_std_step_over_255() -> None:
    step = 8.0
    x = _x(shape=(64, C, 16, 16))  # 49 152 pixels
    noise = (
        perturb(x, PerturbConfig(kind="gaussian", step=step), teacher=_teacher(), gen=_gen(0)) - x
    )
    sigma = step / 255
    assert noise.std().item() == pytest.approx(sigma, rel=0.02)
    assert abs(noise.mean().item()) < 4 * sigma / math.sqrt(noise.numel())


# ---------------------------------------------------------------------------------------------
# ods / confods


def _ods_objective(teacher: Members, x: torch.Tensor, j: int, w: torch.Tensor, t: float):
    """Per-example Σ_k w_k · softmax(t_j(x)/T)_k, [B]."""
    with torch.no_grad():
        return (w * F.softmax(teacher(x)[j] / t, -1)).sum(-1)


@pytest.mark.parametrize("step", [1.0, 4.0])
def test_ods_epsilon_has_prescribed_norm(step: float) -> None:
    eps = epsilon(_x(), PerturbConfig(kind="ods", step=step), teacher=_teacher(), gen=_gen(0))
    torch.testing.assert_close(_norms(eps), torch.full((B,), step / 255 * math.sqrt(D)))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_ods_step_raises_the_random_projection_of_the_teacher_output(temperature: float) -> None:
    teacher, x = _teacher(torch.float64), _x(dtype=torch.float64)
    d = ods_direction(x, teacher, temperature, _gen(7))
    assert 0 <= d.teacher < 3
    assert d.weights.shape == (B, K) and d.weights.abs().max() <= 1
    # the perturbation path reproduces the same draws from the same seed
    config = PerturbConfig(kind="ods", step=0.1, temperature=temperature)
    eps = epsilon(x, config, teacher=teacher, gen=_gen(7))
    torch.testing.assert_close(eps, l2_direction(d.grad, 0.1))

    f = _ods_objective(teacher, x, d.teacher, d.weights, temperature)
    up = _ods_objective(teacher, x + eps, d.teacher, d.weights, temperature)
    down = _ods_objective(teacher, x - eps, d.teacher, d.weights, temperature)
    assert (up > f).all() and (down < f).all()  # every example, along vs against
    # first order: the central difference equals g·ε, so g is the objective's input gradient
    directional = (d.grad * eps).reshape(B, -1).sum(1)
    torch.testing.assert_close((up - down) / 2, directional, rtol=1e-4, atol=1e-12)


def test_ods_picks_every_teacher_over_seeds() -> None:
    x, teacher = _x(), _teacher()
    chosen = {ods_direction(x, teacher, 1.0, _gen(s)).teacher for s in range(30)}
    assert chosen == {0, 1, 2}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_confods_scales_ods_by_the_chosen_teachers_confidence(temperature: float) -> None:
    x, teacher = _x(), _teacher()
    ods = epsilon(x, PerturbConfig("ods", 2.0, temperature), teacher=teacher, gen=_gen(3))
    conf = epsilon(x, PerturbConfig("confods", 2.0, temperature), teacher=teacher, gen=_gen(3))
    j = ods_direction(x, teacher, temperature, _gen(3)).teacher
    with torch.no_grad():
        confidence = F.softmax(teacher(x)[j] / temperature, -1).amax(-1)  # [B]
    torch.testing.assert_close(_norms(conf), _norms(ods) * confidence)
    torch.testing.assert_close(conf, ods * confidence.view(B, 1, 1, 1))
    assert (confidence < 1).all()  # a real shrink, not a no-op


# ---------------------------------------------------------------------------------------------
# tdiv-sdiv


def _tdiv_sdiv_objective(
    teacher: Members, student: Members, x: torch.Tensor, i: int, j: int, targets_at: torch.Tensor
) -> torch.Tensor:
    """Per-example CE(t_i ← t_j) − CE(s_i ← s_j), [B], with the targets t_j, s_j held at
    ``targets_at`` (the stop-gradient of docs/method.md §5: only the i-side moves)."""
    with torch.no_grad():
        t, s = teacher(x), student(x)
        t0, s0 = teacher(targets_at), student(targets_at)
        return _ce(t[i], t0[j]) - _ce(s[i], s0[j])


def test_tdiv_sdiv_step_raises_teacher_minus_student_disagreement() -> None:
    teacher, student = _teacher(torch.float64), _student(torch.float64)
    x = _x(dtype=torch.float64)
    d = tdiv_sdiv_direction(x, teacher, student, _gen(4))
    assert d.i != d.j
    eps = epsilon(x, PerturbConfig("tdiv-sdiv", 0.1), teacher=teacher, student=student, gen=_gen(4))
    torch.testing.assert_close(eps, l2_direction(d.grad, 0.1))
    expected_norm = torch.full((B,), 0.1 / 255 * math.sqrt(D), dtype=torch.float64)
    torch.testing.assert_close(_norms(eps), expected_norm)

    h = _tdiv_sdiv_objective(teacher, student, x, d.i, d.j, targets_at=x)
    up = _tdiv_sdiv_objective(teacher, student, x + eps, d.i, d.j, targets_at=x)
    down = _tdiv_sdiv_objective(teacher, student, x - eps, d.i, d.j, targets_at=x)
    assert (up > h).all() and (down < h).all()
    directional = (d.grad * eps).reshape(B, -1).sum(1)
    torch.testing.assert_close((up - down) / 2, directional, rtol=1e-4, atol=1e-12)


def test_tdiv_sdiv_stops_the_gradient_through_the_targets() -> None:
    teacher, student = _teacher(torch.float64), _student(torch.float64)
    x = _x(dtype=torch.float64)
    d = tdiv_sdiv_direction(x, teacher, student, _gen(4))
    x_leaf = x.clone().requires_grad_()
    t, s = teacher(x_leaf), student(x_leaf)
    full = (_ce(t[d.i], t[d.j]) - _ce(s[d.i], s[d.j])).sum()  # targets not detached
    (full_grad,) = torch.autograd.grad(full, x_leaf)
    cos = F.cosine_similarity(d.grad.reshape(B, -1), full_grad.reshape(B, -1), dim=1)
    assert (cos < 0.999).all()  # a different direction, so the stop-gradient is really there


def test_tdiv_sdiv_pairs_are_distinct_and_cover_all_ordered_pairs() -> None:
    x, teacher, student = _x(), _teacher(), _student()
    pairs = [tdiv_sdiv_direction(x, teacher, student, _gen(s))[1:] for s in range(60)]
    assert all(i != j for i, j in pairs)
    assert set(pairs) == {(i, j) for i in range(3) for j in range(3) if i != j}


def test_tdiv_sdiv_uses_members_both_ensembles_have() -> None:
    x, teacher, student = _x(), _teacher(), Members([11, 12], bn=True)  # Mt = 3, Ms = 2
    pairs = {tdiv_sdiv_direction(x, teacher, student, _gen(s))[1:] for s in range(20)}
    assert pairs == {(0, 1), (1, 0)}


def test_tdiv_sdiv_needs_a_student_and_two_members() -> None:
    x, config = _x(), PerturbConfig(kind="tdiv-sdiv")
    with pytest.raises(ValueError, match="tdiv-sdiv"):
        perturb(x, config, teacher=_teacher(), student=None)
    with pytest.raises(ValueError, match="tdiv-sdiv"):
        perturb(x, config, teacher=Members([1]), student=_student())
    with pytest.raises(ValueError, match="tdiv-sdiv"):
        perturb(x, config, teacher=_teacher(), student=Members([11], bn=True))


# ---------------------------------------------------------------------------------------------
# Reproducibility, isolation from the models, errors


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_same_output_different_seed_different(kind: str) -> None:
    x, teacher, student = _x(), _teacher(), _student()
    config = PerturbConfig(kind=kind, step=2.0)

    def run(seed: int) -> torch.Tensor:
        return perturb(x, config, teacher=teacher, student=student, gen=_gen(seed))

    assert torch.equal(run(0), run(0))
    # (tdiv-sdiv has only 6 pairs, so two seeds may coincide; five never all do)
    outputs = [run(s) for s in range(5)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("kind", GRADIENT_KINDS)
def test_models_get_no_gradients_and_keep_their_state(kind: str) -> None:
    teacher, student = _teacher(), _student()
    modules = teacher.members + student.members
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    assert all(p.requires_grad for p in teacher.parameters() + student.parameters())
    perturb(_x(), PerturbConfig(kind=kind), teacher=teacher, student=student, gen=_gen(0))
    assert all(p.grad is None for p in teacher.parameters() + student.parameters())
    for m, state in zip(modules, before, strict=True):
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kind", GRADIENT_KINDS)
def test_gradient_kinds_work_inside_no_grad(kind: str) -> None:
    x, teacher, student, config = _x(), _teacher(), _student(), PerturbConfig(kind=kind)
    expected = perturb(x, config, teacher=teacher, student=student, gen=_gen(0))
    with torch.no_grad():
        got = perturb(x, config, teacher=teacher, student=student, gen=_gen(0))
    assert torch.equal(got, expected)


def test_teacher_logits_must_be_member_stacked() -> None:
    single = _net(1)  # returns [B, K], not [M, B, K]
    with pytest.raises(ValueError, match=r"\[M, B=4, K\]"):
        perturb(_x(), PerturbConfig(kind="ods"), teacher=single, gen=_gen(0))


@pytest.mark.parametrize("kind", ["ods", "confods", "tdiv-sdiv"])
def test_member_subset_path_gives_the_same_perturbation(kind):
    # MemberLogits runs only the chosen teacher(s); the result must equal running all of them
    from ensc.compress.perturb import MemberLogits

    teacher, student, x = _teacher(), _student(), _x()
    cfg = PerturbConfig(kind=kind, step=2.0, temperature=2.0)
    full = perturb(x, cfg, teacher=teacher, student=student, gen=_gen(5))
    subset = perturb(x, cfg, teacher=MemberLogits(teacher.members), student=student, gen=_gen(5))
    assert not torch.equal(full, x)
    assert torch.allclose(full, subset, atol=1e-6)
