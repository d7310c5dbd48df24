"""Weights split over a mesh's ``model`` axis, and safetensors read straight into each device's shard.

Tensor parallelism over heads and MLP width (see ``acdc_jax.sharding`` for why it suits gated
models): ``W_Q``, ``b_Q`` and ``W_O`` are split on their head axis, ``W_K``/``W_V``/``b_K``/``b_V``
on their key/value-head axis when the model axis divides ``n_kv_heads`` (replicated otherwise: a
grouped-query model with fewer kv heads than model devices keeps every kv head on every device),
``W_in``/``W_gate`` on their columns and ``W_out`` on its rows, the token embedding and the
unembedding on the vocabulary when the model axis divides it; norms, biases of the residual
(``b_O``, ``b_out``), positions and q/k norms are replicated.

A key map (``families/``) turns a Hugging Face state dict into our layout with reshapes,
transposes, basic slices and a stack over layers. Run on ``LazyTensor`` stand-ins for the file's
tensors, it records those steps instead of doing them; a device's shard of one of our parameters is
then read by walking its index back through the steps to the smallest box of the file's tensor that
holds it (``get_slice``), one layer at a time. No host copy of the model (or of a whole sharded
tensor) is ever made.
"""

from __future__ import annotations

import math

import numpy as np
from jax.sharding import PartitionSpec

from ._config import TransformerConfig

MODEL = "model"
_READ_CHUNK = 2**21  # elements of a lazy tensor read at once (its coordinate arrays: 8 bytes x rank each)


def check_model_axis(config: TransformerConfig, model_devices: int) -> None:
    """Refuse a model axis that does not split the query heads (and the MLP width) evenly."""
    if model_devices < 1:
        raise ValueError(f"the model axis needs at least 1 device, got {model_devices}")
    if model_devices == 1:
        return
    sizes = {"query heads": config.n_heads} | ({"d_mlp": config.d_mlp} if config.has_mlp else {})
    bad = {k: v for k, v in sizes.items() if v % model_devices}
    if bad:
        common = math.gcd(*sizes.values())
        fits = [d for d in range(1, common + 1) if common % d == 0]
        raise ValueError(
            f"a model axis of {model_devices} devices must divide the {' and '.join(f'{v} {k}' for k, v in sizes.items())}; "
            f"{', '.join(f'{v} {k}' for k, v in bad.items())} cannot be split evenly: use a model axis of {fits}"
        )


def parameter_specs(config: TransformerConfig, model_devices: int) -> dict[str, PartitionSpec]:
    """Each parameter's ``PartitionSpec`` (names as ``expected_shapes``) for a model axis of this size."""
    from ._loading import expected_shapes

    check_model_axis(config, model_devices)
    kv_split = config.kv_heads % model_devices == 0
    axis = {
        "blocks.attn.W_Q": 1, "blocks.attn.b_Q": 1, "blocks.attn.W_O": 1,
        "blocks.mlp.W_in": 2, "blocks.mlp.W_gate": 2, "blocks.mlp.b_in": 1, "blocks.mlp.b_gate": 1, "blocks.mlp.W_out": 1,
    }
    if kv_split:
        axis |= {"blocks.attn.W_K": 1, "blocks.attn.b_K": 1, "blocks.attn.W_V": 1, "blocks.attn.b_V": 1}
    if config.d_vocab % model_devices == 0:
        axis["embed.W_E"] = 0
    if config.d_vocab_out % model_devices == 0:
        axis |= {"unembed.W_U": 1, "unembed.b_U": 0}
    specs = {}
    for name, shape in expected_shapes(config).items():
        parts = [None] * len(shape)
        if model_devices > 1 and name in axis:
            parts[axis[name]] = MODEL
        specs[name] = PartitionSpec(*parts)
    return specs


