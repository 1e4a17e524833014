"""The CIFAR-10-C corruptions made on the fly (evaluation/corruptions.py) and `ensc eval --corruptions`.

Real Fashion-MNIST images throughout; colour images are Fashion-MNIST garments tinted with a
random colour per image over a random background.
"""

from __future__ import annotations

import colorsys
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ensc.data.batches import iterate_batches
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig, Split, balanced_indices
from ensc.engine.predict import predict_logits
from ensc.engine.runtime import resolve_runtime
from ensc.engine.seeding import seeded
from ensc.evaluation.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    PARAMS,
    SEVERITIES,
    corrupt,
    corrupted_split,
    disk_kernel,
    jpeg_with_pil,
    summarize,
)
from ensc.evaluation.evaluate import evaluate_corruptions
from ensc.evaluation.metrics import accuracy, apply_temperature, fit_temperature, nll
from tests.conftest import run_cli

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise")


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset(DataConfig("fashion-mnist", train_subset=4000, test_subset=1000))


@pytest.fixture(scope="module")
def gray(fmnist) -> torch.Tensor:
    return fmnist.test.images[:24].float() / 255  # [24, 1, 28, 28]


@pytest.fixture(scope="module")
def colour(gray) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tint = torch.rand(len(gray), 3, 1, 1, generator=gen) * 0.8 + 0.2
    background = torch.rand(len(gray), 3, 1, 1, generator=gen) * 0.3
    x = gray * tint + (1 - gray) * background
    return x.mul(255).round().div(255)  # exact uint8 levels, as a real split


def _images(request, which: str) -> torch.Tensor:
    return request.getfixturevalue(which)


# --------------------------------------------------------------------------- every corruption


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_and_independent_of_batching(name, colour, fmnist):
    whole = corrupt(colour, name, 3, seed=5)
    assert torch.equal(whole, corrupt(colour, name, 3, seed=5))
    parts = torch.cat(
        [
            corrupt(colour[:7], name, 3, seed=5),
            corrupt(colour[7:], name, 3, seed=5, index=range(7, 24)),
        ]
    )
    assert torch.equal(parts, whole)
    # the global RNG is neither used nor changed
    torch.manual_seed(123)
    state = torch.get_rng_state()
    corrupt(colour, name, 5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    # a split corrupted 7 images at a time is the one corrupted 1000 at a time
    split = Split(fmnist.test.images[:50], fmnist.test.labels[:50])
    small = corrupted_split(split, name, 4, seed=2, batch_size=7)
    assert torch.equal(small.images, corrupted_split(split, name, 4, seed=2).images)
    assert small.images.dtype == torch.uint8 and torch.equal(small.labels, split.labels)
    if name in RANDOM:  # the noise depends on the seed and on the image's index, not its position
        assert not torch.equal(corrupt(colour, name, 3, seed=6), whole)
        moved = corrupt(colour[:1], name, 3, seed=5, index=[9])
        assert not torch.equal(moved, whole[:1])


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("which", ["gray", "colour"])
def test_shape_dtype_and_range(name, which, request):
    x = _images(request, which)
    extremes = torch.stack([torch.zeros_like(x[0]), torch.ones_like(x[0])])  # clipping at 0 and 1
    for images in (x, extremes, x.double()):
        for severity in SEVERITIES:
            y = corrupt(images, name, severity)
            assert y.shape == images.shape and y.dtype == images.dtype
            assert float(y.min()) >= 0 and float(y.max()) <= 1, (severity, y.min(), y.max())


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "saturate"])
@pytest.mark.parametrize("which", ["gray", "colour"])
def test_higher_severity_changes_the_image_more(name, which, request):
    x = _images(request, which)
    change = [float((corrupt(x, name, s) - x).abs().mean()) for s in SEVERITIES]
    assert change[0] > 0
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change


def test_saturate(gray, colour):
    for severity in SEVERITIES:  # a grey image has no saturation to change
        assert torch.equal(corrupt(gray, "saturate", severity), gray)

    def saturation(x):
        v, lo = x.amax(1), x.amin(1)
        return ((v - lo) / v.clamp_min(1e-12)).mean().item()

    s = [saturation(corrupt(colour, "saturate", sev)) for sev in SEVERITIES]
    # CIFAR-10-C's saturate is not monotone: ×0.3, ×0.1 desaturate, ×1.5, ×2 + .1, ×2.5 + .2 saturate
    assert s[1] < s[0] < saturation(colour) < s[2] < s[3] < s[4], s


