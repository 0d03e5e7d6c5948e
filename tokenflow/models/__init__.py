"""Models (backbones): the SD UNet family and the MMDiT (SD 3) family, loading, tiny offline builds, hook sites."""
from tokenflow.models.backbone import DiffusionModel, TextEmbedding
from tokenflow.models.interface import Backbone
from tokenflow.models.layout import MMDiTLayout, UNetLayout
from tokenflow.models.flux import FluxModel
from tokenflow.models.mmdit import SD3Model
from tokenflow.models.loading import as_model, from_pipeline, load_model, resolve_device, resolve_dtype
from tokenflow.models.trajectory import InversionResult, NullTextEmbeddings

__all__ = ["Backbone", "DiffusionModel", "FluxModel", "MMDiTLayout", "SD3Model", "InversionResult", "NullTextEmbeddings", "TextEmbedding", "UNetLayout", "as_model",
           "from_pipeline", "load_model", "resolve_device", "resolve_dtype"]
