"""Exercise checks: run a learner's function and the reference on random inputs, and say what is wrong.

Every check follows one recipe, `compare_with_reference`:

1. call the learner's function and the reference on a few seeded random inputs (float64);
2. if the outputs differ, try the typical mistakes of that exercise (beta missing, chosen and
   rejected swapped, the reference model forgotten, ...) on the same inputs; when one of them
   reproduces the learner's output, name it and give a hint;
3. call both on extreme inputs (huge margins, tiny beta, zero probabilities) where a formula that
   is right on paper overflows to inf or nan in floating point;
4. optionally compare gradients, so that a `.detach()` or `.item()` that cuts the graph is caught.

A check raises AssertionError with an explanation when something is wrong and prints one line when
all is right. A later notebook adds a check by writing an inputs maker and a list of `Mistake`s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_teach import bandit
from dpo_teach.dpo import dpo_loss

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


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _policy(
    generator: torch.Generator, num_prompts: int, num_responses: int, scale: float = 1.0
) -> Tensor:
    return torch.softmax(_randn(generator, num_prompts, num_responses, scale=scale), dim=-1)


def _reward_pairs(generator: torch.Generator) -> Inputs:
    return {
        "reward_chosen": _randn(generator, 8, scale=3.0),
        "reward_rejected": _randn(generator, 8, scale=3.0),
    }


def _huge_margins() -> Inputs:
    return {
        "reward_chosen": torch.tensor([1e4, -1e4, 800.0, 0.0], dtype=torch.float64),
        "reward_rejected": torch.tensor([-1e4, 1e4, 0.0, 800.0], dtype=torch.float64),
    }


# ---- Notebook 01: Bradley-Terry ------------------------------------------------------------------


def check_bt_probability(bt_probability: Callable) -> None:
    """Check bt_probability(reward_chosen, reward_rejected) -> p(y_w > y_l), shape (N,)."""
    case = Case(
        name="bt_probability",
        reference=bandit.bt_probability,
        make_inputs=_reward_pairs,
        shape_hint="Return one probability per comparison, shape (N,).",
        mistakes=[
            Mistake(
                "the chosen and rejected rewards are swapped",
                lambda rw, rl: torch.sigmoid(rl - rw),
                "p(y_w > y_l) = sigma(r_w - r_l) grows with the chosen reward r_w.",
            ),
            Mistake(
                "the sigmoid is missing",
                lambda rw, rl: rw - rl,
                "The reward difference can be any real number; sigma maps it to a probability in (0, 1).",
            ),
            Mistake(
                "the rewards are added instead of subtracted",
                lambda rw, rl: torch.sigmoid(rw + rl),
                "Only the difference r_w - r_l enters the Bradley-Terry model.",
            ),
        ],
        extremes=[
            Extreme(
                "rewards of +-10,000",
                _huge_margins(),
                "exp(r) overflows to inf for r > 709 in float64 (inf / inf = nan). Apply "
                "torch.sigmoid to the difference r_w - r_l instead of exponentiating each reward.",
            )
        ],
    )
    compare_with_reference(bt_probability, case)


def check_bt_nll(bt_nll: Callable) -> None:
    """Check bt_nll(reward_chosen, reward_rejected) -> -log sigma(r_w - r_l), shape (N,)."""
    case = Case(
        name="bt_nll",
        reference=bandit.bt_nll,
        make_inputs=_reward_pairs,
        shape_hint="Return one loss per comparison, shape (N,); average later, when training.",
        mistakes=[
            Mistake(
                "the chosen and rejected rewards are swapped",
                lambda rw, rl: -F.logsigmoid(rl - rw),
                "The likelihood of the observed preference is sigma(r_w - r_l), chosen first.",
            ),
            Mistake(
                "the minus sign is missing (this is the log-likelihood, not its negative)",
                lambda rw, rl: F.logsigmoid(rw - rl),
                "A negative log-likelihood is >= 0: -log sigma(r_w - r_l).",
            ),
            Mistake(
                "the log is missing",
                lambda rw, rl: -torch.sigmoid(rw - rl),
                "The loss is -log of the probability, not minus the probability.",
            ),
            Mistake(
                "it is 1 minus the probability instead of -log of it",
                lambda rw, rl: 1 - torch.sigmoid(rw - rl),
                "Maximum likelihood multiplies probabilities, so the loss sums -log p.",
            ),
        ],
        extremes=[
            Extreme(
                "margins of +-10,000",
                _huge_margins(),
                "torch.log(torch.sigmoid(z)) breaks for large negative z: sigmoid(-10000) rounds to 0 "
                "and log(0) = -inf. Use torch.nn.functional.logsigmoid(z), which is exact for any z.",
            )
        ],
    )
    compare_with_reference(bt_nll, case)


# ---- Notebook 02: the KL-regularised objective and its optimum -------------------------------


def _policy_problem(generator: torch.Generator) -> Inputs:
    return {
        "policy": _policy(generator, 3, 5, scale=1.5),
        "pi_ref": _policy(generator, 3, 5),
        "reward": _randn(generator, 3, 5, scale=2.0),
        "beta": _uniform(generator, 0.2, 0.8),
    }


def _zero_policy_problem() -> Inputs:
    return {
        "policy": torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64),
        "pi_ref": torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=torch.float64),
        "reward": torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -3.0]], dtype=torch.float64),
        "beta": 0.5,
    }


ZERO_LOG_ZERO_HINT = (
    "0 * log 0 counts as 0 (the limit of p log p as p -> 0), but p * torch.log(p) gives 0 * (-inf) = nan. "
    "Use torch.xlogy(p, p) - torch.xlogy(p, q), which treats 0 log 0 as 0."
)


def check_kl_divergence(kl_divergence: Callable) -> None:
    """Check kl_divergence(policy, pi_ref) -> KL(policy || pi_ref) per prompt, shape (P,)."""

    def make_inputs(generator: torch.Generator) -> Inputs:
        problem = _policy_problem(generator)
        return {"policy": problem["policy"], "pi_ref": problem["pi_ref"]}

    zeros = _zero_policy_problem()
    case = Case(
        name="kl_divergence",
        reference=bandit.kl_divergence,
        make_inputs=make_inputs,
        shape_hint="Sum over the responses (the last dimension): one KL per prompt, shape (P,).",
        mistakes=[
            Mistake(
                "the KL is in the wrong direction, KL(pi_ref || policy)",
                lambda p, q: bandit.kl_divergence(q, p),
                "KL is not symmetric. RLHF penalises KL(pi || pi_ref) = sum_y pi(y) log(pi(y) / pi_ref(y)).",
            ),
            Mistake(
                "the terms are weighted by pi_ref instead of the policy",
                lambda p, q: (q * (torch.log(p) - torch.log(q))).sum(-1),
                "The expectation is over y ~ policy: weight each log-ratio by policy(y).",
            ),
            Mistake(
                "the log-ratios are not weighted by the policy",
                lambda p, q: (torch.log(p) - torch.log(q)).sum(-1),
                "KL = sum_y policy(y) log(policy(y) / pi_ref(y)).",
            ),
            Mistake(
                "the sign is flipped",
                lambda p, q: -bandit.kl_divergence(p, q),
                "KL(p || q) >= 0, with equality only when p == q.",
            ),
        ],
        extremes=[
            Extreme(
                "a policy with probability exactly 0 on some responses",
                {"policy": zeros["policy"], "pi_ref": zeros["pi_ref"]},
                ZERO_LOG_ZERO_HINT,
            )
        ],
    )
    compare_with_reference(kl_divergence, case)


def check_rlhf_objective(rlhf_objective: Callable) -> None:
    """Check rlhf_objective(policy, pi_ref, reward, beta) -> E_pi[r] - beta KL(pi || pi_ref), shape (P,)."""
    case = Case(
        name="rlhf_objective",
        reference=bandit.rlhf_objective,
        make_inputs=_policy_problem,
        shape_hint="One value per prompt, shape (P,): sum over the responses, not over the prompts.",
        mistakes=[
            Mistake(
                "beta is missing",
                lambda p, q, r, beta: bandit.expected_reward(p, r) - bandit.kl_divergence(p, q),
                "beta weighs the KL penalty: E[r] - beta * KL.",
            ),
            Mistake(
                "the KL is added instead of subtracted",
                lambda p, q, r, beta: (
                    bandit.expected_reward(p, r) + beta * bandit.kl_divergence(p, q)
                ),
                "The KL is a penalty for moving away from pi_ref: subtract it.",
            ),
            Mistake(
                "the KL is in the wrong direction, KL(pi_ref || policy)",
                lambda p, q, r, beta: (
                    bandit.expected_reward(p, r) - beta * bandit.kl_divergence(q, p)
                ),
                "The objective penalises KL(pi || pi_ref), with the policy first.",
            ),
            Mistake(
                "beta divides the KL instead of multiplying it",
                lambda p, q, r, beta: (
                    bandit.expected_reward(p, r) - bandit.kl_divergence(p, q) / beta
                ),
                "The objective is E[r] - beta * KL: a larger beta means a stronger pull to pi_ref.",
            ),
            Mistake(
                "the reward is not weighted by the policy",
                lambda p, q, r, beta: r.sum(-1) - beta * bandit.kl_divergence(p, q),
                "The expected reward is sum_y policy(y) r(y).",
            ),
        ],
        extremes=[
            Extreme(
                "a policy with probability exactly 0 on some responses",
                _zero_policy_problem(),
                ZERO_LOG_ZERO_HINT,
            )
        ],
    )
    compare_with_reference(rlhf_objective, case)


def check_optimal_policy(optimal_policy: Callable) -> None:
    """Check optimal_policy(pi_ref, reward, beta) -> pi_ref exp(reward / beta) / Z, shape (P, K)."""

    def make_inputs(generator: torch.Generator) -> Inputs:
        problem = _policy_problem(generator)
        return {"pi_ref": problem["pi_ref"], "reward": problem["reward"], "beta": problem["beta"]}

    def tilt(pi_ref: Tensor, logits: Tensor, dim: int = -1) -> Tensor:
        return torch.softmax(torch.log(pi_ref) + logits, dim=dim)

    case = Case(
        name="optimal_policy",
        reference=bandit.optimal_policy,
        make_inputs=make_inputs,
        shape_hint="Return a distribution over the responses for each prompt: the same shape as pi_ref.",
        mistakes=[
            Mistake(
                "beta multiplies the reward instead of dividing it",
                lambda q, r, beta: tilt(q, r * beta),
                "pi* is proportional to pi_ref * exp(r / beta): a small beta sharpens pi* towards argmax r.",
            ),
            Mistake(
                "beta is missing",
                lambda q, r, beta: tilt(q, r),
                "pi* is proportional to pi_ref * exp(r / beta).",
            ),
            Mistake(
                "the reward has the wrong sign",
                lambda q, r, beta: tilt(q, -r / beta),
                "The optimal policy moves probability towards high reward: exp(+r / beta).",
            ),
            Mistake(
                "pi_ref is missing",
                lambda q, r, beta: torch.softmax(r / beta, dim=-1),
                "pi* = pi_ref * exp(r / beta) / Z: the reference policy is reweighted, not replaced.",
            ),
            Mistake(
                "pi_ref enters as if it were a log-probability",
                lambda q, r, beta: torch.softmax(q + r / beta, dim=-1),
                "pi_ref holds probabilities; inside a softmax it enters as torch.log(pi_ref).",
            ),
            Mistake(
                "the result is not normalised (Z(x) is missing)",
                lambda q, r, beta: q * torch.exp(r / beta),
                "Divide by Z(x) = sum_y pi_ref(y|x) exp(r(x,y) / beta) so each row sums to 1.",
            ),
            Mistake(
                "it is normalised over the prompts instead of the responses",
                lambda q, r, beta: tilt(q, r / beta, dim=0),
                "Normalise over the last dimension (the K responses of each prompt): dim=-1.",
            ),
        ],
        extremes=[
            Extreme(
                "beta = 0.01 and rewards in the hundreds",
                {
                    "pi_ref": torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64),
                    "reward": torch.tensor(
                        [[300.0, 299.0, -50.0], [10.0, 12.0, 11.5]], dtype=torch.float64
                    ),
                    "beta": 0.01,
                },
                "exp(r / beta) overflows to inf (inf / inf = nan). Work in log space: "
                "torch.softmax(torch.log(pi_ref) + reward / beta, dim=-1) subtracts the maximum first.",
            )
        ],
    )
    compare_with_reference(optimal_policy, case)


# ---- Notebook 03: from RLHF to DPO ---------------------------------------------------------------


def _implicit_reward(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    return beta * (policy_logps - ref_logps)


def check_implicit_reward(implicit_reward: Callable) -> None:
    """Check implicit_reward(policy_logps, ref_logps, beta) -> beta (log pi - log pi_ref), shape (B,)."""

    def make_inputs(generator: torch.Generator) -> Inputs:
        ref_logps = -_uniform(generator, 5.0, 40.0) * torch.rand(
            8, generator=generator, dtype=torch.float64
        )
        policy_logps = ref_logps + _randn(generator, 8, scale=2.0)
        return {
            "policy_logps": policy_logps,
            "ref_logps": ref_logps,
            "beta": _uniform(generator, 0.05, 0.8),
        }

    case = Case(
        name="implicit_reward",
        reference=_implicit_reward,
        make_inputs=make_inputs,
        shape_hint="One reward per example, shape (B,).",
        mistakes=[
            Mistake(
                "beta is missing", lambda p, q, beta: p - q, "r_hat = beta * (log pi - log pi_ref)."
            ),
            Mistake(
                "the reference model is forgotten",
                lambda p, q, beta: beta * p,
                "The reward is the log-ratio to the reference: subtract ref_logps.",
            ),
            Mistake(
                "policy and reference are swapped",
                lambda p, q, beta: beta * (q - p),
                "r_hat = beta * (log pi - log pi_ref): the policy comes first.",
            ),
            Mistake(
                "beta divides instead of multiplying",
                lambda p, q, beta: (p - q) / beta,
                "r_hat = beta * (...).",
            ),
            Mistake(
                "it divides log-probs instead of subtracting them",
                lambda p, q, beta: beta * p / q,
                "log(pi / pi_ref) = log pi - log pi_ref: with log-probs, a ratio becomes a difference.",
            ),
        ],
    )
    compare_with_reference(implicit_reward, case)


def _dpo_inputs(generator: torch.Generator) -> Inputs:
    ref_chosen_logps = -_uniform(generator, 5.0, 40.0) * torch.rand(
        8, generator=generator, dtype=torch.float64
    )
    ref_rejected_logps = -_uniform(generator, 5.0, 40.0) * torch.rand(
        8, generator=generator, dtype=torch.float64
    )
    return {
        "policy_chosen_logps": ref_chosen_logps + _randn(generator, 8, scale=3.0),
        "policy_rejected_logps": ref_rejected_logps + _randn(generator, 8, scale=3.0),
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "beta": _uniform(generator, 0.1, 0.8),
    }


def _sigmoid_dpo(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    return dpo_loss(pc, pr, rc, rr, beta=beta)


def _dpo_variant(loss: Callable, reward: Callable) -> Callable:
    """A wrong dpo_loss: `loss(pc, pr, rc, rr, beta)` and `reward(policy, ref, beta)`."""
    return lambda pc, pr, rc, rr, beta: (
        loss(pc, pr, rc, rr, beta),
        reward(pc, rc, beta),
        reward(pr, rr, beta),
    )


def _h(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    return (pc - rc) - (pr - rr)


def check_dpo_loss(dpo_loss_fn: Callable) -> None:
    """Check dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta).

    It must return (losses, chosen_rewards, rejected_rewards), each of shape (B,), as the sigmoid
    DPO loss of Rafailov et al. 2023, Eq. 7.
    """
    right = _implicit_reward
    huge = torch.tensor([1e4, -1e4, 500.0, -500.0], dtype=torch.float64)
    case = Case(
        name="dpo_loss",
        reference=_sigmoid_dpo,
        make_inputs=_dpo_inputs,
        output_names=("losses", "chosen_rewards", "rejected_rewards"),
        shape_hint="Return one value per example, shape (B,); take the mean later, in the training loop.",
        grad_inputs=("policy_chosen_logps", "policy_rejected_logps"),
        mistakes=[
            Mistake(
                "beta is missing",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(_h(pc, pr, rc, rr)),
                    lambda p, q, beta: p - q,
                ),
                "The margin is beta * (log-ratio of chosen - log-ratio of rejected), and each reward is beta * log-ratio.",
            ),
            Mistake(
                "chosen and rejected are swapped (or the reference is subtracted the wrong way round)",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(-beta * _h(pc, pr, rc, rr)), right
                ),
                "The loss should fall when the chosen response gains log-ratio: -log sigma(beta * h) with "
                "h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).",
            ),
            Mistake(
                "the reference model is forgotten",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)),
                    lambda p, q, beta: beta * p,
                ),
                "DPO compares log-ratios to the reference: subtract ref_chosen_logps and ref_rejected_logps.",
            ),
            Mistake(
                "the minus sign is missing (the loss is negative)",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: F.logsigmoid(beta * _h(pc, pr, rc, rr)), right
                ),
                "The loss is -log sigma(beta * h) >= 0.",
            ),
            Mistake(
                "beta multiplies the loss instead of the margin",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -beta * F.logsigmoid(_h(pc, pr, rc, rr)), right
                ),
                "beta goes inside the sigmoid: -log sigma(beta * h).",
            ),
            Mistake(
                "beta is missing from the rewards",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pc, pr, rc, rr)),
                    lambda p, q, beta: p - q,
                ),
                "The implicit reward is beta * (log pi - log pi_ref).",
            ),
            Mistake(
                "the rewards forget the reference model",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pc, pr, rc, rr)),
                    lambda p, q, beta: beta * p,
                ),
                "The implicit reward is beta * (log pi - log pi_ref).",
            ),
        ],
        extremes=[
            Extreme(
                "margins of +-10,000",
                {
                    "policy_chosen_logps": -10.0 + huge / 2,
                    "policy_rejected_logps": -10.0 - huge / 2,
                    "ref_chosen_logps": torch.full((4,), -10.0, dtype=torch.float64),
                    "ref_rejected_logps": torch.full((4,), -10.0, dtype=torch.float64),
                    "beta": 1.0,
                },
                "torch.log(torch.sigmoid(z)) breaks for large negative z: sigmoid(-10000) rounds to 0 and "
                "log(0) = -inf. Use torch.nn.functional.logsigmoid(z), which is exact for any z.",
            )
        ],
    )
    compare_with_reference(dpo_loss_fn, case)


# ---- Notebook 00: the warm-up --------------------------------------------------------------------


def check_preferred(preferred: Callable) -> None:
    """Check preferred(text_a, text_b) -> the text the oracle scores higher (text_a on a tie)."""
    from dpo_teach.world import generate_reviews, oracle_reward

    texts = [r["text"] for r in generate_reviews(40, seed=123)]
    cases = list(zip(texts[::2], texts[1::2])) + [(texts[0], texts[0]), ("It was shot in Paris.", "It is on Friday.")]
    for text_a, text_b in cases:
        try:
            got = preferred(text_a, text_b)
        except NotImplementedError as error:
            raise AssertionError("preferred is not written yet: replace `raise NotImplementedError()`.") from error
        score_a, score_b = oracle_reward([text_a, text_b]).tolist()
        expected = text_a if score_a >= score_b else text_b
        if not isinstance(got, str):
            raise AssertionError(f"preferred should return one of the two texts (a str), got {type(got).__name__}.")
        if got not in (text_a, text_b):
            raise AssertionError("preferred should return one of the two texts it was given, unchanged.")
        if got != expected:
            if score_a == score_b:
                raise AssertionError(f"On a tie (both score {score_a:+.3f}) preferred should return the first text.")
            raise AssertionError(
                f"The oracle scores text_a {score_a:+.3f} and text_b {score_b:+.3f}, so the preferred text is "
                f"{'text_a' if score_a > score_b else 'text_b'}; your function returned the other one. "
                "Higher oracle reward means preferred.")
    print(f"✓ preferred is correct: it agrees with the oracle on {len(cases)} pairs, ties included.")


# ---- Notebook 08: DPO on a language model ---------------------------------------------------------


def _tiny_lm_batch(generator: torch.Generator) -> Inputs:
    """A small random GPT-2 and a concatenated batch (chosen rows, then rejected rows)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(int(torch.randint(0, 10_000, (), generator=generator)))
    config = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    num_pairs, width = 3, 12
    prompt_lengths = torch.randint(1, 4, (2 * num_pairs,), generator=generator)
    response_lengths = torch.randint(1, 7, (2 * num_pairs,), generator=generator)
    positions = torch.arange(width).unsqueeze(0)
    end = (prompt_lengths + response_lengths).unsqueeze(1)
    attention_mask = (positions < end).long()
    input_ids = torch.randint(0, 40, (2 * num_pairs, width), generator=generator) * attention_mask
    loss_mask = (attention_mask.bool() & (positions >= prompt_lengths.unsqueeze(1))).long()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone(),
             "loss_mask": loss_mask}
    return {"model": model, "batch": batch}


