"""Keyframe-editor backends for TokenFlow: ``from tokenflow.editors import PnPEditor``."""
from tokenflow.core.guidance import GuidedEditor
from tokenflow.editors.cfg import CFGConfig, CFGEditor
from tokenflow.editors.controlnet import ControlNetConfig, ControlNetEditor, ControlSpec
from tokenflow.editors.flowedit import FlowEditConfig, FlowEditEditor
from tokenflow.editors.kv_injection import KVInjectionConfig, KVInjectionEditor
from tokenflow.editors.ip2p import InstructPix2PixConfig, InstructPix2PixEditor
from tokenflow.editors.p2p import PromptToPromptConfig, PromptToPromptEditor
from tokenflow.editors.pnp import PnPConfig, PnPEditor
from tokenflow.editors.sdedit import SDEditConfig, SDEditEditor

__all__ = ["CFGConfig", "CFGEditor", "ControlNetConfig", "ControlNetEditor", "ControlSpec", "FlowEditConfig", "FlowEditEditor", "GuidedEditor", "InstructPix2PixConfig",
           "InstructPix2PixEditor", "KVInjectionConfig", "KVInjectionEditor", "PnPConfig", "PnPEditor", "PromptToPromptConfig", "PromptToPromptEditor",
           "SDEditConfig", "SDEditEditor"]
