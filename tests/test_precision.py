"""Mixed precision: float32 on the CPU by default, bfloat16 or float16 (with a gradient scaler) on CUDA;
log-probs, rewards, values and losses in float32 either way. The autocast paths run here on the CPU."""

import pytest
import torch

from dpo_teach import training
from dpo_teach.dpo import concatenated_batch, dpo_batch_loss, precompute_ref_logps
from dpo_teach.logps import build_batch, model_sequence_logps
from dpo_teach.models import frozen_copy
from dpo_teach.ppo import PolicyWithValueHead, response_logits_and_values
from dpo_teach.reward import RewardModel
from dpo_teach.settings import DPOConfig
from dpo_teach.training import PRECISION_ENV, autocast, default_precision, grad_scaler

PAIRS = [{"prompt": "The acting was", "chosen": " wonderful and warm.", "rejected": " dull."},
         {"prompt": "I watched", "chosen": " a charming comedy.", "rejected": " a boring western with a weak plot."}] * 4


def test_float32_is_the_default_on_the_cpu(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert default_precision("cpu") == "float32"
    with autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert grad_scaler("cpu") is None


@pytest.mark.parametrize("capability, expected", [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 5), "float16")])
def test_cuda_defaults_to_mixed_precision(monkeypatch, capability, expected):
    """Ampere and later GPUs (H100 9.0, A100 8.0) get bfloat16; a T4 (7.5: bfloat16 only emulated)
    gets float16."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
    assert default_precision("cuda") == expected
    assert default_precision(torch.device("cuda", 0)) == expected


def test_environment_overrides_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "bfloat16")
    assert default_precision("cpu") == "bfloat16"
    monkeypatch.setenv(PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match=PRECISION_ENV):
        default_precision("cpu")
    with pytest.raises(ValueError, match="precision"):
        DPOConfig(precision="half")


def test_only_float16_gets_a_gradient_scaler():
    assert grad_scaler("cpu", "bfloat16") is None and grad_scaler("cpu", "float32") is None
    assert isinstance(grad_scaler("cpu", "float16"), torch.amp.GradScaler)


def test_autocast_turns_on_for_the_asked_precision():
    with autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_rewards_values_and_logps_come_out_in_float32_under_autocast(tiny_model, tokenizer, precision):
    """Every number a loss is computed from is float32, whatever the forward pass's arithmetic; and
    close to the float32 computation (16-bit arithmetic keeps 8 to 11 bits of mantissa)."""
    batch = build_batch([{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS], tokenizer)
    reward_model = RewardModel.from_policy(tiny_model)
    torch.nn.init.normal_(reward_model.score.weight)
    head = PolicyWithValueHead(tiny_model)
    torch.nn.init.normal_(head.value_head.weight)
    prompt_ids, prompt_mask = batch["input_ids"][:, :3], batch["attention_mask"][:, :3]
    response_ids, response_mask = batch["input_ids"][:, 3:], batch["attention_mask"][:, 3:]

    def numbers():
        with torch.no_grad():
            logits, values = response_logits_and_values(head, prompt_ids, prompt_mask, response_ids, response_mask)
            return {"logps": model_sequence_logps(tiny_model, batch),
                    "reward": reward_model(batch["input_ids"], batch["attention_mask"]),
                    "logits": logits, "values": values}

    full = numbers()
    with autocast("cpu", precision):
        low = numbers()
    for name, value in low.items():
        assert value.dtype == torch.float32, f"{name} under {precision} autocast is {value.dtype}"
        scale = full[name].abs().max().item() + 1
        assert (value - full[name]).abs().max().item() < 0.05 * scale, f"{name} under {precision} strays"


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_dpo_trains_under_mixed_precision_like_float32(tiny_model, tokenizer, precision):
    """Five DPO steps in each arithmetic from the same start: the first loss is log 2 in both (policy
    == reference), and the losses stay within 0.02 of the float32 run's; float16 goes through the
    gradient scaler."""
    ref_model = frozen_copy(tiny_model)
    histories = {}
    for arithmetic in ("float32", precision):
        policy = frozen_copy(tiny_model).requires_grad_(True)
        config = DPOConfig(num_steps=5, batch_size=len(PAIRS), lr=1e-3, warmup_steps=1, eval_every=0,
                           precision=arithmetic)
        ref = precompute_ref_logps(ref_model, tokenizer, PAIRS)
        batch = concatenated_batch(PAIRS, tokenizer)

        def batch_loss(_, policy=policy, config=config, batch=batch, ref=ref):
            loss, metrics = dpo_batch_loss(policy, batch, *ref, config)
            assert loss.dtype == torch.float32
            return loss, metrics, 2 * len(PAIRS), int(batch["attention_mask"].sum())

        histories[arithmetic] = training.train(policy, batch_loss, iter(range(5)), config, progress=False)
    full, low = histories["float32"]["train/loss"], histories[precision]["train/loss"]
    assert abs(low[0] - torch.log(torch.tensor(2.0)).item()) < 1e-3
    assert len(low) == 5 and max(abs(a - b) for a, b in zip(full, low)) < 0.02
    assert low[-1] < low[0], "the 16-bit run learns too"
