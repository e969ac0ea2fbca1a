"""Hugging Face causal LMs as layered models: found by their decoder-layer list
(`model.model.layers`); the token embedding is the first layer, the final norm and `lm_head`
the last. Rotary position embeddings and the causal mask are made inside each block, so any
range of layers is a pipeline stage. Parameters keep the Hugging Face names, so trained
weights load back with `from_pretrained`.

The planner needs only the config (a `config.json` read as plain JSON: nothing is
instantiated, a 100B model plans from its config); weights come from the module given to
`hetrain.fit`, from `from_pretrained` on a folder, or seeded random ones from the config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetrain.errors import ModelError
from hetrain.model.config import ModelConfig
from hetrain.model.source import LlamaShaped, ModelSource
from hetrain.model.stage import Stage

# config.json field -> ModelConfig field (the reference decoder's shape prices the same).
_SHAPE_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "dim",
                 "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                 "intermediate_size": "ffn_dim"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Model types whose forward is Llama's loop (embed, layers with rotary and mask, norm, head):
# their layers run alone exactly. Others train whole (data parallelism) through hetrain.fit.
LAYERED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def is_hf_causal_lm(module: nn.Module) -> bool:
    """A decoder-only LM laid out as Llama's: model.{embed_tokens, layers, norm}, lm_head."""
    inner = getattr(module, "model", None)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return (model_type in LAYERED_TYPES and isinstance(getattr(module, "lm_head", None), nn.Linear)
            and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and isinstance(inner.layers, nn.ModuleList))


def shape_config(raw: dict[str, Any], name: str, where: str) -> ModelConfig:
    """A config.json's shape as a ModelConfig; a missing or bad field is one line naming it."""
    for field in _SHAPE_FIELDS:
        value = raw.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            got = "missing" if value is None else f"{value!r}"
            raise ModelError(f"{where}: field {field!r} is {got}; a Hugging Face causal LM "
                             "config needs a positive integer there")
    fields = {ours: raw[theirs] for theirs, ours in _SHAPE_FIELDS.items()}
    kv, head_dim = raw.get("num_key_value_heads"), raw.get("head_dim")
    try:
        return ModelConfig(name=name, n_kv_heads=kv if isinstance(kv, int) else None,
                           head_dim=head_dim if isinstance(head_dim, int) else 0,
                           max_seq_len=int(raw.get("max_position_embeddings") or 2048),
                           tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                           rope_theta=float(raw.get("rope_theta") or 10000.0), **fields)
    except ValueError as err:  # pydantic: the first problem, on one line
        first = err.errors()[0] if hasattr(err, "errors") else {"msg": str(err)}
        raise ModelError(f"{where}: {first['msg']}; fix the config's head counts") from None


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}); give a "
                         "Hugging Face config.json") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: a config.json holds one JSON object")
    if not isinstance(raw.get("model_type"), str):
        raise ModelError(f"{path}: field 'model_type' is missing; a Hugging Face config.json "
                         "names its model type (llama, qwen2, mistral, ...)")
    return raw


