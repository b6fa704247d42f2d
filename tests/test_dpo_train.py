"""DPO on a language model: one forward pass for chosen and rejected, reference log-probs computed
once, TRL's metrics, and equality with what TRL computes on the same batch."""

import copy
import math
import tempfile
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_teach import training
from dpo_teach.dpo import (
    concatenated_batch,
    dpo_batch_loss,
    dpo_loss,
    dpo_metrics,
    evaluate_pairs,
    pair_logps,
    precompute_ref_logps,
    train_dpo,
)
from dpo_teach.logps import build_batch, model_sequence_logps, sequence_logps
from dpo_teach.models import frozen_copy
from dpo_teach.settings import DPOConfig
from dpo_teach.utils import shuffled_batches
from dpo_teach.variants import train_variant, variant_config

PAIRS = [
    {"prompt": "I watched", "chosen": " a great film. Highly recommended.", "rejected": " a dull film."},
    {"prompt": "The acting was", "chosen": " superb.", "rejected": " bad and the plot was boring."},
    {"prompt": "What a", "chosen": " lovely comedy.", "rejected": " terrible western."},
    {"prompt": "The plot", "chosen": " is never boring.", "rejected": " is boring."},
] * 4


def test_concatenated_batch_puts_chosen_then_rejected(tokenizer):
    batch = concatenated_batch(PAIRS[:3], tokenizer)
    chosen = build_batch(PAIRS[:3], tokenizer, "chosen")
    rejected = build_batch(PAIRS[:3], tokenizer, "rejected")
    assert batch["input_ids"].shape[0] == 6
    for half, part in ((slice(0, 3), chosen), (slice(3, 6), rejected)):
        width = part["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][half, :width], part["input_ids"])
        assert torch.equal(batch["loss_mask"][half, :width], part["loss_mask"])
        assert batch["loss_mask"][half, width:].sum() == 0


def test_one_forward_equals_separate_forwards(tiny_model, tokenizer):
    with torch.no_grad():
        chosen_logps, rejected_logps = pair_logps(tiny_model, concatenated_batch(PAIRS[:4], tokenizer))
        alone_chosen = model_sequence_logps(tiny_model, build_batch(PAIRS[:4], tokenizer, "chosen"))
        alone_rejected = model_sequence_logps(tiny_model, build_batch(PAIRS[:4], tokenizer, "rejected"))
    torch.testing.assert_close(chosen_logps, alone_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected_logps, alone_rejected, atol=1e-5, rtol=1e-5)


def counting(model):
    """`model`, counting its forward passes in model.calls: every pass runs its transformer trunk
    (base_model), whether through model(...) or through model_sequence_logps."""
    model.calls = 0

    def count(*args):
        model.calls += 1

    model.base_model.register_forward_hook(count)
    return model


def test_reference_is_run_once_per_data_set_not_during_training(tiny_model, tokenizer):
    ref_model = counting(frozen_copy(tiny_model))
    with torch.no_grad():
        ref_model(input_ids=torch.tensor([[1, 2]]))
        model_sequence_logps(ref_model, build_batch(PAIRS[:2], tokenizer, "chosen"))
    assert ref_model.calls == 2, "the counter sees both ways of running the model"
    ref_model.calls = 0
    policy = copy.deepcopy(tiny_model)
    config = DPOConfig(num_steps=6, batch_size=4, eval_every=3)
    train_dpo(policy, tokenizer, PAIRS, config, ref_model=ref_model, eval_pairs=PAIRS[:4], progress=False)
    assert ref_model.calls == 2, "one batch of 16 training pairs and one of 4 held-out pairs, nothing more"


def test_first_loss_is_log2_and_training_separates_the_pairs(tiny_model, tokenizer):
    policy = copy.deepcopy(tiny_model)
    before = [p.detach().clone() for p in policy.parameters()]
    config = DPOConfig(num_steps=30, batch_size=8, lr=1e-3, beta=0.5, eval_every=10)
    history = train_dpo(policy, tokenizer, PAIRS, config, ref_model=frozen_copy(tiny_model),
                        eval_pairs=PAIRS[:4], progress=False)
    assert history["train/loss"][0] == pytest.approx(math.log(2), abs=1e-6), "policy == reference at step 0"
    assert history["eval/loss"][-1] < 0.5 * math.log(2)
    assert history["eval/rewards/accuracies"][-1] == 1.0
    assert history["eval/rewards/margins"][-1] > history["eval/rewards/margins"][0]
    assert history["eval/step"] == [0, 10, 20, 30]
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters()))
    assert history["tokens"][-1] > 0 and history["sequences"][-1] == 2 * 30 * 8
    trl_names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"}
    assert {f"train/{k}" for k in trl_names} <= set(history) and {f"eval/{k}" for k in trl_names} <= set(history)


