"""Optimizers that train only the adapters, and a jitted, donating train step."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax

from jlora._src.leaf import LoRA, Trainable, is_node
from jlora._src.tree import combine, split

TRAIN, FREEZE = "train", "freeze"


def labels(tree: Any) -> Any:
  """`"train"`/`"freeze"` per array leaf of a jlora tree (`None` holes stay `None`)."""
  def lab(x):
    if isinstance(x, LoRA):
      return LoRA(None if x.w is None else FREEZE, None if x.a is None else TRAIN,
                  None if x.b is None else TRAIN, x.alpha, x.a_axes, x.stack, x.rslora)
    if isinstance(x, Trainable):
      return Trainable(None if x.value is None else TRAIN)
    return None if x is None else FREEZE

  return jax.tree_util.tree_map(lab, tree, is_leaf=lambda x: x is None or is_node(x))


def _require_trainable(tree, who: str) -> None:
  """Raises unless `tree` holds a `LoRA` or `Trainable` leaf; `who` names the caller."""
  if not any(isinstance(x, (LoRA, Trainable))
             for x in jax.tree_util.tree_leaves(tree, is_leaf=is_node)):
    raise ValueError(
        f"{who}: the tree holds no jlora.LoRA or jlora.Trainable leaf, so there is nothing to "
        f"train. Call jlora.apply(params, ...) first.")


def optimizer(tx: optax.GradientTransformation, tree: Any = None) -> optax.GradientTransformation:
  """Wraps `tx` so it updates only adapters (`a`, `b`) and `Trainable` leaves.

  Frozen leaves (every `LoRA.w` and every plain leaf) get a zero update and **no**
  optimizer state: the state of Adam over a LoRA tree holds adapter-sized
  moments only. The transformation accepts the whole jlora tree or just its
  trainable half (`jlora.split(tree).trainable`). Built on
  `optax.multi_transform` with `optax.set_to_zero()` for the frozen label (never
  `optax.masked`, which lets masked-out gradients through).

  Note: `optax.apply_updates(tree, updates)` adds the zero update to frozen
  weights, which leaves every value unchanged but turns a `-0.0` into `0.0`;
  `jlora.train_step` never touches the frozen half at all.

  Args:
    tx: any optax transformation.
    tree: optionally, the jlora tree to be trained, checked to hold adapters.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> opt = jlora.optimizer(optax.adam(1e-3), t)
    >>> state = opt.init(t)
    >>> sum(x.size for x in jax.tree.leaves(state))  # moments of a and b only (+ count)
    41
  """
  if tree is not None:
    _require_trainable(tree, "jlora.optimizer")
  return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)


def update(loss_fn, tx, has_aux, trainable, opt_state, frozen, args, kwargs):
  """One optimizer step on the trainable half: `(trainable, opt_state, loss[, aux])`.

  The frozen half enters the loss as a constant, so no gradient is taken for it.
  """
  def loss_of(t):
    return loss_fn(combine(t, frozen), *args, **kwargs)

  out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  return (trainable, opt_state, *(out if has_aux else (out,)))


class TrainStep:
  """A jit-compiled step that differentiates only the trainable half.

  `step = jlora.train_step(loss_fn, tx)`; `opt_state = step.init(tree)`;
  `tree, opt_state, loss = step(tree, opt_state, *batch)`. `loss_fn(tree,
  *batch)` receives the whole jlora tree (use `jlora.lora(model.apply)` inside
  it for the factored path). The frozen half is closed over as a constant of
  the gradient, so no full-weight gradient is requested. The trainable half
  and the optimizer state are donated; the frozen half is neither donated nor
  returned by the compiled step: the new tree holds the very same frozen
  arrays, so the `params` given to `jlora.apply` stay valid.
  """

  def __init__(self, loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
               has_aux: bool = False, donate: bool = True):
    self.loss_fn = loss_fn
    self.tx = optimizer(tx)
    self.has_aux = has_aux
    self._step = jax.jit(self._impl, donate_argnums=(0, 1) if donate else ())
    functools.update_wrapper(self, loss_fn, updated=())

  def init(self, tree: Any) -> Any:
    _require_trainable(tree, "jlora.train_step")
    return self.tx.init(split(tree).trainable)

  def _impl(self, trainable, opt_state, frozen, /, *args, **kwargs):
    return update(self.loss_fn, self.tx, self.has_aux, trainable, opt_state, frozen, args, kwargs)

  def __call__(self, tree, opt_state, *args, **kwargs):
    trainable, frozen = split(tree)
    trainable, opt_state, *out = self._step(trainable, opt_state, frozen, *args, **kwargs)
    return (combine(trainable, frozen), opt_state, *out)

  def lower(self, tree, opt_state, *args, **kwargs):
    trainable, frozen = split(tree)
    return self._step.lower(trainable, opt_state, frozen, *args, **kwargs)


def train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
               has_aux: bool = False, donate: bool = True) -> TrainStep:
  """Builds a jitted LoRA train step: only adapters are differentiated and updated.

  Args:
    loss_fn: `loss_fn(tree, *batch) -> loss` (or `(loss, aux)` with
      `has_aux=True`), taking the whole jlora tree.
    tx: an optax transformation; it is wrapped with `jlora.optimizer`.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    donate: donate the buffers of the trainable half of the tree (adapters,
      `Trainable` values) and of the optimizer state (default True). Frozen
      weights are never donated.

  Returns:
    A `TrainStep`: `step.init(tree) -> opt_state` and
    `step(tree, opt_state, *batch) -> (tree, opt_state, loss[, aux])`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> x = jax.random.normal(jax.random.key(1), (8, 4))
    >>> t = jlora.apply({"q_proj": jax.random.normal(jax.random.key(2), (4, 6))}, rank=2)
    >>> loss = lambda p, x: jnp.mean((x @ jlora.merge(p)["q_proj"] - 1.0) ** 2)
    >>> step = jlora.train_step(loss, optax.adam(1e-2))
    >>> state = step.init(t)
    >>> t, state, l0 = step(t, state, x)
    >>> t, state, l1 = step(t, state, x)
    >>> bool(l1 < l0)
    True
  """
  return TrainStep(loss_fn, tx, has_aux=has_aux, donate=donate)
