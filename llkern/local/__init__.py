"""The local network and what drives it: ``LocalNet`` (modules, heads, losses, ``local_step``), the
split planner, the saved-activation memory meter, ``LocalTrainer``, and ``PipelineTrainer`` (one stage
of modules per process)."""

from llkern.local import fit, memory, net, pipeline, planner, trainer
from llkern.local.fit import MemoryFit, fit_memory
from llkern.local.memory import MemoryMeter, MemoryReport
from llkern.local.net import Boundary, LocalNet, ModuleMemory, StepResult, run_module
from llkern.local.pipeline import PipelineError, PipelineTrainer, Placement, plan_stages
from llkern.local.planner import SplitPlan, TooManyModulesError, split, trace_units
from llkern.local.trainer import LocalTrainer

__all__ = [
    "Boundary",
    "LocalNet",
    "LocalTrainer",
    "MemoryFit",
    "MemoryMeter",
    "MemoryReport",
    "ModuleMemory",
    "PipelineError",
    "PipelineTrainer",
    "Placement",
    "SplitPlan",
    "StepResult",
    "TooManyModulesError",
    "fit",
    "fit_memory",
    "memory",
    "net",
    "pipeline",
    "plan_stages",
    "planner",
    "run_module",
    "split",
    "trace_units",
    "trainer",
]
