"""Models: the composite config, the model class, and the builder that assembles them from YAML."""

from medm.models.builder import LLMArgs, ModelArgs, build_model, load_model, parse_model_args, save_model
from medm.models.configuration_medm import MedMConfig
from medm.models.modeling_medm import MedMForConditionalGeneration

__all__ = ["LLMArgs", "MedMConfig", "MedMForConditionalGeneration", "ModelArgs", "build_model", "load_model",
           "parse_model_args", "save_model"]
