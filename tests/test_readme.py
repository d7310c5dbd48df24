"""The README stays true: its Python examples run, and its first command prints what it says."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from acdc_jax.cli import app

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# saving GPT-2 from the hub needs a network; everything else runs offline
OFFLINE = [b for b in BLOCKS if "from_pretrained" not in b]


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 4 and len(OFFLINE) == len(BLOCKS) - 1


@pytest.mark.parametrize("index", range(len(OFFLINE)))
def test_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(OFFLINE[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_extension_examples_register_a_task_and_a_method(tmp_path, monkeypatch):
    import acdc_jax as aj
    from acdc_jax.methods import get_method
    from acdc_jax.tasks import task_names

    monkeypatch.chdir(tmp_path)
    for block in OFFLINE:
        if "register_" in block:
            exec(block, {"__name__": "readme"})
    assert "copy-last" in task_names() and get_method("grad").level == "edge"
    circuit = aj.discover("induction", "copy-last", "grad", top_n=5)
    assert circuit.n_kept == 5 and circuit.scores.shape == (circuit.graph.n_gates,)


def test_first_command_prints_what_the_readme_promises():
    command = re.search(r"acdc-jax (discover [^\n`]*)", README).group(1)
    result = CliRunner().invoke(app, shlex.split(command))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    kept, total = map(int, re.search(r"prints the (\d+) edges ACDC keeps out of the model's (\d+)", " ".join(README.split())).groups())
    assert f"kept {kept} of {total} edges" in text, text
    assert "ROC AUC 1.000, precision 1.000, recall 1.000" in text


def test_each_method_module_is_importable_by_its_name():
    """``acdc_jax.methods.<name>`` is the method's module (its helpers reachable, patchable), and the
    method function is ``acdc_jax.<name>``: no function hides its module."""
    import importlib
    import types

    import acdc_jax as aj
    from acdc_jax.methods import get_method, method_names

    modules = ("acdc", "atp_star", "eap", "eap_ig", "eap_ig_activations", "hisp", "learned_mask",
               "node_patching", "path_patching", "wrong_answer")
    for name in modules:
        module = importlib.import_module(f"acdc_jax.methods.{name}")
        assert isinstance(getattr(aj.methods, name), types.ModuleType) and getattr(aj.methods, name) is module
        assert getattr(aj, name) is getattr(module, name) and callable(getattr(aj, name))
    assert aj.methods.acdc.visit_order is aj.methods.visit_order and aj.methods.path_patching.Path is aj.methods.Path
    assert aj.exact_patching is aj.methods.exact.exact_patching
    registered = {getattr(get_method(m).fn, "func", get_method(m).fn) for m in method_names()}
    registered = {fn for fn in registered if fn.__module__.startswith("acdc_jax.")}  # README examples register their own
    assert registered <= {getattr(aj, name) for name in modules} | {aj.exact_patching}
