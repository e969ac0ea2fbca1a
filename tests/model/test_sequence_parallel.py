"""Sequence parallelism of the reference decoder's blocks on a 2-way TP group (two gloo
processes): the same outputs and gradients as one process, and the matmuls' gathered input
saved as this rank's shard when regathering (gathered again in backward), under a whole and
a split backward."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, split: bool, regather: bool, out) -> None:  # noqa: ANN001 - a queue
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from hetrain.model import source
    from hetrain.model.config import model_config
    from hetrain.runtime.rendezvous import gloo_on_loopback
    from hetrain.runtime.stage import full_tensor, settle_partial_grads

    gloo_on_loopback()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        packed = []
        original = source._Regathered.pack

        def counting(self, t):  # noqa: ANN001, ANN202
            saved = original(self, t)
            packed.append(isinstance(saved, source._SavedView))
            return saved

        source._Regathered.pack = counting
        gathers = []  # in backward: regathered inputs
        gather = source._gather_sequence_autograd

        def counting_gather(shard, mesh):  # noqa: ANN001, ANN202
            gathers.append(1)
            return gather(shard, mesh)

        source._gather_sequence_autograd = counting_gather
        model = source.DecoderModel(model_config("tiny"))
        stage = model.build_stage(1, 3, seed=0).double()  # two blocks
        stage.regather = regather
        ref = copy.deepcopy(stage)
        model.apply_tensor_parallel(stage, DeviceMesh("cpu", [0, 1]), sequence_parallel=True)
        x = torch.randn(2, 16, model.hidden_size, dtype=torch.double,
                        generator=torch.Generator().manual_seed(1))
        xr, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        want = ref(xr)
        (want * want).sum().backward()
        got = stage(xs)
        gathers.clear()
        params = list(stage.parameters())
        if split:
            from torch.distributed.pipelining._backward import (
                stage_backward_input,
                stage_backward_weight,
            )

            stage.input_grad_pass = True  # as the worker's input-gradient action
            _, groups = stage_backward_input([got], [2 * got.detach()], [xs], iter(params))
            stage.input_grad_pass = False
            stage_backward_weight(iter(params), groups)
        else:
            (got * got).sum().backward()
        settle_partial_grads(params)
        errors = [float((got - want).abs().max()), float((xs.grad - xr.grad).abs().max())]
        for (_, p), (_, q) in zip(stage.named_parameters(), ref.named_parameters(),
                                  strict=True):
            errors.append(float((full_tensor(p.grad) - q.grad).abs().max()))
        out.put((rank, max(errors), sum(packed), len(packed), len(gathers)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("regather", [True, False], ids=["regather", "keep-gathered"])
@pytest.mark.parametrize("split", [False, True], ids=["backward", "split-backward"])
def test_blocks_match_one_process_and_keep_the_gathered_input_as_shards(split, regather):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, split, regather, out), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, 9)
    for rank, worst, shards, saved, gathers in results:
        assert worst < 1e-12, (rank, worst)
        # per block: q, k, v keep the attention's gathered input; w1, w3 the FFN's
        assert shards == (2 * 5 if regather else 0), (rank, shards, saved)
        # backward gathers each module's input once (a split one in its weight action only)
        assert gathers == (2 * 2 if regather else 0), (rank, gathers)
