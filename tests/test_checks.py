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


def test_an_input_changed_in_place_is_named_with_the_value_it_had():
    def in_place(rw, rl):
        rw -= rl
        return torch.sigmoid(rw)

    with pytest.raises(AssertionError, match=r"(?s)bt_probability modified its input reward_chosen in place: "
                       r"reward_chosen\[0\] was .*, it is now .*compute a new tensor instead"):
        checks.check_bt_probability(in_place)  # the right values, but the caller's rewards are gone


def test_a_copy_changed_in_place_is_fine():
    def on_a_copy(rw, rl):
        rw = rw.clone()
        rw -= rl
        return torch.sigmoid(rw)

    checks.check_bt_probability(on_a_copy)


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


def test_on_frontier_counts_copies_and_ties_by_the_strict_rule():
    """Domination: at least as good in both coordinates AND strictly better in one; each way of
    getting the comparisons wrong is named, and the random inputs hold copies and one-coordinate ties."""
    from dpo_teach.checks.nb09 import _frontier_inputs

    def beaten_by(beats):
        return lambda k, r: torch.tensor([not any(beats(k, r, i, j) for j in range(len(k)) if j != i)
                                          for i in range(len(k))])

    at_least = lambda k, r, i, j: k[j] <= k[i] and r[j] >= r[i]  # noqa: E731
    wrong = [
        (beaten_by(at_least), "two copies of the same point knock each other off"),
        (lambda k, r: torch.zeros(len(k), dtype=torch.bool), "every point beats itself"),
        (beaten_by(lambda k, r, i, j: k[j] < k[i] and r[j] > r[i]), "strictly less KL and strictly more reward"),
        (beaten_by(lambda k, r, i, j: k[j] < k[i] and r[j] >= r[i]), "same KL and less reward is not beaten"),
        (beaten_by(lambda k, r, i, j: k[j] <= k[i] and r[j] > r[i]), "same reward and more KL is not beaten"),
    ]
    for function, message in wrong:
        with pytest.raises(AssertionError, match=f"{message}.*strictly better in one"):
            checks.check_on_frontier(function)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        points = _frontier_inputs(generator)
        kls, rewards = points["kls"], points["rewards"]
        same_kl = kls.unsqueeze(0) == kls.unsqueeze(1)
        same_reward = rewards.unsqueeze(0) == rewards.unsqueeze(1)
        other = ~torch.eye(len(kls), dtype=torch.bool)
        assert (same_kl & same_reward & other).any(), "a point and its copy"
        assert (same_kl & ~same_reward).any() and (same_reward & ~same_kl).any(), "ties in one coordinate"


# ---- The engine: inputs left unchanged, gradients kept, where the values differ ---------------------


def _late_mask(prompt_lengths, response_lengths, width):
    """Starts one token late (> where >= belongs) but ends right: matches no named mistake."""
    positions = torch.arange(width).unsqueeze(0)
    return ((positions > prompt_lengths.unsqueeze(1))
            & (positions < (prompt_lengths + response_lengths).unsqueeze(1))).long()


