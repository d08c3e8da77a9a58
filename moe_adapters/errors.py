"""Typed errors. The library raises these; only the CLI turns them into one `error:` line and an exit code.

Messages quote names taken from untrusted files (tensor names, paths, JSON values). `str()` escapes every
non-printable character, so a hostile name can neither break the one-line error format (a newline) nor drive the
terminal (an escape sequence).
"""

from __future__ import annotations


def printable(text: object) -> str:
    """`text` with control and other non-printable characters escaped (`\\n`, `\\x1b`, ...): safe for one line."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


class MoeAdaptersError(Exception):
    """Base class: a message that names the file and, where known, the tensor."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        self.message = message
        self.file = file
        self.tensor = tensor
        super().__init__(str(self))

    def __str__(self) -> str:
        tensor = self.tensor if self.tensor is None or len(self.tensor) <= 300 else self.tensor[:297] + "..."
        where = ": ".join(x for x in (self.file, f"tensor {tensor}" if tensor else None) if x)
        return printable(f"{where}: {self.message}" if where else self.message)


class OptionError(MoeAdaptersError):
    """A command-line value that cannot be used (the message names the option)."""


class CheckpointError(MoeAdaptersError):
    """Input that is not a valid checkpoint: bad safetensors, bad index, pickle files, unsafe paths."""


class ModelError(MoeAdaptersError):
    """A valid checkpoint that does not fit its family: missing experts, shapes that disagree, bad EP size."""


class DestinationError(MoeAdaptersError):
    """The output folder exists, lies inside the source, or could not be written."""


class ManifestError(MoeAdaptersError):
    """A fused folder whose manifest disagrees with its files."""


class HubError(MoeAdaptersError):
    """A Hugging Face Hub operation failed (the message says which repo, and what to do)."""


class HubOfflineError(HubError):
    """The Hub cannot be reached (HF_HUB_OFFLINE=1 or no network) and the files are not in the local cache."""


class HubNotFoundError(HubError):
    """No such repo or revision on the Hub (or it is private/gated and the token does not grant access)."""


class HubAuthError(HubError):
    """The Hub refused the token: missing, invalid, or without access/write permission."""


class PushRefused(MoeAdaptersError):
    """`push` will not publish this folder: not a standard HF checkpoint, or not proven identical to its source."""


class VerificationFailed(PushRefused):
    """`push` ran verify against the source and the weights differ (the CLI exits 1, like `verify`)."""
