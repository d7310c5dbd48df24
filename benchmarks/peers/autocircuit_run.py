"""auto-circuit's side of the side-by-side: EAP and ACDC timed on the shared random GPT-2 folders.

    /work/peer-venv/bin/python benchmarks/peers/autocircuit_run.py SPEC.json OUT.json

Runs in the peer's own virtual environment (auto-circuit 1.0.1, TransformerLens 2.18.0; see
README.md) and imports nothing from acdc-jax. ``SPEC.json`` (written by ``side_by_side.py``) names
the jobs:

- ``eap``: ``{"model": DIR, "prompts": FILE, "repeats": 3}``. auto-circuit's
  ``mask_gradient_prune_scores`` with ``grad_function="logit"``, ``answer_function="avg_diff"``,
  ``mask_val=0``: the gradient of minus the mean logit difference at the last position with respect to
  every edge's patch mask at the clean point (mask 1 = the corrupted prompt's source output), which is
  EAP. Every edge's score is returned under acdc-jax's edge name.
- ``acdc``: ``{"model", "prompts", "threshold", "repeats", "orders": {NAME: [edge names] | null}}``.
  ``acdc_prune_scores`` at one threshold (``tao_bases=[threshold]``, ``tao_exps=[0]``) on the KL to
  the clean output at the last position; the kept edges (score ``inf``) for each visit order: ``null``
  is auto-circuit's own order, a list of acdc-jax edge names is the same search visiting in that order.
  The first order is timed.
- ``acdc_sample``: ``{"model", "prompts", "threshold", "per_layer", "repeats"}``. The same call on a
  sample of the edges: the first ``per_layer`` edges (in auto-circuit's order) into each of its
  destination layers, so every start layer is represented (the decisions on a sample mean nothing;
  only the time does). Each edge's evaluation (the model call that starts at its layer) is timed
  apart from the rest of the call (ablation caches, the clean run: the setup), and the whole run is
  extrapolated as setup + seconds per forward-equivalent x the forward-equivalents of every edge (an
  edge into block ``b`` runs blocks ``b..L-1`` and the unembedding: ``(L + 1 - b) / (L + 1)``). Its
  untimed warm call is on the first two sampled edges.

A top-level ``"torch_threads": N`` sets ``torch.set_num_threads`` first.

Every timed call is warm (one untimed call first) and reported as the median of ``repeats`` calls.
The model is loaded into TransformerLens without a hub: ``HookedTransformerConfig`` from the folder's
``config.json``, weights from the Hugging Face model with TransformerLens's own GPT-2 converter, and no
weight processing (no LayerNorm folding, centring or value-bias folding, which would move ``b_V`` out of
the heads' outputs and change what an edge carries).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

from _timing import median_seconds  # beside this script (sys.path[0])


def load_tl(folder: str):
    """The Hugging Face GPT-2 folder as a ``HookedTransformer`` set up for auto-circuit's edge patching."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf_config = json.loads((Path(folder) / "config.json").read_text())
    if hf_config.get("model_type") != "gpt2":
        raise SystemExit(f"{folder}: model_type {hf_config.get('model_type')!r}, this loader reads GPT-2 folders only")
    d_model, n_heads = hf_config["n_embd"], hf_config["n_head"]
    cfg = HookedTransformerConfig(
        n_layers=hf_config["n_layer"], d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=hf_config.get("n_inner") or 4 * d_model, n_ctx=hf_config["n_positions"], d_vocab=hf_config["vocab_size"],
        act_fn=hf_config.get("activation_function", "gelu_new"), eps=hf_config["layer_norm_epsilon"],
        normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device="cpu",
    )
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.cfg.use_attn_result = True
    model.cfg.use_attn_in = True
    model.cfg.use_split_qkv_input = True
    model.cfg.use_hook_mlp_in = True
    model.eval()
    for param in model.parameters():
        param.requires_grad = False
    return model, hf, torch


def load_prompts(path: str):
    import torch
    from auto_circuit.data import PromptDataLoader, PromptDataset

    task = json.loads(Path(path).read_text())
    clean = torch.tensor(task["clean"])
    corrupt = torch.tensor(task["corrupt"])
    answers = torch.tensor(task["answers"]).reshape(len(clean), -1)
    wrong = torch.tensor(task["wrong_answers"]).reshape(len(clean), -1)
    dataset = PromptDataset(clean, corrupt, answers, wrong)
    return PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(clean), shuffle=False), clean