def test_unknown_corruption_or_severity(gray):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(gray, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(gray, "contrast", 6)
    with pytest.raises(ValueError, match="float"):
        corrupt((gray * 255).to(torch.uint8), "contrast", 1)


# --------------------------------------------------------------------------- against references


def _hsv_reference(x: torch.Tensor, name: str, severity: int) -> torch.Tensor:
    """make_cifar_c.py's brightness / saturate pixel by pixel, with colorsys for skimage's HSV."""
    c = PARAMS[name][severity - 1]
    out = x.clone()
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                if name == "brightness":
                    v = min(max(v + c, 0.0), 1.0)
                else:
                    s = min(max(s * c[0] + c[1], 0.0), 1.0)
                out[b, :, i, j] = torch.tensor(colorsys.hsv_to_rgb(h, s, v))
    return out


@pytest.mark.parametrize("name", ["brightness", "saturate"])
def test_hsv_corruptions_match_the_reference(name, colour):
    x = colour[:2, :, 10:18, 10:18].clone()
    x[0, :, 0, 0] = 0.0  # black
    x[0, :, 0, 1] = 0.5  # grey: hue 0, so saturate 4-5 tints it red
    for severity in SEVERITIES:
        diff = (corrupt(x, name, severity) - _hsv_reference(x, name, severity)).abs().max()
        assert float(diff) < 1e-6, (severity, float(diff))
    gray = x[:, :1]
    assert torch.allclose(corrupt(gray, "brightness", 5), (gray + 0.3).clamp(max=1))


def _pil(x: torch.Tensor, resample) -> torch.Tensor:
    """Every image of ``x`` through PIL (``resample(image, c) -> image``), back as [0, 1] floats."""
    out = []
    for img in x.mul(255).round().to(torch.uint8):
        a = img.permute(1, 2, 0).numpy()
        done = np.asarray(resample(Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)))
        out.append(torch.from_numpy(done.copy()).float().reshape(a.shape).permute(2, 0, 1))
    return torch.stack(out) / 255


@pytest.mark.parametrize("which", ["gray", "colour"])
def test_pixelate_and_jpeg_match_pil(which, request):
    x = _images(request, which)
    h, w = x.shape[-2:]
    for severity in SEVERITIES:
        c = PARAMS["pixelate"][severity - 1]

        def pixelate(im, c=c):
            return im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)

        diff = (corrupt(x, "pixelate", severity) - _pil(x, pixelate)).abs()
        assert float(diff.max()) <= 1 / 255 + 1e-6  # PIL rounds to uint8 after each pass
        assert float(diff.mean()) < 0.25 / 255
        quality = PARAMS["jpeg_compression"][severity - 1]

        def jpeg(im, quality=quality):
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
            return Image.open(buf)

        got = corrupt(x, "jpeg_compression", severity)
        assert torch.equal(got, _pil(x, jpeg))
        as_uint8 = x.mul(255).round().to(torch.uint8)  # the fallback without torchvision's codec
        assert torch.equal(jpeg_with_pil(as_uint8, quality).float() / 255, got)


def test_blur_kernels(gray):
    for radius, alias in PARAMS["defocus_blur"]:
        k = disk_kernel(radius, alias)
        assert math.isclose(float(k.sum()), 1.0, abs_tol=1e-12)
        assert torch.equal(k, k.T) and torch.equal(k, k.flip(0)) and torch.equal(k, k.flip(1))
    # severity 1: the disk of radius 0.3 is one pixel, blurred by the 3×3 Gaussian of σ 0.4
    g = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) ** 2) / (2 * 0.4**2))
    assert torch.allclose(disk_kernel(0.3, 0.4), torch.outer(g, g) / g.sum() ** 2, atol=1e-15)
    assert disk_kernel(1.5, 0.1).shape == (5, 5)  # radius 1.5 covers 3×3, the blur one more

    # Gaussian blur: scipy's radius int(4σ + 0.5) and skimage's "nearest" border
    for severity, sigma in zip(SEVERITIES, PARAMS["gaussian_blur"], strict=True):
        r = int(4 * sigma + 0.5)
        taps = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
        taps /= taps.sum()
        delta = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
        delta[..., 10, 10] = 1
        out = corrupt(delta, "gaussian_blur", severity)[0, 0]
        assert torch.allclose(out[10 - r : 11 + r, 10 - r : 11 + r], torch.outer(taps, taps))
        assert float(out.sum()) == pytest.approx(1.0) and int((out > 0).sum()) == (2 * r + 1) ** 2
        edge = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
        edge[..., 0] = 1  # with a replicated border, column 0 sees 1s on its left
        got = corrupt(edge, "gaussian_blur", severity)[0, 0, 10, 0]
        assert float(got) == pytest.approx(float(taps[: r + 1].sum()))

    # contrast keeps each channel's own mean (the reference's, not torchvision's grey mean)
    y = corrupt(gray, "contrast", 5)
    assert torch.allclose(y.mean((2, 3)), gray.mean((2, 3)), atol=1e-6)


