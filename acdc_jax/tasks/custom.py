"""Tasks from JSON files of token ids, so users bring their own prompts (``get_task("my.json")``).

Format (one object)::

    {"clean":   [[ids...], ...],            # one prompt per row
     "corrupt": [[ids...], ...],            # same length as clean, row by row
     "answers": [id, ...],                  # one per prompt (or a list of ids per prompt)
     "wrong_answers": [id, ...],            # idem
     "metric": "logit_diff" | "kl" | "prob_diff" | "mse" | "nll",
     "labels": {"END": [pos, ...], ...},    # optional named positions, one per prompt
     "name": "...", "model": "gpt2",        # optional
     "metric_options": {...}, "ablation": "corrupt", "discovery_metric": "kl",
     "pad_token": 0, "description": "..."}  # optional

The metric reads each prompt's ``labels["END"]`` if given, else its last token. Rows of different
lengths are right-padded with ``pad_token`` (default 0); a causal model does not see the padding
from the positions it reads. ``logit_diff`` and ``prob_diff`` need ``answers`` and
``wrong_answers``, ``nll`` needs ``answers``; ``kl`` and ``mse`` compare with the clean run.
Every malformation is reported with the field and the row, e.g. ``clean[3] has 7 tokens but
corrupt[3] has 8``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..metrics import METRIC_NAMES
from ._task import ABLATIONS, Task, TaskError

CUSTOM_METRICS = ("logit_diff", "kl", "prob_diff", "mse", "nll")
_NEEDS = {"logit_diff": ("answers", "wrong_answers"), "prob_diff": ("answers", "wrong_answers"), "nll": ("answers",)}
_KNOWN_FIELDS = {
    "clean", "corrupt", "answers", "wrong_answers", "metric", "labels", "name", "model", "metric_options",
    "ablation", "discovery_metric", "pad_token", "description",
}  # fmt: skip


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_rows(data: dict, field: str) -> list[list[int]]:
    rows = data.get(field)
    if not isinstance(rows, list) or not rows:
        raise TaskError(f"{field} must be a non-empty list of prompts (lists of token ids), got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise TaskError(f"{field}[{i}] must be a non-empty list of token ids, got {row!r}")
        for j, tok in enumerate(row):
            if not _is_int(tok) or tok < 0:
                raise TaskError(f"{field}[{i}][{j}] is {tok!r}, not a non-negative int token id")
    return rows


def _answer_rows(data: dict, field: str, batch: int) -> np.ndarray | None:
    rows = data.get(field)
    if rows is None:
        return None
    if not isinstance(rows, list) or len(rows) != batch:
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise TaskError(f"{field} must have one entry per prompt ({batch}), got {got}")
    out = []
    for i, entry in enumerate(rows):
        ids = entry if isinstance(entry, list) else [entry]
        if not ids:
            raise TaskError(f"{field}[{i}] is an empty list; give at least one token id")
        for tok in ids:
            if not _is_int(tok) or tok < 0:
                raise TaskError(f"{field}[{i}] is {json.dumps(entry)}, not an int token id")
        if out and len(ids) != len(out[0]):
            raise TaskError(f"{field}[{i}] has {len(ids)} token ids but {field}[0] has {len(out[0])}; every row needs the same number")
        out.append(ids)
    return np.asarray(out, np.int32)


def task_from_dict(data: object, *, name: str | None = None, source: str = "the task") -> Task:
    """A ``Task`` from the JSON object described in the module docstring."""
    if not isinstance(data, dict):
        raise TaskError(f"{source} must be a JSON object with fields clean, corrupt, metric, ...; got {type(data).__name__}")
    unknown = sorted(set(data) - _KNOWN_FIELDS)
    if unknown:
        raise TaskError(f"{source} has unknown field(s) {unknown}; known fields: {sorted(_KNOWN_FIELDS)}")
    clean, corrupt = _token_rows(data, "clean"), _token_rows(data, "corrupt")
    if len(clean) != len(corrupt):
        raise TaskError(f"clean has {len(clean)} prompts but corrupt has {len(corrupt)}")
    for i, (a, b) in enumerate(zip(clean, corrupt)):
        if len(a) != len(b):
            raise TaskError(f"clean[{i}] has {len(a)} tokens but corrupt[{i}] has {len(b)}")
    batch = len(clean)

    metric = data.get("metric")
    if metric not in CUSTOM_METRICS:
        raise TaskError(f"metric must be one of {', '.join(CUSTOM_METRICS)}, got {metric!r}")
    answers = _answer_rows(data, "answers", batch)
    wrong = _answer_rows(data, "wrong_answers", batch)
    for field in _NEEDS.get(metric, ()):
        if data.get(field) is None:
            raise TaskError(f"{field} is required for metric {metric!r}")

    lengths = [len(row) for row in clean]
    labels_in = data.get("labels", {})
    if not isinstance(labels_in, dict):
        raise TaskError(f"labels must be an object of named positions, got {type(labels_in).__name__}")
    labels = {}
    for label, positions in labels_in.items():
        if not isinstance(positions, list) or len(positions) != batch:
            got = len(positions) if isinstance(positions, list) else type(positions).__name__
            raise TaskError(f'labels["{label}"] must have one position per prompt ({batch}), got {got}')
        for i, pos in enumerate(positions):
            if not _is_int(pos):
                raise TaskError(f'labels["{label}"][{i}] is {pos!r}, not an int position')
            if not 0 <= pos < lengths[i]:
                raise TaskError(f'labels["{label}"][{i}] is {pos}, outside clean[{i}] ({lengths[i]} tokens: 0..{lengths[i] - 1})')
        labels[label] = np.asarray(positions, np.int32)
    end = labels["END"] if "END" in labels else np.asarray(lengths, np.int32) - 1

    pad = data.get("pad_token", 0)
    if not _is_int(pad) or pad < 0:
        raise TaskError(f"pad_token is {pad!r}, not a non-negative int token id")
    width = max(lengths)

    def padded(rows):
        out = np.full((batch, width), pad, np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    options = data.get("metric_options", {})
    if not isinstance(options, dict):
        raise TaskError(f"metric_options must be an object, got {type(options).__name__}")
    ablation = data.get("ablation", "corrupt")
    if ablation not in ABLATIONS:
        raise TaskError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    discovery = data.get("discovery_metric", "kl")
    if discovery not in METRIC_NAMES:
        raise TaskError(f"discovery_metric must be one of {METRIC_NAMES}, got {discovery!r}")
    for field in ("name", "model", "description"):
        if data.get(field) is not None and not isinstance(data[field], str):
            raise TaskError(f"{field} must be a string, got {data[field]!r}")
    return Task(
        name=name or data.get("name") or "custom",
        clean=padded(clean),
        corrupt=padded(corrupt),
        positions=end[:, None],
        metric=metric,
        metric_options=options,
        answers=answers,
        wrong_answers=wrong,
        labels=labels,
        ablation=ablation,
        model=data.get("model"),
        discovery_metric=discovery,
        description=data.get("description", f"custom task from {source}"),
    )


def load_task_json(path: str | os.PathLike, *, name: str | None = None) -> Task:
    """The task in a JSON file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"no task file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TaskError(f"{path} is not valid JSON: {err}") from None
    return task_from_dict(data, name=name, source=str(path))


