"""Shardings of jlora trees on a device mesh: adapters follow their weights.

A `LoRA` leaf's adapters take their layout from the frozen weight `w`: `a`
gets `w`'s partition-spec entries for the stack axes and the A axes (`a_axes`)
and an unsharded rank axis, `b` the entries for the stack axes, an unsharded
rank axis, then the B axes. For a `(fsdp, tensor)`-sharded `(in, out)` kernel::

    w  P('fsdp', 'tensor')     (in, out)
    a  P('fsdp', None)         (in, r)
    b  P(None, 'tensor')       (r, out)

so the adapter branch `(x @ a) @ b` runs on the shards of `x` and of the output
that the base matmul `x @ w` already uses, and the adapters' gradients are
reduced across the axes that `w`'s would be, at adapter size.

Where a weight's layout comes from, first match wins:

1. the array itself: a `jax.Array` or `jax.ShapeDtypeStruct` with a
   `NamedSharding` (what `jax.device_put`, `jax.jit(..., out_shardings=...)`
   and `jax.eval_shape` of sharded inputs give);
2. Flax metadata around it: Linen `nn.Partitioned` / `nn.LogicallyPartitioned`
   boxes (logical names resolved with `rules`, the box's own rules, or the
   active `nn.logical_axis_rules`), NNX variables with `out_sharding`
   metadata (`nnx.with_partitioning`);
3. `base=`: a tree of `PartitionSpec`/`NamedSharding` for the base
   parameters, e.g. `nn.get_partition_spec(abstract_variables)["params"]` or
   `jlora.sharding.path_specs(params, rules)`;
4. otherwise the leaf is replicated (`P()`).

Multi-host (TPU pods, several GPU hosts): call
`jax.distributed.initialize()` first on every process (no arguments on Cloud
TPU and under SLURM/Open MPI; else `coordinator_address`, `num_processes`,
`process_id`), then build one global `Mesh` over `jax.devices()` and run the
same program everywhere. When a weight's mesh spans several hosts,
`jlora.apply` creates its adapters under `jax.jit` with the derived
`out_shardings`, so every process holds only its own shards; feed each process's slice of the
batch with `jax.make_array_from_process_local_data(batch_sharding, local)`.
A Colab or Kaggle TPU v2/v3-8 is one host with 8 devices: a mesh such as
`jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))` works as is there.

`partition_specs` and `shardings` lay out a jlora tree (`adapter_specs` is the
rule for one weight), `state_shardings` an optimizer state over it (with
`optax.tree_map_params`), `path_specs` gives specs by path to a tree without
sharding metadata, and `abstract` makes restore targets. `jlora.train_step(...,
mesh=mesh)` uses them all.
"""

from jlora._src.optim import state_shardings
from jlora._src.specs import abstract, adapter_specs, partition_specs, path_specs, shardings

__all__ = [
    "abstract",
    "adapter_specs",
    "partition_specs",
    "path_specs",
    "shardings",
    "state_shardings",
]
