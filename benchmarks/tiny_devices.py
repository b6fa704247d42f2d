"""Does the tiny preset gain anything on a GPU? Its two costly operations, timed on each device side by side.

On the tiny GPT-2 of data/base_model it times, on the CPU (with the threads of a laptop, --threads)
and on every accelerator present (CUDA; mps where it exists), in one run:
  (step)   one DPO optimizer step of the tiny preset: 32 pairs, one forward and backward over chosen
           and rejected together (dpo_teach.dpo.dpo_batch_loss), gradient clipping, AdamW;
  (sample) sampling one 40-token response for each of 64 prompts (dpo_teach.sampling.generate), the
           cost of building pairs, of PPO's rollouts and of every evaluation;
and prints the median seconds of each after warm-up and the ratio accelerator / CPU (below 1: the
accelerator is faster). Each device runs in its default arithmetic (training.default_precision):
float32 on the CPU, bfloat16 autocast on a recent GPU. The README ("On a GPU") gives the numbers of
one run and why the tiny preset's default device stays the CPU all the same.

    python benchmarks/tiny_devices.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from dpo_step import make_pairs  # benchmarks/dpo_step.py: review-world pairs

from dpo_teach.dpo import concatenated_batch, dpo_batch_loss, precompute_ref_logps
from dpo_teach.models import frozen_copy, load_base_model
from dpo_teach.presets import get_preset
from dpo_teach.sampling import generate
from dpo_teach.settings import DPOConfig
from dpo_teach.training import gradient_step, make_optimizer
from dpo_teach.world import load_prompts


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _median_seconds(fn, device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_device(device: str, repeats: int) -> dict[str, float]:
    """Median seconds of one DPO step and of one sampling batch of the tiny preset on `device`."""
    preset = get_preset("tiny", device=device)
    policy, tokenizer = load_base_model(preset)
    ref_model = frozen_copy(policy)
    config = DPOConfig()
    pairs = make_pairs(config.batch_size)
    lengths = dict(max_prompt_tokens=preset.max_prompt_tokens, max_response_tokens=preset.max_response_tokens)
    ref_chosen, ref_rejected = precompute_ref_logps(ref_model, tokenizer, pairs, **lengths)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in concatenated_batch(pairs, tokenizer, **lengths).items()}
    optimizer = make_optimizer(policy, config)
    policy.train()

    def step():
        loss, _ = dpo_batch_loss(policy, batch, ref_chosen.to(device), ref_rejected.to(device), config)
        gradient_step(policy, optimizer, loss, config.max_grad_norm)

    prompts = load_prompts(preset, "test", n=64)

    def sample():
        generate(policy, tokenizer, prompts, max_new_tokens=preset.max_new_tokens)

    return {"step": _median_seconds(step, device, repeats), "sample": _median_seconds(sample, device, max(3, repeats // 3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (a laptop's: 2 to 4)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    results = {device: time_device(device, args.repeats) for device in devices}
    for device, seconds in results.items():
        print(f"{device:>5}: DPO step {seconds['step'] * 1000:7.1f} ms, sampling 64 x 40 tokens {seconds['sample'] * 1000:7.1f} ms")
    for device in devices[1:]:
        ratios = {k: results[device][k] / results["cpu"][k] for k in ("step", "sample")}
        print(f"{device} / cpu ({args.threads} threads): DPO step {ratios['step']:.2f}, sampling {ratios['sample']:.2f}")
        results[f"{device}/cpu"] = ratios
    results["threads"] = args.threads
    results["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
