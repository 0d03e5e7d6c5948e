"""Keyframe-editor backends for TokenFlow: ``from editors import PnPEditor``."""
from .pnp import PnPConfig, PnPEditor

__all__ = ["PnPConfig", "PnPEditor"]
