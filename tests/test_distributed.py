"""DPO on several processes (dpo_teach.distributed), tested with real processes on the CPU (the gloo
backend, launched by torch.distributed's launcher, torchrun), on the course's pairs.

With the same global batch, a 2-process run, and a 2-process run with gradient accumulation 2 (a
quarter of the batch per forward pass), take the same steps as dpo.train_dpo on one process: the
per-step losses and the final parameters agree within TOLERANCE (float sums in another order; the
runs are otherwise the same arithmetic; measured: losses within 3e-7, parameters within 6e-6; a run
whose processes do not average their gradients misses by 5e-3 in the loss, which a test checks).
One process under dpo_teach.distributed is dpo.train_dpo step for step (within 1e-6). TRL's DPOTrainer launched the same way logs log 2 at its first step (policy = reference),
and its 1- and 2-process runs agree too.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from dpo_teach import pipeline
from dpo_teach.distributed import micro_batches, run_processes
from dpo_teach.dpo import dpo_config, train_dpo
from dpo_teach.models import frozen_copy
from dpo_teach.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, PAIRS = 6, 16, 96
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # per-step losses and final parameters across process counts


def launch(args: list[str], processes: int) -> None:
    """Run `args` on `processes` CPU processes, offline (the test fails if it fails): one process
    with this process's threads (the same float sums as here), several with one thread each."""
    run_processes(processes, args, threads=torch.get_num_threads() if processes == 1 else 1, timeout=300)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """The tiny preset's SFT policy and its first PAIRS training pairs (notebooks 05-06, from the
    cache or made now), saved where the launched processes read them."""
    preset = get_preset("tiny", device="cpu")
    policy, tokenizer = pipeline.get_sft_policy(preset)
    pairs = pipeline.get_preference_pairs(preset)
    folder = tmp_path_factory.mktemp("distributed")
    policy.save_pretrained(folder / "sft")
    tokenizer.save_pretrained(folder / "sft")
    pairs["train"] = pairs["train"].select(range(PAIRS))
    pairs.save_to_disk(str(folder / "pairs"))
    pairs["train"].save_to_disk(str(folder / "train_pairs"))
    return preset, policy, tokenizer, pairs, folder


@pytest.fixture(scope="module")
def one_process(course):
    """dpo.train_dpo in this process: the single-process run everything is compared with."""
    preset, policy, tokenizer, pairs, _ = course
    config = dpo_config(preset, num_steps=STEPS, batch_size=BATCH, eval_every=0, seed=0)
    trained = copy.deepcopy(policy)
    history = train_dpo(trained, tokenizer, pairs["train"], config, ref_model=frozen_copy(policy), progress=False,
                        max_prompt_tokens=preset.settings.max_prompt_tokens,
                        max_response_tokens=preset.settings.max_response_tokens)
    return history, trained


def distributed_run(course, out: Path, processes: int, accumulation: int = 1, program=("-m", "dpo_teach.distributed")):
    _, _, _, _, folder = course
    launch([*program, "--preset", "tiny", "--model", str(folder / "sft"), "--data",
            str(folder / "pairs"), "--steps", str(STEPS), "--batch-size", str(BATCH), "--accumulation",
            str(accumulation), "--eval-every", "0", "--out", str(out)], processes)
    saved = json.loads((out / "history.json").read_text())
    return saved["run"], saved["history"], GPT2LMHeadModel.from_pretrained(out / "policy")


