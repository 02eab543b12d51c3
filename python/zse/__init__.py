"""ZSE: serve an LLM from one file.

>>> import zse
>>> engine = zse.Engine()                      # the default model, fetched on first use
>>> engine.chat([{"role": "user", "content": "Hi"}], max_tokens=16).text
"""

from . import _gc

with _gc.collector_paused():
    from ._core import (
        ContextLengthExceededError,
        DeviceUnavailableError,
        EngineOverloadedError,
        EngineStoppedError,
        ModelFileError,
        TemplateError,
        UnsupportedModelError,
        ZseError,
        __version__,
    )
    from .convert import RequantizeWarning, convert, inspect
    from .engine import (
        AsyncDeltaStream,
        AsyncTextStream,
        Completion,
        Delta,
        Engine,
        TextStream,
        TokenLogprob,
        TopLogprob,
        Usage,
    )
    from .models import cache_dir, default_model_path, pull

__all__ = [
    "AsyncDeltaStream",
    "AsyncTextStream",
    "Completion",
    "ContextLengthExceededError",
    "Delta",
    "DeviceUnavailableError",
    "Engine",
    "EngineOverloadedError",
    "EngineStoppedError",
    "ModelFileError",
    "RequantizeWarning",
    "TemplateError",
    "TextStream",
    "TokenLogprob",
    "TopLogprob",
    "UnsupportedModelError",
    "Usage",
    "ZseError",
    "__version__",
    "cache_dir",
    "convert",
    "default_model_path",
    "inspect",
    "pull",
]
