"""What one DPO optimizer step costs, measured side by side in one run.

On the same GPT-2-shaped model and the same batch of preference pairs, it times
  (a) our DPO step (dpo_teach.dpo): one forward pass over chosen and rejected together, reference
      log-probs precomputed once, the loss, backward, AdamW;
  (b) a plain SFT step on exactly the same chosen and rejected tokens (the floor: DPO needs no more
      than one forward and backward over those tokens);
  (c) TRL's DPOTrainer step on the same model, data and batch size, reference log-probs
      precomputed there too (precompute_ref_log_probs=True);
and prints the medians over repeated steps after warm-up and the ratios a/b and a/c.

    python benchmarks/dpo_step.py                     # the tiny GPT-2 of data/base_model (CPU)
    python benchmarks/dpo_step.py --model gpt2-124m   # GPT-2 (124M) shape, random weights (GPU)

Goals: a/b <= 1.15 and a/c <= 1.0. Runs offline.
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

from dpo_teach.dpo import DPOConfig, concatenated_batch, dpo_batch_loss, precompute_ref_logps
from dpo_teach.logps import sequence_logps
from dpo_teach.models import disable_dropout, load_base_model
from dpo_teach.offline import block_network, offline_environment
from dpo_teach.presets import get_preset
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
    """(a) our DPO step and (b) the SFT step on the same tokens, interleaved in one loop."""
    config = DPOConfig(beta=0.1)
    ref_chosen, ref_rejected = precompute_ref_logps(model, tokenizer, pairs)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in concatenated_batch(pairs, tokenizer).items()}
    dpo_model, sft_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    dpo_opt = torch.optim.AdamW(dpo_model.parameters(), lr=1e-6)
    sft_opt = torch.optim.AdamW(sft_model.parameters(), lr=1e-6)

    def dpo_step():
        loss, _ = dpo_batch_loss(dpo_model, batch, ref_chosen, ref_rejected, config)
        dpo_opt.zero_grad(set_to_none=True)
        loss.backward()
        dpo_opt.step()

    def sft_step():
        logits = sft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["labels"], batch["loss_mask"])  # (2B,)
        loss = -logps.sum() / batch["loss_mask"].sum()  # mean token NLL over the same tokens
        sft_opt.zero_grad(set_to_none=True)
        loss.backward()
        sft_opt.step()

    dpo_times, sft_times = [], []
    for _ in range(3):  # interleave rounds so that machine noise hits both alike
        dpo_times += time_steps(dpo_step, device, warmup, repeats // 3)
        sft_times += time_steps(sft_step, device, warmup, repeats // 3)
    tokens = int(batch["attention_mask"].sum())
    return dpo_times, sft_times, tokens


class StepTimer(TrainerCallback):
    def __init__(self, device):
        self.device, self.times, self._start = device, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def trl_steps(model, tokenizer, pairs, device, warmup, repeats):
    """(c) TRL's DPOTrainer on the same model, data and batch size (imported here only)."""
    import datasets
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    steps = warmup + repeats
    data = datasets.Dataset.from_list(pairs * steps)  # the same batch, `steps` times, in order
    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(output_dir=out, per_device_train_batch_size=len(pairs), max_steps=steps,
                         learning_rate=1e-6, beta=0.1, precompute_ref_log_probs=True, report_to=[],
                         logging_strategy="no", save_strategy="no", use_cpu=not device.startswith("cuda"),
                         dataloader_num_workers=0, max_length=None, disable_tqdm=True, seed=0)
        timer = StepTimer(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=None, args=args, train_dataset=data,
                                 processing_class=tokenizer, callbacks=[timer])
            trainer.train()  # reference log-probs were precomputed in __init__, outside the timed steps
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "gpt2-124m"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
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

    dpo_times, sft_times, tokens = our_steps(model, tokenizer, pairs, device, args.warmup, args.repeats)
    a, b = statistics.median(dpo_times), statistics.median(sft_times)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device} ({machine})")
    print(f"batch: {args.batch_size} pairs = {2 * args.batch_size} sequences, {tokens} tokens; "
          f"medians over {len(dpo_times)} steps after {args.warmup} warm-up steps")
    print(f"(a) our DPO step          {a * 1000:8.1f} ms   {tokens / a:10.0f} tokens/s")
    print(f"(b) SFT step, same tokens {b * 1000:8.1f} ms   {tokens / b:10.0f} tokens/s")
    print(f"a/b = {a / b:.3f}   (goal <= 1.15)")
    if not args.skip_trl:
        trl_times = trl_steps(model, tokenizer, pairs, device, args.warmup, args.repeats)
        c = statistics.median(trl_times)
        print(f"(c) TRL DPOTrainer step   {c * 1000:8.1f} ms   {tokens / c:10.0f} tokens/s")
        print(f"a/c = {a / c:.3f}   (goal <= 1.0)")


if __name__ == "__main__":
    main()
