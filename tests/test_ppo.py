"""Tests of dpo_teach.ppo: every part of PPO on its own, then the update and the train loop on a tiny model."""

import math
from dataclasses import replace

import pytest
import torch

from dpo_teach import checks, ppo
from dpo_teach.logps import encode_prompt
from dpo_teach.models import frozen_copy
from dpo_teach.sampling import Generation
from dpo_teach.settings import PPOConfig
from dpo_teach.utils import left_pad, position_ids_from_mask
from dpo_teach.world import load_prompts

# ---- GAE ------------------------------------------------------------------------------------------


def slow_gae(rewards, values, mask, gamma, lam):
    """GAE written as the definition reads: a Python loop per response, over its real tokens only."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        for t in range(length):
            total = 0.0
            for k in range(t, length):  # A_t = sum_k (gamma lam)^(k - t) delta_k
                next_value = values[b, k + 1] if k + 1 < length else 0.0
                delta = rewards[b, k] + gamma * next_value - values[b, k]
                total += (gamma * lam) ** (k - t) * delta
            advantages[b, t] = total
            returns[b, t] = total + values[b, t]
    return advantages, returns


def random_right_padded(generator, batch=5, width=7):
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    lengths[0] = width  # one full row: the end of the tensor is also an end
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    garbage = 100 * torch.randn(batch, width, generator=generator, dtype=torch.float64)
    rewards = torch.where(mask.bool(), torch.randn(batch, width, generator=generator, dtype=torch.float64), garbage)
    values = torch.where(mask.bool(), torch.randn(batch, width, generator=generator, dtype=torch.float64), -garbage)
    return rewards, values, mask


def test_gae_hand_worked_example():
    # row 0 (3 tokens): gamma = 0.9, lam = 0.8, so gamma * lam = 0.72
    #   delta_2 = 1 + 0 - 0.7 = 0.3, delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03, delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
    #   A_2 = 0.3, A_1 = 0.03 + 0.72 * 0.3 = 0.246, A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # row 1 (2 tokens, then padding holding 99s that must be ignored):
    #   delta_1 = 2 + 0 - 0.5 = 1.5, delta_0 = 0.5 + 0.9 * 0.5 - 1 = -0.05; A_1 = 1.5, A_0 = -0.05 + 0.72 * 1.5 = 1.03
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 99.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0.21712, 0.246, 0.3], [1.03, 1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[0.71712, 0.846, 1.0], [2.03, 2.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_slow_loop_on_random_inputs(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        rewards, values, mask = random_right_padded(generator)
        advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
        slow_advantages, slow_returns = slow_gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(advantages, slow_advantages)
        torch.testing.assert_close(returns, slow_returns)


def test_gae_limits():
    generator = torch.Generator().manual_seed(1)
    rewards, values, mask = random_right_padded(generator)
    m = mask.double()
    # lam = 1, gamma = 1: Monte Carlo, A_t = (sum of rewards from t to the end) - V_t
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * m).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns, to_go * m)
    torch.testing.assert_close(advantages, (to_go - values) * m)
    # lam = 0: one-step TD error
    advantages, _ = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    torch.testing.assert_close(advantages, (rewards + 0.9 * next_values - values) * m)


def test_gae_rejects_bad_input():
    rewards = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="right-padded"):
        ppo.gae(rewards, rewards, torch.tensor([[1, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="same shape|one shape"):
        ppo.gae(rewards, torch.zeros(2, 4), torch.ones(2, 3))


# ---- Whitening, KL estimators and rewards -------------------------------------------------------


def test_whiten_uses_valid_tokens_only():
    generator = torch.Generator().manual_seed(2)
    _, values, mask = random_right_padded(generator)
    white = ppo.whiten(values, mask)
    valid = white[mask.bool()]
    assert abs(valid.mean().item()) < 1e-9 and abs(valid.std().item() - 1) < 1e-6
    assert (white[~mask.bool()] == 0).all()
    other = torch.where(mask.bool(), values, torch.full_like(values, 1e6))  # other padding values
    torch.testing.assert_close(ppo.whiten(other, mask), white)


def test_k1_and_k3_are_unbiased_and_k3_is_nonnegative():
    generator = torch.Generator().manual_seed(3)
    policy = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    pi_ref = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    kl = (policy * (policy.log() - pi_ref.log())).sum()
    k1, k3 = ppo.kl_k1(policy.log(), pi_ref.log()), ppo.kl_k3(policy.log(), pi_ref.log())
    torch.testing.assert_close((policy * k1).sum(), kl)  # exact expectations under y ~ policy
    torch.testing.assert_close((policy * k3).sum(), kl)
    assert (k1 < 0).any() and (k3 >= 0).all()


def test_k3_has_no_catastrophic_cancellation_near_zero():
    logps = torch.full((5,), -2.0)
    ref_logps = logps + torch.tensor([1e-4, -1e-4, 3e-5, 1e-3, 0.0])
    exact = ppo.kl_k3(logps.double(), ref_logps.double())
    got = ppo.kl_k3(logps, ref_logps)
    assert (got >= 0).all()
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=1e-12)
    d = (ref_logps - logps).double()
    naive = (torch.exp(ref_logps - logps) - 1 - (ref_logps - logps)).double()
    assert (naive - d**2 / 2).abs().max() > 10 * (got.double() - exact).abs().max()  # the naive formula is far off


def test_kl_penalty_rewards_puts_the_score_on_the_last_real_token():
    logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, 7.0, 7.0]])
    ref_logps = torch.tensor([[-1.5, -1.0, -0.5, -2.0], [-0.5, -2.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 0 hit the length limit; row 1 ended (EOS) at 1
    scores = torch.tensor([2.0, -1.0])
    rewards = ppo.kl_penalty_rewards(scores, logps, ref_logps, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.1, 0.0, 0.1 + 2.0], [0.05, -0.1 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    sequence_kl = (ppo.kl_k1(logps, ref_logps) * mask).sum(1)
    torch.testing.assert_close(rewards.sum(1), scores - 0.1 * sequence_kl)


# ---- Losses -------------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_and_when_clipped():
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    mask = torch.tensor([[1, 1, 0]])
    logps = torch.tensor([[-1.0, -1.0, -1.0]])
    loss, clip_fraction, approx_kl = ppo.policy_loss(logps, logps, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2) and clip_fraction == 0 and approx_kl == 0
    # ratios 1.5 (A > 0: clipped to 1.2) and 0.5 (A < 0: clipped to 0.8, the pessimistic choice)
    new_logps = (logps + torch.tensor([[math.log(1.5), math.log(0.5), 5.0]])).requires_grad_()
    loss, clip_fraction, _ = ppo.policy_loss(new_logps, logps, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + 0.8 * -2.0) / 2)
    assert clip_fraction.item() == pytest.approx(1.0)
    loss.backward()
    assert (new_logps.grad == 0).all(), "clipped tokens give no gradient"
    # ratio 0.5 with A > 0: the unclipped term is the pessimistic one and the gradient flows
    down = (logps + math.log(0.5)).requires_grad_()
    loss, clip_fraction, _ = ppo.policy_loss(down, logps, advantages.abs(), mask, 0.2)
    assert loss.item() == pytest.approx(-0.5 * (1.0 + 2.0) / 2) and clip_fraction == 0
    loss.backward()
    assert (down.grad[0, :2] != 0).all() and down.grad[0, 2] == 0


def test_value_loss_unclipped_and_clipped():
    values = torch.tensor([[1.0, 0.0, 5.0]])
    old_values = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = ppo.value_loss(values, old_values, returns, mask, value_clip=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    # clipped value of token 0 is 0.7: error 0.49 < 1, so max keeps 1; token 1 unchanged
    loss, clip_fraction = ppo.value_loss(values, old_values, returns, mask, value_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2) and clip_fraction == 0
    # token 0 jumps from 0.5 to 1.9, close to its return 2: clipped to 0.7, whose larger error is used
    loss, clip_fraction = ppo.value_loss(torch.tensor([[1.9, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]]),
                                         torch.tensor([[2.0, 0.0, 0.0]]), mask, value_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.3**2 + 0) / 2) and clip_fraction.item() == pytest.approx(0.5)


def test_entropy_from_logits_matches_torch():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(ppo.entropy_from_logits(logits), expected)


def test_update_kl_coef_moves_towards_the_target():
    assert ppo.update_kl_coef(0.1, kl=12.0, target_kl=6.0, horizon=100, batch_size=10) == pytest.approx(0.1 * 1.02)
    assert ppo.update_kl_coef(0.1, kl=3.0, target_kl=6.0, horizon=100, batch_size=10) == pytest.approx(0.1 * 0.98)


# ---- The model: log-probs and values over left-padded prompts ----------------------------------------


def make_generation(tokenizer, prompts, responses):
    """A Generation from token id lists (as sampling.generate would return it)."""
    prompt_ids, prompt_mask = left_pad([encode_prompt(p, tokenizer)[0] for p in prompts], tokenizer.pad_token_id)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), tokenizer.pad_token_id)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), 1
    finished = torch.tensor([r[-1] == tokenizer.eos_token_id for r in responses])
    return Generation(list(prompts), ["" for _ in prompts], prompt_ids, prompt_mask, response_ids, response_mask,
                      finished)


def test_logps_and_values_do_not_depend_on_padding(tokenizer, tiny_model):
    torch.manual_seed(0)
    model = ppo.PolicyWithValueHead(tiny_model)
    torch.nn.init.normal_(model.value_head.weight)  # a non-zero head, so values are not all 0
    eos = tokenizer.eos_token_id
    responses = [[40, 41, 42, eos], [50, 51, 52, 53, 54, 55], [60, eos]]
    batch = make_generation(tokenizer, ["The film", "I watched The Silent Harbor last night", "A"], responses)
    ids = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    logits, values = ppo.response_logits_and_values(model, *ids)
    logps = ppo.token_logps(logits, batch.response_ids)
    for i in range(3):  # each row alone: no padding at all
        alone = make_generation(tokenizer, [batch.prompts[i]], [responses[i]])
        one_logits, one_values = ppo.response_logits_and_values(
            model, alone.prompt_ids, alone.prompt_mask, alone.response_ids, alone.response_mask)
        n = len(responses[i])
        torch.testing.assert_close(logps[i, :n], ppo.token_logps(one_logits, alone.response_ids)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(values[i, :n], one_values[0], atol=1e-5, rtol=0)
        # and the same as a plain forward pass of the LM over the unpadded ids
        full = torch.cat([alone.prompt_ids, alone.response_ids], dim=1)
        plain = tiny_model(input_ids=full).logits[0, alone.prompt_ids.shape[1] - 1:-1].log_softmax(-1)
        torch.testing.assert_close(logps[i, :n], plain.gather(1, full[0, -n:, None])[:, 0], atol=1e-5, rtol=0)


def test_value_head_model_gives_the_lm_logits_and_starts_at_zero(tokenizer, tiny_model):
    model = ppo.PolicyWithValueHead(tiny_model)
    ids = torch.tensor([[0, 40, 41, 42]])
    mask = torch.ones_like(ids)
    logits, values = model(ids, mask, position_ids_from_mask(mask))
    torch.testing.assert_close(logits, tiny_model(input_ids=ids).logits)
    assert values.shape == (1, 4) and (values == 0).all()


def test_pack_right_and_reward_model_reads_the_last_real_token(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = [[40, 41, eos], [50, 51, 52, 53]]  # one ended with EOS, one hit the length limit
    g = make_generation(tokenizer, ["The film", "I watched it"], responses)
    input_ids, attention_mask = ppo.pack_right(g.prompt_ids, g.prompt_mask, g.response_ids, g.response_mask, pad)
    for i, prompt in enumerate(g.prompts):
        row = encode_prompt(prompt, tokenizer)[0] + responses[i]
        assert input_ids[i, :len(row)].tolist() == row and attention_mask[i].sum() == len(row)
        assert (input_ids[i, len(row):] == pad).all()

    class LastTokenRewardModel(torch.nn.Module):  # a stand-in reward model: "score" = id of the last real token
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            last = attention_mask.sum(1) - 1
            return input_ids[torch.arange(len(input_ids)), last].float()

    scores = ppo.reward_model_fn(LastTokenRewardModel(), pad)(g)
    assert scores.tolist() == [float(eos), 53.0]


# ---- Rollouts, the update and the train loop on a tiny model ----------------------------------------


def stand_in_reward(generation):
    """A reward a tiny random model can learn fast: the share of response tokens with an id below 1000."""
    low = (generation.response_ids < 1000) & generation.response_mask.bool()
    return low.float().sum(1) / generation.response_mask.sum(1)


CONFIG = PPOConfig(num_steps=4, batch_size=8, num_epochs=2, num_minibatches=2, lr=1e-3, max_new_tokens=8,
                       eval_every=2, seed=0)


@pytest.fixture()
def prompts(preset):
    return load_prompts(preset, "train", 32)


def test_rollout_records_masks_logps_values_and_scores(tokenizer, tiny_model, prompts):
    torch.manual_seed(0)
    model, ref_model = ppo.PolicyWithValueHead(tiny_model), frozen_copy(tiny_model)
    batch = ppo.rollout(model, ref_model, stand_in_reward, tokenizer, prompts[:8], CONFIG)
    g = batch.generation
    assert g.prompt_ids.shape[0] == 8 and g.response_ids.shape == batch.logps.shape == batch.values.shape
    assert (g.prompt_mask[:, -1] == 1).all(), "prompts are left-padded"
    lengths = g.response_mask.sum(1)
    assert torch.equal(g.response_mask, (torch.arange(g.response_ids.shape[1]) < lengths[:, None]).long())
    torch.testing.assert_close(batch.logps, batch.ref_logps)  # policy == ref_model: k1 = 0 everywhere
    assert (batch.logps[g.response_mask.bool()] < 0).all() and (batch.logps[~g.response_mask.bool()] == 0).all()
    torch.testing.assert_close(batch.scores, stand_in_reward(g))


def test_one_ppo_update_raises_the_clipped_objective(tokenizer, tiny_model, prompts):
    torch.manual_seed(0)
    model, ref_model = ppo.PolicyWithValueHead(tiny_model), frozen_copy(tiny_model)
    batch = ppo.rollout(model, ref_model, stand_in_reward, tokenizer, prompts[:8], CONFIG)
    rewards = ppo.kl_penalty_rewards(batch.scores, batch.logps, batch.ref_logps, batch.mask, 0.05)
    advantages, returns = ppo.gae(rewards, batch.values, batch.mask)
    white = ppo.whiten(advantages, batch.mask)  # what ppo_update optimises (it whitens inside)
    g = batch.generation

    def objective():
        with torch.no_grad():
            logits, _ = ppo.response_logits_and_values(model, g.prompt_ids, g.prompt_mask, g.response_ids,
                                                       g.response_mask)
            loss, _, _ = ppo.policy_loss(ppo.token_logps(logits, g.response_ids), batch.logps, white,
                                         batch.mask, CONFIG.clip_range)
        return -loss.item()

    before = objective()
    assert before == pytest.approx(0.0, abs=1e-5)  # ratio 1 and whitened advantages: mean A = 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    config = replace(CONFIG, num_epochs=1, num_minibatches=1)
    parameters = [p.detach().clone() for p in tiny_model.parameters()]
    ppo.ppo_update(model, optimizer, batch, advantages, returns, config, torch.Generator().manual_seed(0))
    assert objective() > before + 1e-3
    assert any(not torch.equal(p, q) for p, q in zip(parameters, tiny_model.parameters(), strict=True))


def low_id_reward(generation):
    """A sharper stand-in reward: the share of response tokens with an id below 200 (about 1 in 8)."""
    low = (generation.response_ids < 200) & generation.response_mask.bool()
    return low.float().sum(1) / generation.response_mask.sum(1)


def exact_token_kl(policy, ref_model, generation):
    """Mean over response tokens of the exact KL(pi(.|s_t) || pi_ref(.|s_t)) over the vocabulary."""
    ids = (generation.prompt_ids, generation.prompt_mask, generation.response_ids, generation.response_mask)
    with torch.no_grad():
        logps = ppo.response_logits_and_values(policy, *ids)[0].log_softmax(-1)  # (B, R, V)
        ref_logps = ppo.response_logits_and_values(ref_model, *ids)[0].log_softmax(-1)
    return ppo.masked_mean((logps.exp() * (logps - ref_logps)).sum(-1), generation.response_mask).item()


def test_large_kl_coef_keeps_the_policy_near_the_reference(tokenizer, tiny_model, prompts):
    import copy

    from dpo_teach.sampling import generate

    torch.manual_seed(1)
    fixed = generate(tiny_model, tokenizer, prompts[:16], max_new_tokens=8)  # the same states for both runs
    config = replace(CONFIG, batch_size=16, num_steps=10, lr=1e-2)
    kls, scores = {}, {}
    for kl_coef in (0.0, 5.0):
        policy = copy.deepcopy(tiny_model)
        history = ppo.train_ppo(policy, frozen_copy(tiny_model), low_id_reward, tokenizer, prompts,
                                replace(config, kl_coef=kl_coef), progress=False)
        kls[kl_coef], scores[kl_coef] = exact_token_kl(policy, tiny_model, fixed), history["train/score"]
    assert sum(scores[0.0][-3:]) > sum(scores[0.0][:3]), "without a KL penalty the stand-in reward is learnt"
    assert kls[0.0] > 0.2, kls
    assert kls[5.0] < 0.3 * kls[0.0], kls


def test_train_ppo_is_deterministic_and_records_history(tokenizer, tiny_model, prompts):
    import copy

    evaluations = []

    def eval_fn(policy):
        evaluations.append(torch.rand(()).item())  # eval uses randomness: training must not notice
        return {"oracle_reward": 0.5, "kl": 0.1, "texts": ["ignored"]}

    runs = []
    for use_eval in (True, True, False):
        model = copy.deepcopy(tiny_model)
        history = ppo.train_ppo(model, frozen_copy(model), stand_in_reward, tokenizer, prompts, CONFIG,
                                eval_fn=eval_fn if use_eval else None, progress=False)
        runs.append((history, [p.detach().clone() for p in model.parameters()]))
    (h1, p1), (h2, p2), (h3, p3) = runs
    for key in ("train/score", "train/oracle_reward", "train/kl", "train/kl_coef", "train/response_length",
                "train/policy_loss", "train/value_loss", "train/entropy", "train/clip_fraction", "train/approx_kl",
                "generated_tokens", "tokens"):
        assert len(h1[key]) == CONFIG.num_steps and h1[key] == h2[key] == h3[key], key
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(p1, p2, p3, strict=True))
    assert h1["eval/step"] == [0, 2, 4] and h1["eval/oracle_reward"] == [0.5] * 3 and "eval/texts" not in h1
    assert len(evaluations) == 6, "eval_fn runs before training, after every eval_every rollout batches and after the last"
    assert "eval/step" not in h3 and not any(key.startswith("eval/") for key in h3)
    assert h1["step"] == list(range(CONFIG.num_steps)) and h1["lr"] == [CONFIG.lr] * CONFIG.num_steps
    assert h1["seconds"][-1] > 0 and all(a <= b for a, b in zip(h1["seconds"], h1["seconds"][1:]))
    batches = torch.arange(1, CONFIG.num_steps + 1)
    assert h1["sequences"] == (batches * CONFIG.batch_size * CONFIG.num_epochs).tolist()
    assert h1["generated_sequences"] == (batches * CONFIG.batch_size).tolist()
    assert h1["inference_sequences"] == (batches * CONFIG.batch_size * 2).tolist(), "policy and reference"
    assert 0 < h1["generated_tokens"][0] <= CONFIG.batch_size * CONFIG.max_new_tokens
    assert h1["tokens"][0] > CONFIG.num_epochs * h1["generated_tokens"][0], "prompts and responses, every epoch"
    assert h1["train/kl_coef"] == [CONFIG.kl_coef] * CONFIG.num_steps
    for gone in ("wall_seconds", "num_models", "forward_sequences", "backward_sequences", "tokens_generated",
                 "peak_memory_mb"):
        assert gone not in h1, gone


def test_train_ppo_with_a_reward_model_module(tokenizer, tiny_model, prompts):
    class LengthRewardModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = torch.nn.Dropout(0.5)  # train_ppo must switch it off
            self.scale = torch.nn.Parameter(torch.tensor(0.1))

        def forward(self, input_ids, attention_mask):
            return self.dropout(self.scale * attention_mask.sum(1).float())

    reward_model = LengthRewardModel().train()
    config = replace(CONFIG, num_steps=2, eval_every=0)
    history = ppo.train_ppo(tiny_model, frozen_copy(tiny_model), reward_model, tokenizer, prompts, config,
                            progress=False)
    assert history["inference_sequences"] == [3 * config.batch_size, 6 * config.batch_size], "and the reward model"
    assert reward_model.dropout.p == 0.0


# ---- The exercise checks -------------------------------------------------------------------------


def test_checks_accept_the_reference_functions():
    checks.check_gae(ppo.gae)
    checks.check_clipped_policy_loss(lambda *args: ppo.policy_loss(*args)[0])
    checks.check_kl_penalty_rewards(ppo.kl_penalty_rewards)


def test_checks_name_typical_mistakes():
    def gae_without_mask(rewards, values, mask, gamma, lam):  # bootstraps from values after the end
        advantages = torch.zeros_like(rewards)
        last = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
            last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
            advantages[:, t] = last
        return advantages * mask, (advantages + values) * mask

    with pytest.raises(AssertionError, match="after the end"):
        checks.check_gae(gae_without_mask)

    def unclipped(logps, old_logps, advantages, mask, clip_range):
        return -ppo.masked_mean(torch.exp(logps - old_logps) * advantages, mask)

    with pytest.raises(AssertionError, match="clip"):
        checks.check_clipped_policy_loss(unclipped)

    def score_one_too_far(scores, logps, ref_logps, mask, kl_coef):
        rewards = -kl_coef * (logps - ref_logps) * mask
        last = mask.sum(1).long().clamp(max=mask.shape[1] - 1)
        rewards[torch.arange(len(scores)), last] += scores
        return rewards

    with pytest.raises(AssertionError, match="one position"):
        checks.check_kl_penalty_rewards(score_one_too_far)


# ---- PPO's update on one batch, generic over the model (notebook 07's exercise) -----------------------


def test_ppo_update_whitens_inside_and_equals_the_generic_update(tokenizer, tiny_model, prompts):
    import copy

    torch.manual_seed(0)
    model, ref_model = ppo.PolicyWithValueHead(tiny_model), frozen_copy(tiny_model)
    batch = ppo.rollout(model, ref_model, stand_in_reward, tokenizer, prompts[:8], CONFIG)
    rewards = ppo.kl_penalty_rewards(batch.scores, batch.logps, batch.ref_logps, batch.mask, 0.05)
    advantages, returns = ppo.gae(rewards, batch.values, batch.mask)
    runs = []
    for whiten_outside in (False, True):
        m = copy.deepcopy(model)
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
        config = replace(CONFIG, whiten_advantages=not whiten_outside)
        a = ppo.whiten(advantages, batch.mask) if whiten_outside else advantages
        stats = ppo.ppo_minibatch_steps(ppo.rollout_evaluator(m, batch, config), m, optimizer, batch.logps,
                                        batch.values, a, returns, batch.mask, config, torch.Generator().manual_seed(3))
        runs.append((stats, [p.detach().clone() for p in m.parameters()]))
    m = copy.deepcopy(model)
    stats = ppo.ppo_update(m, torch.optim.Adam(m.parameters(), lr=1e-3), batch, advantages, returns, CONFIG,
                           torch.Generator().manual_seed(3))
    runs.append((stats, [p.detach().clone() for p in m.parameters()]))
    for stats, parameters in runs[1:]:
        assert stats.keys() == runs[0][0].keys()
        assert all(math.isclose(stats[k], runs[0][0][k], rel_tol=1e-5, abs_tol=1e-7) for k in stats)
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(parameters, runs[0][1], strict=True))


def test_ppo_step_is_one_step_of_train_ppo(tokenizer, tiny_model, prompts):
    import copy

    from dpo_teach.training import make_optimizer
    from dpo_teach.utils import seed_everything

    config = replace(CONFIG, num_steps=1, eval_every=0)
    policy = copy.deepcopy(tiny_model)
    history = ppo.train_ppo(policy, frozen_copy(tiny_model), stand_in_reward, tokenizer, prompts, config,
                            progress=False)
    seed_everything(config.seed)  # what train_ppo does first
    model = ppo.PolicyWithValueHead(copy.deepcopy(tiny_model))
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    batch, stats = ppo.ppo_step(model, frozen_copy(tiny_model), stand_in_reward, tokenizer,
                                [prompts[i] for i in order[:config.batch_size]], config.kl_coef, config,
                                make_optimizer(model, config), generator)
    assert batch.scores.mean().item() == history["train/score"][0]
    assert all(stats[k] == history[f"train/{k}"][0] for k in stats)
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), model.policy.parameters(), strict=True))


def tabular_ppo(steps, seed=0, beta=0.5, batch=128):
    """PPO with the KL-shaped reward on the bandit of notebooks 01-03: a softmax policy with one logit per
    response, a value per prompt; returns (KL(pi_PPO || pi*) per prompt before, after)."""
    from dpo_teach import bandit

    world = bandit.make_bandit(num_prompts=2, num_responses=4, seed=seed)
    optimum = bandit.optimal_policy(world.pi_ref, world.reward, beta)
    logits = torch.nn.Parameter(world.pi_ref.log().clone())
    values = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    model = torch.nn.ParameterList([logits, values])
    config = PPOConfig(num_epochs=4, num_minibatches=4, lr=0.1, vf_coef=0.5, value_clip=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    kl = lambda: bandit.kl_divergence(logits.detach().softmax(-1), optimum)  # noqa: E731
    before = kl()
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = config.lr * (1 - step / steps)  # to 0: no jitter from the last batches
        with torch.no_grad():
            x = torch.randint(0, 2, (batch,), generator=generator)
            y = torch.multinomial(logits.softmax(-1)[x], 1, generator=generator)  # (N, 1): one-token responses
            logps = logits.log_softmax(-1)[x].gather(1, y)
        mask = torch.ones_like(y)
        rewards = ppo.kl_penalty_rewards(world.reward[x, y[:, 0]], logps, world.pi_ref.log()[x].gather(1, y), mask, beta)
        advantages, returns = ppo.gae(rewards, values.detach()[x, None], mask)

        def evaluate(index, x=x, y=y):
            table = logits.log_softmax(-1)[x[index]]  # (b, K)
            return table.gather(1, y[index]), values[x[index], None], -(table.exp() * table).sum(1, keepdim=True)

        ppo.ppo_minibatch_steps(evaluate, model, optimizer, logps, values.detach()[x, None], advantages, returns,
                                mask, config, generator)
    return before, kl()


def test_ppo_with_the_kl_penalty_reaches_the_closed_form_optimum():
    for seed in (0, 1):
        before, after = tabular_ppo(100, seed=seed)
        assert (before > 0.1).all() and (after < 0.002).all(), (before, after)


def test_ppo_update_check_accepts_the_reference_and_names_slips():
    from dpo_teach.checks import ppo_update

    checks.check_ppo_minibatch_steps(ppo.ppo_minibatch_steps)
    with pytest.raises(AssertionError, match="never cleared"):
        checks.check_ppo_minibatch_steps(ppo_update._slipped("no_zero_grad"))
    with pytest.raises(AssertionError, match="vf_coef"):
        checks.check_ppo_minibatch_steps(ppo_update._slipped("value_loss_unscaled"))
    with pytest.raises(AssertionError, match="padding included"):
        checks.check_ppo_minibatch_steps(ppo_update._slipped("whiten_padding"))

    def one_epoch(evaluate, model, optimizer, old_logps, old_values, advantages, returns, mask, config,
                  generator=None, scaler=None):
        return ppo.ppo_minibatch_steps(evaluate, model, optimizer, old_logps, old_values, advantages, returns, mask,
                                       replace(config, num_epochs=1), generator)

    with pytest.raises(AssertionError, match="num_epochs x num_minibatches"):
        checks.check_ppo_minibatch_steps(one_epoch)
