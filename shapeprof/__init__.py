"""shapeprof: where does the time go on a given GPU, and why.

    >>> import torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(1024, 4096), torch.randn(512, 1024), dtype=torch.bfloat16)
    >>> report.nodes[0].bound
    'compute'
"""
from .analysis import META_KEY, UncoveredOpError, analyze
from .calibration import calibrate
from .capture import CaptureError, InputShape, NodeError, capture
from .costs import FLOP_CONVENTION
from .hardware import DeviceSpec, SpecError, get_spec, list_specs, load_spec
from .profiling import ProfileError, ProfileResult, profile
from .report import Report, ReportFormatError

__all__ = [
    "FLOP_CONVENTION", "META_KEY", "CaptureError", "DeviceSpec", "InputShape", "NodeError", "ProfileError",
    "ProfileResult", "Report", "ReportFormatError", "SpecError", "UncoveredOpError", "analyze", "calibrate",
    "capture", "get_spec", "list_specs", "load_spec", "profile",
]
