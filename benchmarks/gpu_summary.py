"""The GPU suite's closing table: one (check, measured, target) row per figure it promises.

Built from the report dict alone (benchmarks/gpu_suite.py writes it as gpu_suite.json), so a
saved report can be summarised again and a failed section shows as a row, not a crash.
"""

from __future__ import annotations


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "n/a"


def _mib(n) -> str:
    return f"{n:.0f} MiB" if isinstance(n, (int, float)) else "n/a"


def _failures(sections: dict) -> list[tuple[str, str, str]]:
    return [(name, "FAILED: " + body["error"].strip().splitlines()[-1][:70], "-")
            for name, body in sections.items() if "error" in body]


def _kernel_rows(sections: dict) -> list[tuple[str, str, str]]:
    rows = []
    kc = sections.get("kernel_correctness", {})
    if "passed" in kc:
        rows.append(("kernel vs float64 reference",
                     f"{'PASS' if kc['passed'] else 'FAIL'} ({len(kc['cases'])} cases, max grad "
                     f"rel err {kc['max_grad_rel_err']:.1e})", "all pass"))
    for n, speed in sections.get("kernel_speed", {}).items():
        if isinstance(speed, dict) and "error" in speed:
            rows.append((f"kernel speed {n} tokens", "FAILED: " + speed["error"][:70], "-"))
        if not isinstance(speed, dict) or "variants" not in speed:
            continue
        v = speed["variants"]
        best = min(("ours", "ours_inplace"), key=lambda k: v[k]["median_ms"] if k in v else 1e30)
        ours = v[best]
        rows.append((f"kernel {speed['n_tokens']}x{speed['vocab']} {speed['dtype']}",
                     f"{ours['median_ms']:.3f} ms, {ours['fraction_of_copy'] * 100:.0f}% of copy "
                     f"bw, x{ours['speedup_vs_eager']:.1f} eager, x"
                     f"{v['naive_compiled']['median_ms'] / ours['median_ms']:.1f} compiled",
                     ">= 80% copy bw, >= 3x eager"))
    div = sections.get("divergences", {})
    if "rows" in div:
        worst = max(div["rows"], key=lambda k: div["rows"][k]["vs_forward_kl"])
        rows.append((f"divergences {div['n_tokens']}x{div['vocab']} {div['dtype']}",
                     f"worst x{div['max_vs_forward_kl']:.2f} of forward_kl ({worst}, "
                     f"{div['rows'][worst]['median_ms']:.3f} ms)", "<= 1.2x"))
    return rows


def _head_rows(sections: dict) -> list[tuple[str, str, str]]:
    head = sections.get("head", {})
    variants = head.get("variants", {})
    rows = []
    if "fused_vs_matmuls" in head:
        fused, matmuls = variants["fused"], variants["matmuls"]
        rows.append(("head + loss fwd+bwd vs its 4 matmuls",
                     f"x{head['fused_vs_matmuls']:.2f} ({fused['median_ms']:.2f} vs "
                     f"{matmuls['median_ms']:.2f} ms; fastest chunk {head.get('best_chunk')})",
                     "<= 1.25x"))
        unfused = variants.get("unfused", {})
        if "median_ms" in unfused:
            rows.append(("head + loss: fused vs head matmuls + kd_loss",
                         f"{fused['median_ms']:.2f} vs {unfused['median_ms']:.2f} ms, "
                         f"{_mib(fused['peak_mib'])} vs {_mib(unfused['peak_mib'])}", "-"))
    if head.get("liger") == "absent":
        rows.append(("Liger LigerFusedLinearJSDLoss", "skipped: liger_kernel is not installed",
                     "-"))
    elif "median_ms" in variants.get("liger", {}) and "median_ms" in variants.get(
            "fused_full_vocab", {}):
        ours, liger = variants["fused_full_vocab"], variants["liger"]
        rows.append(("ours vs Liger (same objective)",
                     f"{ours['median_ms']:.2f} vs {liger['median_ms']:.2f} ms, "
                     f"{_mib(ours['peak_mib'])} vs {_mib(liger['peak_mib'])}",
                     "faster and leaner"))
    return rows