def _pair_logps(model, batch, average=False):
    from dpo_teach.dpo import pair_logps

    with torch.no_grad():
        return pair_logps(model, batch, average=average)


def check_concatenated_logps(concatenated_logps: Callable) -> None:
    """Check concatenated_logps(model, batch) -> (chosen_logps, rejected_logps), each (B,), from
    one forward pass over a batch whose first half holds the chosen rows."""
    def unshifted(model, batch):  # scoring token t with the logits at t, not t - 1
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_logps = torch.gather(logits.log_softmax(-1), 2, batch["labels"].unsqueeze(2)).squeeze(2)
        return ((token_logps * batch["loss_mask"]).sum(-1)).chunk(2)

    def whole_sequence(model, batch):  # the prompt counted too
        masked = dict(batch, loss_mask=batch["attention_mask"])
        return _pair_logps(model, masked)

    case = Case(
        name="concatenated_logps",
        reference=_pair_logps,
        make_inputs=_tiny_lm_batch,
        output_names=("chosen_logps", "rejected_logps"),
        shape_hint="Return two tensors of shape (B,): the first half of the rows are the chosen responses.",
        num_trials=3,
        rtol=1e-4,
        atol=1e-5,
        mistakes=[
            Mistake("the log-probs are averaged over tokens instead of summed",
                    lambda model, batch: _pair_logps(model, batch, average=True),
                    "DPO uses the SUM of the response tokens' log-probs (use average=False)."),
            Mistake("chosen and rejected are swapped",
                    lambda model, batch: _pair_logps(model, batch)[::-1],
                    "The batch holds the chosen rows first: logps.chunk(2) gives (chosen, rejected)."),
            Mistake("the labels are not shifted: token t is scored by the logits at t",
                    unshifted, "The logits at position t - 1 predict token t: use sequence_logps."),
            Mistake("the prompt tokens are counted too", whole_sequence,
                    "Only response tokens count: use batch['loss_mask'], not the attention mask."),
        ],
    )
    compare_with_reference(concatenated_logps, case)


