"""Training the small attention-only model that ships as ``models/induction`` (the induction task's model).

``python -m acdc_jax.training --out models/induction`` retrains it; ``train_induction`` is the same
as a function. Data: ``acdc_jax.tasks.induction.RepeatedTokens`` (BOS, noise, a random segment, the
segment again, noise). Everything is a function of ``seed``: the initial weights, every batch,
hence the result (on one machine and jax version).

Two phases, both AdamW with warm-up and cosine decay:

1. *induction phase*: the loss counts only the predictions that induction can make (the second
   copy's tokens 2..S), and the position table stays at its sinusoidal initial value;
2. *full phase*: next-token cross-entropy on every position, every parameter trained.

Why not plain next-token training from a random start: in about twenty runs on this kind of data
(2 layers; varying seed, learning rate, initial scale, heads 1-4, d_head 16-32, d_model 64-128,
weight decay, tied unembedding, random position offsets) the model reached a low loss on the
repeated half with other mechanisms than the previous-token -> induction-head K-composition this
model is meant to exhibit: layer-0 duplicate-token heads feeding the induction heads' queries
(Q-composition through the positions they copy), or layer-0 heads attending 2 to 7 places back
whose outputs layer 1 reads through both key and value. The full loss on the unpredictable
positions also parked every layer-0 head on BOS within a few hundred steps. Counting only the
induction targets and freezing the positions in a shift-friendly (sinusoidal) geometry first
gave previous-token heads in layer 0 and induction heads in layer 1 (with ``position_scale`` 1,
1.5 and 2; at 4 nothing was learned in 4000 steps); the full phase then makes the model a proper next-token
predictor on every position, and trains the position table too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, Scalar

from .models import Transformer, TransformerConfig, forward, init_model, save_model
from .tasks.induction import RepeatedTokens

TRAINING_FILE = "training.json"

DEFAULT_DATA = RepeatedTokens()
DEFAULT_CONFIG = TransformerConfig(
    n_layers=2,
    n_heads=4,
    d_model=64,
    d_head=16,
    d_mlp=None,
    d_vocab=DEFAULT_DATA.d_vocab,
    n_ctx=DEFAULT_DATA.seq_len,
    normalization="ln",
    causal=True,
    tied_unembed=False,
    name="induction",
)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; each phase has its own AdamW (warm-up then cosine decay)."""

    induction_steps: int = 2000
    full_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    init_std: float = 0.02
    position_scale: float = 2.0  # std of the sinusoidal position table, in units of init_std
    log_every: int = 100

    def __post_init__(self):
        for field in ("induction_steps", "full_steps"):
            if getattr(self, field) < 0:
                raise ValueError(f"TrainSettings.{field} must be >= 0, got {getattr(self, field)}")
        for field in ("batch_size", "log_every"):
            if getattr(self, field) <= 0:
                raise ValueError(f"TrainSettings.{field} must be positive, got {getattr(self, field)}")
        if self.induction_steps + self.full_steps == 0:
            raise ValueError("TrainSettings: no training steps")

    @property
    def steps(self) -> int:
        return self.induction_steps + self.full_steps

    @property
    def optimizer_args(self) -> tuple[float, int, float, float]:
        return (self.learning_rate, self.warmup_steps, self.weight_decay, self.clip_norm)

    def optimizer(self, steps: int) -> optax.GradientTransformation:
        """The optimizer of a phase of ``steps`` steps."""
        return _optimizer(*self.optimizer_args, steps)


def _optimizer(learning_rate: float, warmup_steps: int, weight_decay: float, clip_norm: float, steps: int):
    warmup = min(warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, 1))
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


class TrainResult(NamedTuple):
    model: Transformer
    record: dict[str, Any]  # what training.json holds


