"""Tests for ensc.models.batchensemble: BE layers against explicit per-member math, conversion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensc.models import build_model
from ensc.models.batchensemble import (
    BatchEnsemble,
    BEConv2d,
    BELinear,
    to_batchensemble,
)

M = 3


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


def randomize_member_bias(be: nn.Module) -> None:
    with torch.no_grad():
        for module in be.modules():
            if isinstance(module, (BEConv2d, BELinear)) and module.member_bias is not None:
                module.member_bias.normal_(0.0, 0.5)


@pytest.mark.parametrize("bias", [True, False])
def test_be_conv_equals_per_member_plain_conv(bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias)
    be = BEConv2d.from_layer(plain, M, "normal")
    randomize_member_bias(be)
    assert (be.member_bias is not None) == bias
    x = torch.randn(M * 2, 4, 9, 9)  # M chunks of B=2
    y = be(x)
    assert y.shape == (M * 2, 6, 5, 5)
    for m in range(M):
        w_m = plain.weight * (be.s[m][:, None] * be.r[m][None, :])[:, :, None, None]
        b_m = plain.bias * be.s[m] + be.member_bias[m] if bias else None
        expected = F.conv2d(x[2 * m : 2 * m + 2], w_m, b_m, stride=2, padding=1)
        torch.testing.assert_close(y[2 * m : 2 * m + 2], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_be_linear_equals_per_member_plain_linear(bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(5, 7, bias=bias)
    be = BELinear.from_layer(plain, M, "normal")
    randomize_member_bias(be)
    x = torch.randn(M * 4, 5)
    y = be(x)
    for m in range(M):
        w_m = plain.weight * (be.s[m][:, None] * be.r[m][None, :])
        b_m = plain.bias * be.s[m] + be.member_bias[m] if bias else None
        expected = F.linear(x[4 * m : 4 * m + 4], w_m, b_m)
        torch.testing.assert_close(y[4 * m : 4 * m + 4], expected, rtol=1e-5, atol=1e-5)


def test_be_layer_state_dict_keys_and_copies() -> None:
    plain = nn.Conv2d(3, 4, 3, bias=True)
    be = BEConv2d.from_layer(plain, 2)
    assert set(be.state_dict()) == {"weight", "bias", "r", "s", "member_bias"}
    assert torch.equal(be.weight, plain.weight) and be.weight is not plain.weight
    assert be.r.shape == (2, 3) and be.s.shape == (2, 4) and be.member_bias.shape == (2, 4)
    assert be.members == 2 and isinstance(be, nn.Conv2d)


def test_init_ones_and_normal() -> None:
    torch.manual_seed(0)
    ones = BELinear(64, 64, members=4, init="ones")
    assert torch.equal(ones.r, torch.ones(4, 64)) and torch.equal(ones.s, torch.ones(4, 64))
    assert torch.equal(ones.member_bias, torch.zeros(4, 64))
    normal = BELinear(64, 64, members=4, init="normal")
    assert abs(float(normal.r.detach().mean()) - 1.0) < 0.1
    assert abs(float(normal.r.detach().std()) - 0.5) < 0.1


def test_spread_init_keeps_members_apart_and_their_average_at_the_base_model() -> None:
    """The averaged network of a "spread" BatchEnsemble is the network it was made from."""
    from ensc.compress.average import average

    torch.manual_seed(0)
    base = build_model("resnet8", num_classes=10).eval()
    be = to_batchensemble(copy.deepcopy(base), members=4, init="spread")
    layer = next(m for m in be.modules() if isinstance(m, BEConv2d))
    assert 0.05 < float(layer.r.detach().std(0).mean()) < 0.2  # members differ
    assert torch.allclose(layer.r.detach().mean(0), torch.ones(layer.r.shape[1]), atol=1e-6)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        members = be.eval().forward_members(x)
        plain = average(be).eval()(x)
    assert torch.allclose(plain, base(x), atol=1e-4)  # the average is the base model
    assert float((members[0] - members[1]).abs().max()) > 1e-2  # each member is not


def test_layer_errors() -> None:
    with pytest.raises(ValueError, match="unknown fast-weight init 'uniform'"):
        BELinear(2, 2, members=2, init="uniform")
    with pytest.raises(ValueError, match="members must be >= 1"):
        BELinear(2, 2, members=0)
    be = BELinear(2, 3, members=3)
    with pytest.raises(ValueError, match=r"batch of 4 is not divisible by M=3: tile inputs with"):
        be(torch.randn(4, 2))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        BEConv2d.from_layer(nn.Linear(2, 2), 2)


@pytest.mark.parametrize("make", [lambda: build_model("resnet8", num_classes=10), small_cnn])
def test_ones_init_reproduces_base_model(make) -> None:
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # nontrivial BN running statistics
        for _ in range(2):
            model(torch.rand(8, 3, 16, 16))
    model.eval()
    be = to_batchensemble(model, members=M, init="ones").eval()
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        logits = be.forward_members(x)
        expected = model(x)
    assert logits.shape == (M, 5, 10)
    for m in range(M):
        torch.testing.assert_close(logits[m], expected, rtol=1e-6, atol=1e-6)


def test_to_batchensemble_structure_and_parameter_count() -> None:
    model = build_model("resnet8", num_classes=10)
    be = to_batchensemble(model, members=M)
    assert isinstance(be, BatchEnsemble) and be.members == M
    # The input model is untouched and every Conv2d/Linear is converted, BN shared.
    assert not any(isinstance(m, (BEConv2d, BELinear)) for m in model.modules())
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in be.net.modules())
    assert isinstance(be.net.bn1, nn.BatchNorm2d) and isinstance(be.net.fc, BELinear)

    # Plain keys are kept; BE adds r, s (and member_bias where the layer has a bias).
    be_keys = set(be.net.state_dict())
    extra = {k for k in be_keys if k.rsplit(".", 1)[1] in ("r", "s", "member_bias")}
    assert be_keys - extra == set(model.state_dict())

    # docs/method.md §3: extra cost Σ_layers M·(in + out [+ out]).
    expected = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            expected += M * (
                m.in_channels + m.out_channels + (m.out_channels if m.bias is not None else 0)
            )
        elif isinstance(m, nn.Linear):
            expected += M * (
                m.in_features + m.out_features + (m.out_features if m.bias is not None else 0)
            )
    n_base = sum(p.numel() for p in model.parameters())
    n_be = sum(p.numel() for p in be.parameters())
    assert n_be - n_base == expected

    # The three parameter groups partition the parameters.
    fast = list(be.fast_weight_parameters())
    bias = list(be.member_bias_parameters())
    shared = list(be.shared_parameters())
    n_layers = sum(1 for _ in be.be_layers())
    assert len(fast) == 2 * n_layers and len(bias) == 1  # only fc has a bias in resnet8
    ids = [id(p) for p in fast + bias + shared]
    assert len(ids) == len(set(ids)) == len(list(be.parameters()))


def test_forward_shapes_gradients_and_batch_check() -> None:
    torch.manual_seed(0)
    be = to_batchensemble(small_cnn(), members=M, init="normal")
    x = torch.rand(2, 3, 16, 16)
    assert be(x.repeat(M, 1, 1, 1)).shape == (M * 2, 10)
    logits = be.forward_members(x)
    assert logits.shape == (M, 2, 10)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in be.parameters())
    with pytest.raises(ValueError, match=r"batch of 4 is not divisible by M=3"):
        be(torch.rand(4, 3, 16, 16))


def test_members_differ_with_normal_init() -> None:
    torch.manual_seed(0)
    be = to_batchensemble(small_cnn(), members=M, init="normal").eval()
    with torch.no_grad():
        logits = be.forward_members(torch.rand(2, 3, 16, 16))
    assert (logits[0] - logits[1]).abs().max() > 1e-2


def test_to_batchensemble_errors() -> None:
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        to_batchensemble(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), members=2)
    with pytest.raises(ValueError, match="members must be >= 1"):
        to_batchensemble(small_cnn(), members=0)
    with pytest.raises(TypeError, match="members must be an int"):
        to_batchensemble(small_cnn(), members=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown fast-weight init"):
        to_batchensemble(small_cnn(), members=2, init="zeros")
    be = to_batchensemble(small_cnn(), members=2)
    with pytest.raises(ValueError, match="already contains BatchEnsemble layers"):
        to_batchensemble(be, members=2)


def test_shared_module_and_bare_layer() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    be = to_batchensemble(model, members=2)
    assert be.net[0] is be.net[2] and isinstance(be.net[0], BELinear)
    bare = to_batchensemble(nn.Linear(4, 3), members=2)
    assert isinstance(bare.net, BELinear)
    assert bare.forward_members(torch.rand(5, 4)).shape == (2, 5, 3)
