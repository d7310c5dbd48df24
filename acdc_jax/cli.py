"""The ``acdc-jax`` command: discover circuits, inspect models, score circuits against a task, draw and
export them."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Automatic circuit discovery in transformers, in JAX. Every command has --help with examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _settings(
    no_compile_cache: Annotated[bool, typer.Option(
        "--no-compile-cache",
        help="Compile afresh instead of reusing compiled code from the per-user cache "
             "(~/.cache/acdc-jax/jax, or $ACDC_JAX_CACHE_DIR; ACDC_JAX_COMPILE_CACHE=0 also turns it off).",
    )] = False,
) -> None:
    """Settings shared by every command."""
    from .compile_cache import cache_enabled_by_env, enable_compile_cache

    if not no_compile_cache and cache_enabled_by_env():
        enable_compile_cache()


def _parse_options(pairs: list[str] | None, what: str) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, booleans, lists)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} must look like key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _method_options(spec, option: list[str] | None, threshold: float | None, **more) -> tuple[dict, Mapping]:
    """A method's ``--option`` pairs and ``--threshold``, checked against what its function takes."""
    opts = _parse_options(option, "--option")
    accepted = inspect.signature(spec.fn).parameters
    if threshold is not None:
        if "threshold" not in accepted:
            _fail(f"method {spec.name!r} takes no threshold")
        opts["threshold"] = threshold
    elif "threshold" in accepted and accepted["threshold"].default is inspect.Parameter.empty:
        _fail(f"method {spec.name!r} needs --threshold")
    opts.update({key: value for key, value in more.items() if value is not None})
    if "positions" in opts and "positions" not in accepted:
        from . import methods

        aware = [name for name in methods.method_names()
                 if "positions" in inspect.signature(methods.get_method(name).fn).parameters]
        _fail(f"method {spec.name!r} does not support positions (edges per token position); the position-aware "
              f"methods are {', '.join(aware)}")
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        _fail(f"method {spec.name!r} has no option {', '.join(unknown)}; it takes "
              f"{', '.join(p for p in accepted if p != 'problem' and not p.startswith('_'))}")
    return opts, accepted


def _fail(message: str) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, brackets kept
    raise typer.Exit(code=2)


