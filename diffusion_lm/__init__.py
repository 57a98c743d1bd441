"""diffusion_lm: turn pretrained BERT-like encoders into masked-diffusion text generators."""

from .backbone import Backbone, ScratchBackbone, load_backbone
from .data import CanvasPolicy, ChatTemplate, Conversation, DataSource, DialogDataModule, Turn
from .errors import ConfigError
from .module import MaskedDiffusionLM, load_model
from .objective import masked_diffusion_nelbo
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
    "LogLinearSchedule",
    "MaskedDiffusionLM",
    "NoiseSchedule",
    "PolynomialSchedule",
    "ScratchBackbone",
    "Turn",
    "load_backbone",
    "load_model",
    "masked_diffusion_nelbo",
    "stratified_times",
]
