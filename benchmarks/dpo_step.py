"""What one DPO optimizer step costs, measured side by side in one run.

On the same GPT-2-shaped model and the same batch of preference pairs, it times
  (a) our DPO step, the one dpo_teach.dpo.train_dpo takes: dpo_batch_loss (one forward pass over
      chosen and rejected together, log-probs of the response positions only, reference log-probs
      precomputed once), then training.gradient_step (backward, clipping, AdamW);
  (b) an SFT step on exactly the same chosen and rejected tokens, with the same log-prob function,
      gradient step and optimizer (the floor: DPO needs no more than one forward and backward over
      those tokens);
  (c) TRL's DPOTrainer step on the same model, data and batch size, with TRL's defaults (on a CPU
      that supports it: bfloat16 autocast, gradient checkpointing), reference log-probs
      precomputed there too (precompute_ref_log_probs=True);
  (c') the same with bf16=False and gradient_checkpointing=False: float32 arithmetic, as ours;
  (a16) our DPO step under bfloat16 autocast, TRL's default arithmetic (not the course's CPU default;
      the log-probs are still taken in float32);
and prints the medians over repeated steps after warm-up and the ratios; with --runs 3 the whole
measurement is repeated and the median of each ratio over the runs is printed last.

    python benchmarks/dpo_step.py --runs 3            # the tiny GPT-2 of data/base_model (CPU)
    python benchmarks/dpo_step.py --model gpt2-124m   # GPT-2 (124M) shape, random weights (GPU)

Goals: a/b <= 1.05 and a/c <= 1.0. Runs offline.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from dpo_teach.dpo import concatenated_batch, dpo_batch_loss, precompute_ref_logps
from dpo_teach.logps import model_sequence_logps
from dpo_teach.models import disable_dropout, load_base_model
from dpo_teach.offline import block_network, offline_environment
from dpo_teach.presets import get_preset
from dpo_teach.settings import DPOConfig
from dpo_teach.training import gradient_step, make_optimizer
from dpo_teach.world import generate_reviews, make_prompt


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """n preference pairs of the review world: a positive continuation preferred to a negative one."""
    import random

    rng = random.Random(seed)
    reviews = generate_reviews(8 * n, seed=seed)
    positive = [r["text"] for r in reviews if r["sentiment"] == "positive"]
    negative = [r["text"] for r in reviews if r["sentiment"] == "negative"]
    pairs = []
    for good, bad in zip(positive[:n], negative[:n]):
        prompt = make_prompt(good, rng)["prompt"]
        pairs.append({"prompt": prompt, "chosen": good[len(prompt):], "rejected": " " + " ".join(bad.split()[len(prompt.split()):])})
    return pairs


def build_model(name: str, tokenizer, device: str):
    if name == "tiny":
        model, _ = load_base_model(get_preset("tiny", device=device))
        return model
    # GPT-2 (124M) exactly: its 50,257-token vocabulary (our ids are a subset), random weights
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return disable_dropout(GPT2LMHeadModel(config)).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, device: str, warmup: int, repeats: int) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def our_steps(model, tokenizer, pairs, device, warmup, repeats):
    """(a) our DPO step, (b) the SFT step on the same tokens and (a16) our DPO step under bfloat16
    autocast, interleaved in one loop."""
    config = DPOConfig(beta=0.1, lr=1e-6)
    ref_chosen, ref_rejected = precompute_ref_logps(model, tokenizer, pairs)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in concatenated_batch(pairs, tokenizer).items()}
    dpo_model, sft_model, bf16_model = (copy.deepcopy(model).train() for _ in range(3))
    dpo_opt, sft_opt, bf16_opt = (make_optimizer(m, config) for m in (dpo_model, sft_model, bf16_model))

    def dpo_step():
        loss, _ = dpo_batch_loss(dpo_model, batch, ref_chosen, ref_rejected, config)
        gradient_step(dpo_model, dpo_opt, loss, config.max_grad_norm)

    def sft_step():
        logps = model_sequence_logps(sft_model, batch)  # (2B,)
        loss = -logps.sum() / batch["loss_mask"][:, 1:].sum()  # mean token NLL over the same tokens
        gradient_step(sft_model, sft_opt, loss, config.max_grad_norm)

    def bf16_step():
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            loss, _ = dpo_batch_loss(bf16_model, batch, ref_chosen, ref_rejected, config)
        gradient_step(bf16_model, bf16_opt, loss, config.max_grad_norm)

    dpo_times, sft_times, bf16_times = [], [], []
    for _ in range(3):  # interleave rounds so that machine noise hits all alike
        dpo_times += time_steps(dpo_step, device, warmup, repeats // 3)
        sft_times += time_steps(sft_step, device, warmup, repeats // 3)
        bf16_times += time_steps(bf16_step, device, warmup, repeats // 3)
    tokens = int(batch["attention_mask"].sum())
    return dpo_times, sft_times, bf16_times, tokens


class StepTimer(TrainerCallback):
    def __init__(self, device):
        self.device, self.times, self._start = device, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def trl_steps(model, tokenizer, pairs, device, warmup, repeats, **settings):
    """(c) TRL's DPOTrainer on the same model, data and batch size (imported here only); `settings`
    replace TRL's defaults (e.g. bf16=False, gradient_checkpointing=False)."""
    import datasets
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    steps = warmup + repeats
    data = datasets.Dataset.from_list(pairs * steps)  # the same batch, `steps` times, in order
    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(output_dir=out, per_device_train_batch_size=len(pairs), max_steps=steps,
                         learning_rate=1e-6, beta=0.1, precompute_ref_log_probs=True, report_to=[],
                         logging_strategy="no", save_strategy="no", use_cpu=not device.startswith("cuda"),
                         dataloader_num_workers=0, max_length=None, disable_tqdm=True, seed=0, **settings)
        timer = StepTimer(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=None, args=args, train_dataset=data,
                                 processing_class=tokenizer, callbacks=[timer])
            trainer.train()  # reference log-probs were precomputed in __init__, outside the timed steps
    return timer.times[warmup:]


