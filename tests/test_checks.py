"""dpo_teach.checks: each check passes the right answer and names the typical wrong ones."""

import pytest
import torch
import torch.nn.functional as F

from dpo_teach import bandit, checks
from dpo_teach.dpo import dpo_loss


def _h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def right_dpo(pc, pr, rc, rr, beta):
    return dpo_loss(pc, pr, rc, rr, beta=beta)


def dpo_with(loss, reward=lambda p, q, beta: beta * (p - q)):
    return lambda pc, pr, rc, rr, beta: (
        loss(pc, pr, rc, rr, beta),
        reward(pc, rc, beta),
        reward(pr, rr, beta),
    )


def not_written(*args):
    raise NotImplementedError()


RIGHT = [
    (checks.check_bt_probability, bandit.bt_probability),
    (
        checks.check_bt_probability,
        lambda rw, rl: 1 / (1 + torch.exp(rl - rw)),
    ),  # also right, and finite
    (checks.check_bt_nll, bandit.bt_nll),
    (
        checks.check_bt_nll,
        lambda rw, rl: F.softplus(rl - rw),
    ),  # the same function, written another way
    (checks.check_kl_divergence, bandit.kl_divergence),
    (checks.check_rlhf_objective, bandit.rlhf_objective),
    (checks.check_optimal_policy, bandit.optimal_policy),
    (checks.check_optimal_policy, lambda q, r, beta: torch.softmax(torch.log(q) + r / beta, dim=1)),
    (checks.check_implicit_reward, lambda p, q, beta: beta * (p - q)),
    (checks.check_dpo_loss, right_dpo),
    (
        checks.check_dpo_loss,
        lambda pc, pr, rc, rr, beta: tuple(x.clone() for x in right_dpo(pc, pr, rc, rr, beta)),
    ),
]


@pytest.mark.parametrize("check, function", RIGHT)
def test_right_answers_pass(check, function, capsys):
    check(function)
    assert "is correct" in capsys.readouterr().out