def _rewards_with_ties(generator: torch.Generator) -> Inputs:
    chosen = _randn(generator, 10)
    rejected = _randn(generator, 10)
    rejected[:3] = chosen[:3]  # ties, as at the first step, when policy == reference
    return {"chosen_rewards": chosen, "rejected_rewards": rejected}


def check_reward_accuracy(reward_accuracy: Callable) -> None:
    """Check reward_accuracy(chosen_rewards, rejected_rewards) -> fraction of pairs ranked right."""
    case = Case(
        name="reward_accuracy",
        reference=lambda c, r: (c > r).to(c.dtype).mean(),
        make_inputs=_rewards_with_ties,
        shape_hint="Return one number (a 0-dimensional tensor): the fraction of pairs.",
        mistakes=[
            Mistake("ties count as correct (>= instead of >)", lambda c, r: (c >= r).to(c.dtype).mean(),
                    "A tie ranks nothing: at the first step every pair is a tie and the accuracy is 0, as TRL logs it."),
            Mistake("it counts the pairs instead of taking the fraction", lambda c, r: (c > r).to(c.dtype).sum(),
                    "Divide by the number of pairs (use .mean())."),
            Mistake("it compares the wrong way round", lambda c, r: (c < r).to(c.dtype).mean(),
                    "A pair is ranked right when the chosen response's implicit reward is higher."),
        ],
    )
    compare_with_reference(reward_accuracy, case)


