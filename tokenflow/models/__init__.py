"""Models: loading Stable-Diffusion-family checkpoints, the tiny offline builds, UNet hook sites, DDIM arithmetic."""
from tokenflow.models.loading import DiffusionModel, load_model, resolve_device, resolve_dtype
from tokenflow.models.layout import UNetLayout
from tokenflow.models.trajectory import InversionResult

__all__ = ["DiffusionModel", "InversionResult", "UNetLayout", "load_model", "resolve_device", "resolve_dtype"]
