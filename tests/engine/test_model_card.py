"""Every export is complete on its own: a model card with the run's real numbers, the
tokenizer files AutoTokenizer needs, files readable as the umask says."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml

from engine.data.jsonl import iter_records
from engine.model import GPTNeoXConfig, load_pretrained
from engine.model.config import pythia_config
from engine.quickstart.corpus import train_bpe_tokenizer
from engine.train import model_card as card
from engine.train.export import export_student
from engine.train.loop import run
from tests.data.common import random_texts
from tests.engine.test_train import VALID_VOCAB, make_assets, make_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A 3-step distillation run with a tokenizer: its result, folder and metrics."""
    root = tmp_path_factory.mktemp("card")
    assets = make_assets(root / "assets")
    tokenizer = root / "tokenizer.json"
    train_bpe_tokenizer(random_texts(200, 0), tokenizer, vocab_size=VALID_VOCAB)
    result = run(make_config(assets, root / "run", run__steps=3, run__tokenizer=tokenizer,
                             loss__alpha=0.3, loss__temperature=1.5))
    return {"result": result, "folder": Path(result["export_dir"]), "assets": assets}


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def test_card_states_the_runs_real_numbers(exported):
    folder, result = exported["folder"], exported["result"]
    meta, body = split_card((folder / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert "knowledge-distillation" in meta["tags"] and "base_model" not in meta
    assert "datasets" not in meta  # random shards, not the Pile: no claim about the data
    val = result["val"]
    for key in ("val_ce", "val_ppl", "val_kd", "val_teacher_ce"):
        assert f"| {val[key]:.6g} |" in body, key
    assert f"| tokens scored | {val['val_tokens']} |" in body
    from engine.data.loader import build_dataset

    dataset = build_dataset(exported["assets"]["data"], "packed", 16)
    assert f"shard fingerprint: `{dataset.fingerprint()}`" in body
    assert "tokens seen: 192 (3 optimizer steps x 64 tokens)" in body
    for row in ("| loss | 0.3 x CE + 0.7 x KD |", "| temperature T | 1.5 |",
                "| divergence | forward_kl |", "| steps | 3 (of 3 planned) |",
                "| precision | fp32 |", "= 64 tokens per step |", "| learning rate | 0.003,"):
        assert row in body, row
    assert f"`{exported['assets']['teacher']}`" in body
    assert f"pretrained={folder},dtype=float32" in body
    assert "--tasks piqa,winogrande,lambada_openai,arc_easy,sciq,wsc" in body


def test_cards_heldout_command_reproduces_its_metrics(exported, capsys):
    """The neox-distill eval call the card prints gives the numbers the card states."""
    from engine.eval.__main__ import main as eval_main

    body = (exported["folder"] / "README.md").read_text()
    command = next(block for block in body.split("```bash\n") if "--heldout" in block)
    command = command.split("```")[0].replace("\\\n", " ")
    args = command.split("neox-distill eval ", 2)[2].split()
    assert eval_main([*args, "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)["results"][0]
    val = exported["result"]["val"]
    for key in ("ce", "ppl", "kd", "teacher_ce", "tokens"):
        assert scored[key] == pytest.approx(val[f"val_{key}"], rel=1e-6), key


def test_export_loads_with_autotokenizer_and_gptneox(exported):
    folder = exported["folder"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert tokenizer.pad_token == "<|padding|>" and tokenizer.pad_token_id == 1
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in random_texts(20, 5):
        assert tokenizer(text)["input_ids"] == raw.encode(text).ids, text
    model = transformers.GPTNeoXForCausalLM.from_pretrained(folder).eval()
    ours = load_pretrained(folder)
    ids = torch.tensor([tokenizer("ab cd")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), rtol=1e-4, atol=1e-5)


def test_real_neox_tokenizer_settings(neox_tokenizer_path, pile_sample_path, tmp_path):
    shutil.copyfile(neox_tokenizer_path, tmp_path / "tokenizer.json")
    card.write_tokenizer_files(tmp_path, pythia_config("70m"), pad_id=1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0 and tokenizer.pad_token_id == 1
    assert tokenizer.model_max_length == 2048
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(neox_tokenizer_path))
    for i, record in enumerate(iter_records(pile_sample_path, 0)):
        if i == 20:
            break
        assert tokenizer(record.text)["input_ids"] == raw.encode(record.text).ids


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_export_file_modes_follow_the_umask(exported, tmp_path, umask):
    student = load_pretrained(exported["folder"])
    old = os.umask(umask)
    try:
        folder = export_student(student, tmp_path / "final", model_card="# card\n",
                                tokenizer_path=exported["folder"] / "tokenizer.json", pad_id=1)
    finally:
        os.umask(old)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "neox_distill_export.json",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_base_model_and_config_names():
    pythia = pythia_config("70m")
    custom = GPTNeoXConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=72)
    assert card.pythia_name(pythia) == "pythia-70m" and card.pythia_name(custom) is None
    assert card.describe_shape(pythia).startswith("pythia-70m (6 layers, hidden 512")
    assert card.describe_shape(custom).startswith("custom GPT-NeoX (2 layers")
    for path, expected in [
        ("/models/pythia-70m", "EleutherAI/pythia-70m"),
        ("/hub/models--EleutherAI--pythia-70m-deduped/snapshots/0a1b",
         "EleutherAI/pythia-70m-deduped"),
        ("/models/pythia-70m-v0", None),
        ("/models/mypythia-70m", None),
        ("/models/pythia-160m", None),  # the name disagrees with the shape
        ("", None),
    ]:
        assert card.hub_base_model(path, pythia) == expected, path
    assert card.hub_base_model("/models/pythia-70m", custom) is None


def test_card_variants_ce_only_no_validation_pile_data(exported):
    from engine.train.config import load_config

    facts = {**_facts_of(exported), "teacher_config": None, "val": None,
             "inputs": ["/pile/train/00.jsonl.zst"], "student_config": pythia_config("70m")}
    facts["config"] = load_config(None, ["--student.path=/models/pythia-70m",
                                         "--data.path=/data/pile", "--run.val_batches=0"])
    meta, body = split_card(card.render_model_card(facts, Path("/x/final"),
                                                   has_tokenizer=False))
    assert meta["datasets"] == ["EleutherAI/pile"] and meta["language"] == ["en"]
    assert meta["base_model"] == "EleutherAI/pythia-70m" and "pythia" in meta["tags"]
    assert "knowledge-distillation" not in meta["tags"]
    assert "| loss | cross-entropy only (no teacher) |" in body and "divergence" not in body
    assert "Not measured" in body and "No tokenizer was exported" in body
    assert "--teacher" not in body and "--limit" not in body
    assert "made by `neox-distill preprocess` from `/pile/train/00.jsonl.zst`" in body


def _facts_of(exported) -> dict:
    """run_facts of the exported run, rebuilt from its folder (no Trainer kept around)."""
    from engine.train.config import config_from_dict

    result = exported["result"]
    config = config_from_dict(json.loads((Path(result["out_dir"]) / "config.json").read_text()))
    student = load_pretrained(exported["folder"])
    return {"config": config, "student_config": student.config,
            "student_params": student.num_parameters(), "teacher_config": None,
            "teacher_params": 0, "fingerprint": "f", "inputs": [], "shard_tokens": 10,
            "steps": result["step"], "tokens_per_step": 64, "micro_batch": 2, "accum_steps": 2,
            "world_size": 1, "val": result["val"]}


def test_an_unreadable_tokenizer_is_exported_as_is_with_a_warning(exported, tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text('{"fake": "tokenizer"}')
    with pytest.warns(RuntimeWarning, match=rf"{bad}: not a tokenizer\.json .* exported as is"):
        folder = export_student(load_pretrained(exported["folder"]), tmp_path / "final",
                                tokenizer_path=bad, pad_id=1)
    assert (folder / "tokenizer.json").read_text() == bad.read_text()
    assert not (folder / "tokenizer_config.json").exists()
