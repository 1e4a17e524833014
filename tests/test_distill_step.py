"""The fast distillation step computes the plain maths: same loss and gradients as a reference.

Reference = the obvious way, written here from the formulas: BatchEnsemble as activation
scaling (``conv(x ⊙ r) ⊙ s + b``), the student run on x̃ and on x, one backward of the sum.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensc.compress.distill import DistillConfig, make_distill_step, mean_prediction_logits
from ensc.compress.perturb import PerturbConfig
from ensc.models.batchensemble import BEConv2d, BELinear, to_batchensemble

M, B, K = 2, 6, 4


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3, stride=2, padding=1, bias=True),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, K),
    )


def _student(seed: int = 0):
    be = to_batchensemble(_base(seed), members=M, init="ones")
    with torch.no_grad():  # members that differ, so member mix-ups would show
        for p in be.fast_weight_parameters():
            p.normal_(1.0, 0.3)
        for p in be.member_bias_parameters():
            p.normal_(0.0, 0.3)
    return be


def _teachers() -> list[nn.Module]:
    return [_base(10 + k).eval().requires_grad_(False) for k in range(M)]


def _activation_scaling(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s BatchEnsemble layer: ``layer(x ⊙ r) ⊙ s + member_bias``, per member chunk."""
    m = layer.members
    xs = x.unflatten(0, (m, -1))
    shape = (m, 1, -1) + (1,) * (x.dim() - 2)
    plain = F.conv2d if isinstance(layer, BEConv2d) else F.linear
    kwargs = {"stride": layer.stride, "padding": layer.padding} if plain is F.conv2d else {}
    y = plain((xs * layer.r.view(shape)).flatten(0, 1), layer.weight, layer.bias, **kwargs)
    y = y.unflatten(0, (m, -1)) * layer.s.view(shape)
    if layer.member_bias is not None:
        y = y + layer.member_bias.view(shape)
    return y.flatten(0, 1)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_be_layer_gradients_match_activation_scaling(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "conv":
        layer = BEConv2d.from_layer(nn.Conv2d(3, 4, 3, padding=1), M, "normal")
        x = torch.randn(M * 3, 3, 5, 5)
    else:
        layer = BELinear.from_layer(nn.Linear(3, 4), M, "normal")
        x = torch.randn(M * 3, 3)
    with torch.no_grad():
        layer.member_bias.normal_()
    reference = copy.deepcopy(layer)
    out, expected = layer(x), _activation_scaling(reference, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, p in layer.named_parameters():
        q = dict(reference.named_parameters())[name]
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def _reference_grads(
    student, teachers, x_tilde, x, labels, alpha: float, split: bool, targets: str = "member"
):
    """Loss and gradients of α·KD(x̃) + (1 − α)·CE(x), one backward, from the formulas."""
    student.zero_grad()
    with torch.no_grad():
        mean = torch.stack([t(x_tilde) for t in teachers]).softmax(-1).mean(0)  # [B, K]
    if split:
        inputs_t, inputs_c = x_tilde, x  # member m: the m-th chunk
        chunks = x_tilde.unflatten(0, (M, -1))
        with torch.no_grad():
            probs = torch.stack([teachers[k](chunks[k]) for k in range(M)]).softmax(-1)
        if targets == "mean":
            probs = mean.view(M, -1, K)
        member_labels = labels.view(M, -1)
    else:
        inputs_t, inputs_c = x_tilde.repeat(M, 1, 1, 1), x.repeat(M, 1, 1, 1)
        with torch.no_grad():
            probs = torch.stack([t(x_tilde) for t in teachers]).softmax(-1)
        if targets == "mean":
            probs = mean.expand(M, -1, -1)
        member_labels = labels.expand(M, -1)
    s_t = student(inputs_t).view(M, -1, K)
    s_c = student(inputs_c).view(M, -1, K)
    kd = -(probs * s_t.log_softmax(-1)).sum(-1).mean()
    ce = F.cross_entropy(s_c.flatten(0, 1), member_labels.reshape(-1))
    loss = alpha * kd + (1 - alpha) * ce
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("targets", ["member", "mean"])
@pytest.mark.parametrize("member_batch", ["repeat", "split"])
def test_two_pass_step_matches_one_backward_of_the_sum(member_batch: str, targets: str) -> None:
    """Gaussian noise (drawn from the step's generator) makes x̃ ≠ x, so both passes run.

    targets "member": member m learns teacher m; "mean": every member the mean of the teachers'
    probabilities (not of their logits)."""
    teachers = _teachers()
    student, reference = _student(), _student()
    x, labels = torch.rand(B, 3, 8, 8), torch.randint(0, K, (B,))
    config = DistillConfig(
        alpha=0.9,
        temperature=1.0,
        perturb=PerturbConfig(kind="gaussian", step=8.0),
        member_batch=member_batch,
        targets=targets,
    )
    step = make_distill_step(student, teachers, config, torch.Generator().manual_seed(3))
    result = step(x, labels, lambda loss: loss.backward())
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * (8.0 / 255)
    x_tilde = (x + noise).clamp(0, 1)
    loss, grads = _reference_grads(
        reference, teachers, x_tilde, x, labels, 0.9, member_batch == "split", targets
    )
    assert float(result.loss) == pytest.approx(loss, rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_members_see_their_own_chunk_and_teacher() -> None:
    """In split mode student member m is trained on chunk m only, against teacher m only."""
    teachers = _teachers()
    student = _student()
    seen: list[torch.Tensor] = []
    student.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    calls: list[tuple[int, int]] = []
    for k, t in enumerate(teachers):
        t.register_forward_pre_hook(lambda _, args, k=k: calls.append((k, args[0].shape[0])))
    x, labels = torch.rand(B, 3, 8, 8), torch.randint(0, K, (B,))
    config = DistillConfig(
        alpha=1.0, perturb=PerturbConfig(kind="none"), member_batch="split", targets="member"
    )
    step = make_distill_step(student, teachers, config, torch.Generator().manual_seed(0))
    step(x, labels, lambda loss: loss.backward())
    assert len(seen) == 1 and torch.equal(seen[0], x)  # no tiling: chunk m is member m's
    assert calls == [(0, B // M), (1, B // M)]  # teacher k ran on its member's chunk only


def test_split_cuts_a_batch_to_a_multiple_of_members(caplog) -> None:
    """Split is the default, so a batch M does not divide must train (on ⌊B/M⌋ images per
    member), not fail; a batch smaller than M is refused with the fix."""
    config = DistillConfig(perturb=PerturbConfig(kind="none"), member_batch="split")
    student = _student()
    seen: list[int] = []
    student.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    step = make_distill_step(student, _teachers(), config, torch.Generator())
    with caplog.at_level(logging.WARNING, logger="ensc"):
        result = step(
            torch.rand(5, 3, 8, 8), torch.randint(0, K, (5,)), lambda loss: loss.backward()
        )
        step(torch.rand(5, 3, 8, 8), torch.randint(0, K, (5,)), lambda loss: loss.backward())
    assert seen == [4, 4] and result.count == 4
    assert sum("cut to 4" in r.getMessage() for r in caplog.records) == 1  # said once
    with pytest.raises(Exception, match="larger --batch-size"):
        step(torch.rand(1, 3, 8, 8), torch.randint(0, K, (1,)), lambda loss: loss.backward())


def test_mean_prediction_logits_give_the_mean_of_probabilities_at_any_temperature() -> None:
    logits = torch.randn(3, 5, K) * 4
    for t in (1.0, 4.0):
        got = (mean_prediction_logits(logits, t) / t).softmax(-1)
        torch.testing.assert_close(got, (logits / t).softmax(-1).mean(0))


def test_unknown_target_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="member, mean"):
        DistillConfig(targets="teacher")


def test_unknown_member_batch_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="repeat, split"):
        DistillConfig(member_batch="shuffle")


@pytest.mark.parametrize("timed", [True, False])
def test_loop_logs_progress_without_a_terminal(monkeypatch, caplog, timed: bool) -> None:
    """Every LOG_EVERY_SECONDS a line with s/step and ETA; phase shares when a timer is given
    (`ensc train` passes none: its progress lines crashed once)."""
    from ensc.data.splits import Split
    from ensc.engine import loop
    from ensc.engine.runtime import resolve_runtime
    from ensc.engine.timing import PhaseTimer

    monkeypatch.setattr(loop, "LOG_EVERY_SECONDS", 0.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K))
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    timer = PhaseTimer() if timed else loop.NO_TIMER

    def step(x, y, backward):
        loss = F.cross_entropy(model(x), y)
        backward(loss)
        return loop.StepResult(loss.detach(), 0, len(y))

    with caplog.at_level(logging.INFO, logger="ensc"):
        loop.train(
            model, step, Split(images, torch.randint(0, K, (20,))),
            loop.OptimConfig(epochs=1, batch_size=5), resolve_runtime("cpu"), timer=timer,
        )  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "s/step" in r.getMessage()]
    assert len(lines) == 4 and lines[-1].startswith("train: step 4/4")
    if timed:
        assert "data" in lines[-1] and "optimizer" in lines[-1]  # phase shares from the timer


def test_student_eval_pass_gives_input_gradients_only() -> None:
    from ensc.compress.distill import student_eval_logits_fn

    student = _student().train()
    x = torch.rand(B, 3, 8, 8, requires_grad=True)
    logits = student_eval_logits_fn(student)(x)
    assert student.training  # mode restored
    with torch.no_grad():
        expected = copy.deepcopy(student).eval().forward_members(x)
    torch.testing.assert_close(logits, expected)
    (g,) = torch.autograd.grad(logits.sum(), x)
    assert g.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())


