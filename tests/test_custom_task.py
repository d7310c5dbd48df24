"""Tasks from JSON files: round trips, one clear message per malformation, metrics on a tiny model."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest

from acdc_jax.models import build_model, expected_shapes, forward
from acdc_jax.tasks import TaskError, get_task, load_task_json, save_task_json, task_from_dict
from acdc_jax.tasks.docstring import docstring_task
from acdc_jax.tasks.greaterthan import greater_than_task
from acdc_jax.tasks.ioi import ioi_task

from .conftest import TINY_CONFIGS

VALID = {
    "clean": [[1, 2, 3, 4], [5, 6, 7], [1, 1, 2, 2], [3, 4, 5, 6]],
    "corrupt": [[1, 9, 3, 4], [5, 8, 7], [1, 2, 2, 2], [3, 4, 6, 6]],
    "answers": [4, 7, 2, 6],
    "wrong_answers": [3, 5, 1, 5],
    "metric": "logit_diff",
}


def write(tmp_path, data, name="task.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def assert_same_task(a, b):
    for field in ("clean", "corrupt", "positions", "answers", "wrong_answers"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=field)
    assert a.labels.keys() == b.labels.keys()
    for k in a.labels:
        np.testing.assert_array_equal(a.labels[k], b.labels[k], err_msg=k)
    assert (a.name, a.model, a.metric, dict(a.metric_options), a.ablation, a.discovery_metric) == (
        b.name, b.model, b.metric, dict(b.metric_options), b.ablation, b.discovery_metric,
    )  # fmt: skip


def test_minimal_file_reads_each_prompts_last_token(tmp_path):
    task = get_task(str(write(tmp_path, VALID)))
    assert task.name == "custom" and task.model is None
    assert task.clean.shape == (4, 4)
    np.testing.assert_array_equal(task.positions[:, 0], [3, 2, 3, 3])  # row 1 has 3 tokens
    np.testing.assert_array_equal(task.clean[1], [5, 6, 7, 0])  # right-padded with pad_token 0
    np.testing.assert_array_equal(task.answers[:, 0], VALID["answers"])
    assert task.labels == {}


def test_labels_end_and_optional_fields(tmp_path):
    data = dict(VALID, labels={"END": [2, 1, 2, 2], "X": [0, 0, 1, 1]}, name="mine", model="gpt2", pad_token=9)
    task = get_task(write(tmp_path, data))  # a Path works as well as a str
    np.testing.assert_array_equal(task.positions[:, 0], [2, 1, 2, 2])
    np.testing.assert_array_equal(task.labels["X"], [0, 0, 1, 1])
    assert (task.name, task.model) == ("mine", "gpt2")
    assert task.clean[1, 3] == 9


@pytest.mark.parametrize(
    "make",
    [
        lambda: ioi_task(n_prompts=6, prompt_type="mixed", n_templates=None, seed=2),  # right-padded rows
        lambda: docstring_task(n_prompts=3),  # 13 wrong answers per prompt, metric options
    ],
    ids=["ioi-padded", "docstring"],
)
def test_a_task_round_trips_through_json(make, tmp_path):
    task = make()
    path = save_task_json(task, tmp_path / "saved.json")
    back = get_task(str(path))
    assert_same_task(task, back)
    assert_same_task(back, load_task_json(save_task_json(back, tmp_path / "again.json")))


def test_tasks_the_format_cannot_hold_are_refused(tmp_path):
    with pytest.raises(TaskError, match="cannot be written as a JSON task: the format has no answer_mask, wrong_mask"):
        save_task_json(greater_than_task(n_prompts=2), tmp_path / "gt.json")


def _set(path, value):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return data

    return edit


def _drop(key):
    def edit(data):
        del data[key]
        return data

    return edit


MALFORMED = [
    (_set(("corrupt", 3), [3, 4, 5, 6, 7]), r"clean\[3\] has 4 tokens but corrupt\[3\] has 5"),
    (_set(("answers", 2), "x"), r'answers\[2\] is "x", not an int token id'),
    (_set(("wrong_answers", 0), 1.5), r"wrong_answers\[0\] is 1.5, not an int token id"),
    (_set(("answers",), [4, 7, 2]), r"answers must have one entry per prompt \(4\), got 3"),
    (_set(("clean", 1, 2), -1), r"clean\[1\]\[2\] is -1, not a non-negative int token id"),
    (_set(("clean", 2), []), r"clean\[2\] must be a non-empty list of token ids"),
    (_set(("corrupt",), VALID["corrupt"][:3]), r"clean has 4 prompts but corrupt has 3"),
    (_set(("metric",), "accuracy"), r"metric must be one of logit_diff, kl, prob_diff, mse, nll, got 'accuracy'"),
    (_drop("wrong_answers"), r"wrong_answers is required for metric 'logit_diff'"),
    (_drop("clean"), r"clean must be a non-empty list of prompts"),
    (_set(("labels",), {"END": [3, 9, 0, 0]}), r'labels\["END"\]\[1\] is 9, outside clean\[1\] \(3 tokens: 0..2\)'),
    (_set(("labels",), {"IO": [0, 1]}), r'labels\["IO"\] must have one position per prompt \(4\), got 2'),
    (_set(("answer",), [1, 2, 3, 4]), r"unknown field\(s\) \['answer'\]"),
]


@pytest.mark.parametrize("edit, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_each_malformation_names_field_and_row(edit, message, tmp_path):
    data = edit(copy.deepcopy(VALID))
    with pytest.raises(TaskError, match=message):
        get_task(str(write(tmp_path, data)))


def test_broken_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{'clean': [[1]]")
    with pytest.raises(TaskError, match="is not valid JSON"):
        get_task(str(bad))
    with pytest.raises(TaskError, match="no task file at"):
        get_task(str(tmp_path / "missing.json"))
    with pytest.raises(TaskError, match="must be a JSON object"):
        task_from_dict([1, 2])


@pytest.fixture(scope="module")
def tiny_gpt2():
    config, rng = TINY_CONFIGS["gpt2-like"], np.random.default_rng(0)
    return build_model(config, {k: 0.3 * rng.standard_normal(s, dtype=np.float32) for k, s in expected_shapes(config).items()})


@pytest.mark.parametrize("metric", ["logit_diff", "kl", "prob_diff", "mse", "nll"])
def test_every_metric_runs_on_a_tiny_model(metric, tiny_gpt2, tmp_path):
    model = tiny_gpt2
    data = dict(VALID, metric=metric)
    task = get_task(str(write(tmp_path, data)))
    inputs = task.metric_inputs(model)
    corrupt_logits = forward(model, jnp.asarray(task.corrupt), positions=jnp.asarray(task.positions))
    clean_value = float(task.get_metric()(inputs.clean_logits, inputs))
    patched_value = float(task.get_metric()(corrupt_logits, inputs))
    assert np.isfinite([clean_value, patched_value]).all()
    if metric in ("kl", "mse"):  # distances to the clean run
        assert abs(clean_value) < 1e-6 and patched_value > 0
    if metric == "logit_diff":  # by hand: logit(answer) - logit(wrong) at each prompt's last token
        logits = np.asarray(inputs.clean_logits[:, -1])
        rows = np.arange(4)
        expected = (logits[rows, VALID["answers"]] - logits[rows, VALID["wrong_answers"]]).mean()
        np.testing.assert_allclose(clean_value, expected, rtol=1e-6)
