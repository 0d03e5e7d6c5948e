"""Keyframe-editor backends for TokenFlow: ``from tokenflow.editors import PnPEditor``."""
from tokenflow.core.guidance import GuidedEditor
from tokenflow.editors.p2p import PromptToPromptConfig, PromptToPromptEditor
from tokenflow.editors.pnp import PnPConfig, PnPEditor
from tokenflow.editors.sdedit import SDEditConfig, SDEditEditor

__all__ = ["GuidedEditor", "PnPConfig", "PnPEditor", "PromptToPromptConfig", "PromptToPromptEditor", "SDEditConfig",
           "SDEditEditor"]
