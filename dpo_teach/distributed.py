"""DPO on several processes: the course's DPO step (dpo.dpo_batch_loss) made data-parallel with
Hugging Face accelerate, the engine TRL's trainers run on (notebook 12, "scaling out").

    python -m dpo_teach.distributed --steps 20 --out runs/one                               # one process
    torchrun --nproc_per_node 2 -m dpo_teach.distributed --steps 20 --out runs/two          # two processes
    accelerate launch --multi_gpu --num_processes 8 -m dpo_teach.distributed --out runs/8   # 8 GPUs of a node

torch.distributed's launcher (torchrun) starts the processes and tells each its rank; accelerate,
inside each, sets up the process group: gloo between CPU processes (on a machine without a GPU, or
with --cpu), NCCL between GPUs. `accelerate launch` is a front end to the same launcher that also
reads an accelerate config file (notebook 12 shows one).

What changes with P processes and A gradient-accumulation steps, and what must not:

- The global batch does not change. Optimizer step k reads the same config.batch_size pairs, in the
  same order, as dpo.train_dpo on one process (utils.shuffled_batches with config.seed). They are cut
  into P x A micro-batches of equal size; process p takes micro-batches p, P + p, 2P + p, ...
- The gradient does not change. Each micro-batch's mean loss is divided by A before backward
  (accelerator.backward); during the step's last backward, DDP averages the gradients over the P
  processes. The result is the gradient of the mean loss over all batch_size pairs.
- The reference log-probs are computed once, before the first step, from the policy itself (it
  starts as the reference, so no second model is held). Each process computes those of its own
  shard of the pairs (accelerator.split_between_processes); the shards are then gathered, so that
  every process holds all of them.
- The metrics are gathered: dpo.dpo_metrics are plain means over pairs, so the micro-batches'
  means, combined over A and P (combine_means), are the means over the step's pairs, as one process
  logs them. The held-out metrics: each process evaluates a shard; the shards' means are combined
  the same way, each weighted by its shard's size.
- Mixed precision follows the preset (training.default_precision): float32 on a CPU, bfloat16 or
  float16 on a GPU, handed to accelerate, which also keeps the float16 gradient scaler.
- The main process alone writes the checkpoint and the history and shows the progress bar.

With P = A = 1 the run is dpo.train_dpo's, step for step (tests/test_distributed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpo_teach.dpo import (
    as_records,
    concatenated_batch,
    dpo_batch_loss,
    dpo_config,
    evaluate_pairs,
    precompute_ref_logps,
)
from dpo_teach.logps import SequenceLogps
from dpo_teach.settings import DPOConfig
from dpo_teach.training import append, default_precision, lr_at, make_optimizer, record_eval
from dpo_teach.utils import shuffled_batches

__all__ = ["MIXED_PRECISION", "launch_command", "run_processes", "micro_batches", "combine_means", "gathered_ref_logps", "gathered_eval", "train_dpo_distributed", "main"]

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}  # the course's names -> accelerate's


def launch_command(processes: int, args: list[str]) -> list[str]:
    """The command that runs `args` (["-m", module, ...] or [script, ...]) on `processes` processes:
    python itself for one; for more, torch.distributed's launcher (torchrun) on a free local port.
    accelerate, inside each process, reads the ranks torchrun sets."""
    if processes == 1:
        return [sys.executable, *args]
    with socket.socket() as s:  # a port no other job is listening on, for the processes to meet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(port), *args]


def run_processes(processes: int, args: list[str], threads: int = 1, cpu: bool = True,
                  timeout: int = 600) -> subprocess.CompletedProcess:
    """Run launch_command(processes, args) offline from the repository's root, `threads` CPU threads
    per process, on the CPU (or, with cpu=False, one GPU per process); raise RuntimeError with the
    processes' output if it fails."""
    from dpo_teach.offline import offline_environment
    from dpo_teach.presets import REPOSITORY

    command = launch_command(processes, args)
    env = {**os.environ, **offline_environment(), "OMP_NUM_THREADS": str(threads)}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def micro_batches(index: list[int], num_processes: int, accumulation: int) -> list[list[list[int]]]:
    """The pairs of one optimizer step, cut for P processes and A accumulation steps: element p is
    process p's list of A micro-batches (micro-batch a of process p is piece a * P + p)."""
    pieces = num_processes * accumulation
    if len(index) % pieces:
        raise ValueError(f"a batch of {len(index)} pairs cannot be cut into {num_processes} processes x "
                         f"{accumulation} accumulation steps of equal size: choose a batch size divisible by {pieces}")
    size = len(index) // pieces
    cut = [index[i * size:(i + 1) * size] for i in range(pieces)]
    return [[cut[a * num_processes + p] for a in range(accumulation)] for p in range(num_processes)]


