"""Pretrain the tiny GPT-2 of the offline world and write it, with the world's data, under data/.

    python -m dpo_teach.pretrain              # world + tokenizer + model (about 10 min on 2 CPU cores)
    python -m dpo_teach.pretrain --world-only # only regenerate data/world/*.jsonl

Steps: generate the world (dpo_teach.world.write_world), learn a byte-level BPE tokenizer on its
text, train a tiny GPT-2 on generic text with a minority of reviews (a "base" model that knows the
language but is not yet a review writer), then save both with save_pretrained and write
data/README.md with the counts, the held-out perplexities and a few samples.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dpo_teach.models import EOS_TOKEN, PAD_TOKEN, TinyGPT2Config, tiny_gpt2, wrap_tokenizer
from dpo_teach.presets import data_dir
from dpo_teach.settings import NEW_TOKENS
from dpo_teach.sft import token_perplexity
from dpo_teach.training import TrainConfig, train
from dpo_teach.utils import seed_everything
from dpo_teach.world import read_jsonl, write_world

__all__ = ["PretrainConfig", "block_batches", "pack", "perplexity", "pretrain", "sample_texts", "train_tokenizer",
           "write_readme"]


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """How the base model is pretrained (made once; not a per-preset setting)."""

    num_steps: int = 1500
    batch_size: int = 16  # sequences per step, drawn at random from the packed blocks
    lr: float = 1e-3
    warmup_steps: int = 100  # then TrainConfig's cosine decay to 10% of lr, AdamW betas (0.9, 0.95)
    weight_decay: float = 0.1
    eval_every: int = 0  # perplexities are measured once, at the end
    block_size: int = 128  # tokens per sequence (documents are packed, separated by EOS)
    review_fraction: float = 0.15  # share of reviews in the pretraining mix (the rest is generic)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2's scheme) learnt on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def pack(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Concatenate EOS + document ids into one stream and cut it into rows of block_size tokens."""
    stream = []
    for ids in tokenizer(texts)["input_ids"]:
        stream.append(tokenizer.eos_token_id)
        stream.extend(ids)
    num_blocks = len(stream) // block_size
    return torch.tensor(stream[: num_blocks * block_size]).view(num_blocks, block_size)


def block_batches(blocks: torch.Tensor, batch_size: int = 64):
    """Packed blocks (N, block_size) as batches in build_batch's format: every token but the first
    of a block is predicted (the loss mask covers the whole block)."""
    for i in range(0, len(blocks), batch_size):
        rows = blocks[i : i + batch_size]
        ones = torch.ones_like(rows)
        yield {"input_ids": rows, "attention_mask": ones, "labels": rows, "loss_mask": ones}


def perplexity(model, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """exp(mean next-token loss) over packed blocks (sft.token_perplexity)."""
    return token_perplexity(model, block_batches(blocks, batch_size))


def pretrain(folder: Path, config: PretrainConfig = PretrainConfig()) -> dict:
    seed_everything(config.seed)
    world = folder / "world"
    counts = write_world(world)
    generic = [r["text"] for r in read_jsonl(world / "generic_pretrain.jsonl")]
    reviews = [r["text"] for r in read_jsonl(world / "reviews_pretrain.jsonl")]
    sft_reviews = [r["text"] for r in read_jsonl(world / "reviews_train.jsonl")]
    # The tokenizer sees all training text (so review words are single tokens); the model does not.
    tokenizer = wrap_tokenizer(train_tokenizer(generic + reviews + sft_reviews, TinyGPT2Config.vocab_size))

    num_reviews = int(config.review_fraction / (1 - config.review_fraction) * len(generic))
    texts = generic + reviews[:num_reviews]
    order = torch.randperm(len(texts)).tolist()
    blocks = pack([texts[i] for i in order], tokenizer, config.block_size)
    val_generic = pack([r["text"] for r in read_jsonl(world / "generic_validation.jsonl")], tokenizer, config.block_size)
    val_reviews = pack([r["text"] for r in read_jsonl(world / "reviews_validation.jsonl")], tokenizer, config.block_size)

    model = tiny_gpt2(tokenizer)

    def random_rows():  # endless batches of config.batch_size blocks drawn at random
        while True:
            yield blocks[torch.randint(len(blocks), (config.batch_size,))]  # (B, block_size)

    def batch_loss(batch: torch.Tensor):
        loss = model(input_ids=batch, labels=batch).loss  # mean next-token loss
        return loss, {"loss": loss.item()}, len(batch), batch.numel()

    history = train(model, batch_loss, random_rows(), config, desc="pretraining")
    seconds, losses = history["seconds"][-1], history["train/loss"]

    out = folder / "base_model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {
        "config": asdict(config),
        "model": asdict(TinyGPT2Config()),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": config.num_steps * config.batch_size * config.block_size,
        "seconds": round(seconds, 1),
        "final_train_loss": round(sum(losses[-50:]) / 50, 4),
        "perplexity_generic_validation": round(perplexity(model, val_generic), 3),
        "perplexity_reviews_validation": round(perplexity(model, val_reviews), 3),
        "samples": sample_texts(model, tokenizer),
        "counts": counts,
    }
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def sample_texts(model, tokenizer, seed: int = 0) -> list[dict]:
    """A few samples of the base model, from an empty prompt and from review-like prompts."""
    from dpo_teach.sampling import generate

    prompts = ["", "", "The weather", "To make", "I watched", "The acting was"]
    torch.manual_seed(seed)
    responses = generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0).texts
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]