def test_student_eval_pass_runs_only_the_members_asked_for() -> None:
    from ensc.compress.distill import student_eval_logits_fn

    student = _student().train()
    x = torch.rand(B, 3, 8, 8)
    fn = student_eval_logits_fn(student)
    full = fn(x)
    some = fn(x, members=[1])
    assert some.shape == (1, B, full.shape[-1]) and len(fn) == M
    torch.testing.assert_close(some, full[[1]])
    torch.testing.assert_close(fn(x, members=[1, 0]), full.flip(0))
    assert student.members == M and all(layer.members == M for layer in student.be_layers())


def test_tdiv_sdiv_gradient_is_the_same_from_two_student_members() -> None:
    from ensc.compress.distill import student_eval_logits_fn
    from ensc.compress.perturb import MemberLogits, tdiv_sdiv_direction

    student, teacher = _student(), MemberLogits(_teachers())
    fn = student_eval_logits_fn(student)
    x = torch.rand(B, 3, 8, 8)
    two = tdiv_sdiv_direction(x, teacher, fn, torch.Generator().manual_seed(3))
    every = tdiv_sdiv_direction(x, teacher, lambda v: fn(v), torch.Generator().manual_seed(3))
    assert (two.i, two.j) == (every.i, every.j)
    assert two.grad.abs().sum() > 0
    torch.testing.assert_close(two.grad, every.grad)


def test_fast_teachers_give_the_same_logits_and_input_gradients() -> None:
    from ensc.compress.distill import fast_teachers
    from ensc.engine.runtime import resolve_runtime

    teachers = _teachers()
    for t in teachers:  # non-trivial BatchNorm statistics to fold
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(B, 3, 8, 8)
    fast = fast_teachers(teachers, resolve_runtime("cpu"), x)
    assert all(f is not t for f, t in zip(fast, teachers, strict=True))  # folded copies
    for f, t in zip(fast, teachers, strict=True):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = t(xa), f(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
        (ga,) = torch.autograd.grad(ya.square().sum(), xa)
        (gb,) = torch.autograd.grad(yb.square().sum(), xb)
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-5)
