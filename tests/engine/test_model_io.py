"""Checkpoint folders in and out: round trips with transformers, atomic saves, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.model import (
    CheckpointError,
    GPTNeoX,
    GPTNeoXConfig,
    load_pretrained,
    save_pretrained,
)
from tests.engine.test_model import (
    FP32_TOLERANCE,
    hf_state_dict_as_ours,
    ours_from_hf,
    perturbed,
    relative_max_diff,
)
from tests.hf_models import random_pythia

VOCAB = 503


def perturbed_model(seed=0, **overrides) -> GPTNeoX:
    """Our model with every parameter (LayerNorm and biases included) moved off its init."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                  intermediate_size=256)
    fields.update(overrides)
    return perturbed(GPTNeoXConfig(**fields), seed=seed)


def sample_ids(seed=0, shape=(2, 29)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, input_ids):
    out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("save_dtype", [None, torch.float16])
def test_our_save_loads_in_transformers_with_the_same_logits(tmp_path, save_dtype):
    from transformers import GPTNeoXForCausalLM

    # Non-default rotary settings prove transformers reads them from our config.json.
    ours = perturbed_model(seed=1, rotary_pct=0.5, rotary_base=500.0, use_parallel_residual=False)
    folder = save_pretrained(ours, tmp_path / "student", dtype=save_dtype)
    hf, info = GPTNeoXForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    if save_dtype is not None:
        ours = ours.to(save_dtype).float()  # the logits of what was actually written
    input_ids = sample_ids(1)
    assert relative_max_diff(logits_of(hf.eval(), input_ids), logits_of(ours, input_ids)) <= (
        FP32_TOLERANCE
    )


