"""Run what nasc built: open artifacts, run halves, and move cut tensors between device and server."""

from nasc.runtime.artifact import Artifact, Half, open_artifact

__all__ = ["Artifact", "Half", "open_artifact"]
