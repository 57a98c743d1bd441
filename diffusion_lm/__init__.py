"""diffusion_lm: turn pretrained BERT-like encoders into masked-diffusion text generators."""

from .adapters import PeftOptions
from .backbone import Backbone, LoadedBackbone, ScratchBackbone, SparseHeadDenoiser, load_backbone
from .data import CanvasPolicy, ChatTemplate, Conversation, DataSource, DialogDataModule, Turn
from .errors import ConfigError
from .export import export_checkpoint, export_model
from .health import MLMHealthCheck, mlm_health
from .likelihood import continuation_elbo
from .loading import load_exported, load_model
from .module import MaskedDiffusionLM
from .objective import masked_diffusion_nelbo
from .sampling import SamplerConfig, generate, infill
from .schedules import CosineSchedule, LogLinearSchedule, NoiseSchedule, PolynomialSchedule, stratified_times
from .version import __version__ as __version__

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
    "PeftOptions",
    "PolynomialSchedule",
    "SamplerConfig",
    "ScratchBackbone",
    "SparseHeadDenoiser",
    "Turn",
    "continuation_elbo",
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