def gathered_ref_logps(accelerator, model, tokenizer, records: list[dict], config: DPOConfig,
                       **lengths) -> tuple[Tensor, Tensor]:
    """The reference log-probs of every pair, (chosen, rejected), each (N,), on every process: each
    process computes those of its shard, then the shards are gathered in order."""
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(records) as shard:
        part = precompute_ref_logps(model, tokenizer, shard, average=config.average_logps, precision=config.precision,
                                    **lengths) if shard else (torch.empty(0), torch.empty(0))
    parts = gather_object([part])  # one (chosen, rejected) per process, in process order
    return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])


def combine_means(sizes: Tensor, means: Tensor) -> Tensor:
    """The means over all examples, from pieces of the data: sizes (K,), the examples in each piece;
    means (K, M), each piece's means of M metrics. Shape: (M,). Each piece's mean weighs by its size:
    a mean of the means would let an example of a small piece count for more."""
    weights = sizes.to(means.dtype) / sizes.sum()  # (K,)
    return (weights.unsqueeze(1) * means).sum(dim=0)  # (M,)


def gathered_eval(accelerator, model, tokenizer, records: list[dict], ref_logps: tuple[Tensor, Tensor],
                  config: DPOConfig, **lengths) -> dict[str, float]:
    """dpo.evaluate_pairs on the whole held-out set, computed in shards: each process evaluates its
    shard, and the shards' means are combined (combine_means)."""
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(list(range(len(records)))) as shard:
        part = [(len(shard), evaluate_pairs(model, tokenizer, [records[i] for i in shard],
                                            (ref_logps[0][shard], ref_logps[1][shard]), config, **lengths))] if shard else []
    parts = gather_object(part)  # (size, metrics) of every process that had a shard
    names = list(parts[0][1])
    means = combine_means(torch.tensor([n for n, _ in parts]), torch.tensor([[m[k] for k in names] for _, m in parts],
                                                                             dtype=torch.float64))
    return dict(zip(names, means.tolist()))


