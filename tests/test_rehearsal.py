"""The GPU preset's code path, rehearsed on the CPU: stand-ins of GPT-2's shapes (a 50,257-token
byte-level BPE without a pad token, a GPT-2-format model, IMDb-format data), IMDb's text handling,
scaled-down settings, and every notebook executed under the gpt2 preset (dpo_teach.rehearse)."""

import os
from pathlib import Path

import pytest
import torch

from dpo_teach import rehearse
from dpo_teach.claims import CLAIMS, REHEARSAL_ENV, claim
from dpo_teach.models import load_tokenizer
from dpo_teach.presets import DEVICE_ENV, PRESET_ENV, SCALE_ENV, find_device, get_preset
from dpo_teach.settings import SETTINGS, scaled
from dpo_teach.world import clean_review, load_prompts, load_reviews, token_prompt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """The tokenizer and a small IMDb-format data set, built once (the model is built by the
    end-to-end rehearsal below)."""
    from dpo_teach.world import load_split

    folder = tmp_path_factory.mktemp("standins")
    texts = [r["text"] for r in load_split("reviews_train")] + [r["text"] for r in load_split("generic_pretrain")]
    tokenizer = rehearse.build_tokenizer(folder / "gpt2", texts)
    data = rehearse.build_imdb(folder / "imdb", sizes={"train": 400, "test": 200, "unsupervised": 20})
    return folder, tokenizer, data


def test_the_tokenizer_has_gpt2s_layout_and_no_pad_token(standins):
    folder, tokenizer, _ = standins
    assert len(tokenizer) == rehearse.GPT2_VOCAB_SIZE == 50_257
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50_256
    assert tokenizer.pad_token is None
    reloaded = load_tokenizer(get_preset("gpt2", device="cpu", model=str(folder / "gpt2")))
    assert reloaded.pad_token_id == reloaded.eos_token_id, "like GPT-2's: load_tokenizer pads with EOS"
    ids = tokenizer(" The acting was wonderful.")["input_ids"]
    assert tokenizer.decode(ids) == " The acting was wonderful." and len(ids) <= 6


def test_the_data_set_has_imdbs_format(standins):
    _, _, data = standins
    assert set(data) == {"train", "test", "unsupervised"}
    assert all(data[split].column_names == ["text", "label"] for split in data)
    assert set(data["train"]["label"]) == {0, 1} and set(data["unsupervised"]["label"]) == {-1}
    texts = data["train"]["text"]
    assert any("<br /><br />" in t for t in texts), "IMDb's HTML line breaks"
    assert max(len(t) for t in texts) > 2_000, "some reviews are thousands of characters long"


def test_reviews_lose_their_html_and_prompts_are_2_to_8_tokens(standins, monkeypatch):
    folder, tokenizer, _ = standins
    assert clean_review("Great.<br /><br />Really  great.<BR/>Yes") == "Great. Really great. Yes"
    preset = get_preset("gpt2", device="cpu", model=str(folder / "gpt2"), dataset=str(folder / "imdb"))
    reviews = load_reviews(preset, "train")
    assert len(reviews) == 400 and not any("<br" in r.lower() for r in reviews)
    prompts = load_prompts(preset, "test")
    assert prompts and all(2 <= len(tokenizer(p)["input_ids"]) <= 8 for p in prompts[:50])
    assert all(p.strip() for p in prompts), "no empty prompt"
    import random

    rng = random.Random(0)
    cut = [token_prompt(r, tokenizer, rng) for r in reviews[:100]]
    assert all(r.startswith(c) for r, c in zip(reviews[:100], cut)), "a prompt is the start of its review"


def test_long_reviews_are_cut_to_the_sft_budget(standins):
    """The stated rule: SFT reads a review's first max_response_tokens tokens (128 on the gpt2 preset)."""
    from dpo_teach.logps import build_batch

    folder, tokenizer, data = standins
    tokenizer = load_tokenizer(get_preset("gpt2", device="cpu", model=str(folder / "gpt2")))
    longest = max(data["train"]["text"], key=len)
    budget = SETTINGS["gpt2"].sft.max_response_tokens
    with pytest.warns(UserWarning, match="1 'completion' response"):  # the cut is reported, not silent
        batch = build_batch([{"prompt": "", "completion": clean_review(longest)}], tokenizer, max_response_tokens=budget)
    assert int(batch["loss_mask"].sum()) == budget == 128
    assert batch["input_ids"][0, -1] != tokenizer.eos_token_id, "a cut review does not end with EOS"


