"""The memory plan against measured reality: real parameter counts and the tensors autograd
actually saves (counted through saved_tensors_hooks) for our GPT-NeoX on CPU."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from engine.memory import (
    activation_breakdown,
    largest_micro_batch,
    parameter_count,
    parse_bytes,
    plan_memory,
)
from engine.model import PYTHIA_SHAPES, GPTNeoX, GPTNeoXConfig, pythia_config

# Odd sizes on purpose: nothing divides nicely, rotary covers 6 of 24 head dims.
TINY = dict(vocab_size=301, hidden_size=96, num_layers=3, num_heads=4, intermediate_size=376,
            max_positions=128)
# Exact parameter counts of the released Pythia checkpoints (transformers' num_parameters).
PYTHIA_PARAMS = {"pythia-70m": 70_426_624, "pythia-160m": 162_322_944,
                 "pythia-410m": 405_334_016, "pythia-1b": 1_011_781_632,
                 "pythia-1.4b": 1_414_647_808, "pythia-2.8b": 2_775_208_960,
                 "pythia-6.9b": 6_857_302_016, "pythia-12b": 11_846_072_320}


def test_parameter_count_matches_published_pythia_sizes():
    for name, expected in PYTHIA_PARAMS.items():
        assert parameter_count(pythia_config(name))["total"] == expected


def test_parameter_count_matches_a_real_model():
    config = GPTNeoXConfig(**TINY)
    model = GPTNeoX(config)
    counts = parameter_count(config)
    assert counts["total"] == model.num_parameters()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert counts["linear"] == sum(p.numel() for m in linears for p in m.parameters())
    assert counts["linear_weights"] == sum(m.weight.numel() for m in linears)
    for precision, per_param in (("fp32", 4), ("bf16-pure", 2)):
        plan = plan_memory(None, config, micro_batch=1, seq_len=8, precision=precision)
        weights = next(b for k, b in plan.components.items() if k.startswith("student weights"))
        assert weights == per_param * model.num_parameters()


def _saved_bytes(model, input_ids, autocast: bool):
    """Bytes of distinct storages autograd saves in the forward, split into the model's own
    weights' autocast casts (2-D bf16 copies of a parameter) and everything else."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    storages: dict[int, tuple[int, bool]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            is_cast = autocast and t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes
            storages[storage.data_ptr()] = (storage.nbytes(), is_cast)
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(input_ids)
    activations = sum(n for n, cast in storages.values() if not cast)
    casts = sum(n for n, cast in storages.values() if cast)
    return activations, casts


