"""jlora: LoRA as a pure, functional transform on JAX parameter pytrees.

>>> import jax.numpy as jnp, jlora
>>> params = {"attn": {"q_proj": {"kernel": jnp.ones((8, 16))}}}
>>> lora_params = jlora.apply(params, rank=4)
>>> jlora.count(lora_params).trainable
96
"""

from jlora._src.apply import apply
from jlora._src.leaf import LoRA, Trainable, is_lora
from jlora._src.optim import TrainStep, optimizer, train_step
from jlora._src.transform import MaterializeWarning, lora
from jlora._src.tree import Count, Split, base, combine, count, merge, split, summary

__version__ = "0.1.0"

__all__ = [
    "Count",
    "LoRA",
    "MaterializeWarning",
    "Split",
    "TrainStep",
    "Trainable",
    "apply",
    "base",
    "combine",
    "count",
    "is_lora",
    "lora",
    "merge",
    "optimizer",
    "split",
    "summary",
    "train_step",
]
