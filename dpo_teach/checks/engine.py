"""The check engine: run a learner's function and the reference on random inputs, say what is wrong.

Every check follows one recipe, `compare_with_reference`:

1. call the learner's function and the reference on a few seeded random inputs (float64);
2. if the outputs differ, try the typical mistakes of that exercise (beta missing, chosen and
   rejected swapped, the reference model forgotten, ...) on the same inputs; when one of them
   reproduces the learner's output, name it and give a hint;
3. call both on extreme inputs (huge margins, tiny beta, zero probabilities) where a formula that
   is right on paper overflows to inf or nan in floating point;
4. optionally compare gradients, so that a `.detach()` or `.item()` that cuts the graph is caught.

A check raises AssertionError with an explanation when something is wrong and prints one line when
all is right. A later notebook adds a check by writing an inputs maker and a list of `Mistake`s
(in its own module, dpo_teach/checks/nbNN.py).

The random-input makers used by the checks of more than one notebook live here too: `randn` and
`uniform` (float64 draws from a generator), `dpo_inputs` (log-probs of a preference batch, notebooks
03 and 10) and `loss_mask` (the reference loss mask, notebooks 04 and 05).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Case",
    "Extreme",
    "Inputs",
    "Mistake",
    "compare_with_reference",
    "dpo_inputs",
    "loss_mask",
    "randn",
    "uniform",
]


Inputs = dict[str, object]  # argument name -> value, passed positionally in this order


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: a function computing it from the same inputs, and what to tell."""

    description: str  # completes "it looks like ...", e.g. "beta is missing"
    function: Callable  # same arguments as the exercise, returns the wrong output(s)
    hint: str = ""  # how to fix it


@dataclass(frozen=True)
class Extreme:
    """Inputs where a formula that is right on paper can overflow, with what to do about it."""

    description: str  # e.g. "margins of +-10,000"
    inputs: Inputs
    hint: str = ""


@dataclass(frozen=True)
class Case:
    """What compare_with_reference needs to know about one exercise."""

    name: str  # the function's name, as the learner wrote it
    reference: Callable
    make_inputs: Callable[[torch.Generator], Inputs]
    output_names: Sequence[str] = ("output",)
    mistakes: Sequence[Mistake] = ()
    extremes: Sequence[Extreme] = ()
    grad_inputs: Sequence[str] = ()  # inputs whose gradient (of the first output's sum) must match
    shape_hint: str = ""  # said when the output has the wrong shape
    num_trials: int = 5
    rtol: float = 1e-6
    atol: float = 1e-9
    seed: int = 0


def _as_tuple(output) -> tuple:
    return output if isinstance(output, tuple) else (output,)


def _call(case: Case, function: Callable, inputs: Inputs, learner: bool = True) -> tuple:
    # the learner gets copies, so that an in-place edit cannot change what the reference sees
    args = [
        v.clone() if isinstance(v, Tensor) and not v.requires_grad else v for v in inputs.values()
    ]
    try:
        return _as_tuple(function(*args))
    except NotImplementedError as error:
        if not learner:
            raise
        raise AssertionError(
            f"{case.name} is not written yet: replace `raise NotImplementedError()` by your code."
        ) from error
    except Exception as error:
        if not learner:
            raise
        raise AssertionError(
            f"{case.name} raised {type(error).__name__}: {error}\n"
            f"It was called as {case.name}({', '.join(_summary(v) for v in inputs.values())})."
        ) from error


def _summary(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    return repr(value)


def _close(a, b, case: Case) -> bool:
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a.detach().to(b.dtype), b.detach(), rtol=case.rtol, atol=case.atol))


def _first_difference(case: Case, got: tuple, expected: tuple) -> tuple[int, str] | None:
    """Index and explanation of the first output that differs from the reference, or None."""
    names = case.output_names
    if len(got) != len(expected):
        wanted = ", ".join(names)
        return (
            -1,
            f"it should return {len(expected)} value(s) ({wanted}), but it returned {len(got)}.",
        )
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        label = names[i] if len(expected) > 1 else "the output"
        if not isinstance(g, Tensor):
            return i, f"{label} should be a torch.Tensor, but it is a {type(g).__name__}."
        if g.shape != e.shape:
            return i, (
                f"{label} has shape {tuple(g.shape)}, but it should have shape {tuple(e.shape)}. "
                f"{case.shape_hint}"
            ).strip()
        if torch.isfinite(e).all() and not torch.isfinite(g).all():
            return i, f"{label} contains inf or nan where the right answer is finite."
        if not _close(g, e, case):
            return i, (
                f"{label} has the wrong values.\n  expected: {_preview(e)}\n  got:      {_preview(g)}"
            )
    return None


def _preview(x: Tensor, n: int = 4) -> str:
    flat = x.detach().flatten()[:n].tolist()
    more = ", ..." if x.numel() > n else ""
    return "[" + ", ".join(f"{v:.6g}" for v in flat) + more + "]"


