"""ModelSpec: per layer parameters, FLOPs and activation sizes per token; what the cost model reads.

Counts are in elements, not bytes: the dtype is chosen per stage group by the plan.
"""

from __future__ import annotations

from functools import cached_property

from pydantic import BaseModel, ConfigDict

from hetrain.model.config import ModelConfig


class LayerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # "embed", "block.3", "head"
    params: int
    forward_flops_per_token: float  # backward costs twice this
    activation_elems_per_token: float  # kept for backward, no recomputation
    recompute_elems_per_token: float  # kept with full recomputation (the layer input)
    output_elems_per_token: float  # sent to the next stage
    tp_allreduces: int = 0  # all-reduces of the output per forward under tensor parallelism
    # Memory the runtime really holds (cost.CostModel.stage_memory_bytes), measured against
    # runtime/memory.py: what tensor parallelism leaves whole on every rank, and the
    # working set backward needs on top of what the forward kept.
    tp_replicated_params: int = 0
    tp_replicated_elems_per_token: float = 0.0
    # Under sequence parallelism (ModelSpec.sequence_parallel): what stays whole on every TP
    # rank, the rest (the layer input kept under recomputation included) split by the degree.
    # None: the layer's sequence is never split. Regathering (StageGroup.regather) keeps the
    # matmuls' gathered inputs as shards: `sp_gathered_elems_per_token` of the whole part.
    sp_replicated_elems_per_token: float | None = None
    sp_gathered_elems_per_token: float = 0.0
    backward_peak_elems_per_token: float = 0.0
    # Attention's keys and values (Plan.seq_chunks): as computed (per token, all heads) and
    # as attention keeps them for backward (repeated per query head with grouped heads).
    kv_elems_per_token: float = 0.0
    attention_kv_elems_per_token: float = 0.0
    buffer_bytes: int = 0  # persistent buffers (rotary tables), whatever the dtype

    def kept_elems_per_token(self, tp: int, sequence_parallel: bool,
                             regather: bool = False) -> float:
        """Activations one device of a `tp`-way group keeps for backward, per token."""
        if sequence_parallel and self.sp_replicated_elems_per_token is not None:
            whole = self.sp_replicated_elems_per_token
            if regather:
                whole -= self.sp_gathered_elems_per_token
        else:
            whole = self.tp_replicated_elems_per_token
        return whole + (self.activation_elems_per_token - whole) / tp

    def pieces_elems_per_token(self, pieces: int, tp: int, recompute: bool) -> float:
        """What running the sequence in `pieces` (Plan.seq_chunks) adds per token to what the
        layer keeps on one of `tp` ranks (heads split): each piece's own keys and values,
        which the later pieces read, and, unless recomputed, attention's keys and values over
        the pieces so far, (pieces + 1) / 2 of the whole sequence's on average."""
        if pieces == 1:
            return 0.0
        over = 0.0 if recompute else self.attention_kv_elems_per_token * (pieces - 1) / 2
        return (self.kv_elems_per_token + over) / tp

    def recompute_kept_elems_per_token(self, tp: int, sequence_parallel: bool) -> float:
        """Kept under full recomputation (the layer input): split along the sequence under
        sequence parallelism."""
        split = sequence_parallel and self.sp_replicated_elems_per_token is not None
        return self.recompute_elems_per_token / (tp if split else 1)


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    seq_len: int
    dim: int
    vocab_size: int
    tie_embeddings: bool
    layers: list[LayerSpec]
    # Whether `layers` are half layers (Plan.half_layers): each block as its attention half
    # and its MLP half, the partition units a stage boundary may fall between. `halves` is
    # this model so cut (priced; which runtimes run it: ModelSource.units).
    half_layers: bool = False
    halves: ModelSpec | None = None

    def units(self, half_layers: bool) -> ModelSpec:
        """This model in the partition units a plan's layer ranges count (Plan.half_layers)."""
        if half_layers == self.half_layers:
            return self
        if half_layers and self.halves is not None:
            return self.halves
        from hetrain.errors import PlanError

        raise PlanError(f"half_layers: {'true' if half_layers else 'false'} does not fit model "
                        f"{self.name!r}, priced at "
                        f"{'half' if self.half_layers else 'whole'} layers only; set "
                        f"half_layers: {'false' if half_layers else 'true'}")

    def describe_layers(self) -> str:
        """The layers a plan's ranges count, for messages."""
        blocks = (self.n_layers - 2) // (2 if self.half_layers else 1)
        what = f"{blocks} blocks as attention and MLP halves" if self.half_layers \
            else f"{blocks} blocks"
        return f"{self.n_layers} {'half layers' if self.half_layers else 'layers'} " \
            f"(embed, {what}, head)"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def backward_weights(self) -> tuple[float, ...]:
        """Each layer's share weight of a stage's backward (its forward FLOPs per token, at
        least 1): plan.sync.ready_fraction reads it per group and bucket."""
        return tuple(max(layer.forward_flops_per_token, 1.0) for layer in self.layers)

    @property
    def params(self) -> int:
        total = sum(layer.params for layer in self.layers)
        if self.tie_embeddings:
            total -= self.vocab_size * self.dim
        return total

    def sequence_parallel(self, tp: int) -> bool:
        """Whether a `tp`-way group splits its blocks' sequence (norms, residuals) over its
        ranks, as the runtime does (model/source.py): when the model supports it and the
        sequence divides evenly."""
        return tp > 1 and self.seq_len % tp == 0 and \
            any(lay.sp_replicated_elems_per_token is not None for lay in self.layers)

    def flops_per_token(self, start: int = 0, end: int | None = None) -> float:
        """Forward + backward FLOPs per token of layers [start, end)."""
        return 3 * sum(layer.forward_flops_per_token for layer in self.layers[start:end])

    def range_params(self, start: int, end: int) -> int:
        return sum(layer.params for layer in self.layers[start:end])

    def device_params(self, start: int, end: int, tp: int = 1) -> float:
        """Parameters one device of a `tp`-way group holds of layers [start, end): tensor
        parallelism splits the matmuls, every rank keeps the rest whole."""
        return sum(lay.tp_replicated_params + (lay.params - lay.tp_replicated_params) / tp
                   for lay in self.layers[start:end])


