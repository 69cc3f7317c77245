"""What a pass returns: the model and what it changed, in the style of onnx_ir's PassResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PassResult:
    model: Any
    modified: bool
    # Human-readable record of the change: the sites touched, nodes added, parameters registered.
    changed: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"PassResult(modified={self.modified}, changed={len(self.changed)} items)"