def write_readme(folder: Path, report: dict) -> None:
    """data/README.md: what lies here, the counts, the base model's numbers and samples."""
    counts = report["counts"]
    lines = [
        "# data/",
        "",
        "Everything the default (\"tiny\", CPU, offline) preset of the course reads. It is generated,",
        "seeded and reproducible: `python -m dpo_teach.pretrain` writes all of it again (about",
        f"{math.ceil(report['seconds'] / 60)} minutes on 2 CPU cores); `python -m dpo_teach.pretrain --world-only` only the JSONL files.",
        "",
        "## world/: the review world (JSONL, one record a line)",
        "",
        "| file | records | what |",
        "|---|---:|---|",
    ]
    what = {
        "reviews_train": "reviews for supervised fine-tuning; `{\"text\", \"sentiment\"}`",
        "reviews_validation": "held-out reviews (perplexity)",
        "reviews_test": "held-out reviews (the test prompts come from these)",
        "reviews_pretrain": "reviews mixed into pretraining (a minority of the mix)",
        "generic_pretrain": "weather notes, recipes, sports recaps, town news; `{\"text\", \"topic\"}`",
        "generic_validation": "held-out generic text (perplexity)",
        "prompts_train": "first 2-6 words of training reviews; `{\"prompt\"}`",
        "prompts_test": "first 2-6 words of test reviews, for evaluation; `{\"prompt\"}`",
    }
    for name, n in counts.items():
        lines.append(f"| `{name}.jsonl` | {n} | {what[name]} |")
    lines += [
        "",
        "The `sentiment` field is the label the generator wrote with; it is never used for training.",
        "The course's judge is the oracle `dpo_teach.world.oracle_reward` (VADER).",
        "",
        "## base_model/: the tiny GPT-2 (transformers' save format, safetensors)",
        "",
        f"- {report['parameters']:,} parameters: {report['model']['n_layer']} layers, {report['model']['n_head']} heads,"
        f" width {report['model']['n_embd']}, context {report['model']['n_positions']}; byte-level BPE vocabulary of {report['vocab_size']} tokens.",
        f"- Pretrained for {report['config']['num_steps']} steps of {report['config']['batch_size']} x {report['config']['block_size']} tokens"
        f" ({report['train_tokens']:,} tokens; {int(report['config']['review_fraction'] * 100)}% reviews, the rest generic text) in {report['seconds']:.0f} s on the CPU.",
        f"- Held-out perplexity: {report['perplexity_generic_validation']:.2f} on generic text, {report['perplexity_reviews_validation']:.2f} on reviews.",
        "- `pretrain_report.json` holds every number above and the configuration.",
        "",
        "Samples (temperature 1, no top-k/top-p), prompt in brackets:",
        "",
    ]
    for sample in report["samples"]:
        lines.append(f"- [{sample['prompt']}]{sample['response']}")
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-only", action="store_true", help="only regenerate data/world/")
    parser.add_argument("--num-steps", type=int, default=PretrainConfig.num_steps)
    args = parser.parse_args()
    folder = data_dir()
    if args.world_only:
        print(write_world(folder / "world"))
        return
    report = pretrain(folder, PretrainConfig(num_steps=args.num_steps))
    write_readme(folder, report)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