def test_training_is_deterministic(tiny_model, tokenizer):
    runs = []
    for _ in range(2):
        policy = copy.deepcopy(tiny_model)
        runs.append(train_dpo(policy, tokenizer, PAIRS, DPOConfig(num_steps=5, batch_size=4, lr=1e-3),
                              ref_model=frozen_copy(tiny_model), progress=False)["train/loss"])
    assert runs[0] == runs[1]


def test_train_dpo_is_the_loop_written_out(tiny_model, tokenizer):
    """train_dpo (dpo_teach.training.train), train_variant("sigmoid") and the loop written out by
    hand on the same seeded batches, with the same AdamW (the config's betas, no weight decay) and
    warm-up: every number of the history is the same, to the last bit, and so are the trained weights."""
    config = DPOConfig(num_steps=7, batch_size=4, lr=2e-3, warmup_steps=3, eval_every=3, seed=1)
    ref = frozen_copy(tiny_model)
    ref_logps = precompute_ref_logps(ref, tokenizer, PAIRS)
    eval_ref_logps = precompute_ref_logps(ref, tokenizer, PAIRS[:4])

    policy = copy.deepcopy(tiny_model)
    assert config.weight_decay == 0.0 and config.schedule == "constant"
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    by_hand = defaultdict(list)

    def evaluate(step):
        by_hand["eval/step"].append(step)
        for key, value in evaluate_pairs(policy, tokenizer, PAIRS[:4], eval_ref_logps, config).items():
            by_hand[f"eval/{key}"].append(value)

    evaluate(0)
    policy.train()
    tokens = 0
    for step, index in zip(range(config.num_steps), shuffled_batches(len(PAIRS), config.batch_size, config.seed)):
        batch = concatenated_batch([PAIRS[i] for i in index], tokenizer)
        loss, metrics = dpo_batch_loss(policy, batch, ref_logps[0][index], ref_logps[1][index], config)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        tokens += int(batch["attention_mask"].sum())
        by_hand["step"].append(step)
        by_hand["lr"].append(lr)
        by_hand["sequences"].append(2 * (step + 1) * config.batch_size)
        by_hand["tokens"].append(tokens)
        for key, value in metrics.items():
            by_hand[f"train/{key}"].append(value)
        if (step + 1) % config.eval_every == 0 or step == config.num_steps - 1:
            evaluate(step + 1)

    for train, run_config in ((train_dpo, config), (train_variant, variant_config("sigmoid", config))):
        trained = copy.deepcopy(tiny_model)
        history = train(trained, tokenizer, PAIRS, run_config, ref_logps=ref_logps, eval_pairs=PAIRS[:4],
                        eval_ref_logps=eval_ref_logps, progress=False)
        assert list(history)[:6] == ["step", "lr", "seconds", "sequences", "tokens", "eval/step"], train.__name__
        assert {key: value for key, value in history.items() if key != "seconds"} == dict(by_hand), train.__name__
        assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), policy.parameters())), train.__name__
    assert by_hand["eval/step"] == [0, 3, 6, 7] and by_hand["train/loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert by_hand["lr"][:4] == pytest.approx([config.lr / 3, 2 * config.lr / 3, config.lr, config.lr])


def test_seconds_exclude_evaluation_and_eval_fn_changes_nothing(tiny_model, tokenizer, monkeypatch):
    """A clock that only evaluations move: the training itself then took no time. eval_fn draws
    random numbers, in a forked stream, so the losses are those of a run without it."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def slow_eval_fn(policy):
        clock.now += 100.0
        return {"random": torch.rand(()).item()}

    config = DPOConfig(num_steps=4, batch_size=4, lr=1e-3, eval_every=2)
    ref_logps = precompute_ref_logps(tiny_model, tokenizer, PAIRS)
    history = train_dpo(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_logps=ref_logps,
                        eval_fn=slow_eval_fn, progress=False)
    plain = train_dpo(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_logps=ref_logps, progress=False)
    assert clock.now == 300.0 and history["eval/step"] == [0, 2, 4] and len(history["eval/random"]) == 3
    assert history["seconds"] == [0.0] * 4
    assert history["train/loss"] == plain["train/loss"]


def test_sequences_count_what_the_policy_read(tiny_model, tokenizer):
    """Fewer pairs than batch_size: each batch is all 3 pairs, 6 sequences."""
    history = train_dpo(copy.deepcopy(tiny_model), tokenizer, PAIRS[:3], DPOConfig(num_steps=2, batch_size=4),
                        ref_model=frozen_copy(tiny_model), progress=False)
    assert history["sequences"] == [6, 12]


def test_bad_input_is_named(tiny_model, tokenizer):
    ref_logps = precompute_ref_logps(tiny_model, tokenizer, PAIRS)
    with pytest.raises(ValueError, match="ref_logps has 16 entries for 3 pairs"):
        train_dpo(tiny_model, tokenizer, PAIRS[:3], DPOConfig(num_steps=1), ref_logps=ref_logps, progress=False)
    broken = PAIRS[:5] + [{"prompt": "The plot", "chosen": " is fine."}]
    with pytest.raises(ValueError, match="record 5: missing field 'rejected'"):
        precompute_ref_logps(tiny_model, tokenizer, broken)
    with pytest.raises(ValueError, match="needs ref_logps or a ref_model"):
        train_dpo(tiny_model, tokenizer, PAIRS, DPOConfig(num_steps=1), progress=False)


def test_length_normalised_option_averages(tiny_model, tokenizer):
    batch = concatenated_batch(PAIRS[:4], tokenizer)
    with torch.no_grad():
        total = torch.cat(pair_logps(tiny_model, batch))
        mean = torch.cat(pair_logps(tiny_model, batch, average=True))
    torch.testing.assert_close(mean, total / batch["loss_mask"].sum(1))


# ---- Equality with TRL ------------------------------------------------------------------------


def _trl_trainer(model, tokenizer, pairs):
    trl = pytest.importorskip("trl")
    import datasets

    folder = tempfile.mkdtemp()
    args = trl.DPOConfig(output_dir=folder, per_device_train_batch_size=len(pairs), report_to=[], use_cpu=True,
                         beta=0.1, max_length=None, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOTrainer(model=model, ref_model=frozen_copy(model), args=args,
                              train_dataset=datasets.Dataset.from_list(pairs), processing_class=tokenizer)


def test_sequence_logps_equal_trls_on_the_same_batch(tiny_model, tokenizer):
    trainer = _trl_trainer(tiny_model, tokenizer, PAIRS[:4])
    batch = next(iter(trainer.get_train_dataloader()))  # TRL's own tokenization: rows [chosen..., rejected...]
    trainer.model.train()  # TRL logs under "train" in training mode (dropout is off in this model)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])  # (2B,)
    for i in range(4):  # one pair at a time, so TRL's logged batch means are per-sequence values
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, {k: v[[i, i + 4]] for k, v in batch.items()})
        theirs = torch.tensor([trainer._metrics["train"]["logps/chosen"][0], trainer._metrics["train"]["logps/rejected"][0]])
        torch.testing.assert_close(ours[[i, i + 4]], theirs, rtol=1e-6, atol=1e-6)


def test_metrics_equal_trls_on_identical_log_probs():
    """TRL's DPOTrainer._compute_loss on a stand-in model whose per-token log-probs sum to the
    sequence log-probs we give, reference log-probs precomputed: its logged metrics and ours."""
    trl = pytest.importorskip("trl")
    generator = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-20 + 5 * torch.randn(6, generator=generator) for _ in range(4))
    seq_len, length = 8, 5
    logps = torch.cat([pc, pr])  # (2B,)
    completion_mask = (torch.arange(seq_len)[None, :] >= seq_len - length).long().expand(12, -1)
    per_token = completion_mask[:, 1:].float() * (logps / length)[:, None]  # sums to logps

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x, device=torch.device("cpu"))
    trainer = SimpleNamespace(model=model, accelerator=identity, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                              loss_weights=[1.0], beta=0.1, label_smoothing=0.0, use_weighting=False,
                              _total_train_tokens=0, _tp_size=1,
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"input_ids": torch.zeros(12, seq_len, dtype=torch.long), "attention_mask": torch.ones(12, seq_len),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    ours = dpo_metrics(losses, chosen_rewards, rejected_rewards, pc, pr)
    assert ours["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(trainer._metrics["train"][name][0], abs=1e-6), name
