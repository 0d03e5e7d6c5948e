"""Models: loading Stable-Diffusion-family checkpoints, the tiny offline builds, UNet hook sites, DDIM arithmetic."""
from tokenflow.models.backbone import DiffusionModel, TextEmbedding
from tokenflow.models.layout import UNetLayout
from tokenflow.models.loading import as_model, from_pipeline, load_model, resolve_device, resolve_dtype
from tokenflow.models.trajectory import InversionResult, NullTextEmbeddings

__all__ = ["DiffusionModel", "InversionResult", "NullTextEmbeddings", "TextEmbedding", "UNetLayout", "as_model",
           "from_pipeline", "load_model", "resolve_device", "resolve_dtype"]