@pytest.mark.parametrize(
    "precision, checkpointing",
    [("fp32", False), ("bf16-autocast", False), ("bf16-pure", False), ("fp32", True),
     ("bf16-autocast", True)],
)
def test_activation_estimate_matches_saved_tensors(precision, checkpointing):
    """Measured saved bytes within 1% of the plan (exact for fp32/autocast on CPU; bf16-pure
    LayerNorm keeps its mean/rstd in bf16 where the plan assumes fp32)."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(**TINY)
    model = GPTNeoX(config)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    model.set_activation_checkpointing(checkpointing)
    micro_batch, seq_len = 3, 53
    input_ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    measured, casts = _saved_bytes(model, input_ids, autocast=precision == "bf16-autocast")

    breakdown = activation_breakdown(
        config, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
        activation_checkpointing=checkpointing,
    )
    predicted = sum(breakdown.values())
    if checkpointing:
        # The forward keeps only block inputs; the one block re-run during backward is the
        # non-checkpointed per-block figure, which the uncheckpointed cases measure.
        predicted -= breakdown["one block recomputed in backward"]
    assert measured == pytest.approx(predicted, rel=0.01)

    if precision == "bf16-autocast":
        plan = plan_memory(None, config, micro_batch=micro_batch, seq_len=seq_len,
                           precision=precision, activation_checkpointing=checkpointing,
                           fused_head=False)  # the forward above returns full logits
        planned_casts = plan.components["student bf16 weight casts (autocast)"]
        if checkpointing:  # the re-run block's copies appear only in backward
            h, i = config.hidden_size, config.intermediate_size
            planned_casts -= 2 * (4 * h * h + 2 * h * i)
        assert casts == planned_casts


def test_checkpointing_and_precision_order_the_plan():
    teacher, student = pythia_config("pythia-160m"), pythia_config("pythia-70m")
    kw = dict(micro_batch=2, seq_len=2048)
    full = plan_memory(teacher, student, **kw)
    ckpt = plan_memory(teacher, student, activation_checkpointing=True, **kw)
    pure = plan_memory(teacher, student, precision="bf16-pure", **kw)
    fp32 = plan_memory(teacher, student, precision="fp32", **kw)
    assert ckpt.total < full.total
    assert pure.total < full.total < fp32.total
    assert full.allocated_peak < full.total
    no_teacher = plan_memory(None, student, **kw)
    assert full.total - no_teacher.total > 2 * 162_322_944  # bf16 teacher weights at least


def test_seed_recipe_fits_12_gib():
    plan = plan_memory(pythia_config("pythia-160m"), pythia_config("pythia-70m"),
                       micro_batch=2, seq_len=2048, precision="bf16-autocast")
    assert plan.fits(parse_bytes("12GiB"))
    assert "fits" in plan.table(parse_bytes("12GiB"))
    json.dumps(plan.to_dict())  # serialisable


def test_largest_micro_batch_is_the_boundary_and_monotone():
    teacher, student = pythia_config("pythia-160m"), pythia_config("pythia-70m")
    previous = 0
    for gib in (2, 4, 8, 12, 24, 80):
        budget = gib * 2**30
        for ckpt in (False, True):
            mb = largest_micro_batch(teacher, student, seq_len=2048, budget_bytes=budget,
                                     activation_checkpointing=ckpt)
            if mb:
                assert plan_memory(teacher, student, micro_batch=mb, seq_len=2048,
                                   activation_checkpointing=ckpt).fits(budget)
            assert not plan_memory(teacher, student, micro_batch=mb + 1, seq_len=2048,
                                   activation_checkpointing=ckpt).fits(budget)
        mb = largest_micro_batch(teacher, student, seq_len=2048, budget_bytes=budget)
        assert mb >= previous
        previous = mb
    assert largest_micro_batch(teacher, student, seq_len=2048, budget_bytes=2**30) == 0
    assert largest_micro_batch(teacher, student, seq_len=2048, budget_bytes=12 * 2**30) >= 2


@pytest.mark.parametrize(
    "text, expected",
    [("12GiB", 12 * 2**30), ("12 GB", 12 * 10**9), ("1.5G", int(1.5 * 2**30)), ("512MiB", 2**29),
     ("4096", 4096), (1000, 1000), ("2kb", 2000), ("3 TiB", 3 * 2**40)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-1GiB", "0", "1.2.3G", True])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_bad_plan_arguments_are_named():
    student = pythia_config("pythia-70m")
    with pytest.raises(ValueError, match="precision"):
        plan_memory(None, student, micro_batch=1, seq_len=8, precision="fp8")
    with pytest.raises(ValueError, match="micro_batch"):
        plan_memory(None, student, micro_batch=0, seq_len=8)
    with pytest.raises(ValueError, match="unknown Pythia size"):
        pythia_config("pythia-1t")
    assert list(PYTHIA_SHAPES) == ["pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b",
                                   "pythia-1.4b", "pythia-2.8b", "pythia-6.9b", "pythia-12b"]


def _write_toml(path, **sections):
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_memplan_cli_seed_recipe(tmp_path, capsys):
    from engine.commands.memplan import main

    config = _write_toml(
        tmp_path / "seed.toml",
        teacher={"path": "EleutherAI/pythia-160m"},
        student={"path": "EleutherAI/pythia-70m"},
        batch={"micro_batch": 2, "seq_len": 2048},
    )
    out_json = tmp_path / "plan.json"
    assert main(["--config", str(config), "--budget", "12GiB", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "budget 12.00 GiB: fits" in text
    assert "largest micro_batch x 2048" in text
    saved = json.loads(out_json.read_text())
    assert saved["largest_micro_batch"]["checkpointing"] > saved["largest_micro_batch"][
        "no_checkpointing"] >= 2
    # An override on the command line reaches the plan, and a plan that does not fit exits 1.
    assert main(["--config", str(config), "--budget", "2GiB", "--batch.micro_batch=8"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_memplan_reads_config_json_of_a_checkpoint_folder(tmp_path, capsys):
    from engine.commands.memplan import main

    folder = tmp_path / "my-student"
    folder.mkdir()
    config = GPTNeoXConfig(**TINY)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    toml = _write_toml(tmp_path / "c.toml", student={"path": str(folder)},
                       batch={"micro_batch": 4, "seq_len": 64})
    assert main(["--config", str(toml), "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    expected = plan_memory(None, config, micro_batch=4, seq_len=64).total
    assert f"{expected:,}" in out


def test_memplan_errors_name_the_problem(tmp_path, capsys):
    from engine.commands.memplan import main

    toml = _write_toml(tmp_path / "c.toml", student={"path": str(tmp_path / "nowhere")})
    assert main(["--config", str(toml)]) == 2
    assert "student.path" in capsys.readouterr().err
    assert main(["--config", str(toml), "--budget", "lots"]) == 2
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


# ------------------------------------------------------------------ the fused head's plan

PLAN_VOCAB = 1003  # odd; 75-token chunks (4 equal ones of the 300 tokens) stay well below them


def _tiny_pair(precision: str, with_teacher: bool, checkpointing: bool):
    torch.manual_seed(0)
    student_cfg = GPTNeoXConfig(vocab_size=PLAN_VOCAB, hidden_size=64, num_layers=2,
                                num_heads=4, intermediate_size=200, max_positions=128)
    teacher_cfg = GPTNeoXConfig(vocab_size=PLAN_VOCAB, hidden_size=96, num_layers=2,
                                num_heads=4, intermediate_size=300, max_positions=128)
    student = GPTNeoX(student_cfg)
    if precision == "bf16-pure":
        student = student.to(torch.bfloat16)
    student.set_activation_checkpointing(checkpointing)
    teacher = None
    if with_teacher:
        teacher = GPTNeoX(teacher_cfg).eval().requires_grad_(False)
        if precision != "fp32":
            teacher = teacher.to(torch.bfloat16)
    return student, teacher


@pytest.mark.parametrize("chunk", [75, 512], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("with_teacher", [True, False], ids=["kd", "ce-only"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-pure"])
def test_fused_head_plan_matches_every_tensor_a_step_allocates(precision, with_teacher,
                                                               checkpointing, chunk):
    """The plan's activations, loss buffers and autocast casts against the peak of every
    tensor a whole micro-step (forward, fused head + loss, backward) keeps alive at once,
    measured through the dispatcher on the CPU (where the loss runs on its torch path); with
    several chunks (an fp32 d weight accumulator) and with one (its product is d weight)."""
    from engine.kernels.loss_spec import LossSpec
    from engine.train.step import distill_micro_step
    from engine.train.teacher_signal import LiveTeacher, NoTeacher
    from tests.engine.live_memory import LiveBytes

    student, teacher = _tiny_pair(precision, with_teacher, checkpointing)
    signal = LiveTeacher(teacher) if teacher is not None else NoTeacher()
    micro_batch, seq_len = 3, 100
    gen = torch.Generator().manual_seed(1)
    batch = {name: torch.randint(0, PLAN_VOCAB, (micro_batch, seq_len), generator=gen)
             for name in ("input_ids", "labels")}
    spec = LossSpec(alpha=0.5, temperature=2.0, fused_head=True, backend="torch")
    settings = dict(normalizer=None, chunk_tokens=chunk,
                    autocast_dtype=torch.bfloat16 if precision == "bf16-autocast" else None)
    distill_micro_step(student, signal, batch, spec, **settings)  # gradients exist from here on
    with LiveBytes() as live:
        distill_micro_step(student, signal, batch, spec, **settings)
    plan = plan_memory(teacher.config if teacher else None, student.config,
                       micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                       activation_checkpointing=checkpointing, fused_head=True,
                       chunk_tokens=chunk, device_type="cpu",
                       teacher_dtype_bytes=4 if precision == "fp32" else 2)
    predicted = sum(nbytes for name, nbytes in plan.components.items()
                    if plan.groups[name] in ("activations", "loss") or "casts" in name)
    assert not any("[B,T,V]" in name for name in plan.components)
    assert predicted == pytest.approx(live.peak, rel=0.05)


def test_full_logits_plan_matches_the_h200_measurements():
    """The full-logits plan against the allocated peaks the H200 measured (GPU suite, seed
    step, micro-batch 2 to 12 under a 12 GiB cap: benchmarks/results/gpu_suite_h200.json)."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks/results/gpu_suite_h200.json"
    attempts = json.loads(results.read_text())["sections"]["capped_12gib"]["attempts"]
    teacher, student = pythia_config("pythia-160m"), pythia_config("pythia-70m")
    for row in (a for a in attempts if a["ok"]):
        plan = plan_memory(teacher, student, micro_batch=row["micro_batch"], seq_len=2048,
                           fused_head=False)
        assert plan.allocated_peak == pytest.approx(row["peak_allocated_bytes"], rel=0.01)


