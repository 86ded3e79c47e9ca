"""Diffusion core: schedules, samplers and backbones, kept separate as in diffusers."""

from .backbones import Backbone, DiffusersUNet, OracleBackbone, build_backbone
from .guided_unet import GuidedDiffusionUNet, GuidedUNetModel
from .samplers import ddim_sample, ddim_step, timestep_grid
from .schedule import NoiseSchedule, network_timestep
from .score_sde import NCSNppModel, ScoreSDEBackbone

__all__ = [
    "Backbone",
    "DiffusersUNet",
    "GuidedDiffusionUNet",
    "GuidedUNetModel",
    "NCSNppModel",
    "NoiseSchedule",
    "OracleBackbone",
    "ScoreSDEBackbone",
    "build_backbone",
    "ddim_sample",
    "ddim_step",
    "network_timestep",
    "timestep_grid",
]
