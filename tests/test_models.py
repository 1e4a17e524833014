"""Tests for ensc.models: every registered architecture, the registry and user callables."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.errors import ConfigError
from ensc.models import (
    Normalize,
    NormalizedModel,
    build_model,
    list_models,
    register_model,
    registry,
    resnet,
    wide_resnet,
)

# Too big for a CPU forward in a unit test; their parameter counts are still checked.
COUNT_ONLY = {"wrn28x10"}
# Parsed names that are not registered, to cover the resnet{D} / wrn{D}x{W} patterns.
PARSED = ["resnet26", "wrn10x1", "wrn22x2"]
FORWARD_MODELS = [name for name in list_models() if name not in COUNT_ONLY] + PARSED

# The only module types a generic Conv2d/Linear -> BatchEnsemble converter has to understand.
ALLOWED_LEAVES = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Dropout,
    nn.Flatten,
    Normalize,
)
PARAMETER_OWNERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", FORWARD_MODELS)
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32)])
def test_forward_backward(name: str, in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels)
    x = torch.rand(2, in_channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


# Published sizes: He et al. 2016 Table 6 (CIFAR-10 ResNets), Zagoruyko & Komodakis 2016
# (WRN-28-10: 36.5M), and [DM] Table 1 (DE-4 ResNet-32 1.86M, DE-4 WRN28x10 on CIFAR-100
# 146.15M, so one member is a quarter of that).
@pytest.mark.parametrize(
    ("name", "num_classes", "published"),
    [
        ("resnet20", 10, 0.27e6),
        ("resnet32", 10, 0.46e6),
        ("resnet32", 10, 1.86e6 / 4),
        ("resnet44", 10, 0.66e6),
        ("resnet56", 10, 0.85e6),
        ("resnet110", 10, 1.7e6),
        ("wrn28x10", 10, 36.5e6),
        ("wrn28x10", 100, 146.15e6 / 4),
    ],
)
def test_parameter_count_matches_paper(name: str, num_classes: int, published: float) -> None:
    model = build_model(name, num_classes=num_classes)
    assert num_params(model) == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("name", ["resnet8", "wrn10x1"])
def test_normalization_is_applied_inside(name: str) -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    torch.manual_seed(0)
    normalized = build_model(name, num_classes=5, mean=mean, std=std).eval()
    torch.manual_seed(0)
    plain = build_model(name, num_classes=5).eval()
    x = torch.rand(4, 3, 32, 32)
    x_norm = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = normalized(x)
        torch.testing.assert_close(out, plain(x_norm))
        assert not torch.allclose(out, plain(x))


def test_normalize_layer() -> None:
    layer = Normalize(2, mean=[0.5, 0.25], std=[0.5, 0.25])
    assert layer.mean.shape == layer.std.shape == (1, 2, 1, 1)
    assert set(layer.state_dict()) == {"mean", "std"}
    x = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1)
    torch.testing.assert_close(layer(x), torch.ones(1, 2, 1, 1))
    identity = Normalize(3)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(identity(x), x)
    torch.testing.assert_close(Normalize(3, mean=0.5).mean.flatten(), torch.full((3,), 0.5))


def test_normalize_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="one value per input channel"):
        Normalize(3, mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize(3, std=[0.2, 0.0, 0.2])


def test_invalid_depth_raises() -> None:
    msg = r"ResNet depth must be 6n\+2, e.g. 20, 32, 56; got 21"
    with pytest.raises(ValueError, match=msg):
        resnet(21, num_classes=10)
    with pytest.raises(ValueError, match=msg):
        build_model("resnet21", num_classes=10)
    with pytest.raises(ValueError, match="got 2$"):
        resnet(2, num_classes=10)
    msg = r"WRN depth must be 6n\+4, e.g. 16, 22, 28; got 27"
    with pytest.raises(ValueError, match=msg):
        wide_resnet(27, 10, num_classes=10)
    with pytest.raises(ValueError, match=msg):
        build_model("wrn27x10", num_classes=10)
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        build_model("wrn16x0", num_classes=10)


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="Unknown model 'vgg16'") as info:
        build_model("vgg16", num_classes=10)
    message = str(info.value)
    assert "resnet20" in message and "wrn28x10" in message
    assert "package.module:callable" in message


def test_list_models() -> None:
    names = list_models()
    assert names[:7] == [f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)]
    assert {"wrn16x4", "wrn28x5", "wrn28x10"} <= set(names)


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model()
    def tiny_resnet(**kwargs) -> nn.Module:
        return resnet(8, **kwargs)

    assert "tiny_resnet" in list_models()
    assert build_model("tiny_resnet", num_classes=3)(torch.rand(1, 3, 8, 8)).shape == (1, 3)
    with pytest.raises(ValueError, match="'tiny_resnet' is already registered"):
        register_model("tiny_resnet")(tiny_resnet)
    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_model("resnet20")(tiny_resnet)


def test_dropout_reaches_wide_resnet_blocks() -> None:
    model = build_model("wrn10x1", num_classes=10, dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.3}


USER_ARCH = """
from torch import nn
from ensc.models import Normalize


