"""Tests for ensc.compress.average: the BatchEnsemble → plain network fold (docs/method.md §8)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ensc.compress.average import (
    average,
    average_fast_weights,
    fast_weight_spread,
    fold_max_abs_diff,
    recalibrate_bn,
)
from ensc.models import build_model
from ensc.models.batchensemble import BatchEnsemble, BEConv2d, BELinear, to_batchensemble

M = 3
IMAGE = (3, 16, 16)


def small_cnn() -> nn.Sequential:
    """Conv(bias)-BN-ReLU-Conv-BN-ReLU-AvgPool-Flatten-Linear(bias) on 3x16x16 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(1),
        nn.Linear(16 * 4 * 4, 10),
    )


MODELS = {
    "resnet8": lambda: build_model("resnet8", num_classes=10, in_channels=3),
    "wrn10x1": lambda: build_model("wrn10x1", num_classes=10, in_channels=3),
    "small_cnn": small_cnn,
}


def trained_be(make, seed: int = 0) -> BatchEnsemble:
    """A diverse BE: normal init, random member biases, BN running stats from train-mode passes."""
    torch.manual_seed(seed)
    be = to_batchensemble(make(), members=M, init="normal")
    with torch.no_grad():
        for layer in be.be_layers():
            if layer.member_bias is not None:
                layer.member_bias.normal_(0.0, 0.5)
        be.train()
        for _ in range(3):
            be.forward_members(torch.rand(8, *IMAGE) * 0.8 + 0.1)
    return be.eval()


def with_member0_fast_weights(be: BatchEnsemble) -> BatchEnsemble:
    """A copy whose members all use member 0's r, s, member_bias (a wrong 'average')."""
    out = copy.deepcopy(be)
    with torch.no_grad():
        for layer in out.be_layers():
            for p in (layer.r, layer.s, layer.member_bias):
                if p is not None:
                    p.copy_(p[:1].expand_as(p))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_fold_is_exact(name: str) -> None:
    be = trained_be(MODELS[name])
    before = copy.deepcopy(be.state_dict())
    plain = average(be)
    assert not plain.training
    assert not any(isinstance(m, (BEConv2d, BELinear)) for m in plain.modules())
    x = torch.rand(6, *IMAGE)
    diff = fold_max_abs_diff(be, plain, x)
    assert diff < 1e-4
    # The check can fail: folding member 0's fast weights instead of the mean is far off.
    wrong = average(with_member0_fast_weights(be))
    assert fold_max_abs_diff(be, wrong, x) > 1e-2
    # average is pure.
    after = be.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_average_fast_weights_makes_members_identical() -> None:
    be = trained_be(small_cnn)
    avg = average_fast_weights(be)
    layer = next(avg.be_layers())
    torch.testing.assert_close(layer.r[0], next(be.be_layers()).r.mean(0))
    with torch.no_grad():
        logits = avg.forward_members(torch.rand(4, *IMAGE))  # [M, B, K]
    torch.testing.assert_close(logits, logits[:1].expand_as(logits))
    # The original still has diverse members.
    assert not torch.equal(next(be.be_layers()).r[0], next(be.be_layers()).r[1])


def test_fold_by_hand_linear() -> None:
    """One Linear with numbers checked by hand: W' = W ⊙ (s̄ r̄ᵀ), bias' = bias·s̄ + b̄."""
    be = to_batchensemble(nn.Linear(2, 1), members=2)
    layer = be.net
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.copy_(torch.tensor([3.0]))
        layer.r.copy_(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))  # r̄ = [2, 1]
        layer.s.copy_(torch.tensor([[2.0], [4.0]]))  # s̄ = [3]
        layer.member_bias.copy_(torch.tensor([[1.0], [-3.0]]))  # b̄ = [-1]
    plain = average(be)
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain.weight, torch.tensor([[6.0, 6.0]]))
    torch.testing.assert_close(plain.bias, torch.tensor([8.0]))


def test_bias_added_only_where_a_member_bias_exists() -> None:
    torch.manual_seed(0)
    no_bias = nn.Conv2d(3, 4, 3, bias=False)
    be_layer = BEConv2d.from_layer(no_bias, 2, "normal", member_bias=True)
    with torch.no_grad():
        be_layer.member_bias.normal_()
    be = BatchEnsemble(nn.Sequential(be_layer), members=2)
    plain = average(be)
    assert set(plain.state_dict()) == {"0.weight", "0.bias"}
    assert fold_max_abs_diff(be, plain, torch.rand(2, 3, 8, 8)) < 1e-5
    plain_none = average(to_batchensemble(nn.Sequential(no_bias), members=2))
    assert set(plain_none.state_dict()) == {"0.weight"}


def test_averaged_resnet8_loads_into_build_model() -> None:
    be = trained_be(MODELS["resnet8"])
    plain = average(be)
    fresh = build_model("resnet8", num_classes=10, in_channels=3)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval()
    x = torch.rand(4, *IMAGE)
    with torch.no_grad():
        assert torch.equal(fresh(x), plain(x))


def test_recalibrate_bn_changes_stats_not_weights() -> None:
    be = trained_be(MODELS["resnet8"])
    plain = average(be)
    params = {k: v.clone() for k, v in plain.named_parameters()}
    mean_before = plain.bn1.running_mean.clone()
    batches = [torch.rand(8, *IMAGE) * 0.5 + 0.5 for _ in range(3)]  # brighter than before
    out = recalibrate_bn(plain, batches)
    assert out is plain and not plain.training
    assert not torch.allclose(plain.bn1.running_mean, mean_before)
    assert all(torch.equal(v, params[k]) for k, v in plain.named_parameters())


def test_recalibrate_bn_by_hand() -> None:
    """Equal-size batches: running mean / var become the mean of the per-batch statistics."""
    bn = nn.BatchNorm1d(1)
    batches = [torch.tensor([[0.0], [2.0]]), torch.tensor([[4.0], [8.0]])]
    recalibrate_bn(bn, ((b, None) for b in batches))
    # batch means 1, 6 -> 3.5; unbiased variances 2, 8 -> 5
    torch.testing.assert_close(bn.running_mean, torch.tensor([3.5]))
    torch.testing.assert_close(bn.running_var, torch.tensor([5.0]))
    assert bn.momentum == 0.1
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(bn, [])


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="needs a BatchEnsemble"):
        average(small_cnn())  # type: ignore[arg-type]


def test_fast_weight_spread_measures_how_far_members_moved() -> None:
    be = to_batchensemble(small_cnn(), members=4, init="ones")
    assert fast_weight_spread(be) == {"max_abs_from_one": 0.0, "max_member_spread": 0.0}
    layer = next(be.be_layers())
    with torch.no_grad():
        layer.r[0, 0] = 3.0  # member 0 moved by 2; the members' mean there is 1.5
    spread = fast_weight_spread(be)
    assert spread["max_abs_from_one"] == pytest.approx(2.0)
    assert spread["max_member_spread"] == pytest.approx(1.5)


def test_exact_float32_turns_tf32_off_inside_the_block_and_restores_it():
    """cuDNN's default TF32 made the fold check fail on a GPU (max |Δlogit| 1.9e-3)."""
    from ensc.models.modes import exact_float32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="boom"), exact_float32():
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
            raise RuntimeError("boom")
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (before[0], True)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before