class HFModel(LlamaShaped):
    """A Hugging Face causal LM, from a module, a model folder or a config.json."""

    def __init__(self, raw_config: dict[str, Any], name: str, *, module: nn.Module | None = None,
                 folder: str | None = None):
        self.raw, self.name, self.folder = raw_config, name, folder
        self._module = self._given = module
        self.cfg = shape_config(raw_config, name, name)
        self.n_layers = self.cfg.n_layers + 2
        self.hidden_size = self.cfg.dim
        self.vocab_size, self.max_seq_len = self.cfg.vocab_size, self.cfg.max_seq_len
        self.tie_embeddings = self.cfg.tie_embeddings
        self.max_seq_field = "max_position_embeddings"

    def __getstate__(self) -> dict[str, Any]:
        # Weights that load from the folder or the seed are not pickled to every worker.
        state = dict(self.__dict__)
        if state.get("_given") is None:
            state["_module"] = None
        return state

    @classmethod
    def from_module(cls, module: nn.Module, name: str | None = None) -> HFModel:
        raw = module.config.to_dict()
        raw.setdefault("model_type", getattr(module.config, "model_type", "unknown"))
        return cls(raw, name or type(module).__name__, module=module)

    @classmethod
    def from_path(cls, path: Path, name: str) -> HFModel:
        """A model folder (config.json, weights if present) or a config.json file."""
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ModelError(f"{path}: no config.json in the folder; give a Hugging Face "
                             "model folder, a config.json, a model YAML or a built-in name")
        has_weights = path.is_dir() and any((path / f).exists() for f in _WEIGHT_FILES)
        return cls(read_config_json(config_file), name,
                   folder=str(path) if has_weights else None)

    # --- weights ----------------------------------------------------------------------------
    def module(self, seed: int) -> nn.Module:
        """The whole model: the given module, else loaded from the folder, else seeded random
        weights from the config (the same on every process)."""
        if self._module is None:
            self._module = self._load(seed)
        return self._module

    def _load(self, seed: int) -> nn.Module:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise ModelError("training a Hugging Face model needs transformers: pip install "
                             "'hetrain[hf]'") from None
        try:
            if self.folder is not None:
                return AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32)
            raw = {k: v for k, v in self.raw.items() if k != "model_type"}
            config = AutoConfig.for_model(self.raw["model_type"], **raw)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (ValueError, KeyError, OSError) as err:
            raise ModelError(f"{self.name}: transformers cannot build it "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                             ) from None

    def user_module(self) -> nn.Module | None:
        return self._given

    def whole(self, seed: int) -> nn.Module:
        return copy.deepcopy(self.module(seed))

    def build_stage(self, start: int, end: int, seed: int) -> Stage:
        m = self.module(seed)
        if not is_hf_causal_lm(m):
            raise ModelError(f"{self.name}: model_type {self.raw.get('model_type')!r} is not "
                             f"one hetrain cuts into layers ({', '.join(LAYERED_TYPES)}); pass "
                             "the module to hetrain.fit to train it whole (data parallelism)")
        last = self.n_layers - 1
        # One deepcopy for the whole range: a tied head keeps sharing the embedding's weight.
        wanted = {"embed": m.model.embed_tokens if start == 0 else None,
                  "layers": [m.model.layers[i - 1] for i in range(max(start, 1), min(end, last))],
                  "norm": m.model.norm if end == self.n_layers else None,
                  "lm_head": m.lm_head if end == self.n_layers else None,
                  "rotary": m.model.rotary_emb}
        own = copy.deepcopy(wanted)
        layers: list[nn.Module] = []
        if own["embed"] is not None:
            layers.append(_Embed(own["embed"]))
        for i, block in zip(range(max(start, 1), min(end, last)), own["layers"], strict=True):
            layers.append(_Block(block, i - 1, own["rotary"], m.config))
        if own["norm"] is not None:
            layers.append(_Head(own["norm"], own["lm_head"]))
        aliases = {"lm_head.weight": "model.embed_tokens.weight"} if self.tie_embeddings else {}
        return Stage(layers, [""] * len(layers), start, end, self.n_layers, aliases)

    def layer_of(self, name: str) -> int:
        if name.startswith("model.embed_tokens."):
            return 0
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) + 1
        return self.n_layers - 1

    def apply_tensor_parallel(self, stage: Stage, mesh, sequence_parallel: bool = False) -> None:
        """Megatron-style TP on every decoder layer, as torchtitan's Llama plan: q/k/v and
        gate/up column-wise, o and down row-wise; the attention's head counts become the
        local shard's. Embedding, norms and head stay replicated across the group."""
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        tp = mesh.size()
        self.check_tp(tp)
        for layer in stage.layers:
            if not isinstance(layer, _Block):
                continue
            block = layer.decoder_layer
            parallelize_module(block, mesh, {
                "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(),
            })
            # Models that reshape by head count (not -1) must see the local counts.
            for attr in ("num_heads", "num_key_value_heads", "num_attention_heads"):
                value = getattr(block.self_attn, attr, None)
                if isinstance(value, int):
                    setattr(block.self_attn, attr, value // tp)


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` under `root`, so parameter names are the HF model's."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


class _Embed(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        _place(self, "model.embed_tokens", embed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)


class _Block(nn.Module):
    """Decoder layer `index`, with its positions and causal mask made from its input."""

    def __init__(self, layer: nn.Module, index: int, rotary: nn.Module, config: Any):
        super().__init__()
        _place(self, f"model.layers.{index}", layer)
        self.decoder_layer = layer  # the same module: parameters are listed once
        self.rotary = rotary  # buffers only (inv_freq)
        self.config = config
        # As the model's own forward picks the mask: per layer type (Qwen2/3), else a
        # sliding window whenever the config sets one (Mistral).
        types = getattr(config, "layer_types", None)
        self.sliding = (types[index] == "sliding_attention" if types else
                        getattr(config, "sliding_window", None) is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        make_mask = create_sliding_window_causal_mask if self.sliding else create_causal_mask
        mask = make_mask(config=self.config, inputs_embeds=x, attention_mask=None, cache=None,
                         position_ids=positions)
        out = self.decoder_layer(x, attention_mask=mask, position_ids=positions,
                                 position_embeddings=self.rotary(x, positions))
        return out[0] if isinstance(out, tuple) else out


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        _place(self, "model.norm", norm)
        self.lm_head = lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))


def save_hf_folder(model: ModelSource, params: dict[str, torch.Tensor], folder: Path,
                   metadata: dict[str, str]) -> None:
    """Trained weights (by their Hugging Face names) and the config as a folder that
    `from_pretrained` reads: config.json and model.safetensors."""
    from safetensors.torch import save_file

    if not isinstance(model, HFModel):
        raise ModelError(f"--hf-folder needs a Hugging Face model; {model.name!r} is not one "
                         "(its parameters export as one safetensors file with --out)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.raw, indent=2) + "\n")
    tmp = folder / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp),
              metadata={"format": "pt", **metadata})
    tmp.replace(folder / "model.safetensors")