def _gae_not_reset(rewards, values, mask, gamma, lam):
    """The recursion is not reset after a response's end: the padding's garbage flows into A_t."""
    m = mask.to(values.dtype)
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * m[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages * m, (advantages + values) * m


def test_wrong_values_say_where_the_first_difference_is():
    case = checks.Case(name="double", reference=lambda x: 2 * x,
                       make_inputs=lambda g: {"x": torch.randn(4, 6, generator=g, dtype=torch.float64)})

    def one_slip(x):
        y = 2 * x
        y[2, 5] = 0.0
        return y

    with pytest.raises(AssertionError, match=r"(?s)the output has the wrong values: 1 of 24 entries differ, "
                       r"the first at \[2, 5\]: expected -?\d.*, got 0\.\n  expected\[2\]: \[.*\]\n  got\[2\]: +\[.*, 0\]"):
        checks.compare_with_reference(one_slip, case)
    with pytest.raises(AssertionError, match=r"the output has the wrong value: expected 3, got 4\."):
        checks.compare_with_reference(lambda x: x.sum() + 1, checks.Case(
            name="total", reference=lambda x: x.sum(), make_inputs=lambda g: {"x": torch.tensor([1.0, 2.0])}))


@pytest.mark.parametrize("check, function, message", [
    (checks.check_loss_mask, _late_mask,
     r"(?s)has the wrong values: \d+ of \d+ entries differ, the first at \[\d+, \d+\]: expected 1, got 0\."
     r"\n  expected\[\d+(, \d+:\d+)?\]: \[.*\]\n  got\[\d+"),
    (checks.check_gae, _gae_not_reset,
     r"(?s)advantages has the wrong values: \d+ of \d+ entries differ, the first at \[\d+, \d+\]: expected"),
])
def test_wrong_values_of_notebook_exercises_point_at_the_position(check, function, message):
    with pytest.raises(AssertionError, match=message):
        check(function)


def test_a_mask_one_position_late_is_named():
    from dpo_teach.checks.engine import loss_mask

    with pytest.raises(AssertionError, match="one position too late"):
        checks.check_loss_mask(lambda p, r, w: loss_mask(p + 1, r, w))


def _top_k_in_place(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    logits[logits < kth] = float("-inf")
    return logits


def _sft_in_place(logits, labels, loss_mask):
    from dpo_teach.logps import sequence_logps

    logits -= logits.logsumexp(-1, keepdim=True)  # log-softmax, in place
    return -sequence_logps(logits, labels, loss_mask, average=True)


def _gae_in_place(rewards, values, mask, gamma, lam):
    from dpo_teach import ppo

    rewards *= mask
    values *= mask
    return ppo.gae(rewards, values, mask, gamma, lam)


def _kl_rewards_in_place(scores, logps, ref_logps, mask, kl_coef):
    rewards = logps  # not a copy: the caller's logps
    rewards -= ref_logps
    rewards *= -kl_coef * mask
    rewards[torch.arange(len(scores)), mask.sum(1) - 1] += scores
    return rewards


def _lengths_in_place(prompt_lengths, response_lengths, width):
    response_lengths += prompt_lengths  # the end of each response
    positions = torch.arange(width).unsqueeze(0)
    return ((positions >= prompt_lengths.unsqueeze(1)) & (positions < response_lengths.unsqueeze(1))).long()


@pytest.mark.parametrize("check, function, argument", [
    (checks.check_top_k, _top_k_in_place, "logits"),
    (checks.check_sft_loss, _sft_in_place, "logits"),
    (checks.check_gae, _gae_in_place, "rewards"),
    (checks.check_kl_penalty_rewards, _kl_rewards_in_place, "logps"),
    (checks.check_loss_mask, _lengths_in_place, "response_lengths"),
])
def test_inputs_changed_in_place_are_named(check, function, argument):
    with pytest.raises(AssertionError, match=rf"(?s)modified its input {argument} in place: {argument}\[.*\] was "
                       r".*compute a new tensor instead"):
        check(function)


def test_concatenated_logps_must_leave_the_batch_and_the_model_alone():
    from dpo_teach.dpo import pair_logps

    def shifts_the_mask(model, batch):
        logps = pair_logps(model, batch)
        batch["loss_mask"][:, 1:] = batch["loss_mask"][:, :-1].clone()
        return logps

    def adds_a_key(model, batch):
        batch["logps"] = pair_logps(model, batch)
        return batch["logps"]

    def nudges_a_weight(model, batch):
        with torch.no_grad():
            model.transformer.wte.weight.mul_(1.001)
        return pair_logps(model, batch)

    def builds_a_new_batch(model, batch):  # right: the caller's batch is left as it was
        return pair_logps(model, dict(batch, loss_mask=batch["loss_mask"] * batch["attention_mask"]))

    for function, message in (
        (shifts_the_mask, r"modified its input batch in place: batch\['loss_mask'\]\[\d+, \d+\] was 1, it is now 0"),
        (adds_a_key, r"modified its input batch in place: the key 'logps' was added to batch.*dict\(batch"),
        (nudges_a_weight, r"modified its input model in place: its parameter transformer\.wte\.weight changed"),
    ):
        with pytest.raises(AssertionError, match=message):
            checks.check_concatenated_logps(function)
    checks.check_concatenated_logps(builds_a_new_batch)


def _concatenated_logps_by_hand(model, batch):  # the notebook's solution
    from dpo_teach.logps import sequence_logps

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"], batch["loss_mask"]).chunk(2)


def _under_no_grad(function):
    def wrapped(*args):
        with torch.no_grad():
            return function(*args)
    return wrapped


def _detached(function):
    return lambda *args: tuple(x.detach() for x in _as_tuple(function(*args)))


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _sft(logits, labels, loss_mask):
    from dpo_teach.logps import sequence_logps

    return -sequence_logps(logits, labels, loss_mask, average=True)


def _policy_loss(logps, old_logps, advantages, mask, clip_range):
    from dpo_teach import ppo

    return ppo.policy_loss(logps, old_logps, advantages, mask, clip_range)[0]


def _log_odds(m):
    return m - torch.log(-torch.expm1(m))


GRADIENT_CASES = [  # check, a right answer, what the gradient flows back to
    (checks.check_concatenated_logps, _concatenated_logps_by_hand, "the parameters of model"),
    (checks.check_sft_loss, _sft, "logits"),
    (checks.check_clipped_policy_loss, _policy_loss, "logps"),
    (checks.check_ipo_loss, _ipo, "policy_chosen_logps, policy_rejected_logps"),
    (checks.check_log_odds, _log_odds, "mean_logps"),
]


@pytest.mark.parametrize("check, right, towards", GRADIENT_CASES)
def test_an_answer_without_gradients_is_caught(check, right, towards, capsys):
    check(right)
    assert "is correct" in capsys.readouterr().out
    for wrong in (_under_no_grad(right), _detached(right)):
        with pytest.raises(AssertionError, match=rf"no gradient flows back( from \w+)? to {towards}\. .*"
                           r"no \.detach\(\), \.item\(\), .* or torch\.no_grad\(\)"):
            check(wrong)


def test_every_output_that_is_trained_on_must_carry_its_gradient():
    from dpo_teach.dpo import pair_logps

    def rejected_detached(model, batch):
        chosen, rejected = pair_logps(model, batch)
        return chosen, rejected.detach()

    with pytest.raises(AssertionError, match="no gradient flows back from rejected_logps to the parameters of model"):
        checks.check_concatenated_logps(rejected_detached)

    case = checks.Case(  # outputs named in grad_outputs must carry gradients; the others may be detached
        name="pair", reference=lambda x: (2 * x, 3 * x.detach()), output_names=("a", "b"),
        make_inputs=lambda g: {"x": torch.randn(5, generator=g, dtype=torch.float64)}, grad_inputs=("x",))
    checks.compare_with_reference(lambda x: (2 * x, 3 * x), case)  # b is not trained on: either way
    with pytest.raises(AssertionError, match="no gradient flows back from a to x"):
        checks.compare_with_reference(lambda x: (2 * x.detach(), 3 * x), case)
    both = checks.Case(name="pair", reference=lambda x: (2 * x, 3 * x), output_names=("a", "b"),
                       make_inputs=case.make_inputs, grad_inputs=("x",), grad_outputs=("a", "b"))
    with pytest.raises(AssertionError, match="no gradient flows back from b to x"):
        checks.compare_with_reference(lambda x: (2 * x, 3 * x.detach()), both)


def test_a_gradient_cut_halfway_is_caught():
    def partly_detached(logits, labels, loss_mask):  # the right values, but only a zero gradient
        return _sft(logits.detach() + 0 * logits, labels, loss_mask)

    def parameters_partly_detached(model, batch):  # the LM head cut from the graph
        from dpo_teach.logps import sequence_logps

        hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        logits = hidden.detach() @ model.lm_head.weight.T + 0 * hidden.sum()
        return sequence_logps(logits, batch["labels"], batch["loss_mask"]).chunk(2)

    with pytest.raises(AssertionError, match=r"(?s)the values are right but the gradient of the output with respect "
                       r"to logits is not: \d+ of \d+ entries differ, the first at \[\d+, \d+, \d+\].*cut from the graph"):
        checks.check_sft_loss(partly_detached)
    with pytest.raises(AssertionError, match=r"the values are right but the gradient of chosen_logps with respect "
                       r"to the parameter \S+ of model is not"):
        checks.check_concatenated_logps(parameters_partly_detached)


def test_sequence_logps_check_passes_the_package_and_names_the_label_shift(capsys):
    from dpo_teach.logps import sequence_logps

    checks.check_sequence_logps(sequence_logps)
    assert capsys.readouterr().out.count("is correct") == 2

    def unshifted(logits, labels, mask, average=False):
        token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
        return (token * mask).sum(-1)

    def mask_not_shifted(logits, labels, mask, average=False):
        token = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[:, 1:].unsqueeze(2)).squeeze(2)
        return (token * mask[:, :-1]).sum(-1)

    def mean_over_width(logits, labels, mask, average=False):
        summed = sequence_logps(logits, labels, mask)
        return summed / (logits.shape[1] - 1) if average else summed

    for wrong, message in ((unshifted, "not shifted: token t"), (mask_not_shifted, "mask is not shifted"),
                           (lambda lg, lb, m, average=False: sequence_logps(lg.detach(), lb, m, average), "no gradient"),
                           (mean_over_width, "number of masked tokens"), (not_written, "not written yet")):
        with pytest.raises(AssertionError, match=message):
            checks.check_sequence_logps(wrong)
