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


def one_line(exc: BaseException) -> str:
    """``exc``'s message folded onto one line (at most 200 characters; its type's name when it has none), to quote
    inside an error of ours."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


def chained(error: BaseException | None):
    """``error`` and the exceptions it was raised from or while handling (``__cause__``, else ``__context__``), in
    order; a cycle ends the chain."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def library_error(error: BaseException) -> TokenFlowError | None:
    """The first :class:`TokenFlowError` in ``error``'s chain (e.g. a constructor's, wrapped by Hydra's
    ``instantiate``), or None: raise it unwrapped so the user reads its one line."""
    return next((e for e in chained(error) if isinstance(e, TokenFlowError)), None)
