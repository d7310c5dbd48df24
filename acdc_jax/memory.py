"""How much memory a run needs, from the model's config and the prompt shapes alone (no weights).

The numbers follow the estimates the methods themselves use to chunk their work
(``patching.activation_bytes``): one gated forward of one prompt keeps the difference buffer
``[n_sources, pos, d_model]`` and one layer's work; its backward pass keeps about ``2 n_layers + 2``
forwards' worth (``patching.backward_forwards``); the logits at the read positions add ``k x d_vocab``
floats. Per method, per device, with the prompts split over ``prompt_devices`` devices and the
weights over ``model_devices`` (the mesh's ``model`` axis, tensor parallel over heads and MLP width:
``acdc_jax.sharding``):

- **gradient methods** (EAP, HISP, wrong-answer, EAP-IG's gate steps): at uniform gates they run
  one residual stream (``models.split_pullback``), so the weights plus ``split_backward_bytes`` per
  prompt in a chunk; the methods chunk prompts to fit, so the fastest is every prompt at once and
  the least is one prompt per chunk (EAP-IG's steps run one after another);
- **AtP***: the same with every head's pattern gradient, for each of its ``n_layers + 1`` GradDrop
  points (their backward passes are vmapped over one forward);
- **EAP-IG over inputs**: the gated forward's backward pass, ``2 n_layers + 2`` forwards per
  (step, prompt) configuration (``patching.backward_forwards``, measured), ``steps x prompts`` of
  them at once, or one with the layers recomputed where that keeps less
  (``patching.REMAT_FORWARDS`` forwards);
- **ACDC**: the weights, the cached clean differences of every prompt, and ``width`` gated
  forwards over the whole batch (each evaluation reads every prompt, so prompts are not chunked).

On the model axis each device holds its share of the weights (``parameter_specs``: heads, MLP width,
the vocabulary when the axis divides it) and of the per-head and per-MLP-unit work (the heads' q/k/v
inputs, their attention patterns, the MLP's hidden layer, the logits over a split vocabulary); the
difference buffer of sources and the residual-sized temporaries stay whole on every device (the
head outputs are gathered before they join it).

These are estimates of the live arrays, not of what XLA allocates around them; they are meant to
say which runs fit and which cannot, before a run starts.
"""

from __future__ import annotations

import math

import numpy as np

from .graph import Graph
from .models import TransformerConfig, expected_shapes
from .models._sharded import check_model_axis, sharded_bytes
from .patching import backward_forwards, remat_pays


def weight_bytes(config: TransformerConfig, itemsize: int = 4) -> int:
    """Bytes of the model's parameters in our layout (grouped-query key/value weights per kv head)."""
    return int(sum(math.prod(shape) for shape in expected_shapes(config).values()) * itemsize)


