"""Errors lora_fx raises on bad input.

Each says what is wrong and the way out. They derive from the builtin exception a caller would
expect (ValueError for bad arguments, RuntimeError for failures of the underlying tools), so
``except ValueError`` keeps working.
"""


class LoraFxError(Exception):
    """Base class of every error lora_fx raises on purpose."""


class ConfigError(LoraFxError, ValueError):
    """A config field has a value lora_fx cannot use."""


class TargetNotFoundError(LoraFxError, ValueError):
    """A target selection matched no site of the model."""


class CaptureError(LoraFxError, RuntimeError):
    """torch.export could not capture the model."""


class AdapterError(LoraFxError, ValueError):
    """An adapter does not fit the model it is loaded onto, or is already there."""


class ModelLoadError(LoraFxError, ValueError):
    """A model file could not be read."""


class UnsupportedError(LoraFxError, NotImplementedError):
    """The graph holds something a pass cannot handle; the message names it."""
