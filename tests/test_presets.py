"""Presets: chosen once, overridable by environment variables; the "gpt2" path works from local folders."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

import dpo_teach
from dpo_teach import world
from dpo_teach.models import load_base_model
from dpo_teach.presets import get_preset


def test_setup_picks_the_tiny_preset_on_a_cpu(monkeypatch):
    monkeypatch.delenv("DPO_TEACH_PRESET", raising=False)
    preset = dpo_teach.setup(device="cpu", quiet=True)
    assert preset.name == "tiny" and preset.device == "cpu" and preset.dataset == "reviews"


def test_setup_seeds_everything():
    dpo_teach.setup(seed=5, quiet=True)
    a = torch.rand(3)
    dpo_teach.setup(seed=5, quiet=True)
    assert torch.equal(a, torch.rand(3))


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("DPO_TEACH_PRESET", "gpt2")
    monkeypatch.setenv("DPO_TEACH_DEVICE", "cpu")
    preset = get_preset()
    assert preset.name == "gpt2" and preset.device == "cpu" and preset.model == "gpt2"
    monkeypatch.setenv("DPO_TEACH_PRESET", "large")
    with pytest.raises(ValueError, match="unknown preset 'large'"):
        get_preset()


def test_import_changes_no_global_setting():
    import subprocess
    import sys

    code = ("import torch; before = (torch.get_num_threads(), torch.get_default_dtype(), torch.initial_seed());"
            "import dpo_teach, dpo_teach.world, dpo_teach.logps, dpo_teach.models, dpo_teach.sampling;"
            "after = (torch.get_num_threads(), torch.get_default_dtype(), torch.initial_seed());"
            "assert before == after, (before, after)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture()
def local_gpt2_world(tmp_path, tokenizer, monkeypatch):
    """A GPT-2-shaped model with GPT-2's tokenizer conventions (no pad token) and an IMDb-like
    data set, saved in local folders the way the hub versions would be read."""
    import datasets

    model_dir = tmp_path / "gpt2"
    tok = GPT2TokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert tok.pad_token is None
    tok.save_pretrained(model_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(model_dir)  # GPT-2's default dropout of 0.1 is on
    reviews = [r["text"] + " <br /><br />Seen twice." for r in world.generate_reviews(40, seed=9)]
    imdb = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": reviews[:30], "label": [0] * 30}),
        "test": datasets.Dataset.from_dict({"text": reviews[30:], "label": [1] * 10}),
    })
    imdb.save_to_disk(str(tmp_path / "imdb"))
    monkeypatch.setenv("DPO_TEACH_MODEL", str(model_dir))
    monkeypatch.setenv("DPO_TEACH_DATASET", str(tmp_path / "imdb"))
    return get_preset("gpt2", device="cpu")


def test_gpt2_preset_loads_from_local_folders(local_gpt2_world):
    preset = local_gpt2_world
    model, tok = load_base_model(preset)
    assert tok.pad_token_id == tok.eos_token_id, "GPT-2 gets EOS as its pad token"
    assert not model.training
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)), "dropout off"
    train = world.load_reviews(preset, "train")
    assert len(train) == 30 and "<br />" not in train[0]
    assert len(world.load_reviews(preset, "validation")) == 5 and len(world.load_reviews(preset, "test")) == 5
    prompts = world.load_prompts(preset, "train")
    assert 0 < len(prompts) <= 30 and all(2 <= len(tok(p)["input_ids"]) <= 8 for p in prompts), "2 to 8 tokens"
    assert prompts == world.load_prompts(preset, "train"), "prompts are seeded"


def test_tiny_preset_reads_the_shipped_world(preset):
    assert len(world.load_reviews(preset, "train")) == world.SPLITS["reviews_train"][0]
    assert len(world.load_prompts(preset, "test", n=10)) == 10
    with pytest.raises(ValueError, match="split"):
        world.load_prompts(preset, "validation")
    report = json.loads((dpo_teach.presets.data_dir() / "base_model" / "pretrain_report.json").read_text())
    assert report["counts"]["reviews_train"] == world.SPLITS["reviews_train"][0]


def test_printed_paths_are_relative_to_the_repository(capsys, monkeypatch, tmp_path):
    """Committed outputs must not name the folder of the machine that executed them."""
    from dpo_teach.presets import REPOSITORY, data_dir, display_path

    for name in ("DPO_TEACH_PRESET", "DPO_TEACH_MODEL", "DPO_TEACH_DATASET", "DPO_TEACH_DATA"):
        monkeypatch.delenv(name, raising=False)
    preset = dpo_teach.setup(device="cpu")
    line = capsys.readouterr().out
    assert line == "dpo_teach: preset='tiny' device='cpu' seed=0 model=data/base_model\n"
    assert str(REPOSITORY) not in repr(preset) and "model='data/base_model'" in repr(preset)
    assert preset.model == str(data_dir() / "base_model") and data_dir().is_absolute(), "the field stays usable anywhere"

    assert display_path(REPOSITORY / "data" / ".." / "cache" / "tiny") == "cache/tiny"
    assert display_path(tmp_path / "gpt2") == str(tmp_path / "gpt2"), "outside the repository: as given"
    assert display_path("gpt2") == "gpt2" and display_path("stanfordnlp/imdb") == "stanfordnlp/imdb", "hub names"
    assert display_path(str(REPOSITORY) + "-copy/data") == str(REPOSITORY) + "-copy/data", "a sibling is outside"
    monkeypatch.setenv("DPO_TEACH_MODEL", str(tmp_path / "gpt2"))
    dpo_teach.setup("gpt2", device="cpu")
    assert capsys.readouterr().out.endswith(f"model={tmp_path / 'gpt2'}\n")