def split_activation_bytes(cfg: TransformerConfig, n_in: int, batch: int, n_pos: int, itemsize: int,
                           model_devices: int = 1) -> int:
    """``patching.activation_bytes`` on one device of a model axis of ``model_devices``: the sources
    buffer and the residual-sized temporaries whole, the heads' inputs and patterns and the MLP's
    hidden layer split (equal to ``activation_bytes`` on one device)."""
    act = batch * n_pos * cfg.d_model * itemsize
    per_layer = (-(-n_in // model_devices) + 4) * act + batch * (cfg.n_heads // model_devices) * n_pos * n_pos * itemsize * 2
    if cfg.has_mlp:
        per_layer += 2 * batch * n_pos * (cfg.d_mlp // model_devices) * itemsize
    return cfg.n_sources * act + per_layer


def split_backward_bytes(cfg: TransformerConfig, n_in: int, n_pos: int, itemsize: int, *, pattern: bool = False,
                         model_devices: int = 1) -> int:
    """Rough peak memory per prompt of the one-residual backward pass (``models.split_pullback``:
    EAP, HISP, EAP-IG's gate steps, AtP* and the wrong-answer gradients at uniform gates): every
    layer's work as the plain backward keeps it, every source's value and difference, one layer's
    input cotangents; with ``pattern`` every head's pattern gradient too (AtP*'s QK fix). The
    methods chunk prompts by this estimate; on a model axis the per-head and per-MLP-unit parts
    are split as in ``split_activation_bytes``."""
    act = n_pos * cfg.d_model * itemsize
    one_layer = split_activation_bytes(cfg, 8, 1, n_pos, itemsize, model_devices) - cfg.n_sources * act
    heads = cfg.n_heads // model_devices
    patterns = 2 * cfg.n_layers * heads * n_pos * n_pos * itemsize if pattern else 0
    return cfg.n_layers * one_layer + (2 * cfg.n_sources + 2 * -(-n_in // model_devices)) * act + patterns


def memory_plan(
    config: TransformerConfig,
    *,
    n_prompts: int,
    n_pos: int,
    n_read: int = 1,
    itemsize: int = 4,
    qkv_split: bool = True,
    prompt_devices: int = 1,
    model_devices: int = 1,
    eap_ig_steps: int = 5,
    acdc_width: int = 1,
) -> dict:
    """Bytes per device for each method family: ``{"weights": ..., "methods": {name: {"least":
    ..., "all_at_once": ...}}}`` on a mesh of ``prompt_devices x model_devices`` (see the module
    docstring)."""
    if min(n_prompts, n_pos, n_read, prompt_devices, model_devices, eap_ig_steps, acdc_width) < 1:
        raise ValueError("prompts, positions, read positions, devices, steps and width must all be >= 1")
    check_model_axis(config, model_devices)
    n_in = Graph.from_model(config, qkv_split).n_in
    per_device = -(-n_prompts // prompt_devices)
    weights = sharded_bytes(config, model_devices, itemsize)
    vocab_split = model_devices if config.d_vocab_out % model_devices == 0 else 1
    logits = n_read * (config.d_vocab_out // vocab_split) * 4  # metrics read float32 logits
    forward = split_activation_bytes(config, n_in, 1, n_pos, itemsize, model_devices) + logits
    backward = backward_forwards(config.n_layers, False) * forward
    least_backward = backward_forwards(config.n_layers, remat_pays(config.n_layers)) * forward
    split = split_backward_bytes(config, n_in, n_pos, itemsize, model_devices=model_devices) + logits
    drops = config.n_layers + 1  # AtP*'s GradDrop points: one backward each, vmapped over one forward
    split_qk = drops * (split_backward_bytes(config, n_in, n_pos, itemsize, pattern=True, model_devices=model_devices)
                        + logits)
    deltas = config.n_sources * per_device * n_pos * config.d_model * itemsize
    acdc = weights + deltas + acdc_width * (split_activation_bytes(config, n_in, per_device, n_pos, itemsize, model_devices)
                                            + per_device * logits)
    methods = {
        "eap, hisp, wrong-answer": {"least": weights + split, "all_at_once": weights + per_device * split},
        f"atp-star ({drops} GradDrop points)": {"least": weights + split_qk, "all_at_once": weights + per_device * split_qk},
        # the gate steps are uniform: one residual stream per step, one step after another
        f"eap-ig ({eap_ig_steps} steps)": {"least": weights + split, "all_at_once": weights + per_device * split},
        # the embedding path runs the gated forward, every (step, prompt) configuration at once
        f"eap-ig-inputs ({eap_ig_steps} steps)": {"least": weights + least_backward,
                                                 "all_at_once": weights + eap_ig_steps * per_device * backward},
        f"acdc (width {acdc_width})": {"least": acdc, "all_at_once": acdc},
    }
    return {"weights": weights, "prompts_per_device": per_device, "prompt_devices": prompt_devices,
            "model_devices": model_devices, "methods": methods}


def method_need(plan: dict, method: str) -> int:
    """The least bytes per device of the plan's entry for ``method`` (``acdc``, ``eap``, ``eap-ig``, ...)."""
    for name, need in plan["methods"].items():
        if name.split()[0].rstrip(",") == method or name.startswith(method + " "):
            return need["least"]
    raise ValueError(f"no memory estimate for {method!r}; the plan has {', '.join(plan['methods'])}")


def fitting_mesh(config: TransformerConfig, device_bytes: int, *, n_prompts: int, n_pos: int, method: str = "acdc",
                 max_devices: int = 4096, **options) -> tuple[int, int] | None:
    """The smallest mesh ``(prompt_devices, model_devices)`` on which ``method``'s least memory fits
    ``device_bytes`` per device: the fewest devices (powers of 2), and among those the fewest on the
    model axis (its traffic is per layer, the prompts axis's only per metric); model axes that do not
    divide the heads and MLP width are skipped. None: no such mesh up to ``max_devices``."""
    for total in (int(d) for d in 2 ** np.arange(int(math.log2(max_devices)) + 1)):
        for model in (int(m) for m in 2 ** np.arange(int(math.log2(total)) + 1)):
            prompts = total // model
            if prompts > max(1, n_prompts):
                continue
            try:
                plan = memory_plan(config, n_prompts=n_prompts, n_pos=n_pos, prompt_devices=prompts,
                                   model_devices=model, **options)
            except ValueError:  # this model axis does not split the heads or the MLP width
                continue
            if method_need(plan, method) <= device_bytes:
                return prompts, model
    return None


def human(n: int | float) -> str:
    """Bytes as KB/MB/GB/TB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