# ---- Notebook 09: DPO against PPO on the frontier --------------------------------------------------



class _Frontier:
    """The references of notebook 09, imported on first use (dpo_teach.frontier pulls in the whole pipeline)."""

    def __getattr__(self, name):
        from dpo_teach import frontier

        return getattr(frontier, name)


_frontier = _Frontier()


def _best_of_n_inputs(generator: torch.Generator) -> Inputs:
    n_max, num_prompts = 6, 7
    scores = _randn(generator, n_max, num_prompts)
    rewards = 0.5 * scores + _randn(generator, n_max, num_prompts)  # the reward model is a noisy proxy
    return {"scores": scores, "rewards": rewards, "n": int(torch.randint(2, n_max, (), generator=generator))}


def check_best_of_n_rewards(best_of_n_rewards: Callable) -> None:
    """Check best_of_n_rewards(scores, rewards, n) -> (P,) oracle rewards of the samples that the
    reward model picks among the first n of each prompt; scores and rewards are (N_max, P)."""
    case = Case(
        name="best_of_n_rewards",
        reference=_frontier.best_of_n_rewards,
        make_inputs=_best_of_n_inputs,
        shape_hint="Return one oracle reward per prompt: shape (P,), where scores is (N_max, P).",
        mistakes=[
            Mistake("the sample is chosen by the oracle reward, not by the reward model",
                    lambda s, r, n: r[:n].max(dim=0).values,
                    "Best-of-N cannot see the oracle: pick with scores.argmax, then read the oracle reward of that sample."),
            Mistake("all N_max samples are used instead of the first n",
                    lambda s, r, n: _frontier.best_of_n_rewards(s, r, s.shape[0]),
                    "Only the first n samples of each prompt count: slice scores[:n] and rewards[:n]."),
            Mistake("it returns the reward model's score of the best sample, not its oracle reward",
                    lambda s, r, n: s[:n].max(dim=0).values,
                    "The frontier measures the oracle (ground-truth) reward of what the method picks."),
            Mistake("it averages the oracle rewards of the first n samples instead of picking one",
                    lambda s, r, n: r[:n].mean(dim=0), "Keep the single sample with the highest score."),
        ],
    )
    compare_with_reference(best_of_n_rewards, case)


