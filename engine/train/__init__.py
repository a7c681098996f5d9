"""Training: `python -m engine.train` (engine/train/__main__.py) and `run(config)` from code
(`from engine.train.loop import run`).

    config.py      the typed configuration (TOML presets + --section.key=value overrides)
    setup.py       builders: models, loader, optimizer, micro-batch plan, loss spec
    strategy.py    one process, DDP or FSDP, built once: wrapping, clip, checkpoint layout
    checkpointer.py  resume, save every run.save_every, prune, the last good checkpoint
    step.py        one micro-step and one optimizer step (the normaliser, docs/loss.md)
    teacher_signal.py  the teacher interface the step calls: none, a live teacher, a cache
    loop.py        the Trainer: setup, train_step(), and the validate/save/stop policy
    watch.py       eval.tasks scored while training, the regression alarm
    lost_updates.py  update_lost_frac: AdamW updates a bf16 weight rounded away
    checkpoint.py  atomic, resumable checkpoints; export.py the final Hugging Face folder
    signals.py     SIGTERM/SIGINT -> finish the step, save, exit

This file imports nothing, so importing one module of the package (the training step, say)
loads that module's imports only, not the whole loop (tests/test_architecture.py counts them).
"""
