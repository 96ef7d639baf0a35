"""Optimizers that train only the adapters, and a jitted, donating train step."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jlora._src import paths as P
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


# --------------------------------------------------------------------------- checks


def _trainable_values(tree):
  """`(path, value)` of every trainable value: each `LoRA`'s `a` and `b`, each `Trainable`'s."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
    ps = P.path_str(path)
    if isinstance(x, LoRA):
      for name in ("a", "b"):
        v = getattr(x, name)
        if v is not None:
          yield f"{ps}/{name}", v
    elif isinstance(x, Trainable) and x.value is not None:
      yield ps, x.value


def check_trainable_dtypes(tree: Any, who: str) -> None:
  """Raises naming the first trainable value of `tree` that is not floating-point (or complex)."""
  for ps, v in _trainable_values(tree):
    dt = jnp.result_type(v)
    if not jnp.issubdtype(dt, jnp.inexact):
      raise ValueError(
          f"{who}: the trainable leaf at {ps!r} has dtype {dt}, and only floating-point (or "
          f"complex) arrays can be trained: a gradient step needs real values. Leave it out of "
          f"`trainable=` in jlora.apply (a narrower pattern), or make it a float array.")


def require_trainable(tree: Any, who: str) -> None:
  """Raises unless `tree` holds a `LoRA` or `Trainable` leaf, all of them of float dtypes;
  `who` names the caller."""
  if not any(isinstance(x, (LoRA, Trainable))
             for x in jax.tree_util.tree_leaves(tree, is_leaf=is_node)):
    raise ValueError(
        f"{who}: the tree holds no jlora.LoRA or jlora.Trainable leaf, so there is nothing to "
        f"train. Call jlora.apply(params, ...) first.")
  check_trainable_dtypes(tree, who)


def describe(x: Any) -> str:
  """A short description of a pytree node or leaf, for error messages."""
  if x is None:
    return "None (no value)"
  if isinstance(x, LoRA):
    return (f"a LoRA leaf (alpha={x.alpha}, a_axes={x.a_axes}, stack={x.stack}, "
            f"rslora={x.rslora})")
  if isinstance(x, Trainable):
    return "a Trainable leaf"
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"an array {x.dtype}{list(x.shape)}"
  if isinstance(x, Mapping):
    keys = sorted(map(str, x))
    return f"a {type(x).__name__} with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
  return f"a {type(x).__name__}"


def structure_difference(got: Any, want: Any) -> tuple[str, str, str] | None:
  """Where two pytrees first differ in structure: `(path, got's node, want's node)`, or None.

  The path is '/'-joined (`''` for the root); the nodes are described in words (see
  `describe`); a key present on one side only is described as `"nothing"` on the other.
  Node types and static metadata (a `LoRA`'s alpha, a_axes, ...) count; leaf values do not.
  """
  def level(x):
    return jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)

  def walk(path, a, b):
    ka, da = level(a)
    kb, db = level(b)
    if da == db:
      if jax.tree_util.treedef_is_leaf(da):
        return None
      for (k, x), (_, y) in zip(ka, kb):
        found = walk(path + tuple(k), x, y)
        if found is not None:
          return found
      return None
    if type(a) is type(b) and ka and kb:
      keys_a, keys_b = [k for k, _ in ka], [k for k, _ in kb]
      only_a = [(k, x) for k, x in ka if k not in keys_b]
      only_b = [(k, y) for k, y in kb if k not in keys_a]
      if only_a:
        return P.path_str(path + tuple(only_a[0][0])), describe(only_a[0][1]), "nothing"
      if only_b:
        return P.path_str(path + tuple(only_b[0][0])), "nothing", describe(only_b[0][1])
    return P.path_str(path), describe(a), describe(b)

  return walk((), got, want)


def _node_paths(tree) -> set[tuple[str, ...]]:
  """Every path of `tree` that leads to a node or a leaf, as tuples of key strings."""
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]:
    keys = tuple(P.key_str(k) for k in path)
    out.update(keys[:i] for i in range(1, len(keys) + 1))
  return out


