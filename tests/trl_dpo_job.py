"""TRL's DPOTrainer on saved preference pairs, launched the way dpo_teach.distributed is (one process
with python, several with torch.distributed's launcher, ACCELERATE_USE_CPU=true on a CPU); tests/test_distributed.py runs it.

    torchrun --nproc_per_node 2 tests/trl_dpo_job.py MODEL PAIRS OUT --batch-size 16 --steps 4

MODEL: a saved causal LM with its tokenizer; PAIRS: a saved datasets.Dataset with "prompt", "chosen"
and "rejected". Writes the trainer's log history (one entry per step) to OUT/log.json. The batch size
is the global one: each process reads batch-size / processes pairs a step. Float32 arithmetic (TRL's
default on a CPU with bfloat16 would be bfloat16 autocast), so that runs can be compared closely.
"""

import argparse
import json
import os
import warnings
from pathlib import Path

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("pairs")
parser.add_argument("out", type=Path)
parser.add_argument("--batch-size", type=int, required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--beta", type=float, default=0.1)
args = parser.parse_args()

processes = int(os.environ.get("WORLD_SIZE", 1))  # set by torch.distributed's launcher
if args.batch_size % processes:
    raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {processes} processes")
config = DPOConfig(output_dir=str(args.out / "trainer"), per_device_train_batch_size=args.batch_size // processes,
                   max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                   beta=args.beta, logging_steps=1, save_strategy="no", report_to=[], bf16=False, use_cpu=True,
                   seed=0, max_length=None, disable_tqdm=True, dataloader_num_workers=0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model), ref_model=None, args=config,
                         train_dataset=datasets.load_from_disk(args.pairs),
                         processing_class=AutoTokenizer.from_pretrained(args.model))
    trainer.train()
if trainer.accelerator.is_main_process:
    args.out.mkdir(parents=True, exist_ok=True)
    log = {"processes": trainer.accelerator.num_processes, "log": trainer.state.log_history}
    (args.out / "log.json").write_text(json.dumps(log))