def ours(name: str) -> str:
    """auto-circuit's node name in acdc-jax's naming (``Resid Start`` -> ``embed``, ``A1.2.Q`` ->
    ``a1.2.q``, ``MLP 0`` -> ``mlp0``, ``Resid End`` -> ``logits``)."""
    if name == "Resid Start":
        return "embed"
    if name == "Resid End":
        return "logits"
    if name.startswith("MLP "):
        return f"mlp{name[4:]}"
    if name.startswith("A"):
        return "a" + name[1:].lower()
    raise ValueError(f"unknown auto-circuit node {name!r}")


def edge_name(edge) -> str:
    return f"{ours(edge.src.name)}->{ours(edge.dest.name)}"


def build(folder: str, prompts: str):
    from auto_circuit.utils.graph_utils import patchable_model

    tl_model, hf, torch = load_tl(folder)
    loader, clean = load_prompts(prompts)
    with torch.inference_mode():
        reference = hf(clean).logits
        parity = float((tl_model(clean) - reference).abs().max() / reference.abs().max())
    model = patchable_model(tl_model, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))
    return model, tl_model, loader, clean, parity, torch


def plain_forward_s(tl_model, clean, torch, repeats: int) -> float:
    """One forward of the unpatched TransformerLens model on the clean batch (logits everywhere)."""
    def run():
        with torch.inference_mode():
            return tl_model(clean)

    return median_seconds(run, repeats)[0]


def job_eap(spec: dict) -> dict:
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

    model, tl_model, loader, clean, parity, torch = build(spec["model"], spec["prompts"])
    repeats = spec.get("repeats", 3)
    batch = next(iter(loader))
    with torch.inference_mode():
        logits = model(batch.clean)[model.out_slice]
        clean_ld = float((logits.gather(-1, batch.answers).mean(-1) - logits.gather(-1, batch.wrong_answers).mean(-1)).mean())

    def run():
        return mask_gradient_prune_scores(model, loader, None, grad_function="logit", answer_function="avg_diff", mask_val=0.0)

    seconds, times, scores = median_seconds(run, repeats)
    by_name = {edge_name(e): float(e.prune_score(scores)) for e in model.edges}
    return {"n_edges": len(model.edges), "eap_s": seconds, "eap_times_s": times, "scores": by_name,
            "plain_forward_s": plain_forward_s(tl_model, clean, torch, repeats), "clean_logit_diff": clean_ld,
            "tl_vs_hf_max_rel_diff": parity}


def acdc_call(model, loader, threshold: float):
    from auto_circuit.prune_algos.ACDC import acdc_prune_scores

    return acdc_prune_scores(model, loader, None, tao_exps=[0], tao_bases=[threshold], faithfulness_target="kl_div")


def stock_order(model) -> list:
    """The order ``acdc_prune_scores`` visits: ``sorted(model.edges, key=dest.layer, reverse=True)``,
    a stable sort of a Python set (so within one destination layer the order is the set's, which
    depends on string hashing: ``PYTHONHASHSEED`` fixes it)."""
    return sorted(model.edges, key=lambda e: e.dest.layer, reverse=True)


def job_acdc(spec: dict) -> dict:
    model, tl_model, loader, clean, parity, torch = build(spec["model"], spec["prompts"])
    repeats = spec.get("repeats", 3)
    all_edges = set(model.edges)
    by_name = {edge_name(e): e for e in all_edges}
    out = {"n_edges": len(all_edges), "threshold": spec["threshold"], "tl_vs_hf_max_rel_diff": parity, "runs": {}}
    for i, (order_name, order) in enumerate(spec["orders"].items()):
        edges = stock_order(model) if order is None else [by_name[n] for n in order]
        if set(edges) != all_edges:
            raise SystemExit(f"order {order_name!r} does not list every edge exactly once")
        model.edges = edges  # acdc_prune_scores sorts this by destination layer, stably
        run = {"visit_order": [edge_name(e) for e in stock_order(model)]}
        if i == 0:
            seconds, times, scores = median_seconds(lambda: acdc_call(model, loader, spec["threshold"]), repeats)
            run |= {"acdc_s": seconds, "acdc_times_s": times}
        else:
            scores = acdc_call(model, loader, spec["threshold"])
        run["kept"] = sorted(edge_name(e) for e in edges if e.prune_score(scores).item() == float("inf"))
        out["runs"][order_name] = run
        model.edges = all_edges
    out["plain_forward_s"] = plain_forward_s(tl_model, clean, torch, repeats)
    return out


