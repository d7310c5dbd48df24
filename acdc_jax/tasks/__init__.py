"""Tasks by name: each module builds a ``Task`` (prompts, read positions, metric, canonical circuit)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from ._task import ABLATIONS, CanonicalCircuit, Task, TaskError
from .induction import induction_task
from .tracr import tracr_reverse, tracr_task, tracr_xproportion

TaskBuilder = Callable[..., Task]

_REGISTRY: dict[str, TaskBuilder] = {
    "induction": induction_task,
    "tracr-reverse": tracr_reverse,
    "tracr-xproportion": tracr_xproportion,
}


def register_task(name: str, builder: TaskBuilder) -> None:
    """Make ``get_task(name, **kwargs)`` call ``builder(**kwargs)``."""
    _REGISTRY[name] = builder


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str | Task, **kwargs) -> Task:
    """A task by registered name (builder keyword arguments pass through)."""
    if isinstance(name, Task):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    close = difflib.get_close_matches(str(name), task_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TaskError(f"unknown task {name!r}: known tasks are {', '.join(task_names())}{hint}")


__all__ = [
    "ABLATIONS",
    "CanonicalCircuit",
    "Task",
    "TaskError",
    "get_task",
    "induction_task",
    "register_task",
    "task_names",
    "tracr_reverse",
    "tracr_task",
    "tracr_xproportion",
]
