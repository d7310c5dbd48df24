"""tracr-reverse and tracr-xproportion: compiled models whose circuit is known (ACDC paper, section 4).

Data, metric and ground truth come from ``models/tracr/`` (exported from ACDC's own code; see its
README). Two flavours of data:

- ``data="acdc"`` (default): ACDC's data as it is, for comparability with the paper. The
  corrupted run scrambles position embeddings as ACDC's ``setup_corrupted_cache`` does, and
  xproportion's inputs carry ACDC's token-id mistake (letters encoded as ``ord(c) - ord("w")``
  without BOS, so the rows are sequences over {BOS, pad, w, x}).
- ``data="corrected"``: correctly encoded xproportion inputs (BOS first, tracr's ids) and, for
  both tasks, a plain corrupted run with normal positions.

**Which ablation the ground truth holds under.** The ground-truth edges are what an ACDC run with
*zero* ablation kept, so the tasks default to ``ablation="zero"``, where every ground-truth edge
matters on its own and no other edge does. Under corrupted-input patching several ground-truth
edges have no effect at all (reverse: the whole length/selector-width path, because every clean
and corrupted row has the same length; see caveat 3 of the README), so no patching method can find
them that way.

**Internal edges.** With ``Graph(internal_edges=True)`` the circuit includes ``a.h.t->a.h`` for every
q/k/v input with a circuit edge into it: ACDC's direct-computation edges ``hook_t <- hook_t_input``,
the ones ACDC gates and the paper counts (reverse: a3.0.q/k/v and a0.0.v, as ACDC's own
``acdc_edges`` list them). The ``internal_edges`` field of ``ground_truth_edges.json`` instead
translates ACDC's never-gated ``hook_result <- hook_t`` placeholders (it adds a0.0.q and a0.0.k,
which nothing feeds); this module does not use that field.

Metric: ACDC's ``l2`` (mean squared distance to the clean logits over positions 1..T-1;
reverse uses its 3 output logits, xproportion only logit 0, the ``frac_prevs`` value).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from ..models import models_dir
from ._task import CanonicalCircuit, Task, TaskError

_LOGIT_DIMS = {"reverse": None, "xproportion": (0,)}
_DESCRIPTIONS = {
    "reverse": "tracr program reversing a sequence of 3 tokens over {1,2,3}",
    "xproportion": "tracr program computing the running fraction of 'x' tokens",
}


@lru_cache(maxsize=None)
def _files(program: str) -> tuple[dict, dict]:
    folder = models_dir() / "tracr" / program
    if not folder.exists():
        raise TaskError(f"the tracr data for {program!r} is missing from {folder}; set ACDC_JAX_MODELS to the models/ folder")
    datasets = json.loads((folder / "datasets.json").read_text())
    truth = json.loads((folder / "ground_truth_edges.json").read_text())
    return datasets, truth


def canonical_circuit(program: str) -> CanonicalCircuit:
    _, truth = _files(program)
    nodes = tuple(n for n in truth["nodes"] if n == "embed" or (n.count(".") <= 1 and n != "logits"))
    return CanonicalCircuit(
        edges=tuple(truth["edges"]),
        nodes=nodes,
        ablation="zero",
        source="ACDC repository (get_tracr_%s_edges), translated in models/tracr/%s/ground_truth_edges.json" % (
            "reverse" if program == "reverse" else "proportion", program),
    )


def tracr_task(program: str, *, data: str = "acdc", split: str | None = None, ablation: str = "zero") -> Task:
    """The tracr task for ``program`` (``"reverse"`` or ``"xproportion"``).

    ``split`` picks a dataset of ``datasets.json`` (default: ACDC's discovery set
    ``seed1234_validation``, or its corrected version for xproportion with ``data="corrected"``).
    """
    if program not in _LOGIT_DIMS:
        raise TaskError(f"unknown tracr program {program!r}; choose 'reverse' or 'xproportion'")
    if data not in ("acdc", "corrected"):
        raise TaskError(f"data must be 'acdc' (ACDC's data as it is) or 'corrected', got {data!r}")
    datasets, _ = _files(program)
    if split is None:
        split = "corrected_seed1234_validation" if (data == "corrected" and program == "xproportion") else datasets["primary"]
    if split not in datasets["datasets"]:
        raise TaskError(f"unknown split {split!r} for tracr-{program}; choose one of {sorted(datasets['datasets'])}")
    rows = datasets["datasets"][split]
    clean, corrupt = np.asarray(rows["clean"]), np.asarray(rows["corrupted"])
    batch, n_pos = clean.shape
    pos_ids = None
    if data == "acdc":
        pos_ids = np.asarray(datasets["acdc_corrupted_run_pos_permutation"][str(n_pos)])
    dims = _LOGIT_DIMS[program]
    return Task(
        name=f"tracr-{program}",
        clean=clean,
        corrupt=corrupt,
        positions=np.tile(np.arange(1, n_pos), (batch, 1)),
        metric="l2",
        metric_options={} if dims is None else {"logit_dims": dims},
        discovery_metric="l2",  # ACDC refuses KL here: tracr's outputs are not distributions
        canonical=canonical_circuit(program),
        ablation=ablation,
        corrupt_pos_ids=pos_ids,
        model=f"tracr-{program}",
        description=f"{_DESCRIPTIONS[program]} ({data} data, split {split})",
    )


def tracr_reverse(**kwargs) -> Task:
    return tracr_task("reverse", **kwargs)


def tracr_xproportion(**kwargs) -> Task:
    return tracr_task("xproportion", **kwargs)
