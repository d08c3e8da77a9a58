"""Typed errors. The library raises these; only the CLI turns them into one `error:` line and an exit code."""

from __future__ import annotations


class MoeAdaptersError(Exception):
    """Base class: a message that names the file and, where known, the tensor."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        self.message = message
        self.file = file
        self.tensor = tensor
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(x for x in (self.file, f"tensor {self.tensor}" if self.tensor else None) if x)
        return f"{where}: {self.message}" if where else self.message


class CheckpointError(MoeAdaptersError):
    """Input that is not a valid checkpoint: bad safetensors, bad index, pickle files, unsafe paths."""


class ModelError(MoeAdaptersError):
    """A valid checkpoint that does not fit its family: missing experts, shapes that disagree, bad EP size."""


class DestinationError(MoeAdaptersError):
    """The output folder exists, lies inside the source, or could not be written."""


class ManifestError(MoeAdaptersError):
    """A fused folder whose manifest disagrees with its files."""