def test_fused_head_plan_at_the_seed_shapes():
    teacher, student = pythia_config("pythia-160m"), pythia_config("pythia-70m")
    fused = plan_memory(teacher, student, micro_batch=12, seq_len=2048, teacher_dtype_bytes=2)
    full = plan_memory(teacher, student, micro_batch=12, seq_len=2048, teacher_dtype_bytes=2,
                       fused_head=False)
    assert fused.fused_head and not any("[B,T,V]" in name for name in fused.components)
    # The logits of both models (2 x 24576 x 50304 bf16 = 4.6 GiB) are what the fused head
    # saves; it costs two equal-chunk logit blocks and the head's gradient buffers instead.
    assert full.allocated_peak - fused.allocated_peak > 3.5 * 2**30
    assert largest_micro_batch(teacher, student, seq_len=2048, budget_bytes=12 * 2**30,
                               teacher_dtype_bytes=2) >= 24


def test_fused_head_extra_memory_at_the_seed_shapes():
    """Micro-batch 2 x 2048 (pythia-160m teacher, pythia-70m student, bf16 autocast, bf16
    teacher): the loss's own buffers (teacher hidden states, the fused head's chunk blocks
    and gradients, cuBLAS workspaces) at most 0.45 GiB, in 4 equal chunks of 1024 tokens."""
    teacher, student = pythia_config("pythia-160m"), pythia_config("pythia-70m")
    plan = plan_memory(teacher, student, micro_batch=2, seq_len=2048, teacher_dtype_bytes=2)
    loss = {name: n for name, n in plan.components.items() if plan.groups[name] == "loss"}
    assert sum(loss.values()) <= 0.45 * 2**30, loss
    assert loss["fused head: student logit block [chunk,V]"] == 2 * 1024 * 50304


