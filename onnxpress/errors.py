"""The onnxpress exception hierarchy.

Every error a user can cause (bad file, bad option, bad calibration data, a target that cannot be
built) is raised as one of these, with a message that names the file, node, tensor or option and
says what to do. Nothing from deep inside onnx, onnxruntime or TVM should reach the user raw.
"""

from __future__ import annotations


class OnnxPressError(Exception):
    """Base class of every error onnxpress raises on purpose."""


class ModelLoadError(OnnxPressError):
    """A model file or buffer could not be read: missing, not ONNX, truncated."""


class InvalidModelError(OnnxPressError):
    """A model was read but is not valid ONNX (checker failure, unknown op, bad shapes)."""


class ModelSaveError(OnnxPressError):
    """A model could not be written (bad destination, would overwrite the input)."""


class PassError(OnnxPressError):
    """A pass failed while running; the message names the pass."""


class UnknownPassError(PassError):
    """A pipeline names a pass that is not registered."""


class PassOptionError(PassError):
    """A pass option is unknown, of the wrong type or out of range."""


class VerificationError(PassError):
    """`verify=True` found a pass that broke the model (checker or outputs differ)."""


class CalibrationError(OnnxPressError):
    """Calibration data does not fit the model: wrong input names, dtypes, shapes, or empty."""


class FrontendError(OnnxPressError):
    """A framework model could not be converted to ONNX."""


class MissingExtraError(FrontendError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class BackendError(OnnxPressError):
    """A backend could not run, compile or benchmark a model."""


class UnsupportedOpError(BackendError):
    """A backend cannot handle an operator; the message names the op and node."""


__all__ = [
    "OnnxPressError",
    "ModelLoadError",
    "InvalidModelError",
    "ModelSaveError",
    "PassError",
    "UnknownPassError",
    "PassOptionError",
    "VerificationError",
    "CalibrationError",
    "FrontendError",
    "MissingExtraError",
    "BackendError",
    "UnsupportedOpError",
]
