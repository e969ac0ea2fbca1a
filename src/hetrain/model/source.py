"""The one model object (torchtitan's ModelSpec role): layer costs for the planner, the stage
of a layer range, the layer a parameter belongs to, tensor parallelism. The runtime, the
planner and the CLI ask it, never which model they hold.

Sources: the reference decoder (DecoderModel), Hugging Face causal LMs (model/hf.py), and any
other nn.Module as one whole-model layer (WholeModule: data parallelism only).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import nn

from hetrain.errors import ModelError, PlanError
from hetrain.model.config import ModelConfig
from hetrain.model.spec import LayerSpec, ModelSpec, model_spec
from hetrain.model.stage import Stage


class ModelSource(ABC):
    """A model as a list of layers: embedding first, blocks, then final norm and head."""

    name: str
    n_layers: int  # pipeline-cuttable layers, embedding and head included
    hidden_size: int  # elements per token a stage sends to the next (0: never cut)
    vocab_size: int | None
    max_seq_len: int | None
    max_seq_field = "max_seq_len"  # the config field that bounds it, named in errors
    tie_embeddings: bool = False
    # Whether its stages run a sequence in pieces (Plan.seq_chunks: attention reads the
    # earlier pieces' keys and values, model.decoder.SequencePieces).
    sequence_pieces = False
    half_layers = False  # whether its layers are half layers (units())
    cuts_half_layers = False  # whether its stages may be cut at half layers (units())

    @abstractmethod
    def spec(self, seq_len: int) -> ModelSpec:
        """Per-layer parameters, FLOPs and activations: what the cost model reads."""

    def tp_sizes(self) -> tuple[int, ...]:
        """Tensor-parallel degrees the planner may use (heads and FFN width divide)."""
        return (1,)

    def check_tp(self, tp: int) -> None:
        """Raise PlanError when the model cannot be split `tp` ways."""
        if tp > 1:
            raise PlanError(f"model {self.name!r} is one whole-model layer: it trains data-"
                            "parallel only (tp 1); use a Hugging Face causal LM or the "
                            "reference decoder for tensor parallelism")

    def units(self, half_layers: bool) -> ModelSource:
        """The model cut into the partition units a plan's layer ranges count
        (Plan.half_layers); PlanError where its layers cannot be cut so."""
        if half_layers != self.half_layers:
            raise PlanError(f"half_layers: model {self.name!r} is cut at whole layers only "
                            "(only the reference decoder cuts its blocks into attention and "
                            "MLP halves); set half_layers: false")
        return self

    def user_module(self) -> nn.Module | None:
        """The user's own module this object wraps (None: built here from a name or path)."""
        return None

    def check_trainable(self) -> None:  # noqa: B027 - most models can always be built
        """Raise ModelError when the model cannot be built here (spec-only)."""

    @abstractmethod
    def build_stage(self, start: int, end: int, seed: int) -> Stage:
        """Layers [start, end) with this process's own copy of their weights (the same
        weights on every process)."""

    @abstractmethod
    def layer_of(self, name: str) -> int:
        """The layer a parameter (by canonical name) belongs to."""

    def apply_tensor_parallel(self, stage: Stage, mesh, sequence_parallel: bool = False) -> None:
        """Shard the stage's blocks over `mesh` (DTensor plans), in place; with
        `sequence_parallel` (ModelSpec.sequence_parallel says when) also split their
        sequence."""
        self.check_tp(mesh.size())

    @abstractmethod
    def whole(self, seed: int) -> nn.Module:
        """The whole model (tokens -> logits, or an output with `.logits`) whose
        named_parameters() are the canonical names: one-process training, the yardstick."""


