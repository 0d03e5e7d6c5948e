"""TokenFlow: consistent text-driven video editing with image diffusion models (Geyer et al., ICLR 2024).

Everything a research script needs is importable from here; backends live in ``tokenflow.editors``.
"""
from tokenflow.core.attention import KeyframeAttention
from tokenflow.core.distributed import Ranks
from tokenflow.core.editor import Branch, BranchCall, EditInputs, KeyframeEditor, Latents, Phase, Step, WrappingEditor
from tokenflow.core.flow_propagation import FlowPropagator
from tokenflow.core.guidance import GuidedEditor, UnconditionalEmbedding, cfg
from tokenflow.core.inversion import DDIMInverter, Inverter, reconstruct, sample
from tokenflow.core.keyframes import AdaptiveKeyframes, AutoKeyframes, FixedKeyframes, KeyframeSchedule, RandomKeyframes
from tokenflow.core.nulltext import NullTextInverter, sample_with_null_text
from tokenflow.core.pipeline import EditResult, TokenFlowPipeline
from tokenflow.core.video_inversion import invert_video
from tokenflow.core.propagation import (NoPropagation, PropagationInputs, PropagationQuery, Propagator,
                                        SourceFeatures, TokenFlowPropagator)
from tokenflow.core.search import NeighbourSearch, TorchNeighbourSearch
from tokenflow.errors import ConfigError, ModelLoadError, TokenFlowError, VideoError
from tokenflow.models import (Backbone, DiffusionModel, FluxModel, InversionResult, MMDiTLayout, NullTextEmbeddings, SD3Model,
                              TextEmbedding, UNetLayout, from_pipeline, load_model)
from tokenflow.samplers import DDIMSampler, FlowMatchEulerSampler, Grid, NoiseLevel, Sampler, sampler_for
from tokenflow.models.trajectory import FileTrajectory, TensorTrajectory, Trajectory
from tokenflow.storage.cache import InversionCache
from tokenflow.storage.mp4 import VideoWriter, write_video
from tokenflow.storage.png import FrameWriter, write_frames
from tokenflow.storage.video import Video, read_video

__version__ = "0.1.0"
__all__ = [
    "Backbone", "DDIMSampler", "FluxModel", "FlowMatchEulerSampler", "Grid", "MMDiTLayout", "NoiseLevel", "SD3Model", "Sampler",
    "sampler_for", "AdaptiveKeyframes", "AutoKeyframes", "Branch", "BranchCall", "ConfigError", "DDIMInverter", "DiffusionModel", "EditInputs", "EditResult",
    "FileTrajectory", "FixedKeyframes", "FlowPropagator", "FrameWriter", "GuidedEditor", "InversionCache", "InversionResult", "Inverter", "KeyframeAttention", "KeyframeEditor",
    "KeyframeSchedule", "Latents", "ModelLoadError", "NeighbourSearch", "NoPropagation", "NullTextEmbeddings", "NullTextInverter",
    "Phase", "PropagationInputs", "PropagationQuery", "Propagator", "SourceFeatures", "RandomKeyframes", "Ranks", "Step", "TextEmbedding", "TokenFlowError",
    "TensorTrajectory", "TokenFlowPipeline", "TokenFlowPropagator", "TorchNeighbourSearch", "Trajectory", "UNetLayout",
    "UnconditionalEmbedding", "Video", "VideoWriter",
    "VideoError", "cfg", "from_pipeline", "invert_video", "load_model", "read_video", "reconstruct", "sample",
    "sample_with_null_text", "write_frames", "write_video", "WrappingEditor"]