def assert_same_run(history, model, reference_history, reference_model, **tolerance):
    assert history["step"] == reference_history["step"] == list(range(STEPS))
    assert history["sequences"] == reference_history["sequences"], "the same global batch"
    assert history["tokens"] == reference_history["tokens"], "the same pairs, every step"
    for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen"):
        torch.testing.assert_close(torch.tensor(history[key]), torch.tensor(reference_history[key]), **tolerance,
                                   msg=lambda m, key=key: f"{key}: {m}")
    reference = dict(reference_model.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, reference[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}")


def test_micro_batches_cut_the_global_batch_without_loss_or_overlap():
    index = list(range(100, 116))
    cut = micro_batches(index, num_processes=2, accumulation=2)
    assert [len(process) for process in cut] == [2, 2] and all(len(m) == 4 for p in cut for m in p)
    assert sorted(i for process in cut for micro in process for i in micro) == index
    assert cut[0][0] == index[:4] and cut[1][0] == index[4:8], "accumulation step 0 of process 0, then process 1"
    assert micro_batches(index, 1, 1) == [[index]]
    with pytest.raises(ValueError, match="12 pairs cannot be cut into 2 processes x 4"):
        micro_batches(index[:12], 2, 4)


def test_one_process_is_train_dpo_step_for_step(course, one_process, tmp_path):
    reference_history, reference_model = one_process
    run, history, model = distributed_run(course, tmp_path / "one", processes=1)
    assert run["processes"] == 1 and run["precision"] == "float32"
    assert reference_history["train/loss"][0] == pytest.approx(math.log(2), abs=1e-6), "step 0: policy = reference"
    assert_same_run(history, model, reference_history, reference_model, atol=1e-6, rtol=1e-6)


def test_two_processes_take_the_steps_of_one(course, one_process, tmp_path):
    reference_history, reference_model = one_process
    run, history, model = distributed_run(course, tmp_path / "two", processes=2)
    assert run["processes"] == 2 and run["accumulation"] == 1
    assert_same_run(history, model, reference_history, reference_model, **TOLERANCE)


def test_two_processes_with_gradient_accumulation_take_the_steps_of_one(course, one_process, tmp_path):
    reference_history, reference_model = one_process
    run, history, model = distributed_run(course, tmp_path / "accumulated", processes=2, accumulation=2)
    assert run["processes"] == 2 and run["accumulation"] == 2
    assert_same_run(history, model, reference_history, reference_model, **TOLERANCE)


def test_the_comparison_catches_processes_that_do_not_average_their_gradients(course, one_process, tmp_path):
    """The negative control: the same job with its forward pass bypassing DDP's wrapper (no
    all-reduce) drifts from the one-process run by far more than TOLERANCE."""
    reference_history, _ = one_process
    _, history, _ = distributed_run(course, tmp_path / "unsynced", processes=2,
                                    program=(str(ROOT / "tests" / "unsynced_dpo_job.py"),))
    drift = max(abs(a - b) for a, b in zip(history["train/loss"], reference_history["train/loss"]))
    assert drift > 10 * TOLERANCE["atol"], f"an unsynchronised run stayed within {drift:.1e} of one process"


def test_a_batch_that_does_not_divide_is_refused(course, tmp_path):
    _, _, _, _, folder = course
    with pytest.raises(RuntimeError, match="6 pairs cannot be cut into 1 processes x 4"):
        run_processes(1, ["-m", "dpo_teach.distributed", "--model", str(folder / "sft"), "--data", str(folder / "pairs"),
                          "--steps", "1", "--batch-size", "6", "--accumulation", "4", "--out", str(tmp_path / "bad")])


def test_trls_dpo_trainer_launched_the_same_way(course, tmp_path):
    _, _, _, _, folder = course
    logs = {}
    for processes in (1, 2):
        out = tmp_path / f"trl{processes}"
        launch([str(ROOT / "tests" / "trl_dpo_job.py"), str(folder / "sft"), str(folder / "train_pairs"), str(out),
                "--batch-size", str(BATCH), "--steps", str(STEPS)], processes)
        saved = json.loads((out / "log.json").read_text())
        assert saved["processes"] == processes
        logs[processes] = [entry for entry in saved["log"] if "loss" in entry]
    for processes, log in logs.items():
        assert [entry["step"] for entry in log] == list(range(1, STEPS + 1)), processes
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), f"{processes} process(es): policy = reference"
    torch.testing.assert_close(torch.tensor([e["loss"] for e in logs[2]]), torch.tensor([e["loss"] for e in logs[1]]),
                               **TOLERANCE)
