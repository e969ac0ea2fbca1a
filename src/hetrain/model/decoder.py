"""The reference decoder, built as a list of layers: embedding, blocks, head.

Every layer maps one tensor to one tensor, so any contiguous range of layers is a pipeline
stage. Attention infers its local head count from the projection's width, so the blocks run
unchanged under tensor parallelism (DTensor colwise/rowwise styles, see runtime/tensor_parallel).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hetrain.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * rms).type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               offset: int = 0) -> torch.Tensor:
    # x: [batch, seq, heads, head_dim], at positions offset.. ; rotate interleaved pairs.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    end = offset + x.shape[1]
    cos, sin = cos[offset:end, None, :], sin[offset:end, None, :]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


@functools.lru_cache(maxsize=16)
def piece_mask(seq: int, offset: int, device: torch.device) -> torch.Tensor:
    """The causal mask of a piece of `seq` queries after `offset` keys of earlier pieces: query
    i sits at offset + i and sees keys 0 .. offset + i. Made once for every layer and
    micro-batch that runs such a piece (it is never written)."""
    return torch.ones(seq, offset + seq, dtype=torch.bool, device=device).tril(offset)


class SequencePieces:
    """One micro-batch's keys and values at a stage when its sequence runs in pieces
    (Plan.seq_chunks, see plan/schedule.py): piece p attends to the pieces before it.

    Each attention layer keeps, per piece, its keys and values twice: as the graph's own
    tensors (a root of that piece's backward) and as detached leaves the later pieces read.
    The later pieces' backward leaves the gradient of those keys and values in the leaves'
    .grad; the piece's own backward then starts from its output's gradient and these. The
    same arithmetic as the whole sequence at once (the causal mask over the pieces so far),
    so training stays exact. A recomputed forward (checkpointing) finds its piece's keys
    and values already kept and reads the same past."""

    def __init__(self) -> None:
        self.piece = 0  # the piece the stage is running
        self.kept: dict[nn.Module, list[tuple[torch.Tensor, ...]]] = {}

    def attend(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep this piece's keys and values; the keys and values of every piece up to it."""
        kept = self.kept.setdefault(layer, [])
        if len(kept) == self.piece:  # not a recomputation
            # clones: a split backward detaches its roots in place, which a view refuses
            k, v = k.clone(), v.clone()
            kept.append((k, v, k.detach().requires_grad_(True),
                         v.detach().requires_grad_(True)))
        past = kept[:self.piece]
        return (torch.cat([p[2] for p in past] + [kept[self.piece][0]], dim=1),
                torch.cat([p[3] for p in past] + [kept[self.piece][1]], dim=1))

    def roots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The running piece's kept keys and values with the gradients the later pieces left
        (none for the last piece: nothing read them)."""
        tensors, grads = [], []
        for kept in self.kept.values():
            own_k, own_v, leaf_k, leaf_v = kept[self.piece]
            for own, leaf in ((own_k, leaf_k), (own_v, leaf_v)):
                if leaf.grad is not None:
                    tensors.append(own)
                    grads.append(leaf.grad)
        return tensors, grads

    def past_leaves(self) -> list[torch.Tensor]:
        """The leaves of the pieces before the running one (their gradients build up)."""
        return [t for kept in self.kept.values() for p in kept[:self.piece] for t in p[2:]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pieces: SequencePieces | None = None  # set by the stage around a piece's action
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.kv_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        pieces = self.pieces
        offset = 0 if pieces is None else pieces.piece * seq
        q = apply_rope(q, self.cos, self.sin, offset)
        k = apply_rope(k, self.cos, self.sin, offset)
        mask = None
        if pieces is not None:
            k, v = pieces.attend(self, k, v)
            if offset:
                mask = piece_mask(seq, offset, x.device)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=2)
            v = v.repeat_interleave(self.n_rep, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class AttentionHalf(nn.Module):
    """A block's first residual half, x + attn(attn_norm(x)), as a partition unit of its own
    (Plan.half_layers). It holds the block's own modules under the block's names, so its
    parameters keep their canonical names (blocks.i.attn_norm..., blocks.i.attn...)."""

    def __init__(self, block: Block):
        super().__init__()
        self.attn_norm, self.attn = block.attn_norm, block.attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x))


class FeedForwardHalf(nn.Module):
    """A block's second residual half, x + ffn(ffn_norm(x)) (see AttentionHalf)."""

    def __init__(self, block: Block):
        super().__init__()
        self.ffn_norm, self.ffn = block.ffn_norm, block.ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.ffn_norm(x))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens)


class Head(nn.Module):
    """Final norm and output projection; with tied embeddings it owns a copy of the embedding
    weight whose gradient is combined with the embedding's (same canonical name)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.out = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class Decoder(nn.Module):
    """embed -> blocks -> head; `layers()` is the ordered list pipeline stages cut."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = Head(cfg)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.out.weight = self.embed.tok.weight

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def layers(self, half_layers: bool = False) -> list[nn.Module]:
        """The partition units: embedding, blocks (or each block's two halves), head."""
        if not half_layers:
            return [self.embed, *self.blocks, self.head]
        halves = (h for b in self.blocks for h in (AttentionHalf(b), FeedForwardHalf(b)))
        return [self.embed, *halves, self.head]

    def layer_prefixes(self, half_layers: bool = False) -> list[str]:
        per_block = 2 if half_layers else 1
        return ["embed.", *(f"blocks.{i}." for i in range(len(self.blocks))
                            for _ in range(per_block)), "head."]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for layer in self.layers():
            x = layer(x)
        return x


def build_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """The same weights on every process: seeded, built on CPU in fp32."""
    if not cfg.trainable:
        from hetrain.errors import ModelError

        raise ModelError(f"model {cfg.name!r} is spec-only (too big to build here); "
                         "plan or simulate it, or train 'tiny' or 'small'")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Decoder(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