class NetWithNorm(nn.Module):
    def __init__(self, *, num_classes, in_channels=3, mean=None, std=None, width=4):
        super().__init__()
        self.received = dict(in_channels=in_channels, mean=mean, std=std, width=width)
        self.normalize = Normalize(in_channels, mean, std)
        self.conv = nn.Conv2d(in_channels, width, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.conv(self.normalize(x)))))


def plain_net(num_classes, width=4):
    return nn.Sequential(
        nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )


def not_a_model(num_classes):
    return "oops"
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user architecture module ``ensc_test_user_arch`` importable from a temporary dir, the
    folder user architectures may come from while the test runs (as with --code-path)."""
    name = "ensc_test_user_arch"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_ARCH))
    monkeypatch.syspath_prepend(str(tmp_path))
    with registry.trusted_code(tmp_path):
        yield name
    sys.modules.pop(name, None)


def test_user_callable_that_takes_mean_std(user_module: str) -> None:
    model = build_model(
        f"{user_module}:NetWithNorm", num_classes=5, in_channels=1, mean=[0.5], std=[0.25], width=3
    )
    assert type(model).__name__ == "NetWithNorm"
    assert model.received == dict(in_channels=1, mean=[0.5], std=[0.25], width=3)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 5)


def test_user_callable_without_mean_std_is_wrapped(user_module: str) -> None:
    torch.manual_seed(0)
    model = build_model(f"{user_module}:plain_net", num_classes=5, mean=0.5, std=0.25, width=3)
    assert isinstance(model, NormalizedModel)
    assert isinstance(model.normalize, Normalize) and isinstance(model.model, nn.Sequential)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model((x - 0.5) / 0.25))
    # Without mean/std there is nothing to add: the user's model comes back as built.
    assert isinstance(build_model(f"{user_module}:plain_net", num_classes=5), nn.Sequential)


def test_user_callable_errors(user_module: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ensc_no_such_module is not in the --code-path folder"):
        build_model("ensc_no_such_module:Net", num_classes=10)  # not looked for elsewhere
    with (
        registry.trusted_code(unsafe=True),
        pytest.raises(ValueError, match="Cannot import module 'ensc_no_such_module'") as info,
    ):
        build_model("ensc_no_such_module:Net", num_classes=10)
    assert "ModuleNotFoundError" in str(info.value) and "\n" not in str(info.value)

    (tmp_path / "ensc_test_broken_arch.py").write_text("raise RuntimeError('boom')\n")
    try:
        with pytest.raises(ValueError, match="'ensc_test_broken_arch'.*RuntimeError: boom"):
            build_model("ensc_test_broken_arch:Net", num_classes=10)
    finally:
        sys.modules.pop("ensc_test_broken_arch", None)

    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        build_model(f"{user_module}:Missing", num_classes=10)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        build_model(f"{user_module}:not_a_model", num_classes=10)
    with pytest.raises(ValueError, match="package.module:callable"):
        build_model(f"{user_module}:", num_classes=10)


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_only_convertible_modules(name: str) -> None:
    """Every Conv2d/Linear is a distinct module, called once; nothing else holds weights."""
    model = build_model(name, num_classes=10)
    assert isinstance(model.normalize, Normalize)
    assert isinstance(model.fc, nn.Linear)
    for mname, module in model.named_modules():
        if not any(module.children()):
            assert isinstance(module, ALLOWED_LEAVES), f"{name}: {mname} is {type(module)}"
        if list(module.parameters(recurse=False)):
            assert isinstance(module, PARAMETER_OWNERS), f"{name}: {mname} owns parameters"
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(
        list(model.parameters())
    ), f"{name}: parameters are shared between modules"

    calls: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, args, mname=mname: calls.append(mname))
        for mname, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear, Normalize))
    ]
    model(torch.rand(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert calls[0] == "normalize" and calls[-1] == "fc"
    expected = [m for m, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert sorted(calls[1:]) == sorted(expected), f"{name}: a layer is skipped or reused"
