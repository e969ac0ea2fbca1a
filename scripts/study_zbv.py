"""Study: would a V-shape zero-bubble schedule (ZB-V) fill a plan's pipeline bubble?

Takes the first route of a plan (a pipeline of S stage groups), gives each group two layer
chunks (group i holds chunk i and chunk 2S - 1 - i, the V), times torch.distributed.
pipelining's own ZB-V order (`ScheduleZBVZeroBubble`) with the cost model's compute and
transfer times, and prices what each device then holds as the planner prices a stage.
Prints the step of the pipeline, its bubble share, and memory per device against capacity.

    python scripts/study_zbv.py examples/clusters/mixed-1024.yaml plan.json [--equal]

`--equal` scales each device's compute to the mean, so no imbalance is left: the best any
split of the layers could do. A study, not part of hetrain: the runtime has no chunks.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

from torch.distributed.pipelining.schedules import ScheduleZBVZeroBubble
from torch.distributed.pipelining.schedules import _ComputationType as Op

from hetrain.cli.simulate import _load
from hetrain.plan.types import StageGroup

OPS = {Op.FORWARD: "forward", Op.BACKWARD_INPUT: "backward_input",
       Op.BACKWARD_WEIGHT: "backward_weight"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cluster", type=Path)
    ap.add_argument("plan", type=Path)
    ap.add_argument("--equal", action="store_true", help="every device's compute made equal")
    args = ap.parse_args()
    cluster, plan, cost = _load(args.cluster, args.plan, None, None, None, "fp32")
    route = plan.routes[0]
    groups = [plan.group_by_name[g] for g in route.stages]
    s, m = len(groups), route.micro_batches
    owner = list(range(s)) + list(reversed(range(s)))  # chunk -> device group

    def chunk(c: int, lo: int, hi: int) -> StageGroup:
        g = groups[owner[c]]
        return StageGroup(name=f"c{c}", kind=g.kind, devices=g.devices, layers=(lo, hi),
                          dtype=g.dtype, regather=g.regather)

    def step_s(c: int, lo: int, hi: int) -> float:
        return sum(cost.stage_compute_s(chunk(c, lo, hi), op, route.micro_batch_size,
                                        plan.seq_len) for op in OPS.values())

    # each group's layers halved, then chunk boundaries moved while the busiest device gains
    sizes = [g.n_layers // 2 for g in groups]
    sizes += [groups[i].n_layers - sizes[i] for i in reversed(range(s))]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)

    def device_s(b: list[int]) -> list[float]:
        out = [0.0] * s
        for c in range(2 * s):
            out[owner[c]] += step_s(c, b[c], b[c + 1])
        return out

    better = True
    while better:
        better = False
        now = device_s(bounds)
        best = (max(now), sorted(now, reverse=True))
        for i in range(1, 2 * s):
            for d in (-1, 1):
                b = list(bounds)
                b[i] += d
                if not b[i - 1] < b[i] < b[i + 1]:
                    continue
                t = device_s(b)
                if (max(t), sorted(t, reverse=True)) < best:
                    best, bounds, better = (max(t), sorted(t, reverse=True)), b, True
    chunks = [chunk(c, bounds[c], bounds[c + 1]) for c in range(2 * s)]
    dur = {(c, op): cost.stage_compute_s(ch, name, route.micro_batch_size, plan.seq_len)
           for c, ch in enumerate(chunks) for op, name in OPS.items()}
    if args.equal:
        total = device_s(bounds)
        mean = sum(total) / s
        dur = {(c, op): v * mean / total[owner[c]] for (c, op), v in dur.items()}

    def hop_s(a: int, b: int) -> float:
        if owner[a] == owner[b]:
            return 0.0
        src, dst = chunks[a].devices[0], chunks[b].devices[0]
        nbytes = cost.activation_bytes(chunks[min(a, b)].layers[1], route.micro_batch_size,
                                       chunks[0].dtype)
        return cost.p2p_s(src, dst, nbytes) + cost.p2p_handshake_s(src, dst)

    view = types.SimpleNamespace(pp_group_size=s, _n_microbatches=m, num_stages=2 * s)
    orders = {r: [a for a in ScheduleZBVZeroBubble._calculate_single_rank_operations(view, r)
                  if a is not None] for r in range(s)}
    done: dict[tuple[int, Op, int], float] = {}
    pos, free, busy = [0] * s, [0.0] * s, [0.0] * s
    held, peak = [0] * (2 * s), [0] * (2 * s)
    moved = True
    while moved:  # each rank runs its order; an action waits for its inputs
        moved = False
        for r in range(s):
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                c, mb, op = a.stage_index, a.microbatch_index, a.computation_type
                if op == Op.FORWARD:
                    deps = [((c - 1, Op.FORWARD, mb), hop_s(c - 1, c))] if c else []
                elif op == Op.BACKWARD_INPUT:
                    deps = [((c, Op.FORWARD, mb), 0.0)]
                    if c < 2 * s - 1:
                        deps.append(((c + 1, Op.BACKWARD_INPUT, mb), hop_s(c + 1, c)))
                else:
                    deps = [((c, Op.BACKWARD_INPUT, mb), 0.0)]
                if any(d not in done for d, _ in deps):
                    break
                start = max([done[d] + x for d, x in deps] + [free[r]])
                free[r] = done[(c, op, mb)] = start + dur[(c, op)]
                busy[r] += dur[(c, op)]
                if op == Op.FORWARD:
                    held[c] += 1
                    peak[c] = max(peak[c], held[c])
                elif op == Op.BACKWARD_WEIGHT:
                    held[c] -= 1
                pos[r] += 1
                moved = True
    step = max(free)
    print(f"ZB-V over {2 * s} chunks, {m} micro-batches{' (compute made equal)' * args.equal}: "
          f"pipeline {step:.3f} s, bubble share {sum(step - b for b in busy) / s / step:.4f}")
    gib = 2**30
    for r in range(s):
        a, b = chunks[r], chunks[2 * s - 1 - r]
        shards = len(plan.routes)  # the optimizer state spread over the copies (ZeRO-1)
        need = sum(cost.stage_memory_bytes(ch, route.micro_batch_size, peak[c],
                                           cost.device_params(ch) / shards, 0.0)
                   for c, ch in ((r, a), (2 * s - 1 - r, b))) - cost.fixed_overhead_bytes(a.kind)
        today = cost.stage_memory_bytes(groups[r], route.micro_batch_size, s - r,
                                        cost.device_params(groups[r]) / shards, 0.0)
        print(f"  device group {r:2d} {a.kind:11s} layers {a.layers} + {b.layers}: busy "
              f"{busy[r]:.3f} s, holds {peak[r]} + {peak[2 * s - 1 - r]} micro-batches, "
              f"~{need / gib:.1f} GiB of {cluster.kinds[a.kind].memory_bytes / gib:.0f} "
              f"(one chunk under 1F1B: {today / gib:.1f})")


if __name__ == "__main__":
    main()