# ----------------------------------------------------------------------------- on-policy sampling


def _kv_line(plan) -> int:
    (kv,) = [b for name, b in plan.components.items() if "KV cache" in name]
    return kv


@pytest.mark.parametrize("precision, kv_bytes", [("fp32", 4), ("bf16-autocast", 4),
                                                  ("bf16-pure", 2)])
def test_onpolicy_kv_cache_term_equals_the_formula_and_the_cache_allocated(precision, kv_bytes):
    """2 x layers x micro_batch x (prompt + new tokens) x hidden x the bytes of the weights the
    sampler reads (fp32 masters under autocast), and exactly what GPTNeoX.new_kv_cache holds."""
    teacher, student = pythia_config("pythia-160m"), pythia_config("pythia-70m")
    plan = plan_memory(teacher, student, micro_batch=6, seq_len=2048, precision=precision,
                       onpolicy=(64, 192))
    assert _kv_line(plan) == 2 * 6 * 6 * (64 + 192) * 512 * kv_bytes
    assert plan.groups[next(n for n in plan.components if "KV cache" in n)] == "sampling"
    tiny = GPTNeoX(GPTNeoXConfig(**TINY))
    if precision == "bf16-pure":
        tiny = tiny.to(torch.bfloat16)
    cache = tiny.new_kv_cache(3, 20 + 9)
    held = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
    small = plan_memory(None, tiny.config, micro_batch=3, seq_len=64, precision=precision,
                        device_type="cpu", onpolicy=(20, 9))
    assert _kv_line(small) == held


def test_onpolicy_fraction_zero_changes_nothing(tmp_path):
    """fraction 0 (whatever the other onpolicy keys say) plans exactly what no on-policy
    section plans: same components, bytes, table and JSON, single GPU and FSDP."""
    from engine.train.config import load_config
    from engine.train.setup import memory_planner

    config = _write_toml(tmp_path / "c.toml", teacher={"path": "EleutherAI/pythia-160m"},
                         student={"path": "EleutherAI/pythia-70m"},
                         batch={"micro_batch": 4, "seq_len": 2048})
    teacher, student = pythia_config("pythia-160m"), pythia_config("pythia-70m")
    for strategy in ("ddp", "fsdp"):
        plans = []
        for extra in ([], ["--onpolicy.fraction=0", "--onpolicy.new_tokens=500"],
                      ["--onpolicy.fraction=0.5"]):
            loaded = load_config(config, [f"--dist.strategy={strategy}", *extra], check=False)
            planner, args = memory_planner(loaded, world_size=2)
            plans.append(planner(teacher, student, micro_batch=4, **args))
        bare, zero, on = plans
        assert zero.to_dict() == bare.to_dict() and zero.table() == bare.table()
        assert "sampling" not in bare.groups.values() and bare.sampling_peak == 0
        assert "sampling" in on.groups.values() and on.to_dict() != bare.to_dict()
        # The training step itself is the same; only the sampling phase is new.
        assert on.step_peak == bare.step_peak