def sinusoidal_positions(n_ctx: int, d_model: int, std: float) -> np.ndarray:
    """Sines and cosines of ``position / 10000^(2i/d_model)``, rescaled to standard deviation ``std``."""
    pos = np.arange(n_ctx)[:, None]
    freq = 1.0 / (10000.0 ** (2 * np.arange(d_model // 2)[None, :] / d_model))
    table = np.zeros((n_ctx, d_model))
    table[:, 0 : 2 * freq.shape[1] : 2] = np.sin(pos * freq)
    table[:, 1 : 2 * freq.shape[1] : 2] = np.cos(pos * freq)
    return (table / table.std() * std).astype(np.float32)


def initial_model(config: TransformerConfig, key: jax.Array, std: float, position_std: float) -> Transformer:
    """``init_model`` with the position table replaced by ``sinusoidal_positions``."""
    model = init_model(config, key, std=std)
    table = jnp.asarray(sinusoidal_positions(config.n_ctx, config.d_model, position_std), model.dtype)
    return eqx.tree_at(lambda m: m.embed.W_pos, model, table)


def next_token_losses(model: Transformer, tokens: Int[Array, "batch pos"]) -> Float[Array, "batch pos_minus_1"]:
    """``-log p(tokens[:, t+1] | tokens[:, :t+1])`` for every position ``t`` but the last."""
    logits = forward(model, tokens)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[:, :, 0]


def _weighted_loss(model: Transformer, tokens: Int[Array, "batch pos"], weights: Float[Array, "batch pos_minus_1"]) -> Scalar:
    return (next_token_losses(model, tokens) * weights).sum() / weights.sum()


_STATIC = ("data", "batch_size", "optimizer_args", "phase_steps", "induction_only", "static")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _train_chunk(params, opt_state, keys, *, data, batch_size, optimizer_args, phase_steps, induction_only, static):
    """``len(keys)`` optimisation steps in one ``lax.scan``, one batch per key.

    Everything but the arrays is a static argument, so a chunk of the same shape in the same
    phase compiles once, in every call of ``train_induction``.
    """
    optimizer = _optimizer(*optimizer_args, phase_steps)

    def step(carry, key):
        params, opt_state = carry
        batch = data.sample(key, batch_size)
        if induction_only:
            weights = batch.predictable().astype(jnp.float32)
        else:
            weights = jnp.ones(batch.tokens[:, 1:].shape, jnp.float32)
        loss, grads = jax.value_and_grad(lambda p: _weighted_loss(eqx.combine(p, static), batch.tokens, weights))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if induction_only:  # the position table keeps its initial value in this phase
            updates = eqx.tree_at(lambda u: u.embed.W_pos, updates, jnp.zeros_like(updates.embed.W_pos))
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.lax.scan(step, (params, opt_state), keys)


def evaluate_induction(
    model: Transformer,
    data: RepeatedTokens,
    *,
    n: int = 512,
    seed: int = 12345,
    segment_len: int | None = None,
    noise_before: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss read in the first copy and in the repeated copy of each row.

    Both read ``S - 1`` positions per row: the copy's tokens 2..S, each predicted from the one
    before (a copy's first token is not predictable from the context). ``segment_len=None``
    draws ``S`` as in training (``noise_before`` likewise). ``uniform`` is ``log(d_vocab - 1)``,
    a guess among the tokens.
    """
    batch = data.sample(jax.random.PRNGKey(seed), n, segment_len, noise_before)
    losses = np.asarray(jax.jit(next_token_losses)(model, batch.tokens))
    seg, first, second = (np.asarray(a) for a in (batch.segment_len, batch.first, batch.second))
    offsets = np.arange(data.max_segment - 1)[None, :]
    inside = offsets < (seg - 1)[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], inside.shape)

    def mean_from(start):
        # losses[:, t] scores the prediction made at position t (of token t + 1)
        return float(losses[rows[inside], (start[:, None] + offsets)[inside]].mean())

    return {"first_half": mean_from(first), "repeated_half": mean_from(second), "uniform": float(np.log(data.d_vocab - 1))}


def train_induction(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    settings: TrainSettings = TrainSettings(),
    config: TransformerConfig = DEFAULT_CONFIG,
    data: RepeatedTokens = DEFAULT_DATA,
    evaluate: bool = True,
    verbose: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train the induction model; with ``out``, save it there (``save_model``) with ``training.json``.

    ``evaluate`` adds ``evaluate_induction`` on the task's prompts and on the training distribution
    to the record (``eval``). ``progress``, if given, is called after every ``settings.log_every``
    steps with ``{"step", "steps", "phase", "loss"}``.
    """
    if config.d_vocab != data.d_vocab or config.n_ctx < data.seq_len:
        raise ValueError(
            f"the model (d_vocab={config.d_vocab}, n_ctx={config.n_ctx}) cannot read the data "
            f"(d_vocab={data.d_vocab}, seq_len={data.seq_len})"
        )
    started = time.perf_counter()
    key_init, key_data = jax.random.split(jax.random.PRNGKey(seed))
    params, static = eqx.partition(initial_model(config, key_init, settings.init_std, settings.position_scale * settings.init_std), eqx.is_array)

    logged: list[dict[str, Any]] = []
    done = 0
    for phase, steps in (("induction", settings.induction_steps), ("full", settings.full_steps)):
        if steps == 0:
            continue
        opt_state = settings.optimizer(steps).init(params)
        static_args = dict(
            data=data,
            batch_size=settings.batch_size,
            optimizer_args=settings.optimizer_args,
            phase_steps=steps,
            induction_only=phase == "induction",
            static=static,
        )
        stop = done + steps
        while done < stop:
            n = min(settings.log_every, stop - done)
            keys = jax.vmap(lambda i: jax.random.fold_in(key_data, i))(jnp.arange(done, done + n))
            (params, opt_state), losses = _train_chunk(params, opt_state, keys, **static_args)
            done += n
            logged.append({"step": done, "phase": phase, "loss": float(jnp.mean(losses))})
            if progress is not None:
                progress({**logged[-1], "steps": settings.steps})
            if verbose:
                print(f"step {done:6d} ({phase:9s})  train loss {logged[-1]['loss']:.4f}  "
                      f"({time.perf_counter() - started:.1f} s)", flush=True)
    model = eqx.combine(params, static)
    wall = time.perf_counter() - started

    evaluation = None
    if evaluate:
        evaluation = {
            "task_data": evaluate_induction(model, data, segment_len=data.max_segment, noise_before=0),
            "training_distribution": evaluate_induction(model, data),
        }
    record = {
        "model": config.name,
        "seed": seed,
        "config": config.to_dict(),
        "data": {"kind": "RepeatedTokens", **data.to_dict()},
        "settings": dataclasses.asdict(settings),
        "steps": settings.steps,
        "wall_time_s": round(wall, 2),
        "final_train_loss": logged[-1]["loss"],
        "train_loss": logged,
        "eval": evaluation,
        "provenance": _provenance(),
    }
    if verbose:
        print(f"done: {settings.steps} steps in {wall:.1f} s; eval {json.dumps(evaluation)}")
    if out is not None:
        save_model(model, out)
        (Path(out) / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return TrainResult(model, record)


def _provenance() -> dict[str, Any]:
    versions = {}
    for package in ("jax", "jaxlib", "equinox", "optax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "trainer": "acdc_jax.training.train_induction",
        "command": " ".join(["python -m acdc_jax.training", *sys.argv[1:]]) if _run_as_script() else None,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": jax.devices()[0].device_kind,
        "versions": versions,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _run_as_script() -> bool:
    return __name__ == "__main__"  # python -m acdc_jax.training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m acdc_jax.training", description="Train the induction model.")
    parser.add_argument("--out", required=True, help="checkpoint directory (e.g. models/induction)")
    parser.add_argument("--seed", type=int, default=0)
    defaults = TrainSettings()
    parser.add_argument("--induction-steps", type=int, default=defaults.induction_steps)
    parser.add_argument("--full-steps", type=int, default=defaults.full_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    args = parser.parse_args(argv)
    settings = dataclasses.replace(
        defaults,
        induction_steps=args.induction_steps,
        full_steps=args.full_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
    )
    train_induction(args.out, seed=args.seed, settings=settings, verbose=True)


if __name__ == "__main__":
    main()