def measure(args, model, tokenizer, pairs, device) -> dict[str, float]:
    """One side-by-side measurement: medians of (a), (b), (c), (c') in seconds, and tokens per batch."""
    dpo_times, sft_times, bf16_times, tokens = our_steps(model, tokenizer, pairs, device, args.warmup, args.repeats)
    result = {"a": statistics.median(dpo_times), "b": statistics.median(sft_times),
              "a16": statistics.median(bf16_times), "tokens": tokens}
    if not args.skip_trl:
        result["c"] = statistics.median(trl_steps(model, tokenizer, pairs, device, args.warmup, args.repeats))
        result["c'"] = statistics.median(trl_steps(model, tokenizer, pairs, device, args.warmup, args.repeats,
                                                   bf16=False, gradient_checkpointing=False))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "gpt2-124m"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement; medians of the ratios")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    import os

    os.environ.update(offline_environment())
    block_network()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = get_preset("tiny", device=device)
    _, tokenizer = load_base_model(preset)
    model = build_model(args.model, tokenizer, device)
    pairs = make_pairs(args.batch_size)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device} ({machine})")
    ratios = []
    for run in range(args.runs):
        r = measure(args, model, tokenizer, pairs, device)
        print(f"run {run + 1}: batch {args.batch_size} pairs = {2 * args.batch_size} sequences, {r['tokens']} tokens; "
              f"medians over {args.repeats // 3 * 3} steps after {args.warmup} warm-up steps")
        names = {"a": "(a) our DPO step", "b": "(b) SFT step, same tokens", "c": "(c) TRL DPOTrainer, defaults",
                 "c'": "(c') TRL, float32, no checkpointing", "a16": "(a16) our DPO step, bf16 autocast"}
        for key, name in names.items():
            if key in r:
                print(f"  {name:<38} {r[key] * 1000:8.1f} ms   {r['tokens'] / r[key]:10.0f} tokens/s")
        ratio = {"a/b": r["a"] / r["b"]}
        if "c" in r:
            ratio.update({"a/c": r["a"] / r["c"], "a/c'": r["a"] / r["c'"], "a16/c": r["a16"] / r["c"]})
        print("  " + "   ".join(f"{k} = {v:.3f}" for k, v in ratio.items()))
        ratios.append(ratio)
    if args.runs > 1:
        print(f"medians over {args.runs} runs: " + "   ".join(
            f"{k} = {statistics.median(r[k] for r in ratios):.3f}" for k in ratios[0]) + "   (goals: a/b <= 1.05, a/c <= 1.0)")


if __name__ == "__main__":
    main()
