"""Rehearse the "gpt2" preset without the hub: stand-ins of GPT-2's shapes, every notebook run, a report.

    python -m dpo_teach.rehearse                          # GPT-2 (124M) stand-in, the preset's sizes (a GPU)
    python -m dpo_teach.rehearse --small --scale 0.02     # tiny GPT-2-format model, every count x 0.02 (CPU)

A learner who opens the course on a Colab GPU gets the "gpt2" preset: GPT-2 (124M) and IMDb from the
Hugging Face hub. No test machine reaches the hub, so the rehearsal builds stand-ins with the same
shapes and formats, and runs the course on them:

- a byte-level BPE tokenizer of GPT-2's kind and size (50,257 tokens, "<|endoftext|>" the last one,
  no pad token), trained here on the review world's text and filled up to full size with made-up
  words;
- a GPT-2 with GPT2Config()'s defaults (124M parameters, 1,024 positions; with --small, a 2-layer,
  64-wide GPT-2 with the same vocabulary and positions) from random weights, pretrained for a few
  hundred steps on the world's generic text and reviews, so that its samples are words that end
  with EOS (the real GPT-2 is pretrained far longer on far more);
- an IMDb-format data set (a DatasetDict with "train", "test" and "unsupervised" splits, columns
  "text" and "label"): the world's reviews with IMDb's HTML line breaks, one in ten joined with
  others into a long review of thousands of characters.

It saves them with save_pretrained / save_to_disk, points DPO_TEACH_MODEL and DPO_TEACH_DATASET at
them, executes every notebook with DPO_TEACH_PRESET=gpt2 in a fresh kernel with the network cut off
(into the output folder; the committed notebooks are not touched), and writes report.json: for
every notebook its status, wall seconds, peak memory (on a GPU the CUDA allocator's peak reserved
bytes; on a CPU the kernel's peak resident set size, on Linux), the tokens it trained on, sampled
and scored per second, and an estimate of its time on a T4 (t4_estimate). --scale multiplies every
count of the preset's settings (DPO_TEACH_SCALE, settings.scaled).

So briefly pretrained a model, and a scaled-down run, do not learn enough for every claim the
notebooks make about results (e.g. "DPO raises the reward"). The rehearsal sets
DPO_TEACH_REHEARSAL=1, under which `dpo_teach.claims.claim` counts such a claim as unmet instead of
failing; every other assertion (shapes, identities, conventions) must hold. The report counts the
claims met and unmet per notebook.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

from dpo_teach.claims import REHEARSAL_ENV
from dpo_teach.presets import REPOSITORY

__all__ = ["GPT2_VOCAB_SIZE", "END_OF_TEXT", "REHEARSAL_ENV", "T4_FLOPS", "TEST_SCALE", "Run", "build_imdb", "build_model",
           "build_tokenizer", "main", "prepare", "rehearse", "t4_estimate"]

GPT2_VOCAB_SIZE = 50_257  # GPT-2's vocabulary: 50,000 merges + 256 bytes + <|endoftext|> (id 50,256)
END_OF_TEXT = "<|endoftext|>"
REPORT_TAG = "dpo_teach-rehearsal-report "
SMALL = dict(n_embd=64, n_layer=2, n_head=2)  # --small: GPT-2's vocabulary and positions, a tiny trunk
# Pretraining of the stand-in (steps, blocks per step, tokens per block): a few seconds on a GPU for the
# 124M model; about half a minute on a CPU for the small one (its 50,257-way output layer dominates).
PRETRAINING = {"full": (300, 16, 128), "small": (150, 8, 64)}
# What a T4 sustains in float16 on a model of this size, for the T4 estimate: 40% of its dense
# tensor-core peak of 65 TFLOP/s (NVIDIA's T4 datasheet). The 40% is an assumption, not a measurement.
T4_FLOPS = 0.4 * 65e12
TEST_SCALE = 0.02  # the scale of the rehearsal the tests run (tests/test_rehearsal.py, with --small)


def _made_up_words(n: int, seed: int) -> list[str]:
    """Lines of random lower-case words: text for the BPE trainer to fill the vocabulary with."""
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
                     for _ in range(20)) for _ in range(n)]


def build_tokenizer(folder: Path, texts: list[str]):
    """Train a byte-level BPE of GPT-2's size on `texts` (plus made-up words), save it to `folder`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts + _made_up_words(20_000, seed=0), vocab_size=GPT2_VOCAB_SIZE - 1,
                            min_frequency=1, show_progress=False, special_tokens=[])
    bpe.add_special_tokens([END_OF_TEXT])  # the last id, as in GPT-2
    if bpe.get_vocab_size() != GPT2_VOCAB_SIZE:
        raise RuntimeError(f"the BPE trainer made {bpe.get_vocab_size()} tokens, not {GPT2_VOCAB_SIZE}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                        unk_token=END_OF_TEXT, model_max_length=1024)  # no pad token, like GPT-2's
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, tokenizer, texts: list[str], small: bool = False):
    """A GPT-2 (GPT2Config() defaults, or the SMALL trunk) from random weights, briefly pretrained on
    `texts` (PRETRAINING steps of packed blocks), saved to `folder`. Without those steps its samples
    would be random tokens that never end: no EOS, no text that re-tokenizes to itself."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_teach.models import disable_dropout
    from dpo_teach.pretrain import PretrainConfig, pack
    from dpo_teach.training import train

    torch.manual_seed(0)
    config = GPT2Config(**(SMALL if small else {}))
    if config.vocab_size != len(tokenizer) or tokenizer.eos_token_id != config.eos_token_id:
        raise RuntimeError("the stand-in tokenizer does not have GPT-2's vocabulary layout")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = disable_dropout(GPT2LMHeadModel(config)).to(device)
    steps, rows_per_step, block_size = PRETRAINING["small" if small else "full"]
    blocks = pack(texts, tokenizer, block_size)
    generator = torch.Generator().manual_seed(0)

    def rows():
        while True:
            yield blocks[torch.randint(len(blocks), (rows_per_step,), generator=generator)].to(device)

    def batch_loss(batch):
        loss = model(input_ids=batch, labels=batch).loss
        return loss, {"loss": loss.item()}, len(batch), batch.numel()

    config = PretrainConfig(num_steps=steps, lr=3e-3 if small else 6e-4, warmup_steps=steps // 10)
    history = train(model, batch_loss, rows(), config, desc="pretraining the stand-in", progress=False)
    model.save_pretrained(folder)
    return model, history["train/loss"][-1]


def build_imdb(folder: Path, seed: int = 0, sizes: dict[str, int] | None = None):
    """An IMDb-format DatasetDict from the review world, saved with save_to_disk to `folder`.

    Each review is one of the world's (a fresh sample per split), its sentences joined by IMDb's
    "<br /><br />" now and then; one in ten is several reviews joined into a long one. label is 1 for
    a positive oracle score, else 0 (IMDb's labels; "unsupervised" has -1, as on the hub).
    """
    import datasets

    from dpo_teach.world import generate_reviews, oracle_reward

    sizes = sizes or {"train": 25_000, "test": 25_000, "unsupervised": 2_000}
    rng = random.Random(seed)
    splits = {}
    for i, (split, n) in enumerate(sizes.items()):
        pool = [r["text"] for r in generate_reviews(n + 2_000, seed=100 + i)]
        texts = []
        for k in range(n):
            parts = [pool[k]] + (rng.sample(pool, rng.randint(8, 30)) if rng.random() < 0.1 else [])
            text = " ".join(parts)
            sentences = text.split(". ")
            texts.append(". ".join(s + ("<br /><br />" if rng.random() < 0.15 else "") for s in sentences))
        if split == "unsupervised":
            labels = [-1] * n
        else:
            labels = [int(score > 0) for score in oracle_reward(texts).tolist()]
        splits[split] = datasets.Dataset.from_dict({"text": texts, "label": labels})
    data = datasets.DatasetDict(splits)
    data.save_to_disk(str(folder))
    return data


def prepare(folder: Path, small: bool = False) -> dict[str, str]:
    """Build the three stand-ins under `folder`; return the environment that points the course at them."""
    from dpo_teach.world import load_split

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reviews = [r["text"] for r in load_split("reviews_train")]
    pretraining = [r["text"] for name in ("reviews_pretrain", "generic_pretrain") for r in load_split(name)]
    tokenizer = build_tokenizer(folder / "gpt2", reviews + pretraining)
    _, loss = build_model(folder / "gpt2", tokenizer, pretraining, small)
    print(f"stand-in GPT-2 pretrained briefly: loss {loss:.2f}", flush=True)
    build_imdb(folder / "imdb", sizes={"train": 5_000, "test": 2_000, "unsupervised": 200} if small else None)
    print(f"stand-ins built in {time.perf_counter() - start:.0f} s under {folder}", flush=True)
    return {"DPO_TEACH_PRESET": "gpt2", "DPO_TEACH_MODEL": str(folder / "gpt2"),
            "DPO_TEACH_DATASET": str(folder / "imdb"), "DPO_TEACH_CACHE": str(folder / "cache"), REHEARSAL_ENV: "1"}


# What the kernel reports after the notebook's last cell: memory and tokens, as one JSON line.
_REPORT_CELL = f"""
import json, os, torch
from dpo_teach.utils import TOKEN_COUNTS
_status = "/proc/self/status"  # Linux: VmHWM is this process's peak resident set size (None elsewhere)
_peak = [line.split()[1] for line in open(_status) if line.startswith("VmHWM:")] if os.path.exists(_status) else []
_r = {{"peak_rss_mb": int(_peak[0]) / 1024 if _peak else None, "trained_tokens": TOKEN_COUNTS["trained"],
       "generated_tokens": TOKEN_COUNTS["generated"], "scored_tokens": TOKEN_COUNTS["scored"]}}
from dpo_teach.claims import CLAIMS
_r.update(claims_met=CLAIMS["met"], claims_unmet=CLAIMS["unmet"])
if torch.cuda.is_available():
    _r.update(gpu=torch.cuda.get_device_name(), peak_gpu_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
              peak_gpu_allocated_mb=torch.cuda.max_memory_allocated() / 2**20)
print({REPORT_TAG!r} + json.dumps(_r))
"""


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _errors(nb) -> list[str]:
    """'cell N: ErrorName: message (the failing line)' of every cell that raised."""
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                frames = [line for line in _strip_ansi("\n".join(output.get("traceback", []))).splitlines()
                          if line.startswith("---->")]
                where = f" at {frames[-1][5:].strip()}" if frames else ""
                found.append(f"cell {index}: {output['ename']}: {_strip_ansi(output['evalue'])}{where}"[:500])
    return found


def _run_notebook(path: Path, out: Path, timeout: int, keep_going: bool = False) -> dict:
    """Execute one notebook in a fresh kernel (the current environment, offline); its report.
    keep_going: run every cell even after one raised, and list every error."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from dpo_teach.offline import offline_environment

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_REPORT_CELL))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=keep_going,
                            resources={"metadata": {"path": str(path.parent)}})
    saved = dict(os.environ)
    os.environ.update(offline_environment())
    os.environ.setdefault("MPLBACKEND", "agg")
    result = {"notebook": path.name, "status": "ok"}
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError:
        pass  # the error is in the cell's outputs
    except Exception as error:  # a cell timeout, a dead kernel
        result["status"] = f"error: {type(error).__name__}: {error}"[:500]
    finally:
        result["seconds"] = round(time.perf_counter() - start, 1)
        os.environ.clear()
        os.environ.update(saved)
    errors = _errors(nb)
    if errors:
        result["status"], result["errors"] = "error: " + errors[0], errors
    for output in nb.cells[-1].get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith(REPORT_TAG):
                result.update(json.loads(line[len(REPORT_TAG):]))
    if "trained_tokens" in result:
        tokens = result["trained_tokens"] + result["generated_tokens"] + result["scored_tokens"]
        result["tokens_per_second"] = round(tokens / result["seconds"])
    nbformat.write(nb, out / path.name)
    return result


