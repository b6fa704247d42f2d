"""The check engine: run a learner's function and the reference on random inputs, say what is wrong.

Every check follows one recipe, `compare_with_reference`:

1. call the learner's function and the reference on a few seeded random inputs (float64). Each
   function gets copies (tensors cloned, dicts of tensors copied, a model deep-copied), and the
   learner's must leave them as they were: an input changed in place (`x += 1`, `mask[...] = 0`,
   a key added to a batch dict, a model's weight) is named;
2. if the outputs differ, try the typical mistakes of that exercise (beta missing, chosen and
   rejected swapped, the reference model forgotten, ...) on the same inputs; when one of them
   reproduces the learner's output, name it and give a hint; else say how many entries differ and
   where the first one is (its full index and both values there);
3. call both on extreme inputs (huge margins, tiny beta, zero probabilities) where a formula that
   is right on paper overflows to inf or nan in floating point;
4. optionally compare gradients (`Case.grad_inputs`: tensors, or a model, meaning its parameters):
   every output that must carry gradients (`Case.grad_outputs`; by default those of the reference
   that do) must be connected to the graph and give the reference's gradient, so that a
   `.detach()`, `.item()` or `torch.no_grad()` that cuts the graph is caught.

A check raises AssertionError with an explanation when something is wrong and prints one line when
all is right. A later notebook adds a check by writing an inputs maker and a list of `Mistake`s
(in its own module, dpo_teach/checks/nbNN.py).

The random-input makers used by the checks of more than one notebook live here too: `randn` and
`uniform` (float64 draws from a generator), `dpo_inputs` (log-probs of a preference batch, notebooks
03 and 10), `loss_mask` (the reference loss mask, notebooks 04 and 05), and `tiny_gpt2` and
`lm_batch` (a small random GPT-2 and a right-padded batch for it, notebook 08 and the training
steps' checks).
"""

from __future__ import annotations

import contextlib
import copy
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
    "lm_batch",
    "loss_mask",
    "randn",
    "tiny_gpt2",
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
    # inputs whose gradients must match the reference's: tensors, or a torch.nn.Module (its parameters)
    grad_inputs: Sequence[str] = ()
    # outputs that must carry gradients back to grad_inputs (the gradient of each one's sum is compared);
    # None: every output through which the reference's gradient flows (so DPO's implicit rewards,
    # detached on purpose, are left out)
    grad_outputs: Sequence[str] | None = None
    shape_hint: str = ""  # said when the output has the wrong shape
    num_trials: int = 5
    rtol: float = 1e-6
    atol: float = 1e-9
    seed: int = 0


def _as_tuple(output) -> tuple:
    return output if isinstance(output, tuple) else (output,)


# ---- Calling a function on copies, and checking that it left them alone ---------------------------


def _copy(value):
    """What a function is handed in place of `value`: a copy it can change without changing `value`.

    A tensor that requires grad (a leaf of the gradient check) is handed as it is: the gradients are
    taken with respect to it, and autograd refuses to change it in place. Objects other than tensors,
    models, dicts, lists and tuples are handed as they are."""
    if isinstance(value, Tensor):
        return value if value.requires_grad else value.clone()
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_copy(v) for v in value)
    return value


def _call(case: Case, function: Callable, inputs: Inputs, learner: bool = True) -> tuple[tuple, Inputs]:
    """`function`'s outputs (as a tuple) on copies of `inputs`, and the copies it was handed.

    For the learner's function an exception becomes an AssertionError that says how it was called,
    and an input changed in place is named."""
    given = {k: _copy(v) for k, v in inputs.items()}
    try:
        output = function(*given.values())
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
    if learner:
        for name, value in inputs.items():
            change = _change(value, given[name], name)
            if change is not None:
                raise AssertionError(f"{case.name} modified its input {name} in place: {change}. {_fix(value)}")
    return _as_tuple(output), given


