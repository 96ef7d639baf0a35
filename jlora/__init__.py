"""jlora: LoRA as a pure, functional transform on JAX parameter pytrees.

The core is at the root: `apply` adapts a parameter tree, `lora` runs a function
with the adapters kept factored, `train_step`/`optimizer` train them,
`merge`/`split`/`combine`/`base` reshape the tree, `save`/`restore` checkpoint it.
Beside it: `jlora.sharding` (layouts on a device mesh), `jlora.hf` (Hugging Face
PEFT adapters and merged safetensors) and `jlora.keras` (Keras models; import it
explicitly).

>>> import jax.numpy as jnp, jlora
>>> params = {"attn": {"q_proj": {"kernel": jnp.ones((8, 16))}}}
>>> lora_params = jlora.apply(params, rank=4)
>>> jlora.count(lora_params).trainable
96
"""

from jlora import hf, sharding
from jlora._src.apply import apply, quantize
from jlora._src.checkpoint import CheckpointManager, Restored, read_metadata, restore, save
from jlora._src.leaf import LoRA, LoRAStack, Trainable, is_lora
from jlora._src.multi import select, stack, unstack
from jlora._src.optim import TrainStep, lora_plus, optimizer, train_step
from jlora._src.qarray import Quantized
from jlora._src.transform import MaterializeWarning, lora
from jlora._src.tree import Count, Split, base, combine, count, merge, split, summary
from jlora._src.version import VERSION as __version__  # noqa: F401

__all__ = [
    "CheckpointManager",
    "Count",
    "LoRA",
    "LoRAStack",
    "MaterializeWarning",
    "Quantized",
    "Restored",
    "Split",
    "TrainStep",
    "Trainable",
    "apply",
    "base",
    "combine",
    "count",
    "hf",
    "is_lora",
    "lora",
    "lora_plus",
    "merge",
    "optimizer",
    "quantize",
    "read_metadata",
    "restore",
    "save",
    "select",
    "sharding",
    "split",
    "stack",
    "summary",
    "train_step",
    "unstack",
]