def _frontier_inputs(generator: torch.Generator) -> Inputs:
    num = 12
    kls = _randn(generator, num).abs() * 4
    rewards = 0.2 * kls.sqrt() + 0.2 * _randn(generator, num)
    rewards[-1] = rewards[0]  # a tie in reward: the point with the larger KL is not on the frontier
    kls[-1] = kls[0] + 1.0
    return {"kls": kls, "rewards": rewards}


def check_on_frontier(on_frontier: Callable) -> None:
    """Check on_frontier(kls, rewards) -> (M,) bool: True for the points that no other point beats,
    i.e. no point has a KL as low or lower AND a reward as high or higher (and is better in one)."""
    def best_only(kls, rewards):
        return (rewards == rewards.max()).to(rewards.dtype)

    def lower_frontier(kls, rewards):
        return _frontier.on_frontier(kls, -rewards)

    def ignores_ties(kls, rewards):
        no_more_kl = kls.unsqueeze(0) < kls.unsqueeze(1)
        more_reward = rewards.unsqueeze(0) > rewards.unsqueeze(1)
        return (~(no_more_kl & more_reward).any(dim=1)).to(rewards.dtype)

    case = Case(
        name="on_frontier",
        reference=_frontier.on_frontier,
        make_inputs=_frontier_inputs,
        shape_hint="Return one True/False per point: shape (M,), like kls.",
        mistakes=[
            Mistake("only the single best-reward point is kept", best_only,
                    "A point with less reward can still be on the frontier if it costs less KL."),
            Mistake("it finds the lower frontier (lowest reward), not the upper one", lower_frontier,
                    "Better means more reward for the same or less KL."),
            Mistake("a point is only beaten by one with strictly less KL and strictly more reward", ignores_ties,
                    "A point with the same reward at a larger KL is beaten too: use <= and >=, with one of them strict."),
        ],
    )
    compare_with_reference(on_frontier, case)


