"""TokenFlow: consistent text-driven video editing with image diffusion models (Geyer et al., ICLR 2024)."""
from tokenflow.storage.cache import InversionCache
from tokenflow.core.editor import Branch, EditInputs, KeyframeEditor, Step
from tokenflow.errors import ConfigError, ModelLoadError, TokenFlowError, VideoError
from tokenflow.core.inversion import DDIMInverter, Inverter, reconstruct
from tokenflow.models.trajectory import InversionResult
from tokenflow.core.keyframes import FixedKeyframes, KeyframeSchedule, RandomKeyframes
from tokenflow.models.layout import UNetLayout
from tokenflow.models.loading import DiffusionModel, load_model
from tokenflow.core.nulltext import NullTextInverter, sample_with_null_text
from tokenflow.core.pipeline import EditResult, TokenFlowPipeline, invert_video
from tokenflow.core.propagation import NoPropagation, Propagator, TokenFlowPropagator
from tokenflow.core.search import NeighbourSearch, TorchNeighbourSearch
from tokenflow.storage.video import Video, read_video, write_frames, write_video

__version__ = "0.1.0"
__all__ = [
    "Branch", "ConfigError", "DDIMInverter", "DiffusionModel", "EditInputs", "EditResult", "FixedKeyframes",
    "InversionCache", "InversionResult", "Inverter", "KeyframeEditor", "KeyframeSchedule", "ModelLoadError",
    "NeighbourSearch", "NoPropagation", "NullTextInverter", "Propagator", "RandomKeyframes", "Step", "TokenFlowError",
    "TokenFlowPipeline", "TokenFlowPropagator", "TorchNeighbourSearch", "UNetLayout", "Video", "VideoError",
    "invert_video", "load_model", "read_video", "reconstruct", "sample_with_null_text", "write_frames", "write_video",
]