def model_spec(cfg: ModelConfig, seq_len: int, sequence_parallel: bool = True,
               half_layers: bool = False) -> ModelSpec:
    """`sequence_parallel`: whether the runtime splits the blocks' sequence under TP (the
    reference decoder does; Hugging Face layers, which build their positions from their
    input, do not). `half_layers`: each block as two units, its attention half and its MLP
    half (_halves)."""
    h, f, kv = cfg.dim, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    q = cfg.n_heads * cfg.head_dim
    block_params = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
    # Matmuls: 2 FLOPs per weight per token; causal attention: QK^T and AV over seq/2 keys.
    block_flops = 2 * (block_params - 2 * h) + 2 * 2 * q * seq_len / 2
    # Kept for backward, per token, as autograd saves them in model/decoder.py: per RMSNorm
    # its 1/rms, x*rms and output (2h + 1); the residual sums (2h); the rotated q and k, v,
    # or with grouped heads the repeated k and v (2q); the attention output and its
    # logsumexp per head (flash attention: no s^2 term); w1's output, silu's, w3's and
    # their product (4f). Norms and residuals stay whole under tensor parallelism; under
    # sequence parallelism they are split along the sequence, and what stays whole is the
    # all-gathered input the attention's and the FFN's first matmuls keep (2h), unless
    # regathered (saved as the shard, gathered again in backward).
    kv_kept = q if cfg.n_heads != cfg.kv_heads else kv
    whole = 4 * h + 2 + 2 * h
    block_acts = whole + 2 * q + 2 * kv_kept + cfg.n_heads + 4 * f
    # head: its norm, and the log-softmax cross-entropy keeps over the vocabulary
    head_acts = 2 * h + 1 + cfg.vocab_size
    layers = [
        LayerSpec(name="embed", params=cfg.vocab_size * h, forward_flops_per_token=0.0,
                  activation_elems_per_token=h, recompute_elems_per_token=h,
                  output_elems_per_token=h, tp_replicated_params=cfg.vocab_size * h,
                  tp_replicated_elems_per_token=h, backward_peak_elems_per_token=h),
        *(
            LayerSpec(name=f"block.{i}", params=block_params, forward_flops_per_token=block_flops,
                      activation_elems_per_token=block_acts, recompute_elems_per_token=h,
                      output_elems_per_token=h, tp_allreduces=2, tp_replicated_params=2 * h,
                      tp_replicated_elems_per_token=whole,
                      sp_replicated_elems_per_token=2 * h if sequence_parallel else None,
                      sp_gathered_elems_per_token=2 * h,
                      backward_peak_elems_per_token=2 * (h + f),
                      kv_elems_per_token=2 * kv, attention_kv_elems_per_token=2 * kv_kept,
                      buffer_bytes=cfg.max_seq_len * cfg.head_dim * 4)
            for i in range(cfg.n_layers)
        ),
        LayerSpec(name="head", params=cfg.vocab_size * h + h,
                  forward_flops_per_token=2.0 * h * cfg.vocab_size,
                  activation_elems_per_token=head_acts,
                  recompute_elems_per_token=h + 2 * cfg.vocab_size, output_elems_per_token=0.0,
                  tp_replicated_params=cfg.vocab_size * h + h,
                  tp_replicated_elems_per_token=head_acts,
                  backward_peak_elems_per_token=2 * (h + cfg.vocab_size)),
    ]
    halves = None
    if half_layers:
        layers = [layers[0], *(half for i in range(cfg.n_layers)
                               for half in _halves(cfg, seq_len, layers[1 + i], i)), layers[-1]]
    else:
        halves = model_spec(cfg, seq_len, sequence_parallel, half_layers=True)
    return ModelSpec(name=cfg.name, seq_len=seq_len, dim=h, vocab_size=cfg.vocab_size,
                     tie_embeddings=cfg.tie_embeddings, layers=layers, half_layers=half_layers,
                     halves=halves)


