"""acdc-jax: automatic circuit discovery in transformers, in JAX, with a gate on every edge."""

from .graph import Graph, GraphError
from .models import (
    Ablation,
    ConfigError,
    DenseGates,
    InputError,
    LoadError,
    Transformer,
    TransformerConfig,
    gated_forward,
    init_model,
    load_model,
    save_model,
)
from .patching import (
    GatedRun,
    chunked_vmap,
    corrupt_ablation,
    make_ablation,
    mean_ablation,
    source_values,
    zero_ablation,
)

from . import evaluate, methods, metrics, tasks  # noqa: E402  (after the core they build on)
from . import export, viz  # noqa: E402  (after methods and evaluate, which they build on)
from .methods import Circuit, PositionUnits, Problem, discover  # noqa: E402
from .methods.acdc import acdc  # noqa: E402  (each method function; its module is acdc_jax.methods.<name>)
from .methods.atp_star import atp_star  # noqa: E402
from .methods.eap import eap  # noqa: E402
from .methods.eap_ig import eap_ig  # noqa: E402
from .methods.eap_ig_activations import eap_ig_activations  # noqa: E402
from .methods.exact import exact_patching  # noqa: E402
from .methods.hisp import hisp  # noqa: E402
from .methods.learned_mask import learned_mask  # noqa: E402
from .methods.node_patching import node_patching  # noqa: E402
from .methods.path_patching import path_patching  # noqa: E402
from .methods.wrong_answer import wrong_answer  # noqa: E402
from .tasks import Task, get_task  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Ablation",
    "Circuit",
    "PositionUnits",
    "Problem",
    "Task",
    "discover",
    "acdc",
    "atp_star",
    "eap",
    "eap_ig",
    "eap_ig_activations",
    "exact_patching",
    "hisp",
    "learned_mask",
    "node_patching",
    "path_patching",
    "wrong_answer",
    "evaluate",
    "export",
    "get_task",
    "methods",
    "metrics",
    "tasks",
    "viz",
    "ConfigError",
    "DenseGates",
    "GatedRun",
    "Graph",
    "GraphError",
    "InputError",
    "LoadError",
    "Transformer",
    "TransformerConfig",
    "chunked_vmap",
    "corrupt_ablation",
    "gated_forward",
    "init_model",
    "load_model",
    "make_ablation",
    "mean_ablation",
    "save_model",
    "source_values",
    "zero_ablation",
]
