"""diffusion_lm: turn pretrained BERT-like encoders into masked-diffusion text generators."""

from .backbone import Backbone, LoadedBackbone, ScratchBackbone, SparseHeadDenoiser, load_backbone
from .data import CanvasPolicy, ChatTemplate, Conversation, DataSource, DialogDataModule, Turn
from .errors import ConfigError
from .export import export_checkpoint, export_model, load_exported
from .health import MLMHealthCheck, mlm_health
from .module import MaskedDiffusionLM, load_model
from .objective import masked_diffusion_nelbo
from .sampling import SamplerConfig, generate, infill
from .schedules import CosineSchedule, LogLinearSchedule, NoiseSchedule, PolynomialSchedule, stratified_times

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "CanvasPolicy",
    "ChatTemplate",
    "ConfigError",
    "Conversation",
    "CosineSchedule",
    "DataSource",
    "DialogDataModule",
    "LoadedBackbone",
    "LogLinearSchedule",
    "MLMHealthCheck",
    "MaskedDiffusionLM",
    "NoiseSchedule",
    "PolynomialSchedule",
    "SamplerConfig",
    "ScratchBackbone",
    "SparseHeadDenoiser",
    "Turn",
    "export_checkpoint",
    "export_model",
    "generate",
    "infill",
    "load_backbone",
    "load_exported",
    "load_model",
    "masked_diffusion_nelbo",
    "mlm_health",
    "stratified_times",
]