def test_scaled_settings_keep_lengths_and_shrink_every_count():
    full, small = SETTINGS["gpt2"], scaled(SETTINGS["gpt2"], 0.02)
    assert (small.max_prompt_tokens, small.max_response_tokens, small.max_new_tokens) == (
        full.max_prompt_tokens, full.max_response_tokens, full.max_new_tokens)
    for stage in ("sft", "reward", "ppo", "dpo"):
        a, b = getattr(full, stage), getattr(small, stage)
        assert 2 <= b.num_steps < a.num_steps and b.batch_size <= a.batch_size and b.batch_size % 2 == 0
        assert b.lr == a.lr and 1 <= b.eval_every <= b.num_steps and b.warmup_steps <= b.num_steps
    for sweep in ("sweep", "live_sweep", "paper_sweep"):
        a, b = getattr(full, sweep), getattr(small, sweep)
        assert b.dpo_betas == a.dpo_betas and b.seeds == a.seeds and b.dpo_steps < a.dpo_steps
    assert scaled(full, 1) is full
    with pytest.raises(ValueError):
        scaled(full, 0)


def test_the_scale_override_reaches_every_stage(monkeypatch):
    monkeypatch.setenv(SCALE_ENV, "0.1")
    assert get_preset("gpt2", device="cpu").settings == scaled(SETTINGS["gpt2"], 0.1)
    monkeypatch.delenv(SCALE_ENV)
    assert get_preset("gpt2", device="cpu").settings == SETTINGS["gpt2"]


def test_the_tiny_preset_stays_on_the_cpu_where_a_gpu_exists(monkeypatch):
    for name in (DEVICE_ENV, PRESET_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_preset().name == "gpt2" and get_preset().device == "cuda"
    assert get_preset("tiny").device == "cpu" and find_device("tiny") == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert get_preset("tiny").device == "cuda", "DPO_TEACH_DEVICE still decides"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(DEVICE_ENV)
    assert get_preset().name == "tiny" and get_preset().device == "cpu"


def test_a_claim_raises_except_in_a_rehearsal(monkeypatch, capsys):
    monkeypatch.delenv(REHEARSAL_ENV, raising=False)
    before = dict(CLAIMS)
    claim(True, "holds")
    with pytest.raises(AssertionError, match="does not hold"):
        claim(False, "does not hold")
    monkeypatch.setenv(REHEARSAL_ENV, "1")
    claim(False, "counted only")
    assert "claim not met: counted only" in capsys.readouterr().out
    assert CLAIMS["met"] == before.get("met", 0) + 1 and CLAIMS["unmet"] == before.get("unmet", 0) + 2


def test_every_notebook_runs_under_the_gpt2_preset(background_rehearsal, tmp_path):
    """The rehearsal CI runs: a 2-layer GPT-2-format model with GPT-2's vocabulary, the IMDb-format
    data, every count of the gpt2 settings x 0.02, every notebook in a fresh kernel, offline. Claims
    about results are counted, not enforced (a barely trained model); every other assertion holds.
    Run beside the notebooks, it was started in the background when the session began (conftest.py);
    alone, it runs here."""
    run = background_rehearsal or rehearse.Run(tmp_path / "rehearsal", scale=rehearse.TEST_SCALE,
                                               threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    code, report, log = run.wait(timeout=2400)
    assert code is not None, f"the rehearsal did not end within 40 minutes and was stopped:\n{log}"
    assert report is not None, f"the rehearsal wrote no report (exit code {code}):\n{log}"
    failed = {r["notebook"]: r.get("errors", r["status"]) for r in report["notebooks"] if r["status"] != "ok"}
    assert not failed and code == 0, f"{failed}\n{log}"
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [r["notebook"] for r in report["notebooks"]] == notebooks
    assert all(r["seconds"] > 0 and "peak_rss_mb" in r for r in report["notebooks"])
    assert sum(r["claims_met"] + r["claims_unmet"] for r in report["notebooks"]) > 50, "the notebooks' claims were reached"