def test_onpolicy_peak_is_the_larger_of_the_step_and_the_sampling_phase():
    teacher = pythia_config("pythia-160m")
    seen = set()
    # 70m without checkpointing: its activations set the peak; 410m (24 layers) with
    # checkpointing and a whole 2048-token window sampled: its fp32 KV cache does.
    for name, checkpointing, new_tokens in (("pythia-70m", False, 64),
                                            ("pythia-410m", True, 1984)):
        student = pythia_config(name)
        plan = plan_memory(teacher, student, micro_batch=8, seq_len=2048,
                           activation_checkpointing=checkpointing, onpolicy=(64, new_tokens))
        bare = plan_memory(teacher, student, micro_batch=8, seq_len=2048,
                           activation_checkpointing=checkpointing)
        persistent = sum(b for name, b in plan.components.items()
                         if plan.groups[name] in ("student", "teacher")
                         and "casts" not in name)
        sampling = sum(b for name, b in plan.components.items()
                       if plan.groups[name] == "sampling")
        workspace = plan.components["cuBLAS workspaces and small buffers"]
        assert plan.step_peak == bare.allocated_peak
        assert plan.sampling_peak == persistent + sampling + workspace
        assert plan.allocated_peak == max(bare.allocated_peak, plan.sampling_peak)
        overhead = sum(b for name, b in plan.components.items()
                       if plan.groups[name] == "overhead")
        assert plan.total == plan.allocated_peak + overhead
        seen.add("sampling" if plan.sampling_peak > plan.step_peak else "step")
        table = plan.table()
        assert "sampler: student KV cache" in table and "on-policy sampling peak" in table
        assert plan.to_dict()["sampling_peak_bytes"] == plan.sampling_peak
    assert seen == {"sampling", "step"}  # each side of the max really wins once


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-pure"])
def test_sampler_components_match_every_tensor_sample_allocates(precision, monkeypatch):
    """The sampling group against the peak of every tensor engine.sampling.sample keeps alive
    at once (measured through the dispatcher on the CPU), prefill-bound and decode-bound. The
    plan is a GPU's: the CPU-only oneDNN weight copies of an fp32 sampler are left out."""
    from engine.memory import sampler_components
    from engine.model.network import PackedLinears, autocast_context
    from engine.sampling import new_generator, sample
    from tests.engine.live_memory import LiveBytes

    # Prefill-bound by the MLP, prefill-bound by the attention (9H > 4H + 2I), decode-bound.
    for shape, (batch, prompt, new) in (((96, 376), (4, 40, 3)), ((128, 200), (3, 20, 8)),
                                        ((64, 400), (2, 1, 8))):
        torch.manual_seed(0)
        cfg = GPTNeoXConfig(**{**TINY, "hidden_size": shape[0], "intermediate_size": shape[1],
                               "vocab_size": 1003})
        model = GPTNeoX(cfg)
        if precision == "bf16-pure":
            model = model.to(torch.bfloat16)
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt),
                                generator=torch.Generator().manual_seed(1))
        dtype = torch.bfloat16 if precision == "bf16-autocast" else None
        monkeypatch.setattr(PackedLinears, "usable", staticmethod(lambda model: False))
        with LiveBytes() as live, autocast_context("cpu", dtype):
            sample(model, prompts, new, generator=new_generator(0), stop_early=False)
        predicted = sum(b for _, b in sampler_components(
            cfg, micro_batch=batch, prompt_tokens=prompt, new_tokens=new, precision=precision))
        assert predicted == pytest.approx(live.peak, rel=0.05), shape


def test_memplan_shows_the_sampler_when_onpolicy_is_on(tmp_path, capsys):
    from engine.commands.memplan import main

    config = _write_toml(tmp_path / "seed.toml", teacher={"path": "EleutherAI/pythia-160m"},
                         student={"path": "EleutherAI/pythia-70m"},
                         batch={"micro_batch": 2, "seq_len": 2048})
    assert main(["--config", str(config)]) == 0
    assert "sampler" not in capsys.readouterr().out
    out_json = tmp_path / "plan.json"
    assert main(["--config", str(config), "--onpolicy.fraction=1", "--onpolicy.prompt_tokens=64",
                 "--onpolicy.new_tokens=128", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    kv = 2 * 6 * 2 * (64 + 128) * 512 * 4
    assert "sampler: student KV cache [2 x L x B x 192 x H]" in text and f"{kv:,}" in text
    assert "training step peak" in text and "on-policy sampling peak" in text
    saved = json.loads(out_json.read_text())["plan"]
    assert saved["groups"]["sampler: student KV cache [2 x L x B x 192 x H]"] == "sampling"
    assert saved["allocated_peak_bytes"] == max(saved["step_peak_bytes"],
                                                saved["sampling_peak_bytes"])
