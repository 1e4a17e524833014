"""Training loop: schedule shape, resume after an interruption reproduces the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig, Split
from ensc.engine import loop
from ensc.engine.loop import OptimConfig, StepResult, train
from ensc.engine.runtime import resolve_runtime
from ensc.engine.schedule import warmup_cosine
from ensc.errors import CheckpointError, ConfigError, DivergenceError, EnscError
from ensc.models import build_model
from ensc.models.checkpoint import ModelSpec, load_checkpoint, load_model, save_checkpoint
from ensc.models.modes import eval_mode


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0)  # peak right after warm-up
    assert lrs[55] == pytest.approx(0.5, abs=1e-9)  # cosine half-way point
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.001


class Interrupt(Exception):
    pass


def _run(
    tmp_path: Path, *, interrupt_at: int | None = None, resume: bool = False
) -> torch.nn.Module:
    data = load_dataset(DataConfig("fashion-mnist", train_subset=330, test_subset=10))
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1)
    calls = {"n": 0}

    def step(x: torch.Tensor, y: torch.Tensor, backward) -> StepResult:
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at:
            raise Interrupt
        loss = F.cross_entropy(model(x), y)
        backward(loss)
        return StepResult(loss.detach(), 0, len(y))

    config = OptimConfig(epochs=3, batch_size=100)  # 297 train images -> 2 steps per epoch
    if resume:  # a new process would rebuild the model from scratch before resuming
        torch.manual_seed(123)
        model.load_state_dict(build_model("resnet8", num_classes=10, in_channels=1).state_dict())
    train(
        model,
        step,
        data.train,
        config,
        resolve_runtime("cpu"),
        seed=7,
        state_path=tmp_path / "state.pt",
        resume=resume,
        hflip=False,
    )
    return model


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path):
    straight = _run(tmp_path / "a")
    with pytest.raises(Interrupt):
        _run(tmp_path / "b", interrupt_at=4)  # dies in epoch 2, after epoch 1 was saved
    assert (tmp_path / "b" / "state.pt").exists()
    resumed = _run(tmp_path / "b", resume=True)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def _cross_entropy_step(model: torch.nn.Module):
    """A step function for ``train``: plain cross-entropy of ``model``."""

    def step(x, y, backward):
        loss = F.cross_entropy(model(x), y)
        backward(loss)
        return StepResult(loss.detach(), 0, len(y))

    return step


def test_resume_with_other_settings_is_refused(tmp_path: Path):
    data = load_dataset(DataConfig("fashion-mnist", train_subset=330, test_subset=10))
    model = build_model("resnet8", num_classes=10, in_channels=1)

    step = _cross_entropy_step(model)
    rt = resolve_runtime("cpu")
    train(
        model,
        step,
        data.train,
        OptimConfig(epochs=1, batch_size=100),
        rt,
        state_path=tmp_path / "s.pt",
    )
    with pytest.raises(ConfigError, match="different settings"):
        train(
            model,
            step,
            data.train,
            OptimConfig(epochs=2, batch_size=100),
            rt,
            state_path=tmp_path / "s.pt",
            resume=True,
        )


def test_checkpoint_round_trip_and_refusals(tmp_path: Path):
    model = build_model("resnet8", num_classes=3, in_channels=1, mean=(0.5,), std=(0.25,))
    spec = ModelSpec("resnet8", 3, 1, (28, 28), (0.5,), (0.25,), ("a", "b", "c"), "fashion-mnist")
    save_checkpoint(tmp_path / "m.pt", model, spec, metrics={"val_acc": 50.0}, info={"seed": 3})
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file
    loaded, spec2 = load_model(tmp_path / "m.pt")
    assert spec2 == spec
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    assert load_checkpoint(tmp_path / "m.pt").info["seed"] == 3
    torch.save({"weights": model.state_dict()}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="not an ensc checkpoint"):
        load_checkpoint(tmp_path / "raw.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"obj": Interrupt()}, tmp_path / "pickled.pt")  # needs full unpickling: refused
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(tmp_path / "pickled.pt")


def test_step_budget_fits_warmup_and_cosine_into_the_budget():
    """A budget of 150 steps on CIFAR-10 must not be all warm-up (5 epochs = 1,755 steps)."""
    config = OptimConfig(epochs=200, batch_size=128, steps=150)
    n_train = 45_000  # 351 steps per epoch
    assert config.total_steps(n_train) == 150
    assert config.num_epochs(n_train) == 1
    assert config.warmup_steps(n_train) == 15  # 10 % of a run shorter than 50 epochs
    long = OptimConfig(epochs=200, batch_size=128, steps=351 * 100)
    assert long.warmup_steps(n_train) == 5 * 351  # the papers' 5 epochs for long runs
    assert OptimConfig(epochs=200, batch_size=128).warmup_steps(n_train) == 5 * 351
    assert OptimConfig(epochs=200, steps=150, max_steps=10).total_steps(n_train) == 10


def test_loop_runs_exactly_the_step_budget_across_epochs():
    data = load_dataset(DataConfig("fashion-mnist", train_subset=330, test_subset=10))
    model = build_model("resnet8", num_classes=10, in_channels=1)

    step = _cross_entropy_step(model)
    history = train(
        model, step, data.train, OptimConfig(epochs=1, batch_size=100, steps=5),
        resolve_runtime("cpu"), hflip=False,
    )  # fmt: skip
    assert history["steps"] == 5 and len(history["epochs"]) == 3  # 2 steps per epoch


def test_divergence_is_a_one_line_ensc_error():
    data = load_dataset(DataConfig("fashion-mnist", train_subset=330, test_subset=10))
    model = build_model("resnet8", num_classes=10, in_channels=1)

    def step(x, y, backward):
        loss = F.cross_entropy(model(x), y) * float("nan")
        backward(loss)
        return StepResult(loss.detach(), 0, len(y))

    with pytest.raises(DivergenceError, match="loss became nan at step 0; lower --lr") as info:
        train(
            model, step, data.train, OptimConfig(epochs=1, batch_size=100), resolve_runtime("cpu")
        )
    assert isinstance(info.value, EnscError) and isinstance(info.value, FloatingPointError)


def test_unreadable_resume_state_names_the_file(tmp_path: Path):
    data = load_dataset(DataConfig("fashion-mnist", train_subset=330, test_subset=10))
    model = build_model("resnet8", num_classes=10, in_channels=1)
    (tmp_path / "s.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="s.pt is not a PyTorch checkpoint"):
        train(
            model, _cross_entropy_step(model), data.train, OptimConfig(epochs=1, batch_size=100),
            resolve_runtime("cpu"), state_path=tmp_path / "s.pt", resume=True,
        )  # fmt: skip


def test_eval_mode_restores_each_mode_even_on_errors():
    a, b = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2).eval()
    with pytest.raises(Interrupt), eval_mode(a, b):
        assert not a.training and not b.training
        raise Interrupt
    assert a.training and not b.training


def _noisy_run(
    state: Path,
    *,
    save_every: int | None,
    stop_at: int | None = None,
    resume: bool = False,
    ema: float = 0.0,
) -> tuple[torch.nn.Module, dict]:
    """A small net with dropout (torch's global RNG) whose step adds noise from a generator of
    its own, on augmented batches: 297 images of 50, 5 steps an epoch, 3 epochs. ``stop_at``: the
    step call that raises (the step before it is the last one done)."""
    data = load_dataset(DataConfig("fashion-mnist", train_subset=330, test_subset=10))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.LazyLinear(10),
    )  # fmt: skip
    model(torch.zeros(1, 1, 28, 28))  # materialize the lazy layer
    noise = torch.Generator().manual_seed(11)
    calls = {"n": 0}

    def step(x: torch.Tensor, y: torch.Tensor, backward) -> StepResult:
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise Interrupt
        loss = F.cross_entropy(model(x + 0.1 * torch.randn(x.shape, generator=noise)), y)
        backward(loss)
        return StepResult(loss.detach(), 1, len(y))

    if resume:  # a new process: other weights and another global RNG state until resumed
        torch.manual_seed(123)
        for p in model.parameters():
            torch.nn.init.normal_(p)
    history = train(
        model, step, data.train, OptimConfig(epochs=3, batch_size=50, ema=ema),
        resolve_runtime("cpu"), seed=7, state_path=state, resume=resume, hflip=True,
        save_every=save_every,
        generators=[noise],
    )  # fmt: skip
    return model, history


@pytest.mark.parametrize(
    ("save_every", "stop_at", "resumed_at"),
    [(2, 4, 2), (2, 9, 8), (0, 9, 5), (3, 10, 9)],  # epoch 1, epoch 2, its start, epoch 2 again
)
def test_resume_from_a_step_checkpoint_matches_the_uninterrupted_run(
    tmp_path: Path, save_every: int, stop_at: int, resumed_at: int
):
    """Killed after k steps (inside the 1st or 2nd epoch), resumed from the last save: the same
    weights bit for bit, the same history (dropout, noise generator and augmentation resume too)."""
    straight, want = _noisy_run(tmp_path / "a.pt", save_every=None)
    with pytest.raises(Interrupt):
        _noisy_run(tmp_path / "b.pt", save_every=save_every, stop_at=stop_at)
    resumed, got = _noisy_run(tmp_path / "b.pt", save_every=1, resume=True)  # may change it
    assert got["resumed_steps"] == resumed_at and got["steps"] == want["steps"] == 15
    # the resumed epoch's mean loss too (and every record's field but its wall-clock seconds)
    assert _timeless(got["epochs"]) == _timeless(want["epochs"])
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("save_every", "seconds", "saved"),
    [(None, 0.0, [1, 2, 3, 4, 6, 7, 8, 9]), (None, 600.0, []), (0, 0.0, []), (4, 600.0, [4, 8])],
)
def test_mid_epoch_saves_come_when_due_and_never_at_an_epoch_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, save_every, seconds, saved
):
    """Time-based by default (SAVE_EVERY_SECONDS), every N steps, or never (0); an epoch's end
    saves anyway, so no mid-epoch save falls on it (2 epochs of 5 steps here)."""
    monkeypatch.setattr(loop, "SAVE_EVERY_SECONDS", seconds)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = Split(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.zeros(50, dtype=torch.long))
    steps: list[int] = []
    train(
        model, _cross_entropy_step(model), data, OptimConfig(epochs=2, batch_size=10),
        resolve_runtime("cpu"), state_path=tmp_path / "s.pt", save_every=save_every,
        after_save=steps.append,
    )  # fmt: skip
    assert steps == saved


def test_negative_save_every_is_refused():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = Split(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match="--save-every must be 0 or more steps; got -1"):
        train(model, _cross_entropy_step(model), data, OptimConfig(epochs=1, batch_size=4),
              resolve_runtime("cpu"), save_every=-1)  # fmt: skip


def _timeless(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_ema_ships_the_average_and_resumes_bit_for_bit(tmp_path: Path):
    """--ema: the run ends with the moving average of its weights (not the last step's), and a
    run killed mid-epoch and resumed ends with the same average bit for bit."""
    last, _ = _noisy_run(tmp_path / "plain.pt", save_every=None)
    straight, _ = _noisy_run(tmp_path / "a.pt", save_every=None, ema=0.8)
    with pytest.raises(Interrupt):
        _noisy_run(tmp_path / "b.pt", save_every=2, stop_at=9, ema=0.8)
    resumed, got = _noisy_run(tmp_path / "b.pt", save_every=1, resume=True, ema=0.8)
    assert got["resumed_steps"] == 8
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    weight = "5.weight"  # the last Linear: same steps, so any difference is the averaging
    assert not torch.allclose(straight.state_dict()[weight], last.state_dict()[weight])


def test_ema_changes_the_resume_identity_and_bad_decays_are_refused(tmp_path: Path):
    _noisy_run(tmp_path / "s.pt", save_every=None)
    with pytest.raises(ConfigError, match="different settings"):
        _noisy_run(tmp_path / "s.pt", save_every=None, resume=True, ema=0.5)
    with pytest.raises(ConfigError, match=r"--ema must be a decay in \[0, 1\)"):
        OptimConfig(ema=1.0)