def sharded_bytes(config: TransformerConfig, model_devices: int, itemsize: int = 4) -> int:
    """Bytes of the parameters one device holds with the model axis this size."""
    from ._loading import expected_shapes

    specs = parameter_specs(config, model_devices)
    total = 0
    for name, shape in expected_shapes(config).items():
        split = model_devices if MODEL in tuple(specs[name]) else 1
        total += math.prod(shape) // split
    return int(total * itemsize)


# --------------------------------------------------------------------------------------------
# Lazy tensors: a key map's steps recorded, read back one shard at a time


def _slices(index, shape) -> tuple[slice | int, ...]:
    """A basic index (slices, ints, an Ellipsis-free tuple shorter than the rank) as one slice or int per axis."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or any(i is Ellipsis or i is None for i in index):
        raise TypeError(f"a lazy tensor takes only slices and ints, one per axis at most, got {index!r}")
    out = []
    for i, n in zip(index + (slice(None),) * (len(shape) - len(index)), shape):
        if isinstance(i, slice):
            out.append(slice(*i.indices(n)))
        else:
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for an axis of {n}")
            out.append(i % n)
    return tuple(out)


class LazyTensor:
    """A tensor of a safetensors file with the reshapes, transposes and basic slices applied to it
    recorded, not done: ``read(index)`` returns ``self[index]`` (float32, or float64 if stored so)
    reading only the box of the file's tensor that holds it."""

    def __init__(self, file: str, name: str, stored_shape: tuple[int, ...], stored_dtype: str,
                 steps: tuple = (), shape: tuple[int, ...] | None = None):
        self.file, self.name, self.stored_shape, self.stored_dtype = file, name, tuple(stored_shape), stored_dtype
        self.steps = steps
        self.shape = tuple(stored_shape) if shape is None else tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return np.dtype(np.float64) if self.stored_dtype == "F64" else np.dtype(np.float32)

    def _then(self, kind, arg, shape) -> "LazyTensor":
        step = (kind, arg, self.shape, tuple(shape))  # what it does, with its input and output shapes
        return LazyTensor(self.file, self.name, self.stored_shape, self.stored_dtype, self.steps + (step,), shape)

    def reshape(self, *shape) -> "LazyTensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        if math.prod(shape) != math.prod(self.shape) or any(s < 0 for s in shape):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return self._then("reshape", None, shape)

    def transpose(self, *axes) -> "LazyTensor":
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], tuple) else tuple(axes) or tuple(range(self.ndim))[::-1]
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"axes {axes} are not a permutation of {self.ndim} axes")
        return self._then("transpose", axes, tuple(self.shape[a] for a in axes))

    @property
    def T(self) -> "LazyTensor":
        return self.transpose()

    def __getitem__(self, index) -> "LazyTensor":
        index = _slices(index, self.shape)
        shape = tuple(len(range(i.start, i.stop, i.step)) for i in index if isinstance(i, slice))
        return self._then("index", index, shape)

    def __array__(self, dtype=None, copy=None):
        whole = self.read(tuple(slice(None) for _ in self.shape))
        return whole if dtype is None else whole.astype(dtype)

    def read(self, index) -> np.ndarray:
        """``self[index]`` as a numpy array, from the smallest box of the stored tensor that holds it.

        A large part is read in pieces along its first axis (at most ``_READ_CHUNK`` elements each),
        so the coordinate arrays that map it back to the stored tensor stay small."""
        index = _slices(index, self.shape)
        lengths = [len(range(i.start, i.stop, i.step)) if isinstance(i, slice) else 1 for i in index]
        cut = next((a for a, i in enumerate(index) if isinstance(i, slice) and lengths[a] > 1), None)
        if cut is not None and math.prod(lengths) > _READ_CHUNK:
            rows = range(index[cut].start, index[cut].stop, index[cut].step)
            per_piece = max(1, _READ_CHUNK * lengths[cut] // math.prod(lengths))
            pieces = []
            for first in range(0, len(rows), per_piece):
                part = rows[first : first + per_piece]
                sub = index[:cut] + (slice(part.start, part.stop, part.step),) + index[cut + 1 :]
                pieces.append(self.read(sub))
            return np.concatenate(pieces, axis=sum(isinstance(i, slice) for i in index[:cut]))
        coords = list(np.meshgrid(*[np.arange(i.start, i.stop, i.step) if isinstance(i, slice) else np.array([i])
                                    for i in index], indexing="ij"))
        shape_out = tuple(c for c, i in zip(coords[0].shape, index) if isinstance(i, slice))
        for kind, arg, shape_in, shape_step_out in reversed(self.steps):  # output coordinates to the input's
            if kind == "reshape":
                coords = list(np.unravel_index(np.ravel_multi_index(tuple(coords), shape_step_out), shape_in))
            elif kind == "transpose":
                back = [None] * len(arg)
                for out_axis, in_axis in enumerate(arg):
                    back[in_axis] = coords[out_axis]
                coords = back
            else:  # a basic index: ints drop an axis, slices are affine
                it = iter(coords)
                coords = [np.full(coords[0].shape, i) if not isinstance(i, slice) else i.start + i.step * next(it)
                          for i in arg]
        lo = [int(c.min()) for c in coords]
        hi = [int(c.max()) + 1 for c in coords]
        box = self._read_box(tuple(slice(a, b) for a, b in zip(lo, hi)))
        from ._loading import check_finite

        check_finite(self.name, box, f" in {self.file}")
        return box[tuple(c - a for c, a in zip(coords, lo))].reshape(shape_out)

    def _read_box(self, box: tuple[slice, ...]) -> np.ndarray:
        from safetensors import safe_open

        if self.stored_dtype == "BF16":  # no numpy bfloat16 in safetensors' numpy reader
            import jax.numpy as jnp

            with safe_open(self.file, framework="flax") as f:
                return np.asarray(f.get_slice(self.name)[box].astype(jnp.float32))
        with safe_open(self.file, framework="numpy") as f:
            part = f.get_slice(self.name)[box]
        return np.asarray(part) if part.dtype == np.float64 else np.asarray(part, np.float32)


class LazyStack:
    """Per-layer tensors (lazy or not) stacked on a new leading axis, read one layer at a time."""

    def __init__(self, layers: list):
        self.layers = layers
        self.shape = (len(layers),) + tuple(layers[0].shape)
        self.dtype = np.dtype(np.float32)

    def read(self, index) -> np.ndarray:
        index = _slices(index, self.shape)
        rows = range(index[0].start, index[0].stop, index[0].step) if isinstance(index[0], slice) else [index[0]]
        parts = [read_part(self.layers[i], index[1:]) for i in rows]
        return np.stack(parts) if isinstance(index[0], slice) else parts[0]


def read_part(value, index) -> np.ndarray:
    """``value[index]`` of a lazy tensor, a lazy stack or a numpy array."""
    return value.read(index) if isinstance(value, (LazyTensor, LazyStack)) else np.asarray(value)[tuple(index)]


def lazy_safetensors(file) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a ``LazyTensor`` (only the header is read)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(file), framework="numpy") as f:
        for name in f.keys():
            part = f.get_slice(name)
            out[name] = LazyTensor(str(file), name, tuple(part.get_shape()), part.get_dtype())
    return out


def leaf_name(path) -> str:
    """A parameter's name in our naming (``blocks.attn.W_Q``) from its pytree path."""
    return ".".join(str(getattr(p, "name", getattr(p, "key", p))) for p in path)


def shard_model(model, mesh):
    """The model with every parameter placed on ``mesh`` as ``parameter_specs`` says (split over the
    mesh's ``model`` axis, replicated over its other axes)."""
    import jax
    from jax.sharding import NamedSharding

    import dataclasses

    specs = parameter_specs(model.config, dict(mesh.shape).get(MODEL, 1))
    placed = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.device_put(leaf, NamedSharding(mesh, specs[leaf_name(path)])), model)
    return dataclasses.replace(placed, mesh=mesh)