def train_dpo_distributed(accelerator, policy, tokenizer, train_pairs, config: DPOConfig, eval_pairs=None,
                          progress: bool = True, **lengths) -> dict[str, list]:
    """Train `policy` in place with DPO on this process's share of every step (module docstring);
    return the history, the same on every process, in dpo.train_dpo's format: "step", "lr",
    "seconds", "sequences", "tokens", "train/<m>" and, at "eval/step", "eval/<m>" on eval_pairs."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ValueError(f"dpo_teach.distributed is data parallelism (DDP) only, not {accelerator.distributed_type}: "
                         "for FSDP or DeepSpeed use TRL's DPOTrainer (notebook 12, section 5)")
    records = as_records(train_pairs)
    eval_records = as_records(eval_pairs) if eval_pairs is not None else None
    num_processes, accumulation = accelerator.num_processes, accelerator.gradient_accumulation_steps
    micro_batches(list(range(config.batch_size)), num_processes, accumulation)  # fail now, not at step 0
    ref = gathered_ref_logps(accelerator, policy, tokenizer, records, config, **lengths)  # before any step
    eval_ref = gathered_ref_logps(accelerator, policy, tokenizer, eval_records, config, **lengths) if eval_records else None
    model, optimizer = accelerator.prepare(SequenceLogps(policy), make_optimizer(policy, config))
    history: dict[str, list] = {"step": [], "lr": [], "seconds": [], "sequences": [], "tokens": []}
    evaluating = eval_records is not None and config.eval_every > 0

    def evaluate() -> dict[str, float]:
        return gathered_eval(accelerator, policy, tokenizer, eval_records, eval_ref, config, **lengths)

    if evaluating:
        record_eval(history, policy, evaluate, 0)
    sequences = tokens = 0
    eval_seconds, start = 0.0, time.perf_counter()
    model.train()
    bar = tqdm(range(config.num_steps), desc=f"DPO x{num_processes} processes", disable=not (
        progress and accelerator.is_main_process))
    batches = shuffled_batches(len(records), config.batch_size, config.seed)  # the same on every process
    for step, index in zip(bar, batches):
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine, step_metrics, step_tokens = micro_batches(index, num_processes, accumulation)[accelerator.process_index], [], 0
        for micro in mine:
            with accelerator.accumulate(model):  # no gradient sync until the last micro-batch
                batch = concatenated_batch([records[i] for i in micro], tokenizer, **lengths)
                loss, metrics = dpo_batch_loss(model, batch, ref[0][micro], ref[1][micro], config)
                accelerator.backward(loss)  # loss / A; on the last micro-batch DDP averages over processes
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch
                optimizer.zero_grad(set_to_none=True)
            step_metrics.append(metrics)
            step_tokens += int(batch["attention_mask"].sum())
        rows = accelerator.gather(torch.tensor([[m[k] for k in metrics] for m in step_metrics], dtype=torch.float64,
                                               device=accelerator.device)).cpu()  # (P A, M): every micro-batch's
        step_means = combine_means(torch.full((len(rows),), len(mine[0])), rows)  # (M,): equal pieces
        step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
        sequences, tokens = sequences + 2 * len(index), tokens + step_tokens
        append(history, {"step": step, "lr": lr, "seconds": time.perf_counter() - start - eval_seconds,
                         "sequences": sequences, "tokens": tokens})
        append(history, dict(zip(metrics, step_means.tolist())), prefix="train/")
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{history['train/loss'][-1]:.3f}")
        if evaluating and ((step + 1) % config.eval_every == 0 or step + 1 == config.num_steps):
            eval_seconds += record_eval(history, policy, evaluate, step + 1)
    policy.eval()
    return history


def load_inputs(args, preset):
    """(policy, tokenizer, train pairs, held-out pairs): the preset's SFT policy and preference pairs
    (the pipeline's cache, as notebook 08 reads them), or a saved model and data set given by path."""
    import datasets

    from dpo_teach import pipeline
    from dpo_teach.models import load_base_model

    if args.model:
        policy, tokenizer = load_base_model(replace(preset, model=args.model))
    else:
        policy, tokenizer = pipeline.get_sft_policy(preset)
    pairs = datasets.load_from_disk(args.data) if args.data else pipeline.get_preference_pairs(preset)
    train = pairs["train"].select(range(min(args.pairs, len(pairs["train"])))) if args.pairs else pairs["train"]
    held_out = pairs["test"].select(range(min(args.eval_pairs, len(pairs["test"])))) if args.eval_pairs else None
    return policy, tokenizer, train, held_out


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import parse_flag_from_env

    from dpo_teach.presets import get_preset
    from dpo_teach.utils import seed_everything

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="tiny or gpt2 (default: as setup() chooses)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's DPO steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per optimizer step, over all processes")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps per optimizer step")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=0, help="train on the first N pairs only (0: all)")
    parser.add_argument("--eval-pairs", type=int, default=0, help="held-out pairs to evaluate on (0: none)")
    parser.add_argument("--model", default=None, help="a saved causal LM and tokenizer (default: the SFT policy)")
    parser.add_argument("--data", default=None, help="a saved DatasetDict of pairs (default: the course's pairs)")
    parser.add_argument("--out", required=True, type=Path, help="folder for history.json and the policy")
    parser.add_argument("--no-save", action="store_true", help="write the history only, not the policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) also where GPUs exist")
    args = parser.parse_args(argv)

    cpu = args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)  # the processes' ranks and devices, from the launcher (one when there is none)
    preset = get_preset(args.preset, device=str(state.device))
    overrides = {"num_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "beta": args.beta,
                 "warmup_steps": args.warmup_steps, "eval_every": args.eval_every}
    config = dpo_config(preset, seed=args.seed, **{k: v for k, v in overrides.items() if v is not None})
    precision = config.precision or default_precision(state.device)
    accelerator = Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[precision],
                              gradient_accumulation_steps=args.accumulation)
    seed_everything(args.seed)
    with accelerator.main_process_first():  # the main process fills the cache, the others then read it
        policy, tokenizer, train, held_out = load_inputs(args, preset)
    lengths = dict(max_prompt_tokens=preset.settings.max_prompt_tokens,
                   max_response_tokens=preset.settings.max_response_tokens)
    start = time.perf_counter()
    history = train_dpo_distributed(accelerator, policy.to(accelerator.device), tokenizer, train, config, held_out,
                                    **lengths)
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # written once
        args.out.mkdir(parents=True, exist_ok=True)
        run = {"processes": accelerator.num_processes, "accumulation": args.accumulation, "precision": precision,
               "device": str(accelerator.device), "pairs": len(train), "config": asdict(config),
               "wall_seconds": seconds}
        (args.out / "history.json").write_text(json.dumps({"run": run, "history": history}, indent=1))
        if not args.no_save:
            policy.save_pretrained(args.out / "policy")
            tokenizer.save_pretrained(args.out / "policy")
    accelerator.end_training()


if __name__ == "__main__":
    main()