def t4_estimate(result: dict, parameters: int) -> float:
    """Seconds a notebook would take on a T4, estimated from its run here: the measured seconds (the
    launch and Python overhead a T4 pays as well) plus its floating-point work at T4_FLOPS. The work
    is counted as 6 x parameters per token trained (forward and backward) and 2 x parameters per
    token sampled or scored (forward only)."""
    flops = 2 * parameters * (3 * result["trained_tokens"] + result["generated_tokens"] + result["scored_tokens"])
    return result["seconds"] + flops / T4_FLOPS


def _parameters(folder: Path) -> int:
    """Parameters of the saved stand-in (tied embeddings counted once)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def rehearse(out: Path, notebooks: list[Path], small: bool = False, scale: float = 1.0, timeout: int = 1800,
             deadline: float | None = None, keep_going: bool = False) -> dict:
    """Build the stand-ins under `out`, execute `notebooks` under the gpt2 preset; the report (also
    written to out/report.json after every notebook). deadline: seconds after which no further
    notebook is started (those left are reported as "not run")."""
    start = time.perf_counter()
    env = prepare(out, small)
    env["DPO_TEACH_SCALE"] = str(scale)
    saved = dict(os.environ)
    os.environ.update(env)
    report = {"small": small, "scale": scale, "python": sys.version.split()[0], "notebooks": []}
    try:
        import torch
        import transformers

        report.update(torch=torch.__version__, transformers=transformers.__version__,
                      device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      parameters=_parameters(out / "gpt2"))
        report["prepare_seconds"] = round(time.perf_counter() - start, 1)
        for path in notebooks:
            if deadline is not None and time.perf_counter() - start > deadline:
                report["notebooks"].append({"notebook": path.name, "status": "not run: deadline"})
                continue
            result = _run_notebook(path, out, timeout, keep_going)
            if "trained_tokens" in result and "gpu" in result:  # a T4 estimate from a GPU run only
                result["t4_estimate_seconds"] = round(t4_estimate(result, report["parameters"]), 1)
            report["notebooks"].append(result)
            print(json.dumps(result), flush=True)
            (out / "report.json").write_text(json.dumps(report, indent=1))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


class Run:
    """`python -m dpo_teach.rehearse --small --scale SCALE --out OUT`, started now in a subprocess with
    `threads` CPU threads (OMP_NUM_THREADS) and collected later by wait(). Its output goes to
    OUT/rehearsal.log. The subprocess leads a session of its own (on POSIX), so that stop() stops the
    notebook kernels it started too. The tests start one in the background (conftest.py)."""

    def __init__(self, out: Path, scale: float = TEST_SCALE, threads: int = 2):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "rehearsal.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_TEACH_")}
        env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "dpo_teach.rehearse", "--small", "--scale", str(scale), "--out", str(self.out)]
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=os.name == "posix")

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> tuple[int | None, dict | None, str]:
        """(exit code, report, the log's last 6,000 characters), once the run has ended; a run still
        going `timeout` seconds after its start is stopped (exit code None). The report is None where
        the run wrote none."""
        try:
            code = self.process.wait(timeout=max(0.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            code = None
        report_path = self.out / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        return code, report, self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        """End the run and the kernels it started, if it is still going."""
        if not self.running():
            return
        if os.name == "posix":
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.kill()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook under notebooks/")
    parser.add_argument("--out", type=Path, default=Path("rehearsal"), help="stand-ins, executed notebooks, report.json")
    parser.add_argument("--small", action="store_true", help="a 2-layer GPT-2-format model instead of the 124M one")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count of the settings (0, 1]")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take")
    parser.add_argument("--deadline", type=float, default=None, help="start no notebook after this many seconds")
    parser.add_argument("--keep-going", action="store_true", help="run every cell after an error; list every error")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((REPOSITORY / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    report = rehearse(args.out.resolve(), paths, args.small, args.scale, args.timeout, args.deadline, args.keep_going)
    failed = [r for r in report["notebooks"] if r["status"] != "ok"]
    print(f"{len(report['notebooks']) - len(failed)} of {len(report['notebooks'])} notebooks ran; "
          f"report in {args.out / 'report.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