def state_mismatch(tx: optax.GradientTransformation, opt_state: Any, trainable: Any,
                   who: str) -> ValueError | None:
  """An error naming where `opt_state` differs from `tx.init(trainable)`'s structure, or None."""
  want = jax.eval_shape(tx.init, trainable)
  diff = structure_difference(opt_state, want)
  if diff is None:
    return None
  path, got_node, want_node = diff
  keys = tuple(path.split("/")) if path else ()
  nodes = _node_paths(trainable)
  tree_path = next(("/".join(keys[k:]) for k in range(1, len(keys)) if keys[k:] in nodes), None)
  where = (f"{tree_path!r} (state path {path!r})" if tree_path else
           f"state path {path!r}" if path else "the root of the state")
  return ValueError(
      f"{who}: the optimizer state does not fit the tree: at {where} the state holds "
      f"{got_node} where this tree needs {want_node}. Make the state for the tree you step, "
      f"opt_state = step.init(tree), again whenever the tree's structure changes (adapters "
      f"added or removed); a plain optax state (tx.init(tree)) does not fit either: it would "
      f"hold moments for every frozen weight.")


# --------------------------------------------------------------------------- donation


def _is_buffer(x) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def unalias(trainable: Any, opt_state: Any, frozen: Any, batch: Any, who: str):
  """`(trainable, opt_state)` with a fresh copy of each array that would be donated twice.

  The step donates the trainable half and the optimizer state, so an array may appear in
  them only once, and not in the frozen half or the batch (which stay valid). Tied
  weights (one array at two paths of the tree) and optimizer states that keep the
  parameters themselves break that rule; each repeat is copied instead (the first
  occurrence is donated), and a tie within the tree is reported with a warning, since
  the paths are trained as separate weights from then on.
  """
  t_leaves, t_def = jax.tree_util.tree_flatten(trainable)
  s_leaves, s_def = jax.tree_util.tree_flatten(opt_state)
  f_leaves = jax.tree_util.tree_leaves(frozen)
  b_leaves = jax.tree_util.tree_leaves(batch)
  ids = [*map(id, t_leaves), *map(id, s_leaves), *map(id, f_leaves), *map(id, b_leaves)]
  if len(set(ids)) == len(ids):  # the usual case: every leaf is an object of its own
    return trainable, opt_state
  tree_ids = {id(x) for x in f_leaves if _is_buffer(x)}
  seen = tree_ids | {id(x) for x in b_leaves if _is_buffer(x)}
  tied, copied = [], [False, False]
  for n, (leaves, in_tree) in enumerate(((t_leaves, True), (s_leaves, False))):
    for i, x in enumerate(leaves):
      if not _is_buffer(x):
        continue
      if id(x) in seen:
        if in_tree and id(x) in tree_ids:
          tied.append(x)
        leaves[i] = jax.device_put(x, x.sharding, may_alias=False)
        copied[n] = True
      else:
        seen.add(id(x))
        if in_tree:
          tree_ids.add(id(x))
  if tied:
    _warn_tied(tied, trainable, frozen, who)
  if copied[0]:
    trainable = jax.tree_util.tree_unflatten(t_def, t_leaves)
  if copied[1]:
    opt_state = jax.tree_util.tree_unflatten(s_def, s_leaves)
  return trainable, opt_state


def _warn_tied(tied, trainable, frozen, who):
  def paths_of(tree, x):
    return [P.path_str(p) for p, y in jax.tree_util.tree_flatten_with_path(tree)[0] if y is x]

  for x in {id(x): x for x in tied}.values():
    trained = paths_of(trainable, x)
    everywhere = sorted(trained + paths_of(frozen, x))
    warnings.warn(
        f"{who}: one array is at {' and '.join(map(repr, everywhere))} (tied weights), and it "
        f"is trained at {' and '.join(map(repr, trained))}. In a jlora tree each path is a "
        f"weight of its own: the step trains a copy (a buffer cannot be donated twice), and "
        f"the paths part ways from this step on. To train one tied weight, keep it at one path "
        f"and have the model read that path for both uses (as Flax's nn.Embed.attend does), or "
        f"leave every path of it frozen.", UserWarning, stacklevel=4)


# --------------------------------------------------------------------------- optimizer, step


