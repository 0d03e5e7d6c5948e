"""Keyframe-editor backends for TokenFlow: ``from editors import PnPEditor``."""
from .guided import GuidedEditor
from .p2p import PromptToPromptConfig, PromptToPromptEditor
from .pnp import PnPConfig, PnPEditor
from .sdedit import SDEditConfig, SDEditEditor

__all__ = ["GuidedEditor", "PnPConfig", "PnPEditor", "PromptToPromptConfig", "PromptToPromptEditor", "SDEditConfig", "SDEditEditor"]
