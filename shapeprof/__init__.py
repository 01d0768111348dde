"""shapeprof: where does the time go on a given GPU, and why.

    >>> import torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(1024, 4096), torch.randn(512, 1024), dtype=torch.bfloat16)
    >>> report.nodes[0].bound
    'compute'
"""
from .advice import Advice, advise
from .analysis import META_KEY, UncoveredOpError, analyze
from .batching import generate_batch
from .calibration import calibrate
from .capture import CaptureError, InputShape, NodeError, capture
from .costs import FLOP_CONVENTION
from .hardware import DeviceSpec, SpecError, get_spec, list_specs, load_spec
from .measured_step import MeasuredStep
from .phases import Decode, PhaseError, Prefill
from .optimize import OptimizeError, OptimizeReport, Tolerance, optimize
from .profiling import ProfileError, ProfileResult, profile
from .report import Report, ReportFormatError
from .routing import Routing, measure_routing
from .speculative import Speculative, speculative
from .training import Train
from .output.tensorboard import ExportError, export_tensorboard, tensorboard_trace_handler

__all__ = [
    "Advice", "FLOP_CONVENTION", "META_KEY", "CaptureError", "DeviceSpec", "ExportError", "InputShape", "NodeError",
    "Decode", "MeasuredStep", "OptimizeError", "OptimizeReport", "PhaseError", "Prefill", "ProfileError", "ProfileResult", "Report", "ReportFormatError", "Routing", "SpecError", "Speculative",
    "Tolerance", "Train", "UncoveredOpError", "advise", "analyze", "calibrate", "capture", "export_tensorboard", "get_spec",
    "generate_batch", "list_specs", "load_spec", "measure_routing", "optimize", "profile", "speculative", "tensorboard_trace_handler",
]

from . import rewrites  # noqa: E402  (the rewrite registry, `shapeprof.rewrites`, right after `import shapeprof`)
