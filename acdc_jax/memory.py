"""How much memory a run needs, from the model's config and the prompt shapes alone (no weights).

The numbers follow the estimates the methods themselves use to chunk their work
(``patching.activation_bytes``): one gated forward of one prompt keeps the difference buffer
``[n_sources, pos, d_model]`` and one layer's work; its backward pass keeps about ``2 n_layers + 2``
forwards' worth (``patching.backward_forwards``); the logits at the read positions add ``k x d_vocab`` floats. Per method, per device,
with the prompts split over ``prompt_devices`` devices and the weights on every device:

- **gradient methods** (EAP, HISP, AtP*, wrong-answer): the weights plus ``2 n_layers + 2`` forwards
  per prompt in a chunk (``patching.backward_forwards``, measured); the methods chunk prompts to fit, so the fastest is every prompt at once
  and the least is one prompt per chunk, with the layers recomputed in the backward pass where that
  keeps less (``patching.REMAT_FORWARDS`` forwards instead of ``2 n_layers + 2``), as the methods do
  when they must chunk;
- **EAP-IG**: the same per (step, prompt) configuration, ``steps x prompts`` of them;
- **ACDC**: the weights, the cached clean differences of every prompt, and ``width`` gated
  forwards over the whole batch (each evaluation reads every prompt, so prompts are not chunked).

These are estimates of the live arrays, not of what XLA allocates around them; they are meant to
say which runs fit and which cannot, before a run starts.
"""

from __future__ import annotations

import math

import numpy as np

from .graph import Graph
from .models import TransformerConfig, expected_shapes
from .patching import activation_bytes, backward_forwards, remat_pays


def weight_bytes(config: TransformerConfig, itemsize: int = 4) -> int:
    """Bytes of the model's parameters in our layout (grouped-query key/value weights per kv head)."""
    return int(sum(math.prod(shape) for shape in expected_shapes(config).values()) * itemsize)


def memory_plan(
    config: TransformerConfig,
    *,
    n_prompts: int,
    n_pos: int,
    n_read: int = 1,
    itemsize: int = 4,
    qkv_split: bool = True,
    prompt_devices: int = 1,
    eap_ig_steps: int = 5,
    acdc_width: int = 1,
) -> dict:
    """Bytes per device for each method family: ``{"weights": ..., "methods": {name: {"least":
    ..., "all_at_once": ...}}}`` (see the module docstring)."""
    if min(n_prompts, n_pos, n_read, prompt_devices, eap_ig_steps, acdc_width) < 1:
        raise ValueError("prompts, positions, read positions, devices, steps and width must all be >= 1")
    n_in = Graph.from_model(config, qkv_split).n_in
    per_device = -(-n_prompts // prompt_devices)
    weights = weight_bytes(config, itemsize)
    logits = n_read * config.d_vocab_out * 4  # metrics read float32 logits
    forward = activation_bytes(config, n_in, 1, n_pos, itemsize) + logits
    backward = backward_forwards(config.n_layers, False) * forward
    least_backward = backward_forwards(config.n_layers, remat_pays(config.n_layers)) * forward
    deltas = config.n_sources * per_device * n_pos * config.d_model * itemsize
    acdc = weights + deltas + acdc_width * (activation_bytes(config, n_in, per_device, n_pos, itemsize) + per_device * logits)
    methods = {
        "eap, hisp, atp-star, wrong-answer": {"least": weights + least_backward,
                                              "all_at_once": weights + per_device * backward},
        f"eap-ig ({eap_ig_steps} steps)": {"least": weights + least_backward,
                                          "all_at_once": weights + eap_ig_steps * per_device * backward},
        f"acdc (width {acdc_width})": {"least": acdc, "all_at_once": acdc},
    }
    return {"weights": weights, "prompts_per_device": per_device, "methods": methods}


def mesh_that_fits(config: TransformerConfig, device_bytes: int, *, n_prompts: int, n_pos: int, method: str = "acdc",
                   max_devices: int = 4096, **options) -> int | None:
    """The fewest prompt devices on which ``method``'s least memory fits ``device_bytes`` (None: none,
    e.g. when the weights alone do not fit one device: that needs the weights sharded)."""
    for devices in 2 ** np.arange(int(math.log2(max_devices)) + 1):
        plan = memory_plan(config, n_prompts=n_prompts, n_pos=n_pos, prompt_devices=int(devices), **options)
        need = next(v["least"] for k, v in plan["methods"].items() if k.startswith(method))
        if need <= device_bytes:
            return int(devices)
    return None


def human(n: float) -> str:
    """Bytes as KB/MB/GB/TB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
