"""`hetrain plan`: search the fastest memory-feasible plan, print it, write plan.json."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import app, user_errors
from hetrain.errors import PlannerError


@app.command()
@user_errors
def plan(
    cluster: Path = typer.Option(..., help="cluster YAML"),
    model: str = typer.Option(..., help="the model: a built-in name (tiny, small, llama-7b, "
                              "llama-70b, ...), a Hugging Face config.json or model folder, "
                              "or a model YAML"),
    global_batch: int = typer.Option(1024, min=1, help="samples per optimizer step"),
    seq_len: int | None = typer.Option(None, min=1, help="tokens per sample [model's maximum]"),
    out: Path | None = typer.Option(None, help="write the plan (JSON) here"),
    json_out: Path | None = typer.Option(None, "--json", help="write a summary (JSON) here"),
    compare: bool = typer.Option(False, help="also plan the baselines and print speedups"),
    profile: Path | None = typer.Option(None, help="measured costs from 'hetrain profile'"),
    dtype: str | None = typer.Option(None, help="one dtype for every kind [each kind's best]"),
) -> None:
    """Find the fastest plan that fits in memory, for any mix of kinds."""
    from hetrain.plan.io import check_writable_file

    check_writable_file(out, "--out")
    check_writable_file(json_out, "--json")
    from hetrain.cluster.loading import load_cluster
    from hetrain.cost.model import CostModel
    from hetrain.cost.profile import Profile
    from hetrain.model.loading import model_and_seq_len
    from hetrain.planner.options import model_options
    from hetrain.planner.report import checked_memory_bytes
    from hetrain.planner.search import search_plan

    console = Console()
    clus = load_cluster(cluster)
    source, seq = model_and_seq_len(model, seq_len)
    spec = source.spec(seq)
    prof = None
    if profile is not None:
        prof = Profile.load(profile)
        prof.check_layers(spec.n_layers, source.name)
    cost = CostModel(clus, spec, prof)
    options = model_options(source, dtype=dtype)
    result = search_plan(clus, cost, global_batch, options)
    memory = checked_memory_bytes(result.plan, cost)
    baselines = _baselines(clus, cost, global_batch, options) if compare or json_out else []

    print_plan_table(console, result.plan, cost, result.estimate,
                     title=f"{spec.name} on {clus.name}: global batch {global_batch} x {seq} "
                     "tokens", memory=memory)
    _print_summary(console, result, cost)
    if compare:
        _print_baselines(console, result.estimate, baselines)
        from hetrain.planner.baselines import strict_efficiency

        strict = strict_efficiency(result.estimate, baselines)
        console.print(f"strict efficiency (tokens/s over the sum of each kind alone): "
                      f"{strict.value:.3f}" + (f"; left out (cannot hold the model alone): "
                                               f"{', '.join(strict.left_out)}"
                                               if strict.left_out else ""))
    if out is not None:
        result.plan.save(out)
        console.print(f"plan written to {out}")
    if json_out is not None:
        summary = _summary(result, cost, baselines, out)
        from hetrain.plan.io import atomic_write_text

        atomic_write_text(json_out, json.dumps(summary, indent=1) + "\n")
        console.print(f"summary written to {json_out}")


def _baselines(clus, cost, global_batch, options):
    from hetrain.planner.baselines import homogeneous_plan, single_kind_plans

    try:
        homogeneous = homogeneous_plan(clus, cost, global_batch, options.tp_sizes,
                                       options=options)
    except PlannerError as err:  # e.g. the kinds share no dtype
        from hetrain.planner.baselines import Baseline

        homogeneous = Baseline("homogeneous", None, None, str(err))
    return [homogeneous, *single_kind_plans(clus, cost, global_batch, options)]


def print_plan_table(console: Console, plan, cost, estimate, title: str,
                     memory: dict[str, float] | None = None) -> None:
    """The plan's pipeline shapes and stages; its caption names the devices left without
    samples, if any."""
    from rich.markup import escape

    from hetrain.planner.report import checked_memory_bytes, shape_rows, unused_devices_note

    memory = checked_memory_bytes(plan, cost) if memory is None else memory
    unused = unused_devices_note(plan, cost.cluster)
    table = Table(title=title, caption="pipelines: copies x devices each; GiB: per device at "
                  "the schedule's peak / capacity; ms: forward + backward of one micro-batch; "
                  "recomp: yes, or 'gather' (sequence parallelism's input kept as shards)"
                  + ("; layers in half layers: a, b: a block's attention, MLP half"
                     if plan.half_layers else "")
                  + (f"\n[yellow]{escape(unused)}[/]" if unused else ""))
    for col in ("pipelines", "stage", "kind", "tp", "layers", "recomp", "GiB", "ms",
                "micro-b.", "time s"):
        table.add_column(col, justify="left" if col in ("kind", "layers") else "right")
    for row in shape_rows(plan, cost, memory, estimate):
        for st in row.stages:
            first = st.stage == 0
            table.add_row(
                f"{row.pipelines}x{row.devices}" if first else "",
                str(st.stage), st.kind, str(st.tp), _layer_range(plan, st.layers),
                "yes" if st.recompute else "gather" if st.regather else "",
                f"{st.memory_gib:.1f}/{st.capacity_gib:.0f}",
                f"{st.stage_ms:.4g}",
                "/".join(map(str, row.micro_batches)) if first else "",
                f"{row.route_s:.4g}" if first else "",
                end_section=st is row.stages[-1])
    console.print(table)


def _layer_range(plan, layers: tuple[int, int]) -> str:
    """A stage's first and last layer, as the model counts its layers (0: embedding); in
    half layers, 5b is layer 5's MLP half and 14a layer 14's attention half."""
    if not plan.half_layers:
        return f"{layers[0]}-{layers[1] - 1}"

    def unit(u: int) -> str:
        return "0" if u == 0 else f"{(u + 1) // 2}{'a' if u % 2 else 'b'}"

    first, last = unit(layers[0]), unit(layers[1] - 1)
    return first if first == last else f"{first}-{last}"


def _print_summary(console: Console, result, cost) -> None:
    from hetrain.planner.report import kind_rows

    est = result.estimate
    table = Table(title="Predicted step")
    for col in ("kind", "devices used", "MFU"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for row in kind_rows(result.plan, cost, est):
        table.add_row(row["kind"], f"{row['used']}/{row['devices']}", f"{100 * row['mfu']:.1f}%")
    console.print(table)
    console.print(f"step {est.step_s:.4g} s (pipelines {est.pipeline_s:.4g} s + gradient sync "
                  f"and optimizer {est.sync_s:.4g} s), {est.tokens_per_s:,.0f} tokens/s; "
                  f"{result.plan.schedule} schedule"
                  + (f" over {result.plan.seq_chunks} sequence pieces"
                     if result.plan.seq_chunks > 1 else "")
                  + (", stages cut at half layers" if result.plan.half_layers else "")
                  + f", bubble share {est.bubble_share:.3f} "
                  f"(imbalance no schedule fills {est.imbalance_share:.3f}), "
                  f"exposed sync {est.exposed_sync_s:.3g} s; "
                  f"searched in {result.search_s:.2f} s"
                  + ("" if result.exhaustive else " (large cluster: shapes screened)"))


def _print_baselines(console: Console, estimate, baselines) -> None:
    from hetrain.planner.baselines import speedup

    table = Table(title="Baselines (speedup = baseline step / this plan's step)")
    for col in ("baseline", "step s", "tokens/s", "speedup", "layout"):
        table.add_column(col, justify="left" if col in ("baseline", "layout") else "right")
    for b in baselines:
        if b.estimate is None:
            table.add_row(b.name, "-", "-", "-", b.note)
        else:
            table.add_row(b.name, f"{b.estimate.step_s:.4g}", f"{b.estimate.tokens_per_s:,.0f}",
                          f"{speedup(estimate, b):.2f}x", b.note)
    console.print(table)


def _summary(result, cost, baselines, plan_path: Path | None) -> dict:
    from hetrain.planner.baselines import speedup, strict_efficiency
    from hetrain.planner.report import kind_rows

    est = result.estimate
    plan = result.plan
    strict = strict_efficiency(est, baselines)
    return {
        "model": plan.model, "cluster": cost.cluster.name, "global_batch": plan.global_batch,
        "seq_len": plan.seq_len, "micro_batch_size": plan.routes[0].micro_batch_size,
        "figures": "simulated (planner's price: the shared schedule and sync definition)",
        "predicted_step_s": est.step_s, "tokens_per_s": est.tokens_per_s,
        "strict_efficiency": strict.value, "alone_tokens_per_s": strict.alone_tokens_per_s,
        "strict_efficiency_left_out": strict.left_out,
        "bubble_share": est.bubble_share, "imbalance_share": est.imbalance_share,
        "exposed_sync_s": est.exposed_sync_s,
        "schedule": plan.schedule, "sharded_optimizer": plan.sharded_optimizer,
        "seq_chunks": plan.seq_chunks, "half_layers": plan.half_layers,
        "pipeline_s": est.pipeline_s, "sync_s": est.sync_s,
        "search_s": result.search_s, "exhaustive": result.exhaustive,
        "pipelines": len(plan.routes), "stage_groups": len(plan.stage_groups),
        "kinds": kind_rows(plan, cost, est),
        "plan": str(plan_path) if plan_path else None,
        "baselines": {
            b.name: {"step_s": b.estimate.step_s if b.estimate else None,
                     "tokens_per_s": b.estimate.tokens_per_s if b.estimate else None,
                     "speedup": speedup(est, b) if b.estimate else None, "note": b.note}
            for b in baselines},
    }
