"""The Parcae model as Megatron-Core modules."""

from parcae_megatron.model.config import ParcaeConfig, ParcaeConfigError
from parcae_megatron.model.parcae_model import ParcaeModel
from parcae_megatron.model.presets import preset_config, preset_names

__all__ = ["ParcaeConfig", "ParcaeConfigError", "ParcaeModel", "preset_config", "preset_names"]