class LlamaShaped(ModelSource):
    """A model priced as the reference decoder of its ModelConfig (`self.cfg`)."""

    cfg: ModelConfig
    sequence_parallel = False  # whether apply_tensor_parallel splits the blocks' sequence

    def spec(self, seq_len: int) -> ModelSpec:
        return model_spec(self.cfg, seq_len, self.sequence_parallel)

    def tp_sizes(self) -> tuple[int, ...]:
        return tuple(t for t in (1, 2, 4, 8) if self._divides(t))

    def check_tp(self, tp: int) -> None:
        c = self.cfg
        if not self._divides(tp):
            raise PlanError(f"tensor parallelism of {tp} does not divide {self.name}'s "
                            f"{c.n_heads} heads / {c.kv_heads} kv heads / ffn width "
                            f"{c.ffn_dim}; use a TP degree that does")

    def _divides(self, tp: int) -> bool:
        c = self.cfg
        return c.n_heads % tp == 0 and c.kv_heads % tp == 0 and c.ffn_dim % tp == 0


class DecoderModel(LlamaShaped):
    """The reference decoder (model/decoder.py) of a ModelConfig: a built-in name or a YAML.
    With `half_layers`, its partition units are the embedding, each block's attention half
    and MLP half (model.decoder.AttentionHalf, FeedForwardHalf), and the head."""

    sequence_parallel = True
    sequence_pieces = True
    cuts_half_layers = True

    def __init__(self, cfg: ModelConfig, half_layers: bool = False):
        self.cfg = cfg
        self.name = cfg.name
        self.half_layers = half_layers
        self.n_layers = cfg.n_layers * (2 if half_layers else 1) + 2
        self.hidden_size = cfg.dim
        self.vocab_size, self.max_seq_len = cfg.vocab_size, cfg.max_seq_len
        self.tie_embeddings = cfg.tie_embeddings

    def spec(self, seq_len: int) -> ModelSpec:
        return model_spec(self.cfg, seq_len, half_layers=self.half_layers)

    def units(self, half_layers: bool) -> DecoderModel:
        return self if half_layers == self.half_layers else DecoderModel(self.cfg, half_layers)

    def check_trainable(self) -> None:
        if not self.cfg.trainable:
            raise ModelError(f"model {self.name!r} is spec-only (too big to build here); train "
                             "tiny, tiny-tied or small, or plan it with `hetrain plan`")

    def whole(self, seed: int) -> nn.Module:
        from hetrain.model.decoder import build_decoder

        return build_decoder(self.cfg, seed)

    def build_stage(self, start: int, end: int, seed: int) -> Stage:
        full = self.whole(seed)
        aliases = {"head.out.weight": "embed.tok.weight"} if self.tie_embeddings else {}
        halves = self.half_layers
        return Stage(full.layers(halves)[start:end], full.layer_prefixes(halves)[start:end],
                     start, end, self.n_layers, aliases)

    def layer_of(self, name: str) -> int:
        if name.startswith("embed."):
            return 0
        if name.startswith("blocks."):
            _, block, part, *_ = name.split(".")
            if not self.half_layers:
                return int(block) + 1
            return 2 * int(block) + (1 if part in ("attn_norm", "attn") else 2)
        return self.n_layers - 1

    def apply_tensor_parallel(self, stage: Stage, mesh, sequence_parallel: bool = False) -> None:
        """Megatron-style TP on every block: q/k/v and w1/w3 column-wise, wo and w2 row-wise;
        attention infers its local head count from the projection's width. Embedding and head
        stay replicated across the group.

        With `sequence_parallel`, Megatron's sequence parallelism: the norms and residual sums
        between the blocks work on this rank's share of the sequence (DTensor's
        SequenceParallel; the norms' weight gradients come out partial and are summed by
        runtime/stage.settle_partial_grads); the attention's and the FFN's input is
        all-gathered before their first matmuls and their output reduce-scattered after the
        last. With `stage.regather` (and no recomputation, which keeps only the layer input)
        the gathered input is saved for backward as this rank's shard and gathered again when
        backward needs it, as Megatron does. The stage's first block splits its input and its
        last block gathers its output, so stages exchange whole activations."""
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            SequenceParallel,
            parallelize_module,
        )

        from hetrain.model.decoder import AttentionHalf, Block, FeedForwardHalf

        self.check_tp(mesh.size())
        blocks = [layer for layer in stage.layers
                  if isinstance(layer, Block | AttentionHalf | FeedForwardHalf)]
        rows = {"attn.wo": RowwiseParallel(), "ffn.w2": RowwiseParallel()}
        if sequence_parallel:
            rows = {"attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
                    "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
                    "ffn.w2": RowwiseParallel(output_layouts=Shard(1))}
        styles = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
                  "attn.wv": ColwiseParallel(), "ffn.w1": ColwiseParallel(),
                  "ffn.w3": ColwiseParallel(), **rows}
        for block in blocks:  # a whole block, or the half of one a stage holds
            own = dict(block.named_children())
            parallelize_module(block, mesh, {k: v for k, v in styles.items()
                                             if k.split(".")[0] in own})
            if sequence_parallel:
                for part in ("attn", "ffn"):
                    if part in own:
                        _gather_sequence_first(own[part], mesh, stage)
        if sequence_parallel and blocks:
            blocks[0].register_forward_pre_hook(
                lambda _m, args: (_split_sequence(args[0], mesh), *args[1:]))
            blocks[-1].register_forward_hook(
                lambda _m, _args, out: _gather_sequence(out, mesh))