# ---- Notebook 10: beyond DPO ----------------------------------------------------------------------


def _ipo_reference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    from dpo_teach.variants import ipo_loss

    return ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)[0]


def check_ipo_loss(ipo_loss: Callable) -> None:
    """Check ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    -> (B,) per-example IPO losses (h - 1/(2 beta))^2, h the difference of the two log-ratios."""
    def margin(pc, pr, rc, rr):
        return (pc - rc) - (pr - rr)

    case = Case(
        name="ipo_loss",
        reference=_ipo_reference,
        make_inputs=_dpo_inputs,
        shape_hint="Return one loss per pair, shape (B,), without averaging.",
        grad_inputs=("policy_chosen_logps", "policy_rejected_logps"),
        mistakes=[
            Mistake("the target margin is 1/beta instead of 1/(2 beta)",
                    lambda pc, pr, rc, rr, b: (margin(pc, pr, rc, rr) - 1 / b) ** 2,
                    "IPO's regression target is h = 1 / (2 * beta)."),
            Mistake("the margin is multiplied by beta, as in DPO's sigmoid",
                    lambda pc, pr, rc, rr, b: (b * margin(pc, pr, rc, rr) - 1 / (2 * b)) ** 2,
                    "IPO regresses the raw difference of log-ratios h on 1/(2 beta): no beta in front of h."),
            Mistake("the reference model is left out",
                    lambda pc, pr, rc, rr, b: ((pc - pr) - 1 / (2 * b)) ** 2,
                    "h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))."),
            Mistake("chosen and rejected are swapped",
                    lambda pc, pr, rc, rr, b: (-margin(pc, pr, rc, rr) - 1 / (2 * b)) ** 2,
                    "The chosen response's log-ratio comes first: h = log-ratio(y_w) - log-ratio(y_l)."),
            Mistake("the square is missing",
                    lambda pc, pr, rc, rr, b: margin(pc, pr, rc, rr) - 1 / (2 * b),
                    "IPO is a squared loss: (h - 1/(2 beta)) ** 2."),
            Mistake("the losses are averaged over the batch",
                    lambda pc, pr, rc, rr, b: ((margin(pc, pr, rc, rr) - 1 / (2 * b)) ** 2).mean(),
                    "Return one loss per pair; the training loop takes the mean."),
        ],
    )
    compare_with_reference(ipo_loss, case)


