"""dpo_teach.training: the learning-rate schedules, the optimizer's parameter groups, the gradient
step, and the one training loop every stage shares (its history, evaluations, time, continuation)."""

import math
from types import SimpleNamespace

import pytest
import torch

from dpo_teach import training
from dpo_teach.training import (
    TrainConfig,
    eval_fn_numbers,
    gradient_step,
    lr_at,
    make_optimizer,
    train,
)

# ---- Learning-rate schedules ----------------------------------------------------------------------


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    config = TrainConfig(num_steps=100, warmup_steps=10, lr=1.0, schedule="cosine")
    warm_up = [lr_at(step, config) for step in range(10)]
    assert warm_up == pytest.approx([0.1 * (step + 1) for step in range(10)]), "linear from lr / warmup_steps to lr"
    assert lr_at(10, config) == pytest.approx(1.0), "the peak right after warm-up"
    assert lr_at(55, config) == pytest.approx(0.1 + 0.9 * 0.5), "halfway through the decay: the mean of lr and lr / 10"
    assert lr_at(100, config) == pytest.approx(0.1), "the end at 10% of lr"
    decay = [lr_at(step, config) for step in range(10, 101)]
    assert all(b < a for a, b in zip(decay, decay[1:])), "strictly decreasing after warm-up"
    assert min(decay) == pytest.approx(0.1)
    assert lr_at(0, TrainConfig(num_steps=10, warmup_steps=0, lr=2.0)) == pytest.approx(2.0), "no warm-up: the peak"
    assert lr_at(10, TrainConfig(num_steps=10, warmup_steps=0, lr=2.0)) == pytest.approx(0.2)


def test_constant_schedule_warms_up_then_stays():
    config = TrainConfig(num_steps=50, warmup_steps=4, lr=2.0, schedule="constant")
    assert [lr_at(step, config) for step in range(6)] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert lr_at(49, config) == 2.0 and lr_at(10_000, config) == 2.0, "no decay, even past num_steps"
    assert lr_at(0, TrainConfig(warmup_steps=0, lr=3.0, schedule="constant")) == 3.0


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        TrainConfig(schedule="linear")
    from dpo_teach.settings import DPOConfig, SFTConfig

    for config_class in (SFTConfig, DPOConfig):  # the stage configurations inherit the check
        with pytest.raises(ValueError, match="unknown schedule"):
            config_class(schedule="Cosine")


# ---- Optimizer and gradient step ------------------------------------------------------------------


class Tiny(torch.nn.Module):
    """A matrix with a bias, a layer norm, and a frozen matrix."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 1, bias=False).requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.norm(self.linear(x))).squeeze(-1)


def test_optimizer_decays_matrices_only_with_the_configs_betas():
    model = Tiny()
    config = TrainConfig(lr=3e-3, weight_decay=0.1, adam_betas=(0.8, 0.9))
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert [id(p) for p in decayed["params"]] == [id(model.linear.weight)] and decayed["weight_decay"] == 0.1
    assert {id(p) for p in plain["params"]} == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}
    assert plain["weight_decay"] == 0.0, "no decay on biases and layer norms"
    everything = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert id(model.frozen.weight) not in everything, "frozen parameters are left out"
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.9) and group["lr"] == 3e-3


def test_gradient_step_clears_clips_and_steps():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.weight.grad = torch.full_like(model.weight, 1e6)  # a stale gradient: must be cleared first
    loss = (model(torch.tensor([[300.0, 400.0]])) - 0.0).sum() * 1.0  # gradient (300, 400), norm 500
    gradient_step(model, optimizer, loss, max_grad_norm=2.0)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-1.2, -1.6]]))  # clipped to norm 2


def test_eval_fn_numbers_keeps_numbers_in_a_forked_random_stream():
    policy = torch.nn.Linear(1, 1)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    numbers = eval_fn_numbers(policy, lambda p: {"a": torch.rand(()).item(), "n": 2, "texts": ["x"]})
    assert set(numbers) == {"a", "n"} and numbers["n"] == 2
    assert torch.equal(torch.rand(3), expected), "eval_fn's random numbers are not taken from training"
    assert eval_fn_numbers(policy, lambda p: 0.5) == {"value": 0.5}


# ---- The training loop ----------------------------------------------------------------------------

DATA = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
TARGETS = torch.randn(12, generator=torch.Generator().manual_seed(2))


def regression(model, modes=None):
    """batch_loss of a squared error on DATA; a batch is a list of row indices. Records the model's mode."""

    def batch_loss(index):
        if modes is not None:
            modes.append(model.training)
        loss = ((model(DATA[index]) - TARGETS[index]) ** 2).mean()
        return loss, {"loss": loss.item(), "rows": len(index)}, len(index), 3 * len(index)

    return batch_loss


BATCHES = [[0, 1], [2, 3, 4], [5], [6, 7], [8, 9], [10, 11], [0, 5], [1, 2]]