WRONG = [
    # Bradley-Terry probability
    (checks.check_bt_probability, lambda rw, rl: torch.sigmoid(rl - rw), "swapped"),
    (checks.check_bt_probability, lambda rw, rl: rw - rl, "sigmoid is missing"),
    (
        checks.check_bt_probability,
        lambda rw, rl: torch.sigmoid(rw + rl),
        "added instead of subtracted",
    ),
    (
        checks.check_bt_probability,
        lambda rw, rl: torch.exp(rw) / (torch.exp(rw) + torch.exp(rl)),
        "overflows",
    ),
    (checks.check_bt_probability, not_written, "not written yet"),
    # Bradley-Terry negative log-likelihood
    (checks.check_bt_nll, lambda rw, rl: -torch.log(torch.sigmoid(rw - rl)), "logsigmoid"),
    (checks.check_bt_nll, lambda rw, rl: -F.logsigmoid(rl - rw), "swapped"),
    (checks.check_bt_nll, lambda rw, rl: F.logsigmoid(rw - rl), "minus sign is missing"),
    (checks.check_bt_nll, lambda rw, rl: -F.logsigmoid(rw - rl).mean(), "shape"),
    (checks.check_bt_nll, lambda rw, rl: -torch.sigmoid(rw - rl), "log is missing"),
    # KL divergence
    (checks.check_kl_divergence, lambda p, q: bandit.kl_divergence(q, p), "wrong direction"),
    (checks.check_kl_divergence, lambda p, q: (p * torch.log(p / q)).sum(-1), "0 \\* log 0"),
    (
        checks.check_kl_divergence,
        lambda p, q: torch.xlogy(p, p) - torch.xlogy(p, q),
        "Sum over the responses",
    ),
    (
        checks.check_kl_divergence,
        lambda p, q: (torch.log(p) - torch.log(q)).sum(-1),
        "not weighted",
    ),
    # RLHF objective
    (
        checks.check_rlhf_objective,
        lambda p, q, r, beta: (p * r).sum(-1) - bandit.kl_divergence(p, q),
        "beta is missing",
    ),
    (
        checks.check_rlhf_objective,
        lambda p, q, r, beta: (p * r).sum(-1) + beta * bandit.kl_divergence(p, q),
        "added",
    ),
    (
        checks.check_rlhf_objective,
        lambda p, q, r, beta: (p * r).sum(-1) - beta * bandit.kl_divergence(q, p),
        "direction",
    ),
    (
        checks.check_rlhf_objective,
        lambda p, q, r, beta: (p * r).sum(-1) - beta * (p * torch.log(p / q)).sum(-1),
        "0 \\* log 0",
    ),
    # optimal policy
    (
        checks.check_optimal_policy,
        lambda q, r, beta: torch.softmax(torch.log(q) + r, -1),
        "beta is missing",
    ),
    (
        checks.check_optimal_policy,
        lambda q, r, beta: torch.softmax(torch.log(q) + r * beta, -1),
        "multiplies",
    ),
    (
        checks.check_optimal_policy,
        lambda q, r, beta: torch.softmax(torch.log(q) - r / beta, -1),
        "wrong sign",
    ),
    (
        checks.check_optimal_policy,
        lambda q, r, beta: torch.softmax(r / beta, -1),
        "pi_ref is missing",
    ),
    (
        checks.check_optimal_policy,
        lambda q, r, beta: torch.softmax(q + r / beta, -1),
        "log-probability",
    ),
    (checks.check_optimal_policy, lambda q, r, beta: q * torch.exp(r / beta), "not normalised"),
    (
        checks.check_optimal_policy,
        lambda q, r, beta: torch.softmax(torch.log(q) + r / beta, 0),
        "over the prompts",
    ),
    (
        checks.check_optimal_policy,
        lambda q, r, beta: (
            q * torch.exp(r / beta) / (q * torch.exp(r / beta)).sum(-1, keepdim=True)
        ),
        "overflows",
    ),
    # implicit reward
    (checks.check_implicit_reward, lambda p, q, beta: p - q, "beta is missing"),
    (checks.check_implicit_reward, lambda p, q, beta: beta * p, "reference model is forgotten"),
    (checks.check_implicit_reward, lambda p, q, beta: beta * (q - p), "swapped"),
    (checks.check_implicit_reward, lambda p, q, beta: beta * p / q, "divides log-probs"),
    # DPO loss
    (
        checks.check_dpo_loss,
        dpo_with(lambda pc, pr, rc, rr, beta: -F.logsigmoid(_h(pc, pr, rc, rr))),
        "beta is missing",
    ),
    (
        checks.check_dpo_loss,
        lambda pc, pr, rc, rr, beta: right_dpo(pr, pc, rr, rc, beta),
        "swapped",
    ),
    (
        checks.check_dpo_loss,
        dpo_with(
            lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)),
            lambda p, q, beta: beta * p,
        ),
        "reference model is forgotten",
    ),
    (
        checks.check_dpo_loss,
        dpo_with(lambda pc, pr, rc, rr, beta: -torch.log(torch.sigmoid(beta * _h(pc, pr, rc, rr)))),
        "logsigmoid",
    ),
    (
        checks.check_dpo_loss,
        dpo_with(lambda pc, pr, rc, rr, beta: F.logsigmoid(beta * _h(pc, pr, rc, rr))),
        "minus sign",
    ),
    (
        checks.check_dpo_loss,
        dpo_with(lambda pc, pr, rc, rr, beta: -beta * F.logsigmoid(_h(pc, pr, rc, rr))),
        "multiplies the loss",
    ),
    (
        checks.check_dpo_loss,
        dpo_with(
            lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pc, pr, rc, rr)),
            lambda p, q, beta: p - q,
        ),
        "chosen_rewards.*beta is missing",
    ),
    (
        checks.check_dpo_loss,
        lambda pc, pr, rc, rr, beta: tuple(x.mean() for x in right_dpo(pc, pr, rc, rr, beta)),
        "shape",
    ),
    (
        checks.check_dpo_loss,
        lambda pc, pr, rc, rr, beta: right_dpo(pc, pr, rc, rr, beta)[0],
        "return 3 value",
    ),
    (
        checks.check_dpo_loss,
        lambda pc, pr, rc, rr, beta: tuple(x.detach() for x in right_dpo(pc, pr, rc, rr, beta)),
        "no gradient flows",
    ),
    (checks.check_dpo_loss, not_written, "not written yet"),
]


@pytest.mark.parametrize("check, function, message", WRONG)
def test_wrong_answers_are_caught_with_a_message(check, function, message):
    with pytest.raises(AssertionError, match=message):
        check(function)


def test_a_crash_is_reported_with_the_call():
    def crashes(rw, rl):
        return torch.sigmoid(rw - rl[:3])

    with pytest.raises(AssertionError, match="(?s)raised RuntimeError.*called as bt_probability"):
        checks.check_bt_probability(crashes)


def test_learner_cannot_change_the_inputs_of_the_reference():
    def in_place(rw, rl):
        rw -= rl
        return torch.sigmoid(rw)

    checks.check_bt_probability(in_place)  # right answer, written in place: passes


def test_compare_with_reference_serves_new_exercises(capsys):
    """A later notebook adds a check from a Case: here, a softmax exercise."""
    case = checks.Case(
        name="softmax",
        reference=lambda z: torch.softmax(z, -1),
        make_inputs=lambda g: {"z": torch.randn(4, 3, generator=g, dtype=torch.float64)},
        mistakes=[
            checks.Mistake(
                "exp is missing", lambda z: z / z.sum(-1, keepdim=True), "exponentiate first"
            )
        ],
    )
    checks.compare_with_reference(lambda z: torch.exp(z) / torch.exp(z).sum(-1, keepdim=True), case)
    assert "softmax is correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="exp is missing. exponentiate first"):
        checks.compare_with_reference(lambda z: z / z.sum(-1, keepdim=True), case)
    with pytest.raises(AssertionError, match="wrong values"):
        checks.compare_with_reference(lambda z: torch.softmax(2 * z, -1), case)