def test_noise_statistics():
    mid = torch.full((20, 3, 32, 32), 0.5)  # away from 0 and 1: nothing is clipped
    n = mid.numel()
    for severity in SEVERITIES:
        sigma = PARAMS["gaussian_noise"][severity - 1]
        d = corrupt(mid, "gaussian_noise", severity) - mid
        assert abs(float(d.std()) - sigma) < 4 * sigma / math.sqrt(2 * n)
        assert abs(float(d.mean())) < 4 * sigma / math.sqrt(n)
        photons = PARAMS["shot_noise"][severity - 1]
        y = corrupt(mid, "shot_noise", severity)
        assert abs(float(y.var()) - 0.5 / photons) < 0.1 * 0.5 / photons  # Poisson: var = x / c
        assert torch.allclose((y * photons).round(), y * photons, atol=1e-3)  # counts / c
        amount = PARAMS["impulse_noise"][severity - 1]
        y = corrupt(mid, "impulse_noise", severity)
        hit = (y != mid).float()
        assert abs(float(hit.mean()) - amount) < 4 * math.sqrt(amount / n)
        assert set(y[y != 0.5].unique().tolist()) <= {0.0, 1.0}
        assert abs(float(y[y != 0.5].mean()) - 0.5) < 0.05  # salt and pepper equally likely


def test_summarize_means():
    per = {
        "a": {str(s): {"acc": 10.0 * s, "nll": 1.0, "cnll": 2.0, "ece": 0.1} for s in SEVERITIES},
        "b": {str(s): {"acc": 20.0 * s, "nll": 3.0, "cnll": 2.0, "ece": 0.3} for s in SEVERITIES},
    }
    out = summarize(per)
    assert out["by_severity"]["2"]["acc"] == pytest.approx(30.0)
    assert out["by_severity"]["5"]["nll"] == pytest.approx(2.0)
    assert out["mean"]["acc"] == pytest.approx(45.0) and out["mean"]["ece"] == pytest.approx(0.2)


# --------------------------------------------------------------------------- a trained network


@pytest.fixture(scope="module")
def tiny_cnn(fmnist) -> nn.Module:
    """A small CNN trained for 3 epochs on 3,600 Fashion-MNIST images (about 80 % accuracy)."""
    with seeded(0):
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for x, y in iterate_batches(fmnist.train, 64, gen=gen, shuffle=True):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def test_accuracy_degrades_with_severity(fmnist, tiny_cnn):
    runtime = resolve_runtime("cpu")
    names = FAMILIES["noise"] + FAMILIES["blur"]
    result = evaluate_corruptions(fmnist, runtime, students={"cnn": tiny_cnn}, corruptions=names)
    (row,) = result["models"]
    assert row["name"] == "cnn" and result["n_test"] == len(fmnist.test) == 1000
    clean = accuracy(predict_logits(tiny_cnn, fmnist.test, runtime).softmax(-1), fmnist.test.labels)
    assert clean > 70
    for family in ("noise", "blur"):
        acc = [
            sum(row["per_corruption"][n][str(s)]["acc"] for n in FAMILIES[family]) / len(FAMILIES[family])
            for s in SEVERITIES
        ]  # fmt: skip
        assert acc[0] <= clean + 0.5, (family, clean, acc)
        assert all(b <= a + 0.5 for a, b in zip(acc, acc[1:], strict=False)), (family, acc)
        assert acc[-1] < acc[0] - 1.0, (family, acc)
    # the numbers are those of the network on the corrupted images, T fitted on clean validation
    split = corrupted_split(fmnist.test, "defocus_blur", 4)
    direct = accuracy(predict_logits(tiny_cnn, split, runtime).softmax(-1), split.labels)
    assert row["per_corruption"]["defocus_blur"]["4"]["acc"] == pytest.approx(direct)
    val = predict_logits(tiny_cnn, fmnist.val, runtime)
    assert row["temperature"] == pytest.approx(fit_temperature(val, fmnist.val.labels), rel=1e-6)
    assert row["mean"]["acc"] == pytest.approx(
        sum(row["by_severity"][str(s)]["acc"] for s in SEVERITIES) / 5
    )
    # a subset is class-balanced and seeded
    sub = evaluate_corruptions(fmnist, runtime, students={"cnn": tiny_cnn}, subset=100,
                               corruptions=["contrast"])  # fmt: skip
    assert sub["n_test"] == 100 and sub["corruptions"] == ["contrast"]