def _fix(value) -> str:
    if isinstance(value, torch.nn.Module):
        return ("Computing outputs must leave the model's weights as they are (no optimizer step, no "
                "in-place change of a parameter).")
    if isinstance(value, dict):
        return ("The caller still needs it: compute new tensors (x = x * m, not x *= m) and build a new "
                "dict, dict(batch, key=value), instead of changing this one.")
    return ("The caller still needs it: compute a new tensor instead (x = x + 1, not x += 1; "
            "x.masked_fill(m, 0), not x[m] = 0).")


def _change(original, given, where: str) -> str | None:
    """How `given` (the copy a function was handed) no longer equals `original`, or None."""
    if isinstance(original, Tensor):
        if original.requires_grad:  # handed as it is, see _copy
            return None
        if not isinstance(given, Tensor):
            return f"{where} was replaced by a {type(given).__name__}"
        if given.shape != original.shape or given.dtype != original.dtype:
            return (f"{where} went from shape {tuple(original.shape)}, {original.dtype} to shape "
                    f"{tuple(given.shape)}, {given.dtype}")
        differs = _unequal(given.detach(), original)
        if not differs.any():
            return None
        if original.ndim == 0:
            return f"{where} was {_value(original)}, it is now {_value(given)}"
        index = tuple(differs.nonzero()[0].tolist())
        return (f"{where}{_at(index)} was {_value(original[index])}, it is now {_value(given[index])} "
                f"({int(differs.sum())} of {differs.numel()} entries changed)")
    if isinstance(original, torch.nn.Module):
        for kind, before, after in (("parameter", original.named_parameters(), given.named_parameters()),
                                    ("buffer", original.named_buffers(), given.named_buffers())):
            before, after = dict(before), dict(after)
            if before.keys() != after.keys():
                return f"the {kind}s of {where} are not the same ones any more"
            for name, value in before.items():
                if after[name].shape != value.shape or _unequal(after[name].detach(), value.detach()).any():
                    return f"its {kind} {name} changed"
        return None
    if isinstance(original, dict):
        added = [k for k in given if k not in original]
        removed = [k for k in original if k not in given]
        if added:
            return f"the key {added[0]!r} was added to {where}"
        if removed:
            return f"the key {removed[0]!r} was removed from {where}"
        for key, value in original.items():
            change = _change(value, given[key], f"{where}[{key!r}]")
            if change is not None:
                return change
        return None
    if type(original) in (list, tuple):
        if len(given) != len(original):
            return f"{where} went from {len(original)} to {len(given)} elements"
        for i, (value, now) in enumerate(zip(original, given, strict=True)):
            change = _change(value, now, f"{where}[{i}]")
            if change is not None:
                return change
    return None


