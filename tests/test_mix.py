"""--mix: the images are mixed as documented, from the step's generator, and the teachers and the
student see the same mixed images while the CE term stays on the clean batch."""

from __future__ import annotations

import pytest
import torch

from ensc.compress.distill import DistillConfig, make_distill_step
from ensc.compress.mix import mix_batch
from ensc.compress.perturb import PerturbConfig
from ensc.errors import EnscError
from ensc.models.batchensemble import to_batchensemble

B = 8


def test_mixup_is_a_convex_combination_with_a_partner_from_the_generator() -> None:
    x = torch.rand(B, 3, 6, 6)
    out = mix_batch(x, "mixup", torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    partner, lam = torch.randperm(B, generator=gen), torch.rand(B, generator=gen)
    expected = lam.view(B, 1, 1, 1) * x + (1 - lam.view(B, 1, 1, 1)) * x[partner]
    torch.testing.assert_close(out, expected)
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


def test_cutmix_pastes_one_box_of_the_partner_of_about_the_drawn_area() -> None:
    x = torch.rand(B, 3, 32, 32)
    out = mix_batch(x, "cutmix", torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    partner, lam = torch.randperm(B, generator=gen), torch.rand(B, generator=gen)
    from_partner = (out == x[partner]).all(1) & (out != x).any(1)  # [B, H, W]
    assert ((out == x).all(1) | (out == x[partner]).all(1)).all()  # every pixel one of the two
    for b in range(B):
        rows, cols = from_partner[b].any(1).nonzero(), from_partner[b].any(0).nonzero()
        if len(rows):  # a box: every pixel inside its bounding rectangle came from the partner
            box = from_partner[b, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()
        # the pasted share is at most the drawn 1 − λ (boxes are clipped at the border)
        assert float(from_partner[b].float().mean()) <= float(1 - lam[b]) + 2 / 32


def test_none_and_unknown() -> None:
    x = torch.rand(B, 3, 4, 4)
    assert mix_batch(x, "none") is x
    with pytest.raises(ValueError, match="none, mixup, cutmix"):
        mix_batch(x, "blend")
    with pytest.raises(ValueError, match="none, mixup, cutmix"):
        DistillConfig(mix="blend")


def _nets():
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
    )  # fmt: skip
    teachers = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).eval()
                for _ in range(2)]  # fmt: skip
    for t in teachers:
        t.requires_grad_(False)
    return to_batchensemble(base, members=2, init="ones"), teachers


def test_the_step_distills_on_the_mixed_images_and_keeps_ce_on_the_clean_ones() -> None:
    student, teachers = _nets()
    seen_t, seen_s = [], []
    teachers[0].register_forward_pre_hook(lambda _, a: seen_t.append(a[0].detach()))
    student.register_forward_pre_hook(lambda _, a: seen_s.append(a[0].detach()))
    config = DistillConfig(alpha=0.9, perturb=PerturbConfig(kind="none"), mix="mixup",
                           member_batch="repeat")  # fmt: skip
    x, labels = torch.rand(B, 3, 4, 4), torch.randint(0, 3, (B,))
    step = make_distill_step(student, teachers, config, torch.Generator().manual_seed(2))
    step(x, labels, lambda loss: loss.backward())
    mixed = mix_batch(x, "mixup", torch.Generator().manual_seed(2))
    assert len(seen_t) == 1 and torch.equal(seen_t[0], mixed)  # the teacher labels mixed images
    assert len(seen_s) == 2  # KD pass on the mixed images, CE pass on the clean batch
    assert torch.equal(seen_s[0], mixed.repeat(2, 1, 1, 1))
    assert torch.equal(seen_s[1], x.repeat(2, 1, 1, 1))


def test_finetune_refuses_mix_and_the_api_names_the_choices(tiny_teacher, tmp_path) -> None:
    import ensc

    with pytest.raises(EnscError, match="--method finetune .* --mix mixup"):
        ensc.compress_ensemble(tiny_teacher, "resnet8", method="finetune", mix="mixup",
                               out=tmp_path / "r", steps=1)  # fmt: skip
    with pytest.raises(EnscError, match="none, mixup, cutmix"):
        ensc.compress_ensemble(tiny_teacher, "resnet8", mix="blend", out=tmp_path / "r2", steps=1)
