"""A memory plan as a JSON-ready dict (`lmforge plan --json`) and as the text table printed
from that same dict, so the two always agree."""

from __future__ import annotations

from typing import Any

from lmforge.research.memory_plan import Plan, Stage, Suggestion

COLUMNS = {False: "checkpointing_off", True: "checkpointing_on"}


def _stage_dict(stage: Stage) -> dict[str, Any]:
    return {
        "stage": stage.index,
        "blocks": stage.blocks,
        "micro_batches_in_flight": stage.in_flight,
        "parameters": stage.params,
        "gradients": stage.grads,
        "optimizer_states": stage.optimizer,
        "activations": stage.activations,
        "activations_total": sum(stage.activations.values()),
        "temporary": stage.temporary,
        "temporary_total": stage.temporary_total,
        "device_total": stage.device,
        "host_total": stage.host,
    }


def summary(
    plan: Plan,
    budget: int | None,
    suggestions: list[Suggestion],
    mfu: float,
    peak_flops: float,
    peak_source: str,
) -> dict[str, Any]:
    """Everything `lmforge plan` reports; bytes are per rank, of the worst pipeline stage."""
    cfg, t = plan.cfg, plan.cfg.train
    tokens_per_s = plan.tokens_per_s(mfu, peak_flops)
    return {
        "config": {
            "model": cfg.model.preset,
            "world_size": plan.world_size,
            "layout": plan.layout,
            "reshard_after_forward": t.parallel.reshard_after_forward,
            "cpu_offload": t.parallel.cpu_offload,
            "precision": plan.precision,
            "optimizer": t.optimizer,
            "pp_schedule": plan.pp_schedule,
            "micro_batch_size": t.micro_batch_size,
            "grad_accum_steps": t.grad_accum_steps,
            "block_size": cfg.model.block_size,
            "n_layer": cfg.model.n_layer,
            "d_model": cfg.model.d_model,
            "vocab_size": plan.vocab_size,
            "vocab_note": plan.vocab_note,
        },
        "parameters": {"total": plan.n_params, "non_embedding": plan.n_params_non_embedding},
        "memory": {COLUMNS[c]: _stage_dict(plan.worst(c)) for c in (False, True)},
        "configured": COLUMNS[plan.checkpointing],
        "device_memory": budget,
        "fits": None if budget is None else plan.device_bytes <= budget,
        "suggestions": [
            {"overrides": list(s.overrides), "device_total": s.device_bytes} for s in suggestions
        ],
        "compute": {
            "flops_per_token": plan.flops_per_token,
            "tokens_per_step": plan.tokens_per_step,
            "flops_per_step": plan.flops_per_step,
            "mfu": mfu,
            "peak_flops_per_device": peak_flops,
            "peak_source": peak_source,
            "tokens_per_s": tokens_per_s,
            "seconds_per_step": plan.tokens_per_step / tokens_per_s,
        },
    }


def size(n: float) -> str:
    """Bytes in binary units: '1.23 GiB', '45.6 MiB', '512 B'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def _layout(layout: dict[str, int]) -> str:
    return " x ".join(f"{k} {v}" for k, v in layout.items())


def _memory_table(d: dict[str, Any]) -> list[str]:
    off, on = d["memory"]["checkpointing_off"], d["memory"]["checkpointing_on"]
    configured = d["configured"]
    heads = [
        f"checkpointing {x}{' *' if configured == f'checkpointing_{x}' else ''}"
        for x in ("off", "on")
    ]
    where = " (host)" if d["config"]["cpu_offload"] else ""
    rows: list[tuple[str, Any, Any]] = [
        (f"parameters{where}", off["parameters"], on["parameters"]),
        (f"gradients{where}", off["gradients"], on["gradients"]),
        (f"optimizer states{where}", off["optimizer_states"], on["optimizer_states"]),
        ("activations", off["activations_total"], on["activations_total"]),
    ]
    for key in dict.fromkeys([*off["activations"], *on["activations"]]):
        rows.append((f"  {key}", off["activations"].get(key), on["activations"].get(key)))
    rows.append(("temporary buffers", off["temporary_total"], on["temporary_total"]))
    for key in dict.fromkeys([*off["temporary"], *on["temporary"]]):
        rows.append((f"  {key}", off["temporary"].get(key), on["temporary"].get(key)))
    rows.append(("total on the device", off["device_total"], on["device_total"]))
    if d["config"]["cpu_offload"]:
        rows.append(("total on the host (cpu_offload)", off["host_total"], on["host_total"]))
    if d["config"]["layout"]["pp"] > 1:

        def where_(m: dict[str, Any]) -> str:
            return f"{m['stage']} ({m['blocks']} blocks, {m['micro_batches_in_flight']} in flight)"

        rows.insert(0, ("worst pipeline stage", where_(off), where_(on)))
    width = max(len(r[0]) for r in rows) + 2

    def cell(v: Any) -> str:
        return "-" if v is None else v if isinstance(v, str) else size(v)

    lines = [f"{'per-rank memory':<{width}}{heads[0]:>26}{heads[1]:>26}"]
    lines += [f"{name:<{width}}{cell(a):>26}{cell(b):>26}" for name, a, b in rows]
    lines.append(
        "  (* = the configured train.activation_checkpointing; of the logits' buffers and "
        "the recomputed block only the larger counts: they are not alive at once)"
    )
    return lines


def _verdict(d: dict[str, Any]) -> list[str]:
    budget = d["device_memory"]
    if budget is None:
        return ["fit: give --device-memory (e.g. 80GB) to check one"]
    used = d["memory"][d["configured"]]["device_total"]
    head = f"fit in {size(budget)} per device: "
    if d["fits"]:
        return [head + f"yes, {size(used)} ({used / budget:.0%})"]
    lines = [head + f"NO, needs {size(used)} ({used / budget:.0%})"]
    if not d["suggestions"]:
        lines.append("  nothing tried fits: more or larger devices, or a smaller model or batch")
        return lines
    lines.append("  settings that fit (each checked by planning again):")
    lines += [
        f"  {' '.join(s['overrides'])}   -> {size(s['device_total'])}" for s in d["suggestions"]
    ]
    return lines


def format_text(d: dict[str, Any]) -> str:
    """The table `lmforge plan` prints, from summary()'s dict."""
    c, p, f = d["config"], d["parameters"], d["compute"]
    dp = c["layout"]["dp_replicate"] * c["layout"]["dp_shard"]
    lines = [
        f"lmforge plan: {c['model']} on {c['world_size']} processes "
        f"({_layout(c['layout'])}), {c['precision']}, {c['optimizer']}",
        f"model   {_count(p['total'])} parameters ({_count(p['non_embedding'])} without "
        f"embeddings), {c['n_layer']} layers x d_model {c['d_model']}, vocab "
        f"{c['vocab_size']:,}, {c['block_size']:,} tokens",
    ]
    if c["vocab_note"]:
        lines.append(f"        {c['vocab_note']}")
    lines += [
        f"batch   {c['micro_batch_size']} sequences x {c['grad_accum_steps']} accumulation x "
        f"{dp} data-parallel = {f['tokens_per_step']:,} tokens per step",
        "",
        *_memory_table(d),
        "",
        *_verdict(d),
        "",
        f"compute {f['flops_per_token']:.3g} FLOPs per token (6N + attention), "
        f"{f['flops_per_step']:.3g} per step; at MFU {f['mfu']:.2f} of "
        f"{f['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device ({f['peak_source']}): "
        f"{f['tokens_per_s']:,.0f} tokens/s, {f['seconds_per_step']:.3g} s per step",
    ]
    return "\n".join(lines)