def task_to_dict(task: Task) -> dict:
    """The JSON object of a task that reads one position per prompt with token answers."""
    cannot = [
        field
        for field, present in (
            ("answer_mask", task.answer_mask is not None),
            ("wrong_mask", task.wrong_mask is not None),
            ("read_mask", task.read_mask is not None),
            ("corrupt_pos_ids", task.corrupt_pos_ids is not None),
        )
        if present
    ]
    if task.positions.shape[1] != 1:
        cannot.append(f"positions with {task.positions.shape[1]} reads per prompt")
    if task.metric not in CUSTOM_METRICS:
        cannot.append(f"metric {task.metric!r}")
    if cannot:
        raise TaskError(f"task {task.name!r} cannot be written as a JSON task: the format has no {', '.join(cannot)}")
    labels = {k: v.tolist() for k, v in task.labels.items()}
    labels["END"] = task.positions[:, 0].tolist()  # what the metric reads, whatever the task's labels say
    data = {
        "name": task.name,
        "clean": task.clean.tolist(),
        "corrupt": task.corrupt.tolist(),
        "metric": task.metric,
        "labels": labels,
        "ablation": task.ablation,
        "discovery_metric": task.discovery_metric,
    }
    for field in ("answers", "wrong_answers"):
        value = getattr(task, field)
        if value is not None:
            data[field] = [row[0] if len(row) == 1 else row for row in value.tolist()]
    if task.metric_options:
        data["metric_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in task.metric_options.items()}
    if task.model is not None:
        data["model"] = task.model
    if task.description:
        data["description"] = task.description
    return data


def save_task_json(task: Task, path: str | os.PathLike) -> Path:
    """Write ``task`` as a JSON task file that ``load_task_json``/``get_task`` read back."""
    path = Path(path)
    path.write_text(json.dumps(task_to_dict(task)))
    return path