def test_importing_the_theory_modules_needs_no_ipywidgets():
    import subprocess
    import sys

    code = (
        "import sys, dpo_teach, dpo_teach.bandit, dpo_teach.dpo, dpo_teach.checks; "
        "assert 'ipywidgets' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_preferred_catches_a_reversed_judge_and_ties():
    from dpo_teach.checks import check_preferred
    from dpo_teach.world import oracle_reward

    def right(a, b):
        score_a, score_b = oracle_reward([a, b]).tolist()
        return a if score_a >= score_b else b

    def reversed_judge(a, b):
        score_a, score_b = oracle_reward([a, b]).tolist()
        return a if score_a < score_b else b

    def second_on_tie(a, b):
        score_a, score_b = oracle_reward([a, b]).tolist()
        return a if score_a > score_b else b

    check_preferred(right)
    with pytest.raises(AssertionError, match="Higher oracle reward means preferred"):
        check_preferred(reversed_judge)
    with pytest.raises(AssertionError, match="On a tie"):
        check_preferred(second_on_tie)


def test_notebook_08_checks_catch_typical_mistakes():
    from dpo_teach.checks import check_concatenated_logps, check_reward_accuracy
    from dpo_teach.dpo import pair_logps

    def right(model, batch):
        return pair_logps(model, batch)

    def averaged(model, batch):
        return pair_logps(model, batch, average=True)

    def swapped(model, batch):
        return pair_logps(model, batch)[::-1]

    def with_prompt(model, batch):
        return pair_logps(model, dict(batch, loss_mask=batch["attention_mask"]))

    check_concatenated_logps(right)
    for wrong, message in ((averaged, "averaged"), (swapped, "swapped"), (with_prompt, "prompt tokens")):
        with pytest.raises(AssertionError, match=message):
            check_concatenated_logps(wrong)
    check_reward_accuracy(lambda c, r: (c > r).float().mean())
    with pytest.raises(AssertionError, match="ties count as correct"):
        check_reward_accuracy(lambda c, r: (c >= r).float().mean())
    with pytest.raises(AssertionError, match="counts the pairs"):
        check_reward_accuracy(lambda c, r: (c > r).float().sum())


# ---- Notebooks 09 and 10 --------------------------------------------------------------------------


def _naive_log_odds(m):
    p = torch.exp(m)
    return torch.log(p) - torch.log(1 - p)


def _ipo(pc, pr, rc, rr, beta):
    return (_h(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("check, function", [
    (checks.check_best_of_n_rewards, lambda s, r, n: r[:n].gather(0, s[:n].argmax(0, keepdim=True)).squeeze(0)),
    (checks.check_on_frontier, lambda k, r: torch.tensor(
        [not any((k[j] <= k[i]) and (r[j] >= r[i]) and ((k[j] < k[i]) or (r[j] > r[i])) for j in range(len(k)))
         for i in range(len(k))])),  # a plain double loop, returning bools
    (checks.check_ipo_loss, _ipo),
    (checks.check_log_odds, lambda m: m - torch.log(-torch.expm1(m))),  # expm1 alone is exact enough here
])
def test_notebook_09_and_10_right_answers_pass(check, function, capsys):
    check(function)
    assert "is correct" in capsys.readouterr().out


@pytest.mark.parametrize("check, function, message", [
    (checks.check_best_of_n_rewards, lambda s, r, n: r[:n].max(0).values, "chosen by the oracle"),
    (checks.check_best_of_n_rewards, lambda s, r, n: r.gather(0, s.argmax(0, keepdim=True)).squeeze(0), "first n"),
    (checks.check_best_of_n_rewards, lambda s, r, n: r[:n].mean(0), "averages"),
    (checks.check_on_frontier, lambda k, r: r == r.max(), "single best-reward point"),
    (checks.check_ipo_loss, lambda pc, pr, rc, rr, b: (_h(pc, pr, rc, rr) - 1 / b) ** 2, "1/beta instead"),
    (checks.check_ipo_loss, lambda pc, pr, rc, rr, b: (b * _h(pc, pr, rc, rr) - 1 / (2 * b)) ** 2, "multiplied by beta"),
    (checks.check_ipo_loss, lambda pc, pr, rc, rr, b: _ipo(pc, pr, rc, rr, b).mean(), "averaged"),
    (checks.check_log_odds, _naive_log_odds, "inf or nan"),
    (checks.check_log_odds, lambda m: m, r"log\(1 - p\) is missing"),
    (checks.check_log_odds, not_written, "not written yet"),
])
def test_notebook_09_and_10_mistakes_are_named(check, function, message):
    with pytest.raises(AssertionError, match=message):
        check(function)