def _split_sequence(x: torch.Tensor, mesh) -> torch.Tensor:
    """A whole activation (the same on every rank) -> this rank's share of the sequence;
    backward all-gathers the gradient."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(x, mesh, [Replicate()], run_check=False) \
        .redistribute(mesh, [Shard(1)]).to_local()


def _gather_sequence(x: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's share of the sequence -> the whole activation; backward keeps this rank's
    share of the (whole, same on every rank) gradient."""
    from torch.distributed.tensor import DTensor, Shard

    local = x.to_local() if hasattr(x, "to_local") else x
    # Not a view of the DTensor's storage: pipelining's split backward detaches the stage's
    # output in place, which a view refuses.
    return DTensor.from_local(local, mesh, [Shard(1)], run_check=False).full_tensor().clone()


def _gather_sequence_first(module: nn.Module, mesh, stage: Stage) -> None:
    """`module` (attention or FFN) takes this rank's share of the sequence, all-gathers it
    (backward: reduce-scatter) and runs on the whole sequence; when the stage regathers,
    what its matmuls save of the gathered input is kept as the shard (_Regathered)."""
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        shard = x.to_local() if hasattr(x, "to_local") else x
        full = _gather_sequence_autograd(shard, mesh)
        if stage.recompute or not stage.regather:  # recomputing keeps only the layer input
            return inner(full)
        saved = _Regathered(shard.detach(), mesh, full, stage)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            return inner(full)

    module.forward = forward


