"""Peak CPU memory allocated while a function runs, read from the profiler's allocation events: every
allocation through PyTorch's CPU allocator (llkern's C++ ops and the CUDA bindings on the emulator included),
so a test can hold an op to what it should keep (no N×N matrix, no extra copy of an input)."""

from __future__ import annotations

from collections.abc import Callable

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak bytes allocated above what was allocated when ``fn`` started, ``fn()``)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
        stack.extend(event.children)
    if not events:
        return 0, out
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start, out
