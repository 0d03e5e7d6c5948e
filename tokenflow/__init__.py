"""TokenFlow: consistent text-driven video editing with image diffusion models (Geyer et al., ICLR 2024)."""
from .cache import InversionCache
from .editor import Branch, EditInputs, KeyframeEditor, Step
from .errors import ConfigError, ModelLoadError, TokenFlowError, VideoError
from .inversion import DDIMInverter, InversionResult, Inverter, reconstruct
from .keyframes import FixedKeyframes, KeyframeSchedule, RandomKeyframes
from .layout import UNetLayout
from .models import DiffusionModel, load_model
from .nulltext import NullTextInverter, sample_with_null_text
from .pipeline import EditResult, TokenFlowPipeline, invert_video
from .propagation import NoPropagation, Propagator, TokenFlowPropagator
from .search import NeighbourSearch, TorchNeighbourSearch
from .video import Video, read_video, write_frames, write_video

__version__ = "0.1.0"
__all__ = [
    "Branch", "ConfigError", "DDIMInverter", "DiffusionModel", "EditInputs", "EditResult", "FixedKeyframes",
    "InversionCache", "InversionResult", "Inverter", "KeyframeEditor", "KeyframeSchedule", "ModelLoadError",
    "NeighbourSearch", "NoPropagation", "NullTextInverter", "Propagator", "RandomKeyframes", "Step", "TokenFlowError",
    "TokenFlowPipeline", "TokenFlowPropagator", "TorchNeighbourSearch", "UNetLayout", "Video", "VideoError",
    "invert_video", "load_model", "read_video", "reconstruct", "sample_with_null_text", "write_frames", "write_video",
]