def _halves(cfg: ModelConfig, seq_len: int, block: LayerSpec, i: int
            ) -> tuple[LayerSpec, LayerSpec]:
    """A block's two residual halves as model/decoder.py runs them (AttentionHalf,
    FeedForwardHalf): x + attn(attn_norm(x)), then x + ffn(ffn_norm(x)). Each keeps its norm
    (2h + 1) and its residual sum (h), does one all-reduce under TP, and keeps its own input
    under recomputation; their parameters, FLOPs and kept activations add up to the block's."""
    h, f, kv = cfg.dim, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    q = cfg.n_heads * cfg.head_dim
    kv_kept = q if cfg.n_heads != cfg.kv_heads else kv
    norm = 2 * h + 1
    attn_params, ffn_params = 2 * h * q + 2 * h * kv + h, 3 * h * f + h
    sp = block.sp_replicated_elems_per_token is not None
    common = dict(recompute_elems_per_token=h, output_elems_per_token=h, tp_allreduces=1,
                  tp_replicated_params=h, tp_replicated_elems_per_token=norm + h,
                  sp_replicated_elems_per_token=h if sp else None,
                  sp_gathered_elems_per_token=h)
    attn = LayerSpec(name=f"block.{i}.attn", params=attn_params,
                     forward_flops_per_token=2 * (attn_params - h) + 2 * q * seq_len,
                     activation_elems_per_token=norm + h + 2 * q + 2 * kv_kept + cfg.n_heads,
                     backward_peak_elems_per_token=2 * (h + q),
                     kv_elems_per_token=block.kv_elems_per_token,
                     attention_kv_elems_per_token=block.attention_kv_elems_per_token,
                     buffer_bytes=block.buffer_bytes, **common)
    ffn = LayerSpec(name=f"block.{i}.ffn", params=ffn_params,
                    forward_flops_per_token=2 * (ffn_params - h),
                    activation_elems_per_token=norm + h + 4 * f,
                    backward_peak_elems_per_token=2 * (h + f), **common)
    return attn, ffn
