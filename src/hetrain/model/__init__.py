"""Models: named configs, the reference decoder as a list of layers, and ModelSpec."""

from hetrain.model.config import MODELS, ModelConfig, model_config
from hetrain.model.decoder import Decoder, build_decoder
from hetrain.model.spec import LayerSpec, ModelSpec, model_spec

__all__ = ["MODELS", "Decoder", "LayerSpec", "ModelConfig", "ModelSpec", "build_decoder",
           "model_config", "model_spec"]
