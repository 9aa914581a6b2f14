"""The one exception family for user mistakes.

Every error names the thing at fault (file, node, tensor, target) and says what to do;
the CLI prints it as one red line and exits non-zero. Internal bugs raise normally.
"""


class NascError(Exception):
    """A mistake in what the user gave nasc; `str(err)` is the whole message."""

    exit_code = 2


class ModelError(NascError):
    """The model file is missing, not ONNX, truncated, invalid or has unresolved shapes."""


class UnsupportedOpError(NascError):
    """A node uses an operator a backend cannot compile."""


class CutError(NascError):
    """An unknown tensor name, a set of tensors that is not a cut, or a bad cut index."""


class TargetError(NascError):
    """An unknown or malformed compilation target."""


class ArtifactError(NascError):
    """An artifact directory is missing files, has wrong hashes or targets another machine."""


class VerificationError(NascError):
    """Compiled halves disagree numerically with ONNX Runtime on the original model."""

    exit_code = 3


class ProtocolError(NascError):
    """A frame on the wire is malformed or does not match the manifest."""
