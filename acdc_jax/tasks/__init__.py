"""Tasks by name: each module builds a ``Task`` (prompts, read positions, metric, canonical circuit).

A path to a JSON task file (``custom.py``) is a task name too. The text tasks (IOI, Greater-Than,
Docstring, the MIB-style tasks of ``mib.py``) take a ``tokenizer`` (``load_tokenizer(model_folder)``;
default GPT-2's).
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

from ._task import ABLATIONS, CanonicalCircuit, Task, TaskError
from ._tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer, tokenizer_for_model
from .custom import load_task_json, save_task_json, task_from_dict, task_to_dict
from .docstring import docstring_task
from .greaterthan import greater_than_task
from .induction import induction_task
from .ioi import ioi_task
from .mib import MIB_TASKS, mib_addition_task, mib_arithmetic_task, mib_ioi_task, mib_mcqa_task, mib_subtraction_task
from .tracr import tracr_reverse, tracr_task, tracr_xproportion

TaskBuilder = Callable[..., Task]

_REGISTRY: dict[str, TaskBuilder] = {
    "induction": induction_task,
    "tracr-reverse": tracr_reverse,
    "tracr-xproportion": tracr_xproportion,
    "ioi": ioi_task,
    "greater-than": greater_than_task,
    "docstring": docstring_task,
    "mib-ioi": mib_ioi_task,
    "mib-mcqa": mib_mcqa_task,
    "mib-arithmetic": mib_arithmetic_task,
    "mib-arithmetic-addition": mib_addition_task,
    "mib-arithmetic-subtraction": mib_subtraction_task,
}


def register_task(name: str, builder: TaskBuilder) -> None:
    """Make ``get_task(name, **kwargs)`` call ``builder(**kwargs)``."""
    _REGISTRY[name] = builder


def get_builder(name: str) -> TaskBuilder:
    """The builder registered as ``name``."""
    if name not in _REGISTRY:
        raise TaskError(f"unknown task {name!r}: known tasks are {', '.join(task_names())}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def takes_tokenizer(name: str | os.PathLike | Task) -> bool:
    """Whether the registered task ``name`` is built from text with a ``tokenizer`` argument."""
    builder = _REGISTRY.get(name) if isinstance(name, str) else None
    return builder is not None and "tokenizer" in inspect.signature(builder).parameters


def get_task(name: str | os.PathLike | Task, **kwargs) -> Task:
    """A task by registered name (builder keyword arguments pass through) or a JSON task file."""
    if isinstance(name, Task):
        return name
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    if isinstance(name, os.PathLike) or str(name).endswith(".json") or Path(name).is_file():
        return load_task_json(name, **kwargs)
    close = difflib.get_close_matches(str(name), task_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TaskError(f"unknown task {name!r}: known tasks are {', '.join(task_names())}{hint}")


__all__ = [
    "ABLATIONS",
    "MIB_TASKS",
    "CanonicalCircuit",
    "Task",
    "TaskError",
    "Tokenizer",
    "docstring_task",
    "get_builder",
    "get_task",
    "gpt2_tokenizer",
    "greater_than_task",
    "induction_task",
    "ioi_task",
    "load_task_json",
    "load_tokenizer",
    "mib_addition_task",
    "mib_arithmetic_task",
    "mib_ioi_task",
    "mib_mcqa_task",
    "mib_subtraction_task",
    "register_task",
    "save_task_json",
    "task_from_dict",
    "task_names",
    "task_to_dict",
    "takes_tokenizer",
    "tokenizer_for_model",
    "tracr_reverse",
    "tracr_task",
    "tracr_xproportion",
]
