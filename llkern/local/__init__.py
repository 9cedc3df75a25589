"""The local network and what drives it: ``LocalNet`` (modules, heads, losses, ``local_step``), the
split planner, the saved-activation memory meter, and ``LocalTrainer``."""

from llkern.local import memory, net, planner, trainer
from llkern.local.memory import MemoryMeter, MemoryReport
from llkern.local.net import Boundary, LocalNet, ModuleMemory, StepResult, run_module
from llkern.local.planner import SplitPlan, split
from llkern.local.trainer import LocalTrainer

__all__ = [
    "Boundary",
    "LocalNet",
    "LocalTrainer",
    "MemoryMeter",
    "MemoryReport",
    "ModuleMemory",
    "SplitPlan",
    "StepResult",
    "memory",
    "net",
    "planner",
    "run_module",
    "split",
    "trainer",
]
