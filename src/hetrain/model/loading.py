"""`--model` and `hetrain.fit(model)` to the one model object: a built-in name, a Hugging Face
`config.json` or model folder, a model YAML (ModelConfig fields), or an nn.Module."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError
from torch import nn

from hetrain.errors import ModelError
from hetrain.model.config import MODELS, ModelConfig
from hetrain.model.source import DecoderModel, ModelSource, WholeModule

MODEL_FORMS = ("a built-in name (" + ", ".join(MODELS) + "), a Hugging Face config.json or "
               "model folder, or a model YAML")


def load_model(model: str | Path) -> ModelSource:
    """The model a `--model` value (or a plan's `model` field) names."""
    text = str(model)
    if text in MODELS:
        return DecoderModel(MODELS[text])
    path = Path(text)
    if not path.exists():
        raise ModelError(f"unknown model {text!r}; give {MODEL_FORMS}")
    if path.suffix in (".yaml", ".yml"):
        # Named by its path: a plan written for it names the file the workers read.
        return DecoderModel(model_yaml(path).model_copy(update={"name": text}))
    from hetrain.model.hf import HFModel

    return HFModel.from_path(path, text)


def as_model(model: nn.Module | ModelSource) -> ModelSource:
    """A user's object: a Hugging Face causal LM is layered (every plan form); any other
    nn.Module is one whole-model layer (data parallelism)."""
    if isinstance(model, ModelSource):
        return model
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch nn.Module, not {type(model).__name__}")
    from hetrain.model.hf import HFModel, is_hf_causal_lm

    if is_hf_causal_lm(model):
        return HFModel.from_module(model)
    return WholeModule(model)


def model_yaml(path: Path) -> ModelConfig:
    """A ModelConfig from YAML; a bad field is one line naming it and what it takes."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot read it ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ModelError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: a model YAML is a mapping of ModelConfig fields (vocab_size, "
                         "dim, n_layers, n_heads, ffn_dim, ...)")
    raw.setdefault("name", path.stem)
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(model)"
        fix = ("remove it; the fields are " + ", ".join(ModelConfig.model_fields)
               if first["type"] == "extra_forbidden" else first["msg"])
        raise ModelError(f"{path}: field {field!r}: {fix}") from None


def model_and_seq_len(model: str | Path, seq_len: int | None) -> tuple[ModelSource, int]:
    """A `--model` and its `--seq-len` (default: the model's longest), checked together."""
    source = load_model(model)
    most = source.max_seq_len or 2048
    seq = seq_len or most
    if seq > most:
        raise ModelError(f"--seq-len {seq} is longer than {source.name}'s "
                         f"{source.max_seq_field} {most}; pass at most that")
    return source, seq
