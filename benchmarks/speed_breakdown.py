"""Where a prefill's time goes: one profiled call per variant, split by kind of work (CPU).

`benchmarks/speed.py` compares each recipe with its FLOPs ideal; this module says what holds a
recipe below it. Each variant's forward is profiled (``torch.profiler``, shapes recorded; `speed.py`
keeps the median of up to three profiled calls) and its time split into

* GEMMs -- ``aten::mm`` / ``addmm`` / ``bmm`` outside attention, and ``fitprune::onednn_linear``
  with all it calls (the decoder's linears on CPU), with the rate they ran at (multiply-accumulates
  from the recorded shapes);
* attention -- SDPA, or ``fitprune::attention_with_mass`` at a pruning layer, everything under it;
* pass ops -- the pass's other ops (``fitprune::select_kept_tokens_like``, the gathers);
* compiled code -- the compiled graphs' own time (Inductor's kernels: norms, RoPE, activations,
  residual adds, compaction gathers);
* rest -- the profiled call less all of the above (Python, guards, the eager parts).

Against unpruned, each kind is charged what its own work predicts at unpruned's rates: every
GEMM its multiply-accumulates at the rate unpruned's GEMMs with the same weight shape ran at (the
same lm_head call costs the same), every attention call its causal query-key pairs at unpruned's
rate for the same head shape, compiled code in proportion to the tokens through the layers, pass
ops nothing, rest what unpruned's took. What a pruned variant spends beyond that, kind by kind,
is its gap to this timed ideal. Profiling adds its own overhead, most to calls of many small ops
(the CPU fused attention's row chunks): the kinds' shares, not their absolute times, are the point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from torch.profiler import ProfilerActivity, profile

KINDS = ("gemm", "attention", "pass", "compiled", "rest")
GEMMS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "mkl::_mkl_linear",
    "mkldnn::_linear_pointwise",
}
ATTENTION = "fitprune::attention_with_mass"
LINEAR = "fitprune::onednn_linear"  # a GEMM, counted with the oneDNN call under it


def _whole(name: str) -> bool:
    """Events counted with everything they call (their children are skipped)."""
    return name == LINEAR or _kind(name) in ("attention", "pass")


def _kind(name: str) -> str | None:
    """The kind an event's whole time (`_whole`) or its self time (the others) belongs to."""
    if name == ATTENTION or (name.startswith("aten::") and "scaled_dot_product" in name):
        return "attention"
    if name in GEMMS or name == LINEAR:
        return "gemm"
    if name.startswith("fitprune::"):
        return "pass"
    if name.startswith("## Call CompiledFxGraph"):
        return "compiled"
    return None


def _gemm_key(name: str, shapes: Sequence) -> tuple[str, float]:
    """("KxN", multiply-accumulates) of a GEMM event from its input shapes ("other", 0 if unknown)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return f"{k}x{n}", float(m * k * n)
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return f"{k}x{n}", float(m * k * n)
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return f"{k}x{n}", float(b * m * k * n)
        if name in (LINEAR, "mkldnn::_linear_pointwise"):  # x [..., K], weight [N, K]
            *rows, k = shapes[0]
            n = shapes[1][0]
            return f"{k}x{n}", float(math.prod(rows) * k * n)
    except (TypeError, ValueError, IndexError):
        pass
    return "other", 0.0


def _attention_key(shapes: Sequence) -> tuple[str, float]:
    """("HxD", work) of an attention event: query [B, H, S, D], work B*H*D*S*(S+1)/2 (causal pairs)."""
    try:
        b, h, s, d = shapes[0]
        return f"{h}x{d}", float(b * h * d * s * (s + 1) / 2)
    except (TypeError, ValueError, IndexError):
        return "other", 0.0


def profile_call(fn: Callable[[], object]) -> dict:
    """Milliseconds per kind (`KINDS`) of one call of `fn`, ``total`` (its wall time), and per GEMM
    weight shape / attention head shape the work done and milliseconds spent (``gemm``, ``attn``)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        total = (time.perf_counter() - t0) * 1e3
    out: dict = dict.fromkeys(KINDS, 0.0) | {"total": total, "by_gemm": {}, "by_attention": {}}
    for event in prof.events():
        kind = _kind(event.name)
        if kind is None:
            continue
        parent, inside = event.cpu_parent, False
        while parent is not None and not inside:  # attention, pass ops, linears count with all they call
            inside = _whole(parent.name)
            parent = parent.cpu_parent
        if inside:
            continue
        ms = (event.cpu_time_total if _whole(event.name) else event.self_cpu_time_total) / 1e3
        out[kind] += ms
        if kind in ("gemm", "attention"):
            key, work = (
                _gemm_key(event.name, event.input_shapes)
                if kind == "gemm"
                else _attention_key(event.input_shapes)
            )
            acc = out["by_" + kind].setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + work, acc[1] + ms
    out["rest"] = max(0.0, total - sum(out[k] for k in KINDS if k != "rest"))
    return out


def _at_base_rate(row: dict[str, list[float]], base: dict[str, list[float]]) -> float:
    """Milliseconds `row`'s work (per shape: [work, ms]) would take at `base`'s rate for each shape;
    a shape `base` lacks (or without counted work) is charged what it took."""
    total = 0.0
    for key, (work, ms) in row.items():
        ref = base.get(key)
        total += work * ref[1] / ref[0] if ref and ref[0] and work and key != "other" else ms
    return total


def expected(base: dict, base_lengths: list[int], row: dict, lengths: list[int]) -> dict[str, float]:
    """What each kind of `row` would take at `base`'s rates (module docstring). `lengths`: tokens
    entering each decoder layer (the prefill's cache lengths)."""
    return {
        "gemm": _at_base_rate(row["by_gemm"], base["by_gemm"]),
        "attention": _at_base_rate(row["by_attention"], base["by_attention"]),
        "pass": 0.0,
        "compiled": base["compiled"] * sum(lengths) / sum(base_lengths),
        "rest": base["rest"],
    }


def breakdown_table(breakdown: dict[str, dict], lengths: dict[str, list[int]], base: str) -> str:
    """Markdown: per variant the milliseconds of each kind and, for pruned variants, (+ms) beyond
    what the kind's own work predicts at `base`'s rates; last column the profiled call against that
    timed ideal."""
    ref = breakdown[base]
    lines = [
        "| variant | profiled call ms | GEMMs ms | GEMM rate GMAC/s | attention ms | pass ops ms "
        "| compiled code ms | rest ms | measured / timed ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in breakdown.items():
        macs = sum(work for work, _ in row["by_gemm"].values())
        rate = f"{macs / row['gemm'] / 1e6:.1f}" if row["gemm"] and macs else "-"
        if name == base or name not in lengths:
            cells = [f"{row[k]:.1f}" for k in KINDS]
            ratio = "1.00" if name == base else "-"
        else:
            exp = expected(ref, lengths[base], row, lengths[name])
            cells = [f"{row[k]:.1f} ({row[k] - exp[k]:+.1f})" for k in KINDS]
            ratio = f"{sum(exp.values()) / row['total']:.2f}"
        lines.append(
            f"| {name} | {row['total']:.1f} | {cells[0]} | {rate} | "
            + " | ".join(cells[1:])
            + f" | {ratio} |"
        )
    return "\n".join(lines)