def _plan_row(name: str, body: dict) -> tuple[str, str, str] | None:
    if "plan_over_measured" not in body:
        return None
    planned = _gib(body["plan_allocated_peak_bytes"])
    return (f"memory plan / measured: {name}",
            f"allocated x{body['plan_over_measured']:.3f} ({planned}), card "
            f"x{body['plan_total_over_measured']:.3f}, reserved/allocated "
            f"{body['reserved_over_allocated']:.2f}", "within 5%")


def _step_rows(sections: dict) -> list[tuple[str, str, str]]:
    rows = []
    labels = {"seed_recipe": "seed step, eager, fused head",
              "seed_recipe_logits": "seed step, eager, full logits",
              "seed_recipe_compiled": "seed step, compiled, fused head"}
    for key, label in labels.items():
        body = sections.get(key, {})
        if "tokens_per_s" in body:
            mfu = f", MFU {body['mfu'] * 100:.1f}%" if body.get("mfu") else ""
            rows.append((label, f"{body['tokens_per_s']:,.0f} tokens/s{mfu}, peak "
                         f"{_gib(body.get('peak_allocated_bytes'))}", "-"))
    seed = sections.get("seed_recipe", {})
    if "plan_largest_micro_batch_12gib" in seed:
        rows.append(("largest mb in 12 GiB (plan)",
                     f"{seed['plan_largest_micro_batch_12gib']} (checkpointing: "
                     f"{seed['plan_largest_micro_batch_12gib_checkpointing']})", ">= 24"))
    hf = sections.get("transformers", {})
    if "skipped" in hf:
        rows.append(("transformers step", "skipped: " + hf["skipped"], "-"))
    elif "tokens_per_s" in hf and "tokens_per_s" in seed:
        mem = ""
        if hf.get("peak_allocated_bytes") and seed.get("peak_allocated_bytes"):
            mem = (f", peak memory {_gib(seed['peak_allocated_bytes'])} vs "
                   f"{_gib(hf['peak_allocated_bytes'])}")
        rows.append(("ours eager / transformers step (mb 2)",
                     f"x{seed['tokens_per_s'] / hf['tokens_per_s']:.2f} tokens/s{mem}", ">= 1.5x"))
    return rows


def _capped_rows(sections: dict) -> list[tuple[str, str, str]]:
    capped = sections.get("capped_12gib", {})
    if "seed_micro_batch_fits" not in capped:
        return []
    attempts = capped.get("attempts", [])
    first = attempts[0] if attempts else {}
    rows = [("seed mb under 12 GiB cap", ("fits" if capped["seed_micro_batch_fits"] else
                                          "OUT OF MEMORY")
             + f", peak {_gib(first.get('peak_allocated_bytes'))}", "fits"),
            ("largest mb under 12 GiB cap (measured)",
             f"{capped['measured_largest_micro_batch']} (stopped: {capped['search_stopped']})",
             ">= 24")]
    best = [a for a in attempts if a.get("ok") and a.get("compiled")]
    if best:
        mfu = f", MFU {best[-1]['mfu'] * 100:.1f}%" if best[-1].get("mfu") else ""
        rows.append((f"best under 12 GiB: compiled, mb {best[-1]['micro_batch']}",
                     f"{best[-1]['tokens_per_s']:,.0f} tokens/s{mfu}", ">= 500,000, MFU >= 35%"))
    return rows


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(check, measured, target) rows for the final table."""
    sections = report["sections"]
    rows = _failures(sections) + _kernel_rows(sections) + _head_rows(sections)
    rows += _step_rows(sections) + _capped_rows(sections)
    configs = [(name, sections.get(name, {})) for name in
               ("seed_recipe", "seed_recipe_logits", "seed_recipe_compiled")]
    configs += [(f"capped mb {a['micro_batch']}{' compiled' if a.get('compiled') else ''}", a)
                for a in sections.get("capped_12gib", {}).get("attempts", [])]
    rows += [row for row in (_plan_row(name, body) for name, body in configs) if row]
    return rows


def format_summary(report: dict) -> str:
    rows = summary_rows(report)
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    lines = [f"GPU suite summary - device: {report['device']} ({report['mode']})",
             f"{'check':<{w0}}{'measured':<{w1}}target", "-" * (w0 + w1 + 28)]
    lines += [f"{a:<{w0}}{b:<{w1}}{c}" for a, b, c in rows]
    lines.append(f"total {report['wall_s']:.0f} s; JSON: {report['json_path']}")
    return "\n".join(lines)