def _gather_sequence_autograd(shard: torch.Tensor, mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(shard, mesh, [Shard(1)], run_check=False) \
        .redistribute(mesh, [Replicate()]).to_local()


def _storage_ptr(t: torch.Tensor) -> int:
    local = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
    return local.untyped_storage().data_ptr()


class _Regathered:
    """Saved-tensor hooks for one forward of an attention or FFN under sequence parallelism:
    a saved tensor that is (a view of) the all-gathered input is kept as this rank's shard
    and the view's layout; backward gathers the shard again, once for the saved tensors
    unpacked together (the q/k/v matmuls' inputs), and rebuilds the view.

    The saved views are the matmuls' inputs, which only their weight gradients read: the
    input-gradient action of a split backward (`stage.input_grad_pass`) reads their layout
    alone, so it gets uninitialised memory of that layout instead of a gather; the
    weight-gradient action gathers. A split backward so gathers once, as a whole one does
    (cost.model.tp_comm_passes)."""

    def __init__(self, shard: torch.Tensor, mesh, full: torch.Tensor, stage: Stage):
        self.shard, self.mesh, self.stage = shard, mesh, stage
        self.full_layout = (full.size(), full.stride(), full.dtype, full.device)
        self.full_ptr = full.untyped_storage().data_ptr()
        self.packed = 0
        self.left = 0
        self.gathered: torch.Tensor | None = None

    def pack(self, t: torch.Tensor) -> object:
        if _storage_ptr(t) != self.full_ptr:
            return t
        self.packed += 1
        local = getattr(t, "_local_tensor", t)
        dt = (t.placements, t.shape, t.stride()) if hasattr(t, "placements") else None
        return _SavedView(local.size(), local.stride(), local.storage_offset(), dt)

    def unpack(self, saved: object) -> torch.Tensor:
        if not isinstance(saved, _SavedView):
            return saved
        from torch.distributed.tensor import DTensor

        if self.gathered is None:
            if self.stage.input_grad_pass:
                size, stride, dtype, device = self.full_layout
                self.gathered = torch.empty_strided(size, stride, dtype=dtype, device=device)
            else:
                with torch.no_grad():
                    self.gathered = _gather_sequence_autograd(self.shard, self.mesh)
            self.left = self.packed
        view = self.gathered.as_strided(saved.size, saved.stride, saved.offset)
        self.left -= 1
        if self.left == 0:
            self.gathered = None
        if saved.dtensor is None:
            return view
        placements, shape, stride = saved.dtensor
        return DTensor.from_local(view, self.mesh, placements, run_check=False, shape=shape,
                                  stride=stride)


class _SavedView:
    __slots__ = ("size", "stride", "offset", "dtensor")

    def __init__(self, size, stride, offset: int, dtensor):  # noqa: ANN001 - torch sizes
        self.size, self.stride, self.offset, self.dtensor = size, stride, offset, dtensor


class WholeModule(ModelSource):
    """Any nn.Module (tokens [batch, seq] -> logits or an output with `.logits`) as one layer:
    trained data-parallel, each device holding the whole model."""

    def __init__(self, module: nn.Module, name: str | None = None):
        self.module = module
        self.name = name or type(module).__name__
        self.n_layers, self.hidden_size = 1, 0
        self.max_seq_field = "max_position_embeddings"
        cfg = getattr(module, "config", None)
        self.max_seq_len = _int_or_none(getattr(cfg, "max_position_embeddings", None))
        vocab = _int_or_none(getattr(cfg, "vocab_size", None))
        if vocab is None:  # the first embedding table bounds the token ids it can take
            embed = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
            vocab = embed.num_embeddings if embed is not None else None
        self.vocab_size = vocab

    def spec(self, seq_len: int) -> ModelSpec:
        """One layer holding the whole model: 2 FLOPs per weight per token forward (dense
        matmuls dominate), activations estimated from the hidden size when it can be found."""
        params = sum(p.numel() for p in self.module.parameters())
        cfg = getattr(self.module, "config", None)
        dim = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "dim", 0) or 0)
        vocab = int(getattr(cfg, "vocab_size", 0) or 0)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 1)
        acts = float(layers * 16 * dim + 2 * vocab) if dim else float(params) / 1000
        layer = LayerSpec(name="model", params=params, forward_flops_per_token=2.0 * params,
                          activation_elems_per_token=acts, recompute_elems_per_token=acts,
                          output_elems_per_token=0.0)
        return ModelSpec(name=self.name, seq_len=seq_len, dim=dim, vocab_size=vocab,
                         tie_embeddings=False, layers=[layer])

    def user_module(self) -> nn.Module:
        return self.module

    def check_trainable(self) -> None:
        if not any(p.requires_grad for p in self.module.parameters()):
            raise ModelError("model has no trainable parameters; nothing to train")

    def whole(self, seed: int) -> nn.Module:
        # Tensors pickled to spawned workers live in shared memory: without a private copy
        # every worker's optimizer would step the same weights.
        return copy.deepcopy(self.module)

    def build_stage(self, start: int, end: int, seed: int) -> Stage:
        return Stage([self.whole(seed)], [""], 0, 1, 1)

    def layer_of(self, name: str) -> int:
        return 0


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None