def add_legacy_buffers(folder: Path, num_layers: int, rotary_dims: int) -> None:
    """Put the per-layer buffers old GPT-NeoX checkpoints carry into the shards, as released."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    mask = torch.tril(torch.ones(2048, 2048, dtype=torch.uint8)).view(1, 1, 2048, 2048)
    for layer in range(num_layers):
        prefix = f"gpt_neox.layers.{layer}.attention."
        shard = weight_map[prefix + "query_key_value.weight"]
        tensors = load_file(folder / shard)
        extra = {
            prefix + "bias": mask,
            prefix + "masked_bias": torch.tensor(-1e9),
            prefix + "rotary_emb.inv_freq": 1.0 / 10000 ** (
                torch.arange(0, rotary_dims, 2).float() / rotary_dims
            ),
        }
        tensors.update(extra)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in extra})
    index_path.write_text(json.dumps(index))


def test_transformers_fp16_sharded_save_with_legacy_buffers_loads_in_ours(tmp_path):
    hf = random_pythia("tiny", seed=4, vocab_size=VOCAB)
    folder = tmp_path / "released"
    hf.half().save_pretrained(folder, max_shard_size="100KB")  # released Pythia is fp16
    hf.float()  # the reference: the same fp16-rounded weights, computed in fp32
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    with safe_open(str(shards[0]), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    add_legacy_buffers(folder, num_layers=2, rotary_dims=4)

    ours = load_pretrained(folder)
    assert ours.embed_out.weight.dtype == torch.float32 and not ours.training
    input_ids = sample_ids(2)
    reference = logits_of(hf, input_ids)
    assert relative_max_diff(logits_of(ours, input_ids), reference) <= FP32_TOLERANCE

    in_bf16 = load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in in_bf16.parameters()} == {torch.bfloat16}
    assert in_bf16.rotary.cos.dtype == torch.float32
    assert relative_max_diff(logits_of(in_bf16, input_ids), reference) <= 2e-2


def test_ours_round_trip_is_exact_and_fp16_save_rounds_like_release(tmp_path):
    ours = perturbed_model(seed=5)
    loaded = load_pretrained(save_pretrained(ours, tmp_path / "a"))
    for (name, p), q in zip(ours.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        assert q.requires_grad
    storages = {p.untyped_storage().data_ptr() for p in loaded.parameters()}
    assert len(storages) == len(list(loaded.parameters()))  # one storage per tensor, no views
    assert loaded.config == ours.config

    save_pretrained(ours, tmp_path / "b", dtype=torch.float16)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["model_type"] == "gpt_neox"
    half_loaded = load_pretrained(tmp_path / "b")
    for p, q in zip(ours.parameters(), half_loaded.parameters(), strict=True):
        torch.testing.assert_close(q, p.half().float(), rtol=0, atol=0)


def test_hf_module_state_matches_our_names_one_to_one():
    hf = random_pythia("tiny", seed=0, vocab_size=VOCAB)
    ours = ours_from_hf(hf)
    assert set(hf_state_dict_as_ours(hf)) == set(ours.state_dict())


# ------------------------------------------------------------------------------ atomic save


def test_save_replaces_an_existing_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(perturbed_model(seed=1), target)
    newer = perturbed_model(seed=2)
    save_pretrained(newer, target)
    loaded = load_pretrained(target)
    torch.testing.assert_close(loaded.embed_out.weight, newer.embed_out.weight, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp leftovers
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's private 0700


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    old = perturbed_model(seed=1)
    save_pretrained(old, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import safetensors.torch

    def half_write_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(perturbed_model(seed=2), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("irreplaceable")
    with pytest.raises(CheckpointError, match="notes"):
        save_pretrained(perturbed_model(), precious)
    assert (precious / "thesis.txt").read_text() == "irreplaceable"
    # A model folder with more than config.json + model.safetensors (its tokenizer) is not
    # replaced either: nothing there but what save_pretrained writes is ever deleted.
    model_dir = save_pretrained(perturbed_model(), tmp_path / "model")
    (model_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer"):
        save_pretrained(perturbed_model(seed=1), model_dir)
    assert (model_dir / "tokenizer.json").read_text() == "{}"


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def good_folder(tmp_path) -> Path:
    return save_pretrained(perturbed_model(seed=3), tmp_path / "good")


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_config_names_the_path(good_folder):
    (good_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"good/config\.json.*not found"):
        load_pretrained(good_folder)


def test_broken_config_names_the_path(good_folder):
    (good_folder / "config.json").write_text('{"model_type": "gpt_neox", ')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_pretrained(good_folder)
    (good_folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type must be 'gpt_neox'"):
        load_pretrained(good_folder)


def test_missing_folder_and_missing_weights(tmp_path, good_folder):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    (good_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"good: no model\.safetensors"):
        load_pretrained(good_folder)


def test_missing_tensor_is_named(good_folder):
    rewrite_weights(good_folder, lambda t: t.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    expected = r"missing tensor.*layers\.1\.mlp\.dense_4h_to_h\.bias"
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(good_folder)


def test_unexpected_tensor_is_named(good_folder):
    rewrite_weights(
        good_folder, lambda t: t.update({"gpt_neox.layers.0.attention.scale": torch.ones(3)})
    )
    expected = r"unexpected tensor 'gpt_neox\.layers\.0\.attention\.scale'"
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(good_folder)


def test_shape_mismatch_names_tensor_and_both_shapes(good_folder):
    rewrite_weights(
        good_folder, lambda t: t.update({"gpt_neox.embed_in.weight": torch.randn(VOCAB + 1, 64)})
    )
    with pytest.raises(CheckpointError) as info:
        load_pretrained(good_folder)
    message = str(info.value)
    assert "gpt_neox.embed_in.weight" in message
    assert f"expected [{VOCAB}, 64]" in message and f"found [{VOCAB + 1}, 64]" in message


def test_integer_tensor_is_refused_by_name(good_folder):
    rewrite_weights(
        good_folder,
        lambda t: t.update({"gpt_neox.final_layer_norm.bias": torch.arange(64, dtype=torch.int32)}),
    )
    with pytest.raises(CheckpointError, match=r"final_layer_norm\.bias.*dtype I32"):
        load_pretrained(good_folder)


@pytest.mark.parametrize("damage", ["truncate", "tiny", "garbage"])
def test_damaged_weights_file_names_the_path(good_folder, damage):
    weights = good_folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "tiny":
        weights.write_bytes(data[:5])
    else:
        weights.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    expected = r"good/model\.safetensors: not a readable safetensors"
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(good_folder)


def test_index_referencing_a_missing_shard_names_it(tmp_path):
    hf = random_pythia("tiny", seed=4, vocab_size=VOCAB)
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file .*{victim.name}"):
        load_pretrained(folder)



def test_tensor_in_two_shards_is_refused_by_name(tmp_path):
    hf = random_pythia("tiny", seed=4, vocab_size=VOCAB)
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    name = next(iter(load_file(first)))
    tensors = load_file(second)
    tensors[name] = load_file(first)[name]
    save_file(tensors, second, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name}.*also appears in"):
        load_pretrained(folder)


def test_save_replaces_only_a_folder_it_wrote_unchanged(tmp_path):
    """Issue 22, A.2: config.json + model.safetensors alone (a downloaded model, a
    checkpoint's student/) are not proof of ours; the marker save_pretrained writes is, and
    only while each file keeps the sha256 it records."""
    downloaded = save_pretrained(perturbed_model(seed=1), tmp_path / "downloaded")
    (downloaded / "neox_distill_export.json").unlink()  # as a model from the Hub has none
    before = {p.name: p.read_bytes() for p in downloaded.iterdir()}
    with pytest.raises(CheckpointError, match="was not exported by neox-distill"):
        save_pretrained(perturbed_model(seed=2), downloaded)
    assert {p.name: p.read_bytes() for p in downloaded.iterdir()} == before
    ours = save_pretrained(perturbed_model(seed=1), tmp_path / "ours")
    save_pretrained(perturbed_model(seed=2), ours)  # ours, unchanged: replaced
    config = ours / "config.json"
    config.write_text(config.read_text().replace("  ", "\t", 1))  # an edit of the user's
    with pytest.raises(CheckpointError, match=r"config\.json \(edited\)"):
        save_pretrained(perturbed_model(seed=3), ours)
