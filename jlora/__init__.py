"""jlora: LoRA as a pure, functional transform on JAX parameter pytrees.

>>> import jax.numpy as jnp, jlora
>>> params = {"attn": {"q_proj": {"kernel": jnp.ones((8, 16))}}}
>>> lora_params = jlora.apply(params, rank=4)
>>> jlora.count(lora_params).trainable
96
"""

from jlora._src.apply import apply
from jlora._src.checkpoint import CheckpointManager, Restored, read_metadata, restore, save
from jlora._src.leaf import LoRA, Trainable, is_lora
from jlora._src.optim import TrainStep, optimizer, train_step
from jlora._src.peft import export_merged, export_peft, import_peft, llama_key_map
from jlora._src.sharding import (
    ShardedTrainStep,
    abstract,
    partition_specs,
    path_specs,
    sharded_train_step,
    shardings,
    state_shardings,
)
from jlora._src.transform import MaterializeWarning, lora
from jlora._src.tree import Count, Split, base, combine, count, merge, split, summary

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "Count",
    "LoRA",
    "MaterializeWarning",
    "Restored",
    "ShardedTrainStep",
    "Split",
    "TrainStep",
    "Trainable",
    "abstract",
    "apply",
    "base",
    "combine",
    "count",
    "export_merged",
    "export_peft",
    "import_peft",
    "is_lora",
    "llama_key_map",
    "lora",
    "merge",
    "optimizer",
    "partition_specs",
    "path_specs",
    "read_metadata",
    "restore",
    "save",
    "sharded_train_step",
    "shardings",
    "split",
    "state_shardings",
    "summary",
    "train_step",
]