def test_an_ensemble_row_is_the_mean_of_its_members(fmnist):
    """``ensembles`` (the BE student's members in `ensc compress --corruptions`): one row per
    ensemble, from its members' mean probability, none per member, before the students."""
    runtime = resolve_runtime("cpu")
    with seeded(1):
        nets = [
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 10)).eval()
            for _ in range(2)
        ]  # fmt: skip
    result = evaluate_corruptions(
        fmnist, runtime, students={"one": nets[0]}, ensembles={"pair": nets}, subset=50,
        corruptions=["contrast"], temperatures={"one": 1.5, "pair": 2.0},
    )  # fmt: skip
    assert [m["name"] for m in result["models"]] == ["pair", "one"]
    pair, one = result["models"]
    assert (pair["temperature"], one["temperature"]) == (2.0, 1.5)
    gen = torch.Generator().manual_seed(0)  # the subset evaluate_corruptions draws
    sub = fmnist.test.subset(balanced_indices(fmnist.test.labels, 50, gen))
    split = corrupted_split(sub, "contrast", 3)
    probs = [predict_logits(n, split, runtime).softmax(-1) for n in nets]
    for row, p, t in ((pair, torch.stack(probs).mean(0), 2.0), (one, probs[0], 1.5)):
        cell = row["per_corruption"]["contrast"]["3"]
        assert cell["acc"] == pytest.approx(accuracy(p, split.labels))
        assert cell["nll"] == pytest.approx(nll(p, split.labels), rel=1e-5)
        scaled = apply_temperature(p.clamp_min(1e-12).log(), t)
        assert cell["cnll"] == pytest.approx(nll(scaled, split.labels), rel=1e-5)
    assert pair["per_corruption"]["contrast"]["3"]["nll"] != pytest.approx(
        one["per_corruption"]["contrast"]["3"]["nll"], rel=1e-5
    )  # the mean is not the first member


# --------------------------------------------------------------------------- the CLI


def test_cli_eval_corruptions(tiny_teacher, tmp_path):
    out = tmp_path / "eval.json"
    result = run_cli(
        "eval", "--teacher", str(tiny_teacher), "--test-subset", "500", "--corruptions",
        "--corruption-subset", "200", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "under corruption: 10 corruptions of 200 test images" in result.output
    assert "| DE-2     | cNLL   |" in result.output
    report = json.loads(out.read_text())
    section = report["corruptions"]
    assert section["corruptions"] == list(CORRUPTIONS) and section["severities"] == [1, 2, 3, 4, 5]
    assert section["n_test"] == 200 and "percent" in section["metric_units"]
    assert [m["name"] for m in section["models"]] == ["member 0", "member 1", "DE-2"]
    temperatures = {r["name"]: r["temperature"] for r in report["members"] + report["ensembles"]}
    for model in section["models"]:
        assert model["temperature"] == temperatures[model["name"]]
        assert set(model["per_corruption"]) == set(CORRUPTIONS)
        for name in CORRUPTIONS:
            for s in SEVERITIES:
                cell = model["per_corruption"][name][str(s)]
                assert 0 <= cell["acc"] <= 100 and cell["nll"] > 0 and cell["cnll"] > 0
                assert 0 <= cell["ece"] <= 1
        mean_sev3 = sum(model["per_corruption"][n]["3"]["nll"] for n in CORRUPTIONS) / 10
        assert model["by_severity"]["3"]["nll"] == pytest.approx(mean_sev3)
        assert f"{model['mean']['acc']:.2f} |" in result.output


def test_cli_corruption_subset_needs_the_flag(tiny_teacher):
    result = run_cli("eval", "--teacher", str(tiny_teacher), "--corruption-subset", "10")
    assert result.exit_code != 0 and "--corruption-subset needs --corruptions" in result.output
