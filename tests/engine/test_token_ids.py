"""Token and pad ids outside the embedding: a clear message, never an IndexError (issue 10,
item 12) in training, `engine.eval --heldout` and `engine.generate`; and generate's own
argument checks (item 14: --temperature nan, --device cuda on a CPU build)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.eval.__main__ import main as eval_main
from engine.generate import generate
from engine.generate import main as generate_main
from engine.model import GPTNeoX, GPTNeoXConfig, save_pretrained
from engine.train.__main__ import main as train_main
from tests.data.common import train_tokenizer
from tests.engine.test_train import VOCAB, base_overrides

SMALL_VOCAB = 100  # the test data holds ids up to VALID_VOCAB (300)


def small_model(vocab_size: int = SMALL_VOCAB) -> GPTNeoX:
    torch.manual_seed(0)
    return GPTNeoX(GPTNeoXConfig(vocab_size=vocab_size, hidden_size=16, num_layers=1,
                                 num_heads=2, intermediate_size=32, max_positions=64))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "IndexError" not in err and "Traceback" not in err
    return err


def test_training_on_ids_past_the_embedding_stops_with_the_data_named(assets, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    code = train_main(base_overrides(
        assets, out, teacher__path="", student__init="scratch", student__path="",
        student__vocab_size=SMALL_VOCAB, student__num_layers=1, student__hidden_size=16,
        student__num_heads=2, student__intermediate_size=32, student__max_positions=32,
        data__valid_vocab=0, run__steps=2,
    ))
    assert code == 1
    err = error_line(capsys)
    assert f"data.path={assets['data']}: a batch of step 1" in err
    assert f"outside the model's embedding of {SMALL_VOCAB} rows" in err
    assert not (out / "checkpoints").exists()


def test_a_pad_id_past_the_embedding_is_refused_at_start_up(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_overrides(assets, out, data__mode="padded",
                                     data__pad_id=99999)) == 2
    err = error_line(capsys)
    assert f"data.pad_id=99999 is outside the models' {VOCAB} embedding rows" in err
    assert not (out / "metrics.jsonl").exists()


def test_eval_heldout_with_a_smaller_model_names_the_data(assets, tmp_path, capsys):
    folder = save_pretrained(small_model(), tmp_path / "small")
    code = eval_main(["--model", str(folder), "--task", "ppl", "--data", str(assets["data"]),
                      "--heldout", "packed", "--max-length", "16", "--val-fraction", "0.05",
                      "--no-progress"])
    assert code == 2
    err = error_line(capsys)
    assert f"{assets['data']}: held-out, batch 0" in err and f"{SMALL_VOCAB} rows" in err
    code = eval_main(["--model", str(folder), "--task", "ppl", "--data", str(assets["data"]),
                      "--heldout", "padded", "--pad-id", "500", "--max-length", "16"])
    assert code == 2
    assert "--pad-id 500 is outside the 100 embedding rows" in error_line(capsys)


def test_generate_refuses_prompt_ids_past_the_embedding():
    model = small_model()
    with pytest.raises(ValueError, match=f"prompt: token id 250 is outside the model's "
                                         f"embedding of {SMALL_VOCAB} rows"):
        generate(model, torch.tensor([3, 250, 7]), 2)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_generate_refuses_a_temperature_that_is_not_a_finite_number(temperature):
    with pytest.raises(ValueError, match="temperature: must be a finite number >= 0"):
        generate(small_model(), torch.tensor([1, 2]), 2, temperature=temperature)


def test_generate_cli_errors_are_one_line(tmp_path, neox_tokenizer_path, capsys):
    folder = save_pretrained(small_model(), tmp_path / "small")
    common = ["--model", str(folder), "--tokenizer", str(neox_tokenizer_path),
              "--prompt", "Hello world", "--max-new-tokens", "2"]
    assert generate_main(common) == 2  # NeoX ids of "Hello world" are far past 100 rows
    err = error_line(capsys)
    assert str(neox_tokenizer_path) in err and "the tokenizer the model was trained with" in err
    for extra, fragment in ((["--temperature", "nan"], "temperature: must be a finite"),
                            (["--device", "gpu"], "--device gpu: not a device")):
        assert generate_main([*common, *extra]) == 2
        assert fragment in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_generate_on_cuda_without_cuda_says_so(tmp_path, capsys):
    folder = save_pretrained(small_model(), tmp_path / "small")
    tokenizer = train_tokenizer(tmp_path / "tokenizer.json", ["a tiny corpus"], vocab_size=90)
    assert generate_main(["--model", str(folder), "--tokenizer", str(tokenizer),
                          "--prompt", "x", "--device", "cuda"]) == 2
    assert "--device cuda: this torch build or machine has no CUDA device" in error_line(capsys)