class _EdgeForwards:
    """Times the model calls that evaluate one edge (those that start at a layer), so that the rest
    of a call (ablation caches, the clean run) is measured apart."""

    def __init__(self, model):
        self.inner, self.seconds = model.forward, []
        model.forward = self

    def __call__(self, *args, **kwargs):
        if "start_at_layer" not in kwargs:
            return self.inner(*args, **kwargs)
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return out


def job_acdc_sample(spec: dict) -> dict:
    model, tl_model, loader, clean, parity, torch = build(spec["model"], spec["prompts"])
    repeats, per_layer = spec.get("repeats", 3), spec["per_layer"]
    n_layers = tl_model.cfg.n_layers
    all_edges = set(model.edges)
    sample, taken = [], {}
    for edge in stock_order(model):
        if taken.get(edge.dest.layer, 0) < per_layer:
            sample.append(edge)
            taken[edge.dest.layer] = taken.get(edge.dest.layer, 0) + 1

    def start_block(edge) -> int:
        return int(edge.dest.module_name.split(".")[1])

    def forward_equivalents(edges) -> float:
        return sum((n_layers + 1 - start_block(e)) / (n_layers + 1) for e in edges)

    timer = _EdgeForwards(model)
    model.edges = sample[:2]
    acdc_call(model, loader, spec["threshold"])  # warm: the setup and both kinds of forward, untimed
    model.edges = sample
    calls, edge_s = [], []
    for _ in range(repeats):
        timer.seconds = []
        start = time.perf_counter()
        acdc_call(model, loader, spec["threshold"])
        calls.append(time.perf_counter() - start)
        edge_s.append(sum(timer.seconds))
        assert len(timer.seconds) == len(sample), (len(timer.seconds), len(sample))
    model.forward = timer.inner
    model.edges = all_edges
    setup_s = statistics.median(c - e for c, e in zip(calls, edge_s))
    rate = statistics.median(edge_s) / forward_equivalents(sample)
    all_fe = forward_equivalents(all_edges)
    return {"n_edges": len(all_edges), "sampled_edges": len(sample), "per_layer": per_layer,
            "dest_layers": len(taken), "sampled": [edge_name(e) for e in sample], "setup_s": setup_s,
            "sample_call_s": statistics.median(calls), "sample_call_times_s": calls, "sample_edge_forwards_s": edge_s,
            "sampled_forward_equivalents": forward_equivalents(sample), "s_per_forward_equivalent": rate,
            "all_edges_forward_equivalents": all_fe,
            "extrapolated_s": setup_s + rate * all_fe, "s_per_edge": (setup_s + rate * all_fe) / len(all_edges),
            "plain_forward_s": plain_forward_s(tl_model, clean, torch, repeats), "tl_vs_hf_max_rel_diff": parity}


JOBS = {"eap": job_eap, "acdc": job_acdc, "acdc_sample": job_acdc_sample}


def versions() -> dict:
    import auto_circuit  # noqa: F401
    import importlib.metadata as md

    names = ("auto-circuit", "transformer-lens", "transformers", "torch", "numpy")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: autocircuit_run.py SPEC.json OUT.json")
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    threads = spec.pop("torch_threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    results = {"versions": versions(), "torch_threads": torch.get_num_threads()}
    for name, job in spec.items():
        kind = job.pop("kind")
        started = time.perf_counter()
        results[name] = JOBS[kind](job) | {"job_wall_s": time.perf_counter() - started}
        print(f"auto-circuit {name}: done in {results[name]['job_wall_s']:.1f} s", file=sys.stderr, flush=True)
    Path(argv[1]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
