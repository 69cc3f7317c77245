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


class TrainingDivergedError(LoraFxError, FloatingPointError):
    """Training produced a non-finite loss, gradient or update; the message names the step and the way out.

    ``step`` is the number of the failing step (1 for the first), ``loss`` its loss (a float, possibly
    nan or inf) and ``reason`` what went non-finite. The adapters keep their values from before that
    step's update. A FloatingPointError, as the loop raised before this class existed.
    """

    def __init__(self, message: str, *, step: int, loss: float, reason: str) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.reason = reason


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's own words without its source location and C++ signature ("/onnxruntime_src/…cc:93 const
    onnxruntime::…(…) The buffer …"), on one line: the user needs the sentence, not where ORT said it."""
    import re

    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    text = re.sub(r"\S+\.(?:cc|cpp|h):\d+ (?:[^()]*::[^()]*\([^()]*\)\s*)?", "", text)
    return re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text).strip()