def optimizer(tx: optax.GradientTransformation, tree: Any = None) -> optax.GradientTransformation:
  """Wraps `tx` so it updates only adapters (`a`, `b`) and `Trainable` leaves.

  Frozen leaves (every `LoRA.w` and every plain leaf) get a zero update and **no**
  optimizer state: the state of Adam over a LoRA tree holds adapter-sized
  moments only. The transformation accepts the whole jlora tree or just its
  trainable half (`jlora.split(tree).trainable`); which leaves train is read
  from each tree it is given, so `tree` is optional. Built on
  `optax.multi_transform` with `optax.set_to_zero()` for the frozen label (never
  `optax.masked`, which lets masked-out gradients through).

  Warning:
    A plain optax optimizer over a jlora tree (`optax.adam(lr).init(tree)`,
    then `tx.update(jax.grad(loss)(tree), ...)`) trains every `w` too, with
    `w`-sized moments: `LoRA.w` is an ordinary pytree child, and `jax.grad`
    differentiates it like any other. Wrap the optimizer with
    `jlora.optimizer(tx)`, or use `jlora.train_step`, which does both (only the
    trainable half is differentiated).

  Note: `optax.apply_updates(tree, updates)` adds the zero update to frozen
  weights, which leaves every value unchanged but turns a `-0.0` into `0.0`;
  `jlora.train_step` never touches the frozen half at all.

  Args:
    tx: any optax transformation.
    tree: optionally, the jlora tree to be trained, checked to hold adapters
      (and only floating-point trainable leaves).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> opt = jlora.optimizer(optax.adam(1e-3), t)
    >>> state = opt.init(t)
    >>> sum(x.size for x in jax.tree.leaves(state))  # moments of a and b only (+ count)
    41
  """
  if tree is not None:
    require_trainable(tree, "jlora.optimizer")
  return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)


def update(loss_fn, tx, has_aux, trainable, opt_state, frozen, args, kwargs,
           who: str = "jlora.train_step"):
  """One optimizer step on the trainable half: `(trainable, opt_state, loss[, aux])`.

  The frozen half enters the loss as a constant, so no gradient is taken for it. Runs
  under `jax.jit`: the checks here (dtypes, the state's structure) cost nothing per step.
  """
  check_trainable_dtypes(trainable, who)

  def loss_of(t):
    return loss_fn(combine(t, frozen), *args, **kwargs)

  out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(trainable)
  try:
    updates, opt_state = tx.update(grads, opt_state, trainable)
  except Exception as e:  # a state made for another tree: say where, else re-raise as is
    try:
      mismatch = state_mismatch(tx, opt_state, trainable, who)
    except Exception:  # the diagnosis itself failed: the original error says more
      mismatch = None
    if mismatch is None:
      raise
    raise mismatch from e
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
  arrays, so the `params` given to `jlora.apply` stay valid. An array that
  would be donated twice (tied weights: one array at two paths, trainable at
  one of them at least) is copied first, with a warning.
  """

  def __init__(self, loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
               has_aux: bool = False, donate: bool = True):
    self.loss_fn = loss_fn
    self.tx = optimizer(tx)
    self.has_aux = has_aux
    self.donate = donate
    self._step = jax.jit(self._impl, donate_argnums=(0, 1) if donate else ())
    functools.update_wrapper(self, loss_fn, updated=())

  def init(self, tree: Any) -> Any:
    require_trainable(tree, "jlora.train_step")
    return self.tx.init(split(tree).trainable)

  def _impl(self, trainable, opt_state, frozen, /, *args, **kwargs):
    return update(self.loss_fn, self.tx, self.has_aux, trainable, opt_state, frozen, args, kwargs)

  def __call__(self, tree, opt_state, *args, **kwargs):
    trainable, frozen = split(tree)
    if self.donate:
      trainable, opt_state = unalias(trainable, opt_state, frozen, (args, kwargs),
                                     "jlora.train_step")
    trainable, opt_state, *out = self._step(trainable, opt_state, frozen, *args, **kwargs)
    return (combine(trainable, frozen), opt_state, *out)

  def lower(self, tree, opt_state, *args, **kwargs):
    trainable, frozen = split(tree)
    return self._step.lower(trainable, opt_state, frozen, *args, **kwargs)


def train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
               has_aux: bool = False, donate: bool = True) -> TrainStep:
  """Builds a jitted LoRA train step: only adapters are differentiated and updated.

  This (or `jlora.optimizer`) is the way to train a jlora tree: a plain optax
  optimizer over the whole tree would train every frozen `w` as well.

  Args:
    loss_fn: `loss_fn(tree, *batch) -> loss` (or `(loss, aux)` with
      `has_aux=True`), taking the whole jlora tree.
    tx: an optax transformation; it is wrapped with `jlora.optimizer`.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    donate: donate the buffers of the trainable half of the tree (adapters,
      `Trainable` values) and of the optimizer state (default True). Frozen
      weights are never donated; an array found twice among the donated ones,
      or also in the frozen half or the batch, is copied first.

  Returns:
    A `TrainStep`: `step.init(tree) -> opt_state` and
    `step(tree, opt_state, *batch) -> (tree, opt_state, loss[, aux])`. The
    state must be made by `step.init` for a tree of the same structure (the
    step says where they differ otherwise).

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