@app.command(epilog="""
Examples:

  acdc-jax discover --task tracr-reverse --method acdc --threshold 0.01

  acdc-jax discover --task tracr-xproportion --method acdc --ablation corrupt --out circuit.json

  acdc-jax discover --model ~/models/gpt2 --task ioi --method acdc --threshold 0.05 --checkpoint ioi.ckpt.json

  acdc-jax discover --task tracr-reverse --method path-patching --threshold 1e-3 --option grouped=true

  acdc-jax discover --task induction --method acdc --threshold 0.05 --dtype bfloat16

  acdc-jax discover --task tracr-reverse --method eap-ig --option positions=each --option top_n=20
""")
def discover(
    task: Annotated[str, typer.Option(help="Task name (see `acdc-jax info --tasks`) or a task JSON file.")],
    model: Annotated[Optional[str], typer.Option(help="Model name or local directory (default: the task's model).")] = None,
    method: Annotated[str, typer.Option(help="Discovery method (see `acdc-jax info --methods`).")] = "acdc",
    threshold: Annotated[Optional[float], typer.Option(help="Pruning threshold (methods that take one).")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Metric: kl, logit_diff, prob_diff, nll, l2 (default: the task's).")] = None,
    ablation: Annotated[Optional[str], typer.Option(help="What a removed edge reads: corrupt, zero or mean (default: the task's).")] = None,
    per_head: Annotated[bool, typer.Option("--per-head", help="One input per head instead of separate q/k/v.")] = False,
    internal_edges: Annotated[bool, typer.Option("--internal-edges", help="List ACDC's a.q|k|v->a edges too.")] = False,
    kv_groups: Annotated[bool, typer.Option("--kv-groups", help="Grouped-query models: k/v inputs per key/value head.")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="ACDC: checkpoint file; an interrupted run resumes from it.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the circuit as JSON here.")] = None,
    option: Annotated[Optional[list[str]], typer.Option(help="Extra method option key=value (repeatable).")] = None,
    task_option: Annotated[Optional[list[str]], typer.Option(help="Task builder option key=value (repeatable). Text tasks (ioi, greater-than, docstring) use --model's own tokenizer.")] = None,
    dtype: Annotated[str, typer.Option(help="float32, or bfloat16 for bf16 weights and activations (LayerNorm, softmax and metrics stay float32).")] = "float32",
    prompt_devices: Annotated[int, typer.Option("--prompt-devices", help="Devices the prompts are split over (the mesh's prompts axis).")] = 1,
    model_devices: Annotated[int, typer.Option("--model-devices", help="Devices the weights are split over (heads and MLP width; the mesh's model axis).")] = 1,
    device_memory: Annotated[Optional[str], typer.Option(help="Memory per device to check the run against, e.g. 80GB (default: what the device has free).")] = None,
) -> None:
    """Find a circuit: run a discovery method on a model and task, print it, and score it against
    the task's canonical circuit when there is one. A run whose memory plan does not fit the devices
    is refused before it starts, with the mesh that would fit."""
    from . import methods
    from .models import LoadError, load_model, model_directory
    from .tasks import TaskError, get_task, takes_tokenizer, tokenizer_for_model

    if dtype not in ("float32", "bfloat16"):
        _fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    try:
        task_options = _parse_options(task_option, "--task-option")
        if "tokenizer" in task_options:
            _fail("the tokenizer comes from --model (the tokenizer files in its folder); there is no tokenizer task option")
        tokenizer = None
        if model is not None and takes_tokenizer(task):  # a text task: tokenize with the model's own tokenizer
            tokenizer, note = tokenizer_for_model(model_directory(model), _model_config(model).d_vocab)
            if note:
                console.print(note, soft_wrap=True, markup=False)
            task_options["tokenizer"] = tokenizer
        the_task = get_task(task, **task_options)
        model_name = model or the_task.model
        if model_name is None:
            _fail(f"task {the_task.name!r} names no model: pass --model NAME_OR_DIR")
        _check_memory(_model_config(model_name), the_task, method, dtype, prompt_devices, model_devices, device_memory)
        mesh = None
        if prompt_devices * model_devices > 1:
            import jax

            from .sharding import make_mesh

            mesh = make_mesh(configs=1, prompts=prompt_devices, model=model_devices,
                             devices=jax.devices()[: prompt_devices * model_devices])
        the_model = load_model(model_name, mesh=mesh)
        if dtype == "bfloat16":
            import jax.numpy as jnp

            the_model = the_model.astype(jnp.bfloat16)
        spec = methods.get_method(method)
    except (LoadError, TaskError, ValueError) as err:
        _fail(str(err))
    opts, accepted = _method_options(spec, option, threshold, checkpoint=checkpoint)

    console.print(f"[bold]{method}[/] on [bold]{the_task.name}[/] ({the_task.n_prompts} prompts) with "
                  f"{the_model.config.name or model_name}")
    if tokenizer is not None:
        console.print(f"prompts tokenized with the {tokenizer.describe()}", soft_wrap=True, markup=False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("kept {task.fields[kept]}"), TextColumn("metric {task.fields[metric]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        job = bar.add_task("edges", total=None, kept="-", metric="-")
        if "progress" in accepted:
            def report(state):
                bar.update(job, completed=state["edges_done"], total=state["n_edges"], kept=state["kept"],
                           metric=f"{state['metric']:.4g}")
            opts["progress"] = report
        try:
            circuit = methods.discover(
                the_model, the_task, method, qkv_split=not per_head, internal_edges=internal_edges, kv_groups=kv_groups,
                metric=metric, ablation=ablation, score=False, mesh=mesh, **opts,
            )
        except (ValueError, KeyError) as err:
            _fail(str(err))
        except KeyboardInterrupt:
            bar.stop()
            where = f"; the checkpoint {checkpoint} is written: run the same command to resume" if checkpoint else ""
            console.print(f"interrupted{where}", soft_wrap=True)
            raise typer.Exit(code=130)
        bar.update(job, description="edges" if circuit.graph.level == "edge" else "nodes",
                   completed=circuit.scores.size, total=circuit.scores.size, kept=circuit.n_kept, metric="done")
    if out is not None:  # the search's result first: nothing after this may lose it
        circuit.save(out)
    skipped = methods.attach_reference_scores(circuit, the_task)
    if out is not None and "auc" in circuit.extra:
        circuit.save(out)
    console.print(circuit.summary())
    _print_reference(circuit)
    if skipped is not None:
        console.print(f"not scored against the canonical circuit: {skipped}", soft_wrap=True)
    if "summary" in circuit.extra:
        console.print(circuit.extra["summary"])
    if out is not None:
        console.print(f"wrote {out}")


def _print_reference(circuit) -> None:
    if "auc" not in circuit.extra:
        return
    ref = circuit.extra.get("reference", {})
    console.print(
        f"against the canonical circuit ({ref.get('n_units', '?')} units, ground truth under "
        f"{ref.get('ablation', '?')} ablation): ROC AUC {circuit.extra['auc']:.3f}, "
        f"precision {circuit.extra['precision']:.3f}, recall {circuit.extra['recall']:.3f}"
    )


@app.command(epilog="""
Examples:

  acdc-jax evaluate circuit.json --task tracr-reverse
""")
def evaluate(
    circuit: Annotated[Path, typer.Argument(help="A circuit JSON written by `discover --out`.")],
    task: Annotated[Optional[str], typer.Option(help="Task whose canonical circuit to compare with (default: the circuit's).")] = None,
) -> None:
    """Score a saved circuit against a task's canonical circuit: ROC AUC, precision and recall."""
    from .methods import Circuit, attach_reference_scores
    from .tasks import TaskError, get_task

    try:
        loaded = Circuit.load(circuit)
        the_task = get_task(task or loaded.task)
    except (OSError, ValueError, TaskError) as err:
        _fail(str(err))
    if the_task.canonical is None:
        _fail(f"task {the_task.name!r} has no canonical circuit to compare with")
    attach_reference_scores(loaded, the_task)
    console.print(loaded.summary(n=5))
    _print_reference(loaded)


@app.command(epilog="""
Examples:

  acdc-jax info --model tracr-reverse

  acdc-jax info --model ~/models/gpt2

  acdc-jax info --tasks --methods
""")
def info(
    model: Annotated[Optional[str], typer.Option(help="Model name or directory: print its config and graph sizes.")] = None,
    tasks: Annotated[bool, typer.Option("--tasks", help="List the tasks.")] = False,
    methods: Annotated[bool, typer.Option("--methods", help="List the discovery methods.")] = False,
    prompts: Annotated[Optional[int], typer.Option(help="With --model: the memory a run on this many prompts needs.")] = None,
    pos: Annotated[int, typer.Option(help="With --prompts: tokens per prompt.")] = 16,
    dtype: Annotated[str, typer.Option(help="With --prompts: float32 or bfloat16.")] = "float32",
    prompt_devices: Annotated[int, typer.Option("--prompt-devices", "--devices", help="With --prompts: devices the prompts are split over.")] = 1,
    model_devices: Annotated[int, typer.Option("--model-devices", help="With --prompts: devices the weights are split over (heads, MLP width).")] = 1,
    device_memory: Annotated[Optional[str], typer.Option(help="With --prompts: memory per device to plan for, e.g. 80GB (default: what this machine's device has free).")] = None,
) -> None:
    """Graph sizes of a model, the memory a run needs, and the available tasks and methods."""
    from .graph import Graph
    from .methods import get_method, method_names
    from .models import LoadError
    from .tasks import task_names

    if model is not None:
        try:
            config = _model_config(model)
        except LoadError as err:
            _fail(str(err))
        kv = f" ({config.kv_heads} key/value)" if config.kv_heads != config.n_heads else ""
        extras = [config.positional + " positions", "parallel attention/MLP" if config.parallel else ""]
        table = Table(title=f"{config.name or model}: {config.n_layers} layers, {config.n_heads} heads{kv}, "
                            f"d_model {config.d_model}, {'MLPs' if config.has_mlp else 'attention only'}, "
                            + ", ".join(e for e in extras if e))
        table.add_column("graph")
        table.add_column("gate units", justify="right")
        for label, kwargs in [
            ("edges, q/k/v inputs separate", dict(qkv_split=True)),
            ("edges, with ACDC's a.q|k|v->a edges", dict(qkv_split=True, internal_edges=True)),
            ("edges, one input per head", dict(qkv_split=False)),
            ("nodes (embed, heads, MLPs)", dict(level="node")),
        ] + ([(f"edges, k/v per key/value head ({config.kv_heads} groups; --kv-groups)", dict(kv_groups=True))]
             if config.kv_heads != config.n_heads else []):
            table.add_row(label, f"{Graph.from_model(config, **kwargs).n_gates:,}")
        console.print(table)
        if prompts is not None:
            _print_memory_plan(config, prompts, pos, dtype, prompt_devices, model_devices, device_memory)
    if tasks:
        console.print("tasks: " + ", ".join(task_names()) + ", or a task JSON file")
    if methods:
        for name in method_names():
            console.print(f"  {name:<16} {get_method(name).summary}")
    if model is None and not tasks and not methods:
        console.print("nothing to show: pass --model, --tasks or --methods")


def _model_config(model: str):
    """A model's config without reading its weights where it can (GPT-2 names, Hugging Face folders)."""
    from .models import GPT2_SHAPES, TransformerConfig, hf_directory_config, load_model

    if model in GPT2_SHAPES and not Path(model).exists():
        return TransformerConfig.gpt2(model)  # sizes need no weights
    if (Path(model) / "config.json").exists() and not (Path(model) / "weights.npz").exists():
        return hf_directory_config(model)  # a Hugging Face folder: config.json alone
    return load_model(model).config


def _bytes(text: str | None) -> int | None:
    """``--device-memory``: bytes, or a number with KB/MB/GB/TB (powers of 1024)."""
    if text is None:
        return None
    units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    clean = text.strip().upper().replace(" ", "")
    for unit, size in units.items():
        if clean.endswith(unit):
            clean, factor = clean[: -len(unit)], size
            break
    else:
        factor = 1
    try:
        return int(float(clean) * factor)
    except ValueError:
        _fail(f"--device-memory must be bytes or a size such as 16GB or 512MB, got {text!r}")


_ITEMSIZES = {"float32": 4, "bfloat16": 2}


def _mesh_advice(config, device_bytes: int, method: str, **sizes) -> str:
    """What to pass when ``method`` does not fit: the smallest mesh that would, or that none does."""
    from .memory import fitting_mesh

    fits = fitting_mesh(config, device_bytes, method=method, **sizes)
    if fits is None:
        return "no mesh of up to 4,096 devices would"
    return f"a mesh of {fits[0]} prompt x {fits[1]} model devices would (--prompt-devices {fits[0]} --model-devices {fits[1]})"


def _print_memory_plan(config, prompts: int, pos: int, dtype: str, prompt_devices: int, model_devices: int,
                       device_memory: str | None) -> None:
    from .memory import human, memory_plan
    from .patching import device_memory_bytes

    if dtype not in _ITEMSIZES:
        _fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    try:
        plan = memory_plan(config, n_prompts=prompts, n_pos=pos, itemsize=_ITEMSIZES[dtype],
                           prompt_devices=prompt_devices, model_devices=model_devices)
    except ValueError as err:
        _fail(str(err))
    here = _bytes(device_memory) or device_memory_bytes()
    where = "per device" if device_memory else "here"
    table = Table(title=f"memory per device: {prompts} prompts x {pos} tokens, {dtype}, mesh of {prompt_devices} prompt x "
                        f"{model_devices} model device(s) ({plan['prompts_per_device']} prompts each); weights "
                        f"{human(plan['weights'])}")
    table.add_column("method")
    table.add_column("least (chunked)", justify="right")
    table.add_column("all prompts at once", justify="right")
    table.add_column(f"fits {where} ({human(here)})?")
    for name, need in plan["methods"].items():
        fits = "yes" if need["least"] <= here else "no: " + _mesh_advice(
            config, here, name.split()[0].rstrip(","), n_prompts=prompts, n_pos=pos, itemsize=_ITEMSIZES[dtype])
        table.add_row(name, human(need["least"]), human(need["all_at_once"]), fits)
    console.print(table)


# which memory estimate of ``memory_plan`` a method's run follows (methods without one are not checked)
_PLAN_OF_METHOD = {"acdc": "acdc", "acdc-nodes": "acdc", "eap": "eap", "eap-nodes": "eap", "hisp": "eap",
                   "atp-star": "atp-star", "wrong-answer": "eap", "eap-ig": "eap-ig", "eap-ig-inputs": "eap-ig-inputs"}


def _check_memory(config, task, method: str, dtype: str, prompt_devices: int, model_devices: int,
                  device_memory: str | None) -> None:
    """Refuse, before anything runs, a run whose memory plan does not fit the devices' memory, naming the
    mesh that would; and a mesh larger than the devices there are."""
    import jax

    from .memory import human, memory_plan, method_need
    from .patching import device_memory_bytes

    if prompt_devices * model_devices > jax.device_count():
        _fail(f"a mesh of {prompt_devices} prompt x {model_devices} model devices needs {prompt_devices * model_devices} "
              f"devices, {jax.device_count()} are available")
    plan_method = _PLAN_OF_METHOD.get(method)
    if plan_method is None:
        return
    n_prompts, n_pos = task.clean.shape
    sizes = dict(n_prompts=n_prompts, n_pos=n_pos, n_read=task.positions.shape[1], itemsize=_ITEMSIZES[dtype])
    try:
        plan = memory_plan(config, prompt_devices=prompt_devices, model_devices=model_devices, **sizes)
    except ValueError as err:
        _fail(str(err))
    have = _bytes(device_memory) or device_memory_bytes()
    need = method_need(plan, plan_method)
    if need > have:
        _fail(f"{method} on {n_prompts} prompts x {n_pos} tokens needs about {human(need)} per device on a mesh of "
              f"{prompt_devices} prompt x {model_devices} model devices, and a device has {human(have)}: "
              f"{_mesh_advice(config, have, plan_method, **sizes)}")


def _load_circuit(path: Path):
    from .methods import Circuit

    try:
        return Circuit.load(path)
    except (OSError, ValueError, KeyError) as err:
        _fail(f"cannot read the circuit {path}: {err}")


@app.command(epilog="""
Examples:

  acdc-jax draw circuit.json -o circuit.svg

  acdc-jax draw circuit.json -o circuit.png --heatmap scores.png --per-edge

  acdc-jax draw circuit.json -o full.svg --all-nodes --dot circuit.dot

Edges into a head's q, k and v inputs are blue, green and vermillion;

edges into MLPs and the logits dark grey. Width grows with |score|;

dashed = negative score, dotted = no score.
""")
def draw(
    circuit: Annotated[Path, typer.Argument(help="A circuit JSON written by `discover --out`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Picture to write: .svg, .png or .pdf.")],
    heatmap: Annotated[Optional[Path], typer.Option(help="Also write a heat map of head and MLP scores here.")] = None,
    reduce: Annotated[str, typer.Option(help="Heat map node score: sum or max of |score| over the node's edges.")] = "sum",
    per_edge: Annotated[bool, typer.Option("--per-edge", help="Heat map: add the edge scores by destination and source.")] = False,
    all_nodes: Annotated[bool, typer.Option("--all-nodes", help="Draw every node (untouched ones grey), not only the circuit's.")] = False,
    dot: Annotated[Optional[Path], typer.Option(help="Also write Graphviz DOT source here (for `dot -Tsvg`).")] = None,
    title: Annotated[Optional[str], typer.Option(help="Title (default: method, task and size).")] = None,
) -> None:
    """Draw a circuit layer by layer (no graphviz needed), optionally with a heat map of its scores."""
    from . import viz

    loaded = _load_circuit(circuit)
    if reduce not in viz.REDUCTIONS:
        _fail(f"--reduce must be one of {', '.join(viz.REDUCTIONS)}, got {reduce!r}")
    try:
        written = [viz.draw_circuit(loaded, out, hide_unused=not all_nodes, title=title)]
        if heatmap is not None:
            written.append(viz.plot_scores(loaded, heatmap, reduce=reduce, per_edge=per_edge, title=title))
    except ValueError as err:
        _fail(str(err))
    if dot is not None:
        dot.parent.mkdir(parents=True, exist_ok=True)
        dot.write_text(viz.to_dot(loaded, hide_unused=not all_nodes, title=title))
        written.append(dot)
    for path in written:
        console.print(f"wrote {path}")


@app.command(name="export", epilog="""
Examples:

  acdc-jax export circuit.json --format acdc -o acdc_edges.json

  acdc-jax export circuit.json --format acdc --embed split -o acdc_edges.json

  acdc-jax export circuit.json --format autocircuit -o prune_scores.json

  acdc-jax export circuit.json --format mib --d-model 768 -o mib_graph.json

acdc: ACDC's edge keys (receiver hook and index, sender hook and index).

autocircuit: auto-circuit's node names and PruneScores per destination module.

mib: the EAP-IG graph JSON that the MIB circuit track reads.

The docstring of acdc_jax.export gives each layout and naming map.
""")
def export_command(
    circuit: Annotated[Path, typer.Argument(help="A circuit JSON written by `discover --out`.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="acdc, autocircuit or mib.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write.")],
    embed: Annotated[str, typer.Option(help="acdc: auto (split for tracr tasks, as ACDC), resid_pre or split.")] = "auto",
    d_model: Annotated[Optional[int], typer.Option(help="mib: the model's d_model, when it cannot be inferred.")] = None,
    fold_internal: Annotated[bool, typer.Option("--fold-internal", help="Fold a.q|k|v->a edges into the residual edges first.")] = False,
    nodes_to_edges: Annotated[bool, typer.Option("--nodes-to-edges", help="Turn a node-level circuit into edges first.")] = False,
    merge_positions: Annotated[bool, typer.Option("--merge-positions", help="A position-aware circuit as edges: scores summed over positions, kept if kept at any.")] = False,
) -> None:
    """Write a circuit in a format other tools read: ACDC edges, auto-circuit prune scores, MIB graph JSON."""
    from . import export

    loaded = _load_circuit(circuit)
    if fmt not in export.FORMATS:
        _fail(f"--format must be one of {', '.join(export.FORMATS)}, got {fmt!r}")
    options: dict = {}
    if fmt == "acdc":
        options["embed"] = embed
    elif embed != "auto":
        _fail("--embed applies to --format acdc only")
    if fmt == "mib":
        options["d_model"] = d_model
    elif d_model is not None:
        _fail("--d-model applies to --format mib only")
    if merge_positions:
        loaded = export.merge_positions(loaded)
    if nodes_to_edges:
        loaded = export.edge_circuit_from_nodes(loaded)
    if fold_internal:
        loaded = export.fold_internal_edges(loaded)
    try:
        path = export.write_circuit(loaded, out, fmt, **options)
    except ValueError as err:
        _fail(str(err))
    unit = "edges" if loaded.graph.level == "edge" else "nodes"
    console.print(f"wrote {path} ({fmt}: {loaded.n_kept} of {loaded.graph.n_gates} {unit} kept)")


_MIB_CONVENTIONS = (
    "faithfulness f = (m(C) - m(empty)) / (m(full) - m(empty)), m = mean logit difference (answer minus the "
    "counterfactual's answer) at the last token, removed edges patched with the counterfactual run; circuits: the "
    "top int(k * n_edges) edges at MIB's fractions k; CPR = trapezoid area under f over k (linear, 0.001..1), "
    "CMD = trapezoid area of |1 - f|; for an importances file MIB takes CPR from the ranking by signed score and "
    "CMD from the ranking by |score|, for nine circuits both from those circuits; scores ranked as MIB reads the "
    "file (float32, untested edges 0)"
)


def _mib_tasks(names: list[str]) -> list[tuple[str, str]]:
    """(MIB's task name, the acdc-jax builder's name) for each ``--task``."""
    from .tasks import MIB_TASKS

    ours = {builder: mib for mib, builder in MIB_TASKS.items()}
    chosen = []
    for name in names:
        key = name.replace("_", "-")
        if key in MIB_TASKS:
            chosen.append((key, MIB_TASKS[key]))
        elif key in ours:
            chosen.append((ours[key], key))
        else:
            _fail(f"unknown MIB task {name!r}: choose from {', '.join(MIB_TASKS)} (or {', '.join(ours)}); "
                  "ARC needs its questions, which are not shipped")
    return chosen


@app.command(name="mib", epilog="""
Examples:

  acdc-jax mib --model ~/models/gpt2 --task ioi --method eap-ig-inputs --out submission

  acdc-jax mib --model ~/models/llama3 --task arithmetic-addition --task mcqa --method eap --format circuits

  acdc-jax mib --random-weights --small --task ioi --method eap      (a labelled dry run, no weights needed)

Writes OUT/{method}_patching_edge/{task}_{model}/ (importances.json, or nine

circuit_{k}.json) as MIB's leaderboard reads a submission, and next to that

folder {task}_{model}_results.json: faithfulness at MIB's fractions, CPR, CMD.
""")
def mib_command(
    tasks: Annotated[list[str], typer.Option("--task", help="MIB task (repeatable): ioi, mcqa, arithmetic-addition, arithmetic-subtraction.")],
    method: Annotated[str, typer.Option(help="Discovery method scoring edges (see `acdc-jax info --methods`).")],
    model: Annotated[Optional[str], typer.Option(help="Model name or local Hugging Face directory (its tokenizer poses the tasks).")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="A random GPT-2 with GPT-2's tokenizer: a labelled dry run.")] = False,
    small: Annotated[bool, typer.Option("--small", help="With --random-weights: a 2-layer, 4-head GPT-2 instead of GPT-2 small's shape.")] = False,
    out: Annotated[Path, typer.Option(help="Submission folder.")] = Path("mib_submission"),
    fmt: Annotated[str, typer.Option("--format", help="scores (one importances.json) or circuits (nine thresholded circuits).")] = "scores",
    rank: Annotated[str, typer.Option(help="circuits: rank edges by signed score or by |score| (absolute).")] = "signed",
    model_name: Annotated[Optional[str], typer.Option(help="The model's name in the folder (default: MIB's name for its shape, else the folder's).")] = None,
    prompts: Annotated[int, typer.Option(help="Prompts per task (MIB attributes with 100).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the generated prompts.")] = 0,
    threshold: Annotated[Optional[float], typer.Option(help="Pruning threshold (methods that take one).")] = None,
    option: Annotated[Optional[list[str]], typer.Option(help="Extra method option key=value (repeatable).")] = None,
    task_option: Annotated[Optional[list[str]], typer.Option(help="Task builder option key=value (repeatable), e.g. digits=1.")] = None,
) -> None:
    """Discover circuits for MIB's circuit-localization track and evaluate them as MIB does: write the
    submission folder per task and model, print and save faithfulness at MIB's edge fractions, CPR and CMD."""
    import dataclasses

    import jax

    from . import evaluate, export, methods
    from .graph import GraphError
    from .models import LoadError, TransformerConfig, init_model, load_model, model_directory
    from .tasks import TaskError, get_builder, get_task, gpt2_tokenizer, tokenizer_for_model

    if fmt not in export.MIB_SUBMISSION_FORMATS:
        _fail(f"--format must be one of {', '.join(export.MIB_SUBMISSION_FORMATS)}, got {fmt!r}")
    if rank not in export.MIB_RANKINGS:
        _fail(f"--rank must be one of {', '.join(export.MIB_RANKINGS)}, got {rank!r}")
    if fmt == "scores" and rank != "signed":
        _fail("--rank applies to --format circuits: an importances file is ranked by MIB itself, both ways")
    if prompts < 1:
        _fail(f"--prompts must be positive, got {prompts}")
    if (model is None) == (not random_weights):
        _fail("pass --model NAME_OR_DIR, or --random-weights for a labelled dry run (not both)")
    if small and not random_weights:
        _fail("--small applies to --random-weights only")
    chosen = _mib_tasks(tasks)
    task_options = _parse_options(task_option, "--task-option")
    for key in ("tokenizer", "n_prompts", "seed"):
        if key in task_options:
            _fail(f"{key} is set by {'--model' if key == 'tokenizer' else '--' + key.replace('n_', '')}, not --task-option")
    # each task gets the options its builder takes (digits= goes to arithmetic, n_choices= to mcqa)
    takes = {builder: set(inspect.signature(get_builder(builder)).parameters) for _, builder in chosen}
    unused = sorted(key for key in task_options if not any(key in names for names in takes.values()))
    if unused:
        _fail(f"no chosen task takes the option {', '.join(unused)}; they take "
              f"{', '.join(sorted(set().union(*takes.values()) - {'n_prompts', 'seed', 'tokenizer'}))}")
    try:
        spec = methods.get_method(method)
        if random_weights:
            config = TransformerConfig.gpt2("gpt2", name="gpt2-random")
            if small:
                config = dataclasses.replace(config, n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, name="gpt2-tiny-random")
            the_model, tokenizer, source = init_model(config, jax.random.PRNGKey(0)), gpt2_tokenizer(), "random weights (dry run, not a result)"
            default_name = config.name
        else:
            the_model = load_model(model)
            tokenizer, note = tokenizer_for_model(model_directory(model), the_model.config.d_vocab)
            if note:
                console.print(note, soft_wrap=True, markup=False)
            source = str(model)
            default_name = export.mib_model_name(the_model.config) or Path(model).name.replace("_", "-")
    except (LoadError, TaskError, ValueError) as err:
        _fail(str(err))
    config = the_model.config
    if not config.has_mlp or config.parallel:
        _fail("MIB's graph (EAP-IG's) has an MLP after the attention of every layer; this model is "
              + ("attention-only" if not config.has_mlp else "built of parallel attention/MLP blocks"))
    if spec.level != "edge":
        _fail(f"method {method!r} scores nodes; MIB's edge track needs an edge method (for example eap, eap-ig-inputs, acdc)")
    name = model_name or default_name
    if model_name is None and not random_weights and export.mib_model_name(config) is None:
        console.print(f"the model is not one MIB evaluates ({', '.join(export.MIB_MODELS)}); its folder is named {name!r} "
                      "(--model-name sets another)", soft_wrap=True, markup=False)
    opts, _ = _method_options(spec, option, threshold)
    for mib_task, _ in chosen:  # before any work: names MIB can read, folders holding nothing else
        try:
            folder = export.mib_task_folder(out, method, mib_task, name)
        except ValueError as err:
            _fail(str(err))
        foreign = export.mib_foreign_files(folder)
        if foreign:
            _fail(f"{folder} holds {', '.join(foreign)}; MIB's evaluator reads every file of a task folder as a circuit, "
                  "so move them out or write to another --out")
    start = tokenizer.document_start_id
    console.print(f"prompts tokenized with the {tokenizer.describe()}; MIB-style prompts start with "
                  + (repr(tokenizer.token_text(start)) if start is not None else "no BOS (the tokenizer has none)"),
                  soft_wrap=True, markup=False)

    for mib_task, builder in chosen:
        try:
            mine = {key: value for key, value in task_options.items() if key in takes[builder]}
            the_task = get_task(builder, n_prompts=prompts, seed=seed, tokenizer=tokenizer, **mine)
            console.print(f"[bold]{method}[/] on [bold]{mib_task}[/] ({the_task.n_prompts} prompts, {the_task.name}) with "
                          f"{config.name or name}" + (f" [{source}]" if random_weights else ""), soft_wrap=True)
            circuit = methods.discover(the_model, the_task, method, qkv_split=True, ablation="corrupt", score=False, **opts)
            per_batch = min(20, the_task.n_prompts)  # MIB's run_attribution --batch-size
            files = export.write_mib_submission(circuit, out, task=mib_task, model=name, fmt=fmt, ranking=rank,
                                                d_model=config.d_model, prompts_per_batch=per_batch)
            console.print(f"wrote {files[0].parent} ({', '.join(f.name for f in files[:2])}{', ...' if len(files) > 2 else ''})",
                          soft_wrap=True, markup=False)
            problem = methods.Problem.build(the_model, the_task, qkv_split=True, metric="logit_diff", ablation="corrupt")
            result = evaluate.mib_evaluation(problem, evaluate.mib_scores(circuit.scores, per_batch))
        except (LoadError, TaskError, ValueError, GraphError) as err:
            _fail(str(err))
        cpr_from = "signed" if fmt == "scores" else rank
        cmd_from = "absolute" if fmt == "scores" else rank
        cpr, cmd = result.curve(cpr_from).cpr, result.curve(cmd_from).cmd
        # MIB's weighted_edge_counts: an importances file's top-n sets after one round of its prune; nine
        # circuits are counted as the files hold them
        counts = {"signed": result.pruned_counts_signed, "absolute": result.pruned_counts_absolute}
        if fmt == "circuits":
            counts = {key: result.signed.n_kept for key in counts}
        curves = {"signed": (result.signed, counts["signed"]), "absolute": (result.absolute, counts["absolute"])}
        document = {
            "format": "acdc-jax MIB evaluation",
            "task": mib_task,
            "acdc_jax_task": the_task.name,
            "model": name,
            "model_source": source,
            "method": method,
            "on_mib_leaderboard": f"{mib_task}_{name}" in export.MIB_LEADERBOARD,
            "submission": {"format": fmt, "ranking": rank if fmt == "circuits" else None,
                           "files": [str(f.relative_to(out)) for f in files], "prompts_per_batch": per_batch},
            "n_prompts": the_task.n_prompts,
            "n_edges": problem.graph.n_gates,
            "metric": "logit_diff",
            "full_metric": result.signed.full_value,
            "empty_metric": result.signed.ablated_value,
            "fractions": result.signed.fractions.tolist(),
            "n_kept": result.signed.n_kept.tolist(),
            "curves": {key: {"faithfulness": curve.faithfulness.tolist(), "metric": curve.values.tolist(),
                             "mib_edge_counts": n.tolist(), "cpr": curve.cpr, "cmd": curve.cmd}
                       for key, (curve, n) in curves.items()},
            "cpr": cpr,
            "cpr_ranking": cpr_from,
            "cmd": cmd,
            "cmd_ranking": cmd_from,
            "conventions": _MIB_CONVENTIONS,
        }
        results = out / export.mib_method_folder(method) / f"{mib_task}_{name}_results.json"
        results.write_text(json.dumps(document, indent=1, allow_nan=False))

        table = Table(title=f"{mib_task} on {name}: faithfulness ({method}; m(full) {result.signed.full_value:.4g}, "
                            f"m(empty) {result.signed.ablated_value:.4g})")
        count_label = "MIB's edge count (signed)" if fmt == "scores" else "MIB's edge count"
        for column in ("fraction", "edges kept", "f, signed ranking", "f, |score| ranking", count_label):
            table.add_column(column, justify="right")
        for i, fraction in enumerate(result.signed.fractions.tolist()):
            table.add_row(f"{fraction:g}", f"{int(result.signed.n_kept[i]):,}", f"{result.signed.faithfulness[i]:.4f}",
                          f"{result.absolute.faithfulness[i]:.4f}", f"{int(counts['signed'][i]):,}")
        console.print(table)
        console.print(f"CPR {cpr:.4f} ({cpr_from} ranking), CMD {cmd:.4f} ({cmd_from} ranking)", soft_wrap=True)
        console.print(f"wrote {results}", soft_wrap=True, markup=False)
        if not document["on_mib_leaderboard"] and not random_weights:
            console.print(f"note: MIB's leaderboard does not score {mib_task} on {name!r}", soft_wrap=True, markup=False)
    if random_weights:
        console.print(f"[bold]{source}[/]")


@app.command(epilog="""
Examples:

  acdc-jax experiment tracr-reverse --small

  acdc-jax experiment ioi --model ~/models/gpt2 --out results

  acdc-jax experiment ioi --random-weights --small    (a labelled dry run of the pipeline)
""")
def experiment(
    task: Annotated[str, typer.Argument(help="Task to run every discovery method on.")],
    model: Annotated[Optional[str], typer.Option(help="Model name or local directory (default: the task's).")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="GPT-2 tasks: a labelled dry run on random weights.")] = False,
    small: Annotated[bool, typer.Option("--small", help="Small settings: few prompts, short sweeps.")] = False,
    methods: Annotated[Optional[list[str]], typer.Option("--method", help="Run only these methods (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("results"),
) -> None:
    """Run every discovery method on one task: AUCs, circuit sizes, KL, CPR/CMD, seconds, plots."""
    from experiments._runner import markdown_table, run_experiment

    rows = run_experiment(task, model=model, random_weights=random_weights, small=small, methods=methods, out=out,
                          echo=console.print)
    console.print(markdown_table(rows, task))


@app.command(epilog="""
Examples:

  acdc-jax compare --small

  acdc-jax compare --task ioi --task greater-than --task docstring --model ~/models/gpt2
""")
def compare(
    tasks: Annotated[Optional[list[str]], typer.Option("--task", help="Tasks (repeatable; default: the shipped ones).")] = None,
    model: Annotated[Optional[str], typer.Option(help="A local GPT-2 directory for the GPT-2 tasks.")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="GPT-2 tasks: a labelled dry run on random weights.")] = False,
    small: Annotated[bool, typer.Option("--small", help="Small settings: few prompts, short sweeps.")] = False,
    methods: Annotated[Optional[list[str]], typer.Option("--method", help="Run only these methods (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("results"),
) -> None:
    """The ACDC paper's comparison table (task x method), written to OUT/compare.md."""
    from experiments.compare import SHIPPED_TASKS
    from experiments.compare import compare as run_compare

    run_compare(tasks or list(SHIPPED_TASKS), model=model, random_weights=random_weights, small=small, methods=methods,
                out=out, echo=console.print)


@app.command(name="train-induction", epilog="""
Examples:

  acdc-jax train-induction --out my_induction            (the shipped model: seed 0, about a minute)

  acdc-jax train-induction --out runs/seed3 --seed 3 --full-steps 4000

  acdc-jax discover --model my_induction --task induction --method acdc --threshold 0.01
""")
def train_induction_command(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (weights, config, training.json).")],
    seed: Annotated[int, typer.Option(help="Seed for the initialisation and the data.")] = 0,
    induction_steps: Annotated[Optional[int], typer.Option(help="Steps of phase 1 (induction targets only).")] = None,
    full_steps: Annotated[Optional[int], typer.Option(help="Steps of phase 2 (plain next-token training).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
) -> None:
    """Train the 2-layer attention-only induction model (the shipped `models/induction` is seed 0)."""
    import dataclasses

    from .training import TrainSettings, train_induction

    changes = {k: v for k, v in dict(induction_steps=induction_steps, full_steps=full_steps, batch_size=batch_size,
                                     learning_rate=lr).items() if v is not None}
    try:
        settings = dataclasses.replace(TrainSettings(), **changes)
    except ValueError as err:
        _fail(str(err))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task("training", total=settings.steps, loss="-")

        def report(state):
            bar.update(job, completed=state["step"], description=state["phase"], loss=f"{state['loss']:.4f}")

        result = train_induction(out, seed=seed, settings=settings, progress=report)
    table = Table(title=f"induction model, seed {seed}: next-token loss")
    for column in ("prompts", "first copy", "repeated copy", "uniform guess"):
        table.add_column(column)
    for name, ev in result.record["eval"].items():
        table.add_row(name.replace("_", " "), f"{ev['first_half']:.3f}", f"{ev['repeated_half']:.3f}", f"{ev['uniform']:.3f}")
    console.print(table)
    console.print(f"wrote {out} ({result.record['steps']} steps in {result.record['wall_time_s']} s)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
