"""The quickstart's own pieces: corpus builder, tokenizer, settings, verdict and exit codes.

The whole pipeline runs in CI through the README's `python -m engine.train`, so it is not
rerun here; these tests keep each step honest in seconds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from engine.quickstart import pipeline as quickstart
from engine.quickstart.corpus import (
    SPECIAL_TOKENS,
    build_stdlib_corpus,
    read_documents,
    stdlib_dir,
    stdlib_sources,
    train_bpe_tokenizer,
    write_pile_jsonl_zst,
)


def _fake_stdlib(root: Path) -> Path:
    files = {
        "zeta.py": "def zeta():\n    return 'z' * 3\n",
        "alpha.py": "import os\n\nprint(os.sep)  # café ✓\n",
        "pkg/__init__.py": "from .mod import thing\n",
        "pkg/mod.py": "thing = [i ** 2 for i in range(17)]\n" * 5,
        "test/test_x.py": "assert False\n",
        "site-packages/vendored.py": "raise SystemExit\n",
        "pkg/tests/test_y.py": "assert 0\n",
        "empty.py": "   \n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: skipped when read
    return root


def _read_pile(path: Path) -> list[dict]:
    import zstandard

    with open(path, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line) for line in io.StringIO(raw.decode("utf-8"))]


def test_sources_are_sorted_filtered_and_budgeted(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    files = [p.relative_to(root).as_posix() for p in stdlib_sources(root)]
    assert files == ["alpha.py", "empty.py", "latin1.py", "pkg/__init__.py", "pkg/mod.py",
                     "zeta.py"]
    budget = (root / "alpha.py").stat().st_size + (root / "zeta.py").stat().st_size
    small = [p.name for p in stdlib_sources(root, max_bytes=budget)]
    assert sum((root / n).stat().st_size for n in small) <= budget
    assert "alpha.py" in small and "pkg/mod.py" not in small
    with pytest.raises(FileNotFoundError, match="nowhere"):
        stdlib_sources(tmp_path / "nowhere")


def test_corpus_round_trips_in_pile_format(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    out = tmp_path / "corpus" / "c.jsonl.zst"
    summary = build_stdlib_corpus(out, root=root)
    records = _read_pile(out)
    assert summary["documents"] == len(records) == 4  # empty and non-UTF-8 files skipped
    assert [r["meta"]["path"] for r in records] == ["alpha.py", "pkg/__init__.py", "pkg/mod.py",
                                                    "zeta.py"]
    for record in records:
        assert record["text"] == (root / record["meta"]["path"]).read_text(encoding="utf-8")
        assert record["meta"]["pile_set_name"] == "Github"
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.jsonl.zst"]  # no temp left
    with pytest.raises(ValueError, match="no readable"):
        build_stdlib_corpus(tmp_path / "x.jsonl.zst", root=tmp_path / "corpus")


def test_corpus_of_the_real_stdlib_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl.zst"
    build_stdlib_corpus(a, max_bytes=300_000)
    build_stdlib_corpus(b, max_bytes=300_000)
    assert a.read_bytes() == b.read_bytes()
    assert len(_read_pile(a)) > 5


def test_tokenizer_is_gpt_neox_shaped_and_lossless(tmp_path):
    from tokenizers import Tokenizer

    root = stdlib_dir()
    texts = [t for _, t in read_documents(stdlib_sources(root, max_bytes=400_000), root)]
    path = tmp_path / "tok" / "tokenizer.json"
    vocab = train_bpe_tokenizer(texts, path, vocab_size=700)
    assert 259 < vocab <= 700
    tok = Tokenizer.from_file(str(path))
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == expected
    sample = "def f(x):\n    return {'ü': x ** 2}  # 🐍 never seen in training\n"
    ids = tok.encode(sample).ids
    assert tok.decode(ids) == sample
    assert all(0 <= i < vocab for i in ids)
    assert len(ids) < len(sample.encode("utf-8"))  # it learned merges
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, tmp_path / "t2.json", vocab_size=100)


def test_corpus_and_tokenizer_go_through_preprocess(tmp_path):
    from engine.data.preprocess import preprocess
    from engine.data.shards import ShardSet

    root = _fake_stdlib(tmp_path / "lib")
    corpus = tmp_path / "c.jsonl.zst"
    build_stdlib_corpus(corpus, root=root)
    tok = tmp_path / "tokenizer.json"
    texts = [t for _, t in read_documents(stdlib_sources(root), root)] * 3
    train_bpe_tokenizer(texts, tok, vocab_size=300)
    preprocess([corpus], tok, tmp_path / "shards")
    shards = ShardSet(tmp_path / "shards")
    assert len(shards) == 4
    assert shards.total_tokens > 4


def test_write_pile_replaces_atomically(tmp_path):
    out = tmp_path / "c.jsonl.zst"
    write_pile_jsonl_zst([("a", "first")], out)
    write_pile_jsonl_zst([("b", "second"), ("c", "third")], out)
    assert [r["text"] for r in _read_pile(out)] == ["second", "third"]


def test_default_settings_build_valid_stage_configs(tmp_path):
    settings = quickstart.load_settings(quickstart.DEFAULT_CONFIG)
    for variant in (settings, quickstart.shrink(settings)):
        fill = {"data": {"path": str(tmp_path)}, "student": {"path": str(tmp_path)}}
        for stage in quickstart.STAGES:
            config = quickstart.stage_config(variant, stage, fill)
            assert config.run.steps > 0
        teacher = quickstart.stage_config(variant, "teacher_pretrain", fill).student
        student = quickstart.stage_config(variant, "student_base", fill).student
        assert teacher.init == student.init == "scratch"
        assert teacher.hidden_size > student.hidden_size  # the teacher is the bigger model
    assert quickstart.shrink(settings)["distill"]["run"]["steps"] < settings["distill"]["run"][
        "steps"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[quickstart]\nout_dir = 'x'\n[bogus]\n", "unknown table"),
        ("[quickstart]\nout_dir = 'x'\ncolour = 1\n", "quickstart.colour"),
        ("[quickstart]\nout_dir = 3\n", "quickstart.out_dir must be str"),
        ("[quickstart]\nout_dir = 'x'\n", "missing"),
        ("[quickstart\n", "not valid TOML"),
    ],
)
def test_bad_settings_are_named(tmp_path, text, message):
    path = tmp_path / "q.toml"
    path.write_text(text)
    with pytest.raises(quickstart.QuickstartError, match=message):
        quickstart.load_settings(path)


def test_bad_engine_key_in_a_stage_is_a_config_error(tmp_path):
    from engine.train.config import ConfigError

    settings = quickstart.load_settings(quickstart.DEFAULT_CONFIG)
    settings["distill"]["optim"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match="learning_rate"):
        quickstart.stage_config(settings, "distill", {"data": {"path": str(tmp_path)}})


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(quickstart.QuickstartError, match="not written by the quickstart"):
        quickstart._prepare_out_dir(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    quickstart._prepare_out_dir(ours)
    (ours / "distill").mkdir()
    (ours / "distill" / "old").write_text("previous run")
    quickstart._prepare_out_dir(ours)
    assert not (ours / "distill").exists() and (ours / quickstart.STARTED).is_file()
    # A user's file beside the quickstart's output: refused, and nothing of it is deleted.
    (ours / "distill").mkdir()
    (ours / "my-notes.txt").write_text("keep me")
    with pytest.raises(quickstart.QuickstartError, match=r"my-notes\.txt"):
        quickstart._prepare_out_dir(ours)
    assert (ours / "my-notes.txt").read_text() == "keep me" and (ours / "distill").is_dir()


def _rows(base_ppl, distilled_ppl, control_ppl=None):
    import math

    def row(stage, ppl):
        return {"model": stage, "stage": stage, "steps": 10, "params": 1e5,
                "ce": math.log(ppl), "ppl": ppl, "tokens": 100, "last_word_ppl": 10 * ppl,
                "last_word_acc": 0.25, "last_word_items": 40}

    rows = [row("student_base", base_ppl), row("teacher_pretrain", 50.0),
            row("distill", distilled_ppl)]
    if control_ppl is not None:
        rows.append(row("control", control_ppl))
    return rows


def test_verdict():
    ok, notes = quickstart.verdict(_rows(100.0, 90.0, 95.0))
    assert ok and "AHEAD" in notes[0] and "teacher helped" in notes[-1]
    assert notes[1] == ("last word (LAMBADA-style) of the distilled student vs its base: ppl "
                        "900.00 vs 1000.00 (-10.0%), acc 0.250 vs 0.250")
    ok, notes = quickstart.verdict(_rows(100.0, 101.0))
    assert not ok and "NOT AHEAD" in notes[0]
    ok, _ = quickstart.verdict(_rows(100.0, float("nan")))
    assert not ok
    table = quickstart.format_table(_rows(100.0, 90.0))
    assert "student_base" in table and "last-word ppl" in table and "40 passages" in table
    assert "1000.00   0.250" in table


@pytest.mark.parametrize("distilled, code", [(90.0, 0), (120.0, 1)])
def test_main_exit_code_follows_the_verdict(tmp_path, monkeypatch, capsys, distilled, code):
    def fake_pipeline(settings, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"rows": _rows(100.0, distilled, 95.0), "timings_s": {"total": 1.0},
                "corpus": {"path": "c"}, "tokenizer": {"path": "t"}, "data_dir": "d",
                "runs": {}}

    monkeypatch.setattr(quickstart, "run_pipeline", fake_pipeline)
    assert quickstart.main(["--out-dir", str(tmp_path / "run")]) == code
    captured = capsys.readouterr()
    assert "Held-out perplexity" in captured.out
    assert ("FAILED" in captured.err) == (code == 1)
    assert json.loads((tmp_path / "run" / quickstart.MARKER).read_text())["ok"] == (code == 0)


def test_main_reports_bad_config_with_exit_2(tmp_path, capsys):
    assert quickstart.main(["--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in capsys.readouterr().err


def test_every_stage_validates_on_the_tokens_the_table_scores(tmp_path, monkeypatch, capsys):
    """Issue 22, item 25: curves.png's held-out ppl (the runs' validation) and the table's
    (held_out) were two numbers on two token sets (4 vs eval_batches micro-batches). Every
    stage now validates on eval_batches micro-batches of the distill config's val split, the
    table's loader; and the legend says how many tokens its number is on."""
    seen = {}

    def fake_run(config):
        seen[config.run.out_dir] = config
        return {"status": "completed", "out_dir": config.run.out_dir,
                "export_dir": str(Path(config.run.out_dir) / "final")}

    monkeypatch.setattr(quickstart, "train_run", fake_run)
    data = {"tokenizer_path": tmp_path / "tokenizer.json", "data_dir": tmp_path,
            "vocab": 500, "model_vocab": 512, "last_word": tmp_path / "last_word.jsonl"}
    default = quickstart.load_settings(quickstart.DEFAULT_CONFIG)
    for settings in (default, quickstart.shrink(default)):
        _, configs = quickstart.train_stages(settings, tmp_path, data, quickstart._Laps())
        eval_batches = settings["quickstart"]["eval_batches"]
        reference = configs["distill"]
        for config in configs.values():
            assert config.run.val_batches == eval_batches
            assert (config.batch.micro_batch, config.data.val_fraction) == (
                reference.batch.micro_batch, reference.data.val_fraction)
    from engine.curves import _on_tokens

    assert _on_tokens([{"val_ppl": 134.7, "val_tokens": 16256}]) == " on 16,256 val tokens"
