"""Logical axis names -> device mesh: the rules, the mesh, and shardings for model state and batches.

Every parameter carries logical axis names in its `out_sharding` metadata (e.g. ('embed', 'mlp')) and
the model constrains its activations with logical names too (('batch', 'length', 'embed')). Rules map
each logical name to mesh axes of a 3-axis mesh:

| mesh axis | parallelism                                                               |
|-----------|---------------------------------------------------------------------------|
| `data`    | pure data parallel: batch split, parameters replicated                    |
| `fsdp`    | data parallel with parameters (and optimizer state) split along `embed`   |
| `tensor`  | tensor (model) parallel: heads, MLP hidden units and vocabulary split     |

A logical name may map to nothing (replicated), one mesh axis or a tuple of them. Resolution goes
left to right over an array's logical axes and, like linen's `logical_to_mesh_axes`, skips a mesh
axis that an earlier dimension of the same array already uses: so with the default rules a param
('embed', 'mlp') becomes P('fsdp', 'tensor') while the activation ('batch', 'length', 'embed')
becomes P(('data', 'fsdp'), None, None), from one table. A mesh axis is also dropped for a
dimension it does not divide (e.g. a vocabulary of 21773 ids on tensor=2), which replicates that
dimension instead of failing: jit requires even shardings of its inputs and outputs.

Meshes are built with `AxisType.Auto` axes (this JAX defaults to Explicit, under which GSPMD-style
constraints turn into asserts) and work for any device count, including a single CPU device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# A rule maps one logical axis name to None, a mesh axis name or a tuple of mesh axis names.
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),  # B: examples of the global batch
    ("length", None),  # T: sequence positions (no sequence parallelism)
    ("embed", "fsdp"),  # D: model width; FSDP splits parameters along it
    ("heads", "tensor"),  # N: attention heads
    ("kv", None),  # H: width of one head
    ("mlp", "tensor"),  # F: MLP hidden units
    ("vocab", "tensor"),  # V: token ids (embedding rows, logits)
    ("layers", None),  # L: stacked (scanned) layers
    ("table", None),  # rows of the positional / timing / chord / part / countdown tables
)


def _as_tuple(target) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: LogicalRules = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axis names.

    Args:
      logical_axes: one logical name (or None) per dimension.
      rules: (logical name, mesh axes) pairs; a name may appear more than once, the first usable
        entry wins. Names without a rule are replicated.
      shape: the array's shape; with `mesh_shape`, mesh axes that do not divide a dimension are dropped.
      mesh_shape: mesh axis name -> size (`dict(mesh.shape)`); axes absent from it are dropped.
    Returns:
      The PartitionSpec, one entry per dimension.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        chosen = None
        for rule_name, target in rules:
            if rule_name != name:
                continue
            axes = _as_tuple(target)
            if mesh_shape is not None:
                axes = tuple(a for a in axes if a in mesh_shape)
            if used.intersection(axes):
                continue
            if shape is not None and mesh_shape is not None:
                # Keep the longest prefix of mesh axes whose product divides the dimension.
                while axes and shape[dim] % math.prod(mesh_shape[a] for a in axes):
                    axes = axes[:-1]
            if not axes:
                continue
            chosen = axes
            break
        if not chosen:
            spec.append(None)
            continue
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh of Auto axes over `devices` (default: all devices).

    One size may be -1: it takes whatever the others leave. The product must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def mesh_from_config(mesh_config: Mapping[str, Any] | Any, *, devices=None) -> Mesh:
    """Mesh from a config section with `data`, `fsdp` and `tensor` sizes (a ConfigDict or mapping)."""
    get = mesh_config.get if hasattr(mesh_config, "get") else lambda k, d: getattr(mesh_config, k, d)
    return make_mesh(get("data", -1), get("fsdp", 1), get("tensor", 1), devices=devices)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES, shape=None
) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` with the given logical axes."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape=shape, mesh_shape=dict(mesh.shape)))


def data_sharding(
    mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, batch_size: int | None = None
) -> NamedSharding:
    """Sharding of a [B, T] batch (tokens, features, targets): B split over the batch rule's axes."""
    shape = None if batch_size is None else (batch_size, 1)
    return named_sharding(mesh, ("batch", "length"), rules, shape)


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES
) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context.

    The mesh comes from `jax.set_mesh(...)` (the abstract mesh seen while tracing), so the model code
    stays mesh-agnostic and also runs eagerly on one device without any context.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, shape=x.shape, mesh_shape=dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def _variable_spec(variable: nnx.Variable, rules: LogicalRules, mesh_shape) -> PartitionSpec:
    value = variable.get_value()
    logical = variable.get_metadata().get("out_sharding")
    if not logical:
        return PartitionSpec()
    return logical_to_spec(logical, rules, shape=value.shape, mesh_shape=mesh_shape)


def state_shardings(state, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """NamedShardings for an (abstract or concrete) nnx State, from each Variable's logical axes.

    Returns a tree of the state's structure (Variables holding NamedShardings), usable as
    `jax.jit(..., out_shardings=...)` for a function returning that state.
    """
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, _variable_spec(v, rules, mesh_shape))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def abstract_with_shardings(state, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """The state's arrays as ShapeDtypeStructs carrying their target shardings (e.g. restore targets)."""
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