def _unequal(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise a != b for tensors of one shape and dtype, with nan equal to nan."""
    differs = a != b
    if a.is_floating_point() or a.is_complex():
        differs &= ~(torch.isnan(a) & torch.isnan(b))
    return differs


def _summary(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    if isinstance(value, torch.nn.Module):
        return f"a {type(value).__name__} model"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_summary(v)}" for k, v in value.items()) + "}"
    return repr(value)


# ---- Comparing outputs, and saying where they differ ----------------------------------------------


def _close(a, b, case: Case) -> bool:
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a.detach().to(b.dtype), b.detach(), rtol=case.rtol, atol=case.atol))


def _far(got: Tensor, expected: Tensor, case: Case) -> Tensor:
    """Elementwise: True where `got` is not close to `expected` (one shape), by _close's tolerances."""
    g, e = got.detach().to(expected.dtype), expected.detach()
    if e.is_floating_point() or e.is_complex():
        return ~torch.isclose(g, e, rtol=case.rtol, atol=case.atol)
    return g != e


def _at(index: Sequence) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def _value(x: Tensor) -> str:
    """A one-element tensor, printed briefly."""
    v = x.detach().item()
    return f"{v + 0.0:.6g}" if isinstance(v, float) else str(v)  # + 0.0: -0.0 printed as 0


def _values(x: Tensor) -> str:
    return ", ".join(_value(v) for v in x.detach().flatten())


def _shown(got: Tensor, expected: Tensor) -> Tensor:
    """`got` as printed next to `expected`: True/False as 1/0 when the reference gives numbers."""
    return got.to(expected.dtype) if got.dtype == torch.bool and expected.dtype != torch.bool else got


def _where_it_differs(got: Tensor, expected: Tensor, case: Case) -> str:
    """How many entries of `got` differ from `expected` (one shape), the first one's index and both
    values there, and the stretch of the last dimension around it."""
    if expected.ndim == 0:
        return f"expected {_value(expected)}, got {_value(_shown(got, expected))}."
    differs = _far(got, expected, case)
    index = tuple(differs.nonzero()[0].tolist()) if differs.any() else (0,) * expected.ndim
    got = _shown(got, expected)
    text = (f"{int(differs.sum())} of {differs.numel()} entries differ, the first at {_at(index)}: "
            f"expected {_value(expected[index])}, got {_value(got[index])}.")
    return text + "\n" + _window(got, expected, index)


def _window(got: Tensor, expected: Tensor, index: tuple[int, ...], width: int = 8) -> str:
    """The two outputs side by side along the last dimension, at most `width` values around `index`."""
    row, column, size = index[:-1], index[-1], expected.shape[-1]
    start = max(0, min(column - width // 2, size - width))
    stop = min(size, start + width)
    if size <= width:
        where = _at(row) if row else ""
    else:
        where = _at([*row, f"{start}:{stop}"])
    before, after = ("..., " if start > 0 else ""), (", ..." if stop < size else "")
    lines = []
    for label, x in (("expected", expected), ("got", got)):
        stretch = x.detach()[row][start:stop]
        lines.append(f"  {label + where + ':':<{len('expected' + where) + 2}}[{before}{_values(stretch)}{after}]")
    return "\n".join(lines)


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
            value = "value" if e.ndim == 0 else "values"
            return i, f"{label} has the wrong {value}: {_where_it_differs(g, e, case)}"
    return None


def _diagnose(case: Case, inputs: Inputs, got: tuple, index: int) -> Mistake | None:
    """The first known mistake that reproduces the learner's output number `index`."""
    for mistake in case.mistakes:
        wrong, _ = _call(case, mistake.function, inputs, learner=False)
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


# ---- Gradients ------------------------------------------------------------------------------------


def _differentiated(case: Case, given: Inputs) -> list[tuple[str, Tensor]]:
    """(name, tensor) of what the gradients are taken with respect to: the tensors of
    case.grad_inputs and the parameters of its models, in the copies a function was handed."""
    targets = []
    for k in case.grad_inputs:
        value = given[k]
        if isinstance(value, torch.nn.Module):
            targets += [(f"the parameter {n} of {k}", p) for n, p in value.named_parameters()]
        else:
            targets.append((k, value))
    return targets


def _gradients(output: Tensor, targets: list[tuple[str, Tensor]]) -> list[Tensor | None]:
    """The gradient of output.sum() with respect to each target; None where none flows."""
    wanted = [t for _, t in targets if t.requires_grad]
    found = iter(torch.autograd.grad(output.sum(), wanted, retain_graph=True, allow_unused=True) if wanted else ())
    return [next(found) if t.requires_grad else None for _, t in targets]


def _check_gradients(case: Case, learner: Callable, inputs: Inputs) -> None:
    def leaves() -> Inputs:
        return {
            k: v.detach().clone().requires_grad_(True) if k in case.grad_inputs and isinstance(v, Tensor) else v
            for k, v in inputs.items()
        }

    names = case.output_names
    label = (lambda i: names[i]) if len(names) > 1 else (lambda i: "the output")
    towards = ", ".join(f"the parameters of {k}" if isinstance(inputs[k], torch.nn.Module) else k
                        for k in case.grad_inputs)

    expected_outputs, given = _call(case, case.reference, leaves(), learner=False)
    if case.grad_outputs is None:
        carried = [i for i, e in enumerate(expected_outputs) if isinstance(e, Tensor) and e.requires_grad]
    else:
        carried = [names.index(name) for name in case.grad_outputs]
    if not carried or not all(expected_outputs[i].requires_grad for i in carried):
        raise RuntimeError(f"the reference of {case.name} must keep the graph of the outputs that carry gradients")
    targets = _differentiated(case, given)
    expected = {i: _gradients(expected_outputs[i], targets) for i in carried}

    got_outputs, given = _call(case, learner, leaves())
    targets = _differentiated(case, given)
    for i in carried:
        out = got_outputs[i]
        cut = not (isinstance(out, Tensor) and out.requires_grad)
        if not cut:
            try:
                got = _gradients(out, targets)
            except RuntimeError as error:
                raise AssertionError(f"{case.name}: the gradient of {label(i)} cannot be computed: {error}") from error
            cut = all(g is None for g in got)
        if cut:
            through = f" from {label(i)}" if len(names) > 1 else ""
            raise AssertionError(
                f"{case.name}: no gradient flows back{through} to {towards}. Keep the computation in "
                "torch and in the graph: no .detach(), .item(), .numpy(), float(...) or torch.no_grad(), "
                "so that training can backpropagate through it."
            )
        for (target, value), g, e in zip(targets, got, expected[i], strict=True):
            if g is None and e is None:
                continue
            g = torch.zeros_like(value) if g is None else g
            e = torch.zeros_like(value) if e is None else e
            if not _close(g, e, case):
                raise AssertionError(
                    f"{case.name}: the values are right but the gradient of {label(i)} with respect to {target} "
                    f"is not: {_where_it_differs(g, e, case)}\nIs part of the computation cut from the graph "
                    "(a .detach(), .item() or torch.no_grad() in the middle)?"
                )


def compare_with_reference(learner: Callable, case: Case) -> None:
    """Check `learner` against `case.reference`: random inputs (left unchanged), known mistakes,
    extremes, gradients."""
    generator = torch.Generator().manual_seed(case.seed)
    for trial in range(case.num_trials):
        inputs = case.make_inputs(generator)
        expected, _ = _call(case, case.reference, inputs, learner=False)
        got, _ = _call(case, learner, inputs)
        difference = _first_difference(case, got, expected)
        if difference is not None:
            _fail(case, inputs, got, *difference, context=f"on random input {trial + 1}")
    for extreme in case.extremes:
        expected, _ = _call(case, case.reference, extreme.inputs, learner=False)
        got, _ = _call(case, learner, extreme.inputs)
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


def tiny_gpt2(generator: torch.Generator, vocab: int = 40, keep_global_rng: bool = True):
    """A small random GPT-2 (1 layer, 16 dimensions, 2 heads, no dropout), its weights seeded by one
    draw from `generator`. keep_global_rng: leave the caller's global random state as it was; when
    False, the global generator is left seeded by that draw (as notebook 08's checks always did)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    seed = int(torch.randint(0, 10_000, (), generator=generator))
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng() if keep_global_rng else contextlib.nullcontext():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def lm_batch(generator: torch.Generator, rows: int, vocab: int = 40, width: int = 12, first_token: int = 1) -> dict:
    """A right-padded batch in build_batch's format: prompt of 1-3 tokens, response of 1-6, token ids
    drawn from first_token to vocab - 1 (padding is 0)."""
    prompt_lengths = torch.randint(1, 4, (rows,), generator=generator)
    response_lengths = torch.randint(1, 7, (rows,), generator=generator)
    positions = torch.arange(width).unsqueeze(0)
    attention_mask = (positions < (prompt_lengths + response_lengths).unsqueeze(1)).long()
    input_ids = torch.randint(first_token, vocab, (rows, width), generator=generator) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone(),
            "loss_mask": loss_mask(prompt_lengths, response_lengths, width)}
