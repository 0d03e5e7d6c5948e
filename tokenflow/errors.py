"""User-facing errors: one clear line that names the bad value and what to do about it."""


class TokenFlowError(Exception):
    """An error the user can act on (bad path, impossible setting, unreadable video).

    The CLI prints ``str(error)`` as one line and exits non-zero; other exceptions are bugs and
    keep their traceback.
    """


class ConfigError(TokenFlowError, ValueError):
    """An impossible or out-of-range setting."""


class VideoError(TokenFlowError):
    """A missing, unreadable or too-short video."""


class ModelLoadError(TokenFlowError):
    """A model id or folder that cannot be loaded."""


class NonFiniteError(TokenFlowError):
    """Latents that stopped being numbers (NaN/inf) during a run: nothing is published."""


class StorageError(TokenFlowError):
    """A folder the run needs cannot hold what it must write (full, read-only): names the folder and the fix."""