def test_history_of_a_run_with_evaluations():
    model, modes, evaluations = Tiny(), [], []

    def evaluate():
        evaluations.append(model.training)
        return {"value": float(len(evaluations)), "text": "kept as given"}

    config = TrainConfig(num_steps=7, warmup_steps=2, lr=1e-2, eval_every=3)
    history = train(model, regression(model, modes), BATCHES, config, evaluate, progress=False)
    steps = config.num_steps
    assert list(history)[:5] == ["step", "lr", "seconds", "sequences", "tokens"]
    assert set(history) == {"step", "lr", "seconds", "sequences", "tokens", "train/loss", "train/rows", "eval/step",
                            "eval/value", "eval/text"}
    assert all(len(history[key]) == steps for key in ("step", "lr", "seconds", "sequences", "tokens", "train/loss"))
    assert history["step"] == list(range(steps)), "steps count from 0"
    assert history["lr"] == [lr_at(step, config) for step in range(steps)]
    sizes = [len(b) for b in BATCHES[:steps]]
    assert history["train/rows"] == sizes
    assert history["sequences"] == [sum(sizes[:i + 1]) for i in range(steps)], "cumulative"
    assert history["tokens"] == [3 * s for s in history["sequences"]]
    assert history["eval/step"] == [0, 3, 6, 7], "before training, every eval_every steps, after the last"
    assert history["eval/value"] == [1.0, 2.0, 3.0, 4.0]
    assert evaluations == [False] * 4 and modes == [True] * steps, "evaluations in eval mode, steps in train mode"
    assert not model.training, "the model comes back in eval mode"
    assert all(b >= a for a, b in zip(history["seconds"], history["seconds"][1:]))


def test_no_evaluation_without_evaluate_or_eval_every():
    model, calls = Tiny(), []
    config = TrainConfig(num_steps=3, eval_every=0)
    history = train(model, regression(model), BATCHES, config, lambda: calls.append(1) or {"x": 1.0}, progress=False)
    assert calls == [] and not any(key.startswith("eval/") for key in history)
    history = train(model, regression(model), BATCHES, TrainConfig(num_steps=3, eval_every=2), progress=False)
    assert not any(key.startswith("eval/") for key in history) and len(history["step"]) == 3


def test_the_loop_stops_when_the_batches_run_out():
    model = Tiny()
    history = train(model, regression(model), BATCHES[:2], TrainConfig(num_steps=5, eval_every=0), progress=False)
    assert history["step"] == [0, 1]


def test_evaluation_time_is_not_training_time(monkeypatch):
    """A clock that each step moves by 1 second and each evaluation by 100."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    model = Tiny()
    inner = regression(model)

    def batch_loss(index):
        clock.now += 1.0
        return inner(index)

    def evaluate():
        clock.now += 100.0
        return {"value": 0.0}

    history = train(model, batch_loss, BATCHES, TrainConfig(num_steps=5, eval_every=2), evaluate, progress=False)
    assert history["eval/step"] == [0, 2, 4, 5] and clock.now == 5 + 400
    assert history["seconds"] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_continued_run_equals_one_run():
    """Two calls, the optimizer carried over and first_step = steps already taken, take the same
    steps as one call: the schedule continues, and Adam keeps its moments."""
    config = TrainConfig(num_steps=6, warmup_steps=2, lr=5e-2, eval_every=0)
    whole = Tiny()
    one = train(whole, regression(whole), BATCHES[:6], config, progress=False)
    split = Tiny()
    optimizer = make_optimizer(split, config)
    first = train(split, regression(split), BATCHES[:3], config, optimizer=optimizer, progress=False)
    assert optimizer.state, "the given optimizer is the one used"
    second = train(split, regression(split), BATCHES[3:6], config, optimizer=optimizer, first_step=3, progress=False)
    assert second["step"] == [3, 4, 5]
    assert first["lr"] + second["lr"] == one["lr"] == [lr_at(step, config) for step in range(6)]
    assert first["train/loss"] + second["train/loss"] == one["train/loss"]
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), split.parameters()))
    fresh = Tiny()
    train(fresh, regression(fresh), BATCHES[:3], config, progress=False)
    train(fresh, regression(fresh), BATCHES[3:6], config, first_step=3, progress=False)  # a new optimizer
    assert not all(torch.equal(a, b) for a, b in zip(whole.parameters(), fresh.parameters()))


def test_training_works_inside_no_grad():
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        history = train(model, regression(model), BATCHES, TrainConfig(num_steps=2, eval_every=0), progress=False)
    assert len(history["train/loss"]) == 2 and math.isfinite(history["train/loss"][-1])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_continued_run_records_its_evaluations_at_the_steps_it_has_taken():
    """With first_step = 3 (three steps taken by an earlier call), evaluations sit at steps 3, 5, 6."""
    model = Tiny()
    config = TrainConfig(num_steps=3, batch_size=1, lr=1e-2, warmup_steps=1, eval_every=2)
    history = train(model, regression(model), BATCHES[3:6], config, evaluate=lambda: {"x": 1.0}, first_step=3,
                    progress=False)
    assert history["step"] == [3, 4, 5] and history["eval/step"] == [3, 5, 6]