def _mean_logps(generator: torch.Generator) -> Inputs:
    return {"mean_logps": -(_randn(generator, 10).abs() * 3 + 1e-3)}


def _log_odds_reference(mean_logps: Tensor) -> Tensor:
    from dpo_teach.variants import log_odds

    return log_odds(mean_logps)


def check_log_odds(log_odds: Callable) -> None:
    """Check log_odds(mean_logps) -> log(p / (1 - p)) for p = exp(mean_logps), finite for any mean_logps < 0."""
    case = Case(
        name="log_odds",
        reference=_log_odds_reference,
        make_inputs=_mean_logps,
        shape_hint="Return one log-odds per response, the shape of mean_logps.",
        grad_inputs=("mean_logps",),
        mistakes=[
            Mistake("it returns log((1 - p) / p), the log-odds upside down",
                    lambda m: -_log_odds_reference(m), "log odds = log p - log(1 - p)."),
            Mistake("it returns the odds p / (1 - p), not their log",
                    lambda m: torch.exp(_log_odds_reference(m)), "Stay in log space: log p - log(1 - p)."),
            Mistake("log(1 - p) is missing: it returns log p", lambda m: m,
                    "The odds divide p by 1 - p: subtract log(1 - p)."),
        ],
        extremes=[
            Extreme(
                "responses almost certain under the model (mean log-prob -1e-20, so p rounds to 1)",
                {"mean_logps": torch.tensor([-1e-20, -1e-17, -1e-9, -50.0], dtype=torch.float64)},
                "1 - exp(x) rounds to 0 when x is close to 0, and log(0) = -inf. Use torch.log(-torch.expm1(x)) "
                "(expm1 is exact near 0) for x close to 0, and torch.log1p(-torch.exp(x)) for very negative x.",
            )
        ],
        rtol=1e-6,
        atol=1e-8,
    )
    compare_with_reference(log_odds, case)
