"""Errors that the CLI reports as one line: a user mistake, never a bug."""

from __future__ import annotations


class QuackError(ValueError):
    """A user mistake (bad file, flag, row or checkpoint); the message names it and the fix. Exit code 2.

    A ``ValueError``, so code that checks its arguments the Python way catches it too.
    """


class StrictError(QuackError):
    """A ``--strict`` run refused because rows were rejected. Exit code 1."""


# Lines of torch's refusal that advise loading the file unsafely or point at its documentation: never shown.
_ADVICE = ("weights only load failed", "weights_only", "check the documentation", "file an issue", "add_safe_globals")


def unpickling_reason(error: BaseException) -> str:
    """What a ``torch.load(weights_only=True)`` refusal blocked (the global, the opcode), in one line.

    torch's own text also advises re-running with ``weights_only=False``; that advice is left out.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "unsupported global" in line.lower()]
    if not telling:
        marker = "WeightsUnpickler error:"
        after = [line.split(marker, 1)[1].strip() for line in lines if marker in line]
        following = [line for k, line in enumerate(lines) if k and marker in lines[k - 1]]
        telling = [line for line in after + following if line]
    if not telling:
        telling = [line for line in lines if not any(word in line.lower() for word in _ADVICE)]
    reason = (telling or ["it holds objects other than tensors and plain values"])[0]
    return reason.split(". Please use", 1)[0].rstrip(".")