def _diagnose(case: Case, inputs: Inputs, got: tuple, index: int) -> Mistake | None:
    """The first known mistake that reproduces the learner's output number `index`."""
    for mistake in case.mistakes:
        wrong = _as_tuple(mistake.function(*inputs.values()))
        if index < len(wrong) and index < len(got) and _close(got[index], wrong[index], case):
            return mistake
    return None


def _fail(
    case: Case, inputs: Inputs, got: tuple, index: int, explanation: str, context: str
) -> None:
    """Raise the AssertionError: the named mistake when one matches, else what differs (index -1: the
    number of outputs is wrong)."""
    label = case.output_names[index] if index >= 0 and len(case.output_names) > 1 else ""
    where = f" ({label})" if label else ""
    mistake = _diagnose(case, inputs, got, index) if index >= 0 else None
    if mistake is not None:
        raise AssertionError(
            f"{case.name} is not right yet{where}: it looks like {mistake.description}. {mistake.hint}".strip()
        )
    raise AssertionError(f"{case.name} is not right yet{where} {context}: {explanation}")


def _check_gradients(case: Case, learner: Callable, inputs: Inputs) -> None:
    grads = {}
    for who, function in (("learner", learner), ("reference", case.reference)):
        leaves = {
            k: (
                v.detach().clone().requires_grad_(k in case.grad_inputs)
                if isinstance(v, Tensor)
                else v
            )
            for k, v in inputs.items()
        }
        first = _call(case, function, leaves, learner=who == "learner")[0]
        if not (isinstance(first, Tensor) and first.requires_grad):
            raise AssertionError(
                f"{case.name}: no gradient flows back to {', '.join(case.grad_inputs)}. Keep the "
                "computation in torch (no .item(), .detach(), .numpy() or float(...)) so the loss can train a model."
            )
        first.sum().backward()
        grads[who] = {k: leaves[k].grad for k in case.grad_inputs}
    for k in case.grad_inputs:
        g, e = grads["learner"][k], grads["reference"][k]
        if g is None or not _close(g, e, case):
            got = "None" if g is None else _preview(g)
            raise AssertionError(
                f"{case.name}: the values are right but the gradient with respect to {k} is not.\n"
                f"  expected: {_preview(e)}\n  got:      {got}"
            )


def compare_with_reference(learner: Callable, case: Case) -> None:
    """Check `learner` against `case.reference`: random inputs, known mistakes, extremes, gradients."""
    generator = torch.Generator().manual_seed(case.seed)
    for trial in range(case.num_trials):
        inputs = case.make_inputs(generator)
        expected = _call(case, case.reference, inputs, learner=False)
        got = _call(case, learner, inputs)
        difference = _first_difference(case, got, expected)
        if difference is not None:
            _fail(case, inputs, got, *difference, context=f"on random input {trial + 1}")
    for extreme in case.extremes:
        expected = _call(case, case.reference, extreme.inputs, learner=False)
        got = _call(case, learner, extreme.inputs)
        if any(
            isinstance(g, Tensor) and not torch.isfinite(g).all() and torch.isfinite(e).all()
            for g, e in zip(got, expected, strict=False)
        ):
            raise AssertionError(
                f"{case.name} gives inf or nan for {extreme.description}, where the right answer is finite. "
                f"{extreme.hint}".strip()
            )
        difference = _first_difference(case, got, expected)
        if difference is not None:
            _fail(case, extreme.inputs, got, *difference, context=f"for {extreme.description}")
    if case.grad_inputs:
        _check_gradients(case, learner, case.make_inputs(generator))
    count = len(case.extremes)
    extra = f" and {count} extreme input{'s' if count > 1 else ''}" if count else ""
    print(
        f"✓ {case.name} is correct: it matches the reference on {case.num_trials} random inputs{extra}."
    )


# ---- Random inputs ------------------------------------------------------------------------------


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def dpo_inputs(generator: torch.Generator) -> Inputs:
    ref_chosen_logps = -uniform(generator, 5.0, 40.0) * torch.rand(
        8, generator=generator, dtype=torch.float64
    )
    ref_rejected_logps = -uniform(generator, 5.0, 40.0) * torch.rand(
        8, generator=generator, dtype=torch.float64
    )
    return {
        "policy_chosen_logps": ref_chosen_logps + randn(generator, 8, scale=3.0),
        "policy_rejected_logps": ref_rejected_logps + randn(generator, 8, scale=3.0),
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "beta": uniform(generator, 0.1, 0.8),
    }


def loss_mask(prompt_lengths: Tensor, response_lengths: Tensor, width: int) -> Tensor:
    positions = torch.arange(width).unsqueeze(0)  # (1, T)
    end = (prompt_lengths + response_lengths).unsqueeze(1)  # (B, 1)
    return ((positions >= prompt_lengths.unsqueeze(1)) & (positions < end)).long()  # (B, T)
