"""Optimizers that train only the adapters, and a jitted, donating train step (on a mesh too)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora._src import paths as P
from jlora._src.leaf import LoRA, LoRAStack, Trainable, is_node
from jlora._src.qarray import Quantized
from jlora._src.specs import tree_shardings
from jlora._src.tree import combine, split

TRAIN, FREEZE = "train", "freeze"


def labels(tree: Any) -> Any:
  """`"train"`/`"freeze"` per array leaf of a jlora tree (`None` holes stay `None`)."""
  def frozen(v):  # a quantized weight is a node of several arrays, each frozen
    if v is None:
      return None
    return jax.tree_util.tree_map(lambda _: FREEZE, v) if isinstance(v, Quantized) else FREEZE

  def lab(x):
    if isinstance(x, Quantized):
      return frozen(x)
    if isinstance(x, LoRAStack):
      f = lambda v: None if v is None else FREEZE
      return dataclasses.replace(x, w=frozen(x.w), a=None if x.a is None else TRAIN,
                                 b=None if x.b is None else TRAIN, alphas=f(x.alphas),
                                 ranks=f(x.ranks), ids=f(x.ids))
    if isinstance(x, LoRA):
      return dataclasses.replace(x, w=frozen(x.w),
                                 a=None if x.a is None else TRAIN,
                                 b=None if x.b is None else TRAIN,
                                 m=None if x.m is None else TRAIN)
    if isinstance(x, Trainable):
      return Trainable(None if x.value is None else TRAIN)
    return None if x is None else FREEZE

  return jax.tree_util.tree_map(lab, tree, is_leaf=lambda x: x is None or is_node(x))


# --------------------------------------------------------------------------- checks


def _trainable_values(tree):
  """`(path, value)` of every trainable value: each `LoRA`'s `a` and `b`, each `Trainable`'s."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
    ps = P.path_str(path)
    if isinstance(x, (LoRA, LoRAStack)):
      for name in ("a", "b", "m"):
        v = getattr(x, name, None)
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
  if not any(isinstance(x, (LoRA, LoRAStack, Trainable))
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
  `optax.partition` with `optax.set_to_zero()` for the frozen label (never
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
  return optax.partition({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)



def lora_plus(ratio: float = 16.0) -> optax.GradientTransformation:
  """LoRA+: multiplies the updates of every `LoRA.b` (and nothing else) by `ratio`.

  Chained after an optimizer whose update is proportional to its learning rate
  (SGD, Adam, AdamW with its decoupled weight decay, any schedule), it trains
  `b` with learning rate `ratio·lr` and everything else with `lr`: LoRA+
  (Hayou et al., 2024; PEFT's `create_loraplus_optimizer`, `loraplus_lr_ratio`;
  PEFT also gives 1-D parameters such as DoRA's magnitude the higher rate,
  this gives it to `b` only). It keeps no state; wrap the chain in
  `jlora.optimizer` (or pass it to `jlora.train_step`, which does), so frozen
  weights still get no update and no state.

  Args:
    ratio: the learning-rate ratio of `b` to `a` (the paper suggests 2**4).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> tx = jlora.optimizer(optax.chain(optax.sgd(0.1), jlora.lora_plus(16.0)))
    >>> g = jax.tree.map(jnp.ones_like, t)
    >>> u, _ = tx.update(g, tx.init(t), t)
    >>> [round(float(getattr(u["q_proj"], n)[0, 0]), 4) for n in ("a", "b", "w")]
    [-0.1, -1.6, 0.0]
  """
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
    raise TypeError(f"jlora.lora_plus: ratio={ratio!r} must be a finite number, e.g. 16.0.")

  def scale_b(x):
    if isinstance(x, LoRA) and x.b is not None and hasattr(x.b, "shape"):
      return dataclasses.replace(x, b=x.b * jnp.asarray(ratio, x.b.dtype))
    return x

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(scale_b, updates, is_leaf=is_node), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --------------------------------------------------------------------------- state layout


def _hole(x) -> bool:
  """A place of the parameter tree that holds nothing in a state (`None`, `optax.MaskedNode`)."""
  return x is None or isinstance(x, optax.MaskedNode)


def state_layout(tx: optax.GradientTransformation, state: Any, tree: Any, mesh: Mesh | None, *,
                 rules=None, base=None, adapters: str = "derived",
                 who: str = "jlora.sharding.state_shardings") -> Any:
  """`state_shardings`, naming `who` in its errors."""
  rest, m = tree_shardings(
      tree, mesh, rules=rules, base=base, adapters=adapters, who=who, same_structure=True,
      fix="Pass one: jlora.sharding.state_shardings(tx, state, tree, mesh).")
  replicated = NamedSharding(m, PartitionSpec())

  def param(x, sharding, p):
    if _hole(x) or not hasattr(x, "shape"):
      return x
    if isinstance(sharding, NamedSharding) and tuple(x.shape) == tuple(getattr(p, "shape", ())):
      return sharding
    return replicated  # kept per parameter, but of another shape (factored statistics)

  def other(x):
    return replicated if hasattr(x, "shape") else x

  try:
    return optax.tree_map_params(tx, param, state, rest, tree, transform_non_params=other,
                                 is_leaf=_hole)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{who}: the optimizer state does not fit `tx` and the tree ({e}). Pass the "
        f"transformation that made the state (jlora.optimizer(...), or step.tx of a "
        f"jlora.train_step) and the tree it was made for (the whole tree or its trainable "
        f"half).") from e


def state_shardings(tx: optax.GradientTransformation, state: Any, tree: Any,
                    mesh: Mesh | None = None, *,
                    rules: Sequence[tuple[str, Any]] | None = None, base: Any = None,
                    adapters: str = "derived") -> Any:
  """Shardings for an optimizer state over a jlora tree: each moment laid out as its parameter.

  Built on `optax.tree_map_params`: every copy of the parameter tree that `tx`
  keeps in its state (Adam's `mu` and `nu`, inside any `chain`,
  `inject_hyperparams` or the `optax.partition` of `jlora.optimizer`) takes
  the tree's shardings (`jlora.sharding.shardings`) leaf by leaf, where the
  shapes agree; everything else (step counts, hyperparameters, factored
  statistics of another shape) is replicated. The state may be made from the
  whole tree or from its trainable half (as `jlora.train_step` makes it).

  Args:
    tx: the optax transformation that made `state`: `jlora.optimizer(...)`, or
      `step.tx` of a `jlora.train_step`.
    state: the optimizer state, concrete or abstract (e.g.
      `jax.eval_shape(tx.init, tree)`).
    tree: the jlora tree the state belongs to (or its trainable half).
    mesh, rules, base, adapters: as in `jlora.sharding.shardings`.

  Returns:
    A tree of `NamedSharding` with `state`'s structure.

  Raises:
    ValueError: the state was not made by `tx` for this tree, or no mesh was
      given or found (or a spec does not fit it, naming the path).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> from jax.sharding import PartitionSpec as P, NamedSharding
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("fsdp")))
    >>> t = jlora.apply({"q_proj": w}, rank=2)
    >>> tx = jlora.optimizer(optax.adam(1e-3))
    >>> sh = jlora.sharding.state_shardings(tx, jax.eval_shape(tx.init, t), t)
    >>> tuple(sh.inner_states["train"].inner_state[0].mu["q_proj"].a.spec)
    ('fsdp',)
  """
  return state_layout(tx, state, tree, mesh, rules=rules, base=base, adapters=adapters)


# --------------------------------------------------------------------------- train step


def update(loss_fn, tx, has_aux, trainable, opt_state, frozen, args, kwargs):
  """One optimizer step on the trainable half: `(trainable, opt_state, loss[, aux])`.

  The frozen half enters the loss as a constant, so no gradient is taken for it. Runs
  under `jax.jit`: the checks here (dtypes, the state's structure) cost nothing per step.
  """
  check_trainable_dtypes(trainable, _WHO)

  def loss_of(t):
    return loss_fn(combine(t, frozen), *args, **kwargs)

  out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(trainable)
  try:
    updates, opt_state = tx.update(grads, opt_state, trainable)
  except Exception as e:  # a state made for another tree: say where, else re-raise as is
    try:
      mismatch = state_mismatch(tx, opt_state, trainable, _WHO)
    except Exception:  # the diagnosis itself failed: the original error says more
      mismatch = None
    if mismatch is None:
      raise
    raise mismatch from e
  trainable = optax.apply_updates(trainable, updates)
  return (trainable, opt_state, *(out if has_aux else (out,)))


DEFAULT_BATCH_AXES = ("data", "fsdp")
_WHO = "jlora.train_step"


def _batch_sharding(mesh, spec, x):
  if not hasattr(x, "shape"):
    return None
  s = tuple(spec)[:len(x.shape)]
  return NamedSharding(mesh, PartitionSpec(*s))


def _batch_axes_of(batch_axes: Any, mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch's leading axis is split over, checked against the mesh.

  `None` or `()` replicate the batch on purpose; the default `("data", "fsdp")` keeps
  those of the two the mesh has and needs one at least; any other name must be an axis
  of the mesh. Never replicates the batch silently.
  """
  ax = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else \
      tuple(batch_axes)
  names = tuple(mesh.axis_names)
  if len(set(ax)) != len(ax):
    raise ValueError(f"{_WHO}: batch_axes={ax} names an axis twice; name each mesh axis once.")
  if ax == DEFAULT_BATCH_AXES:
    present = tuple(a for a in ax if a in names)
    if not present:
      raise ValueError(
          f"{_WHO}: the mesh's axes {names} hold none of the default batch axes "
          f"{DEFAULT_BATCH_AXES}, so every device would get the whole batch. Name the mesh axes "
          f"to split the batch's leading axis over, e.g. batch_axes=({names[0]!r},), or pass "
          f"batch_axes=() to give every device the whole batch on purpose (tensor parallelism "
          f"alone).")
    return present
  for a in ax:
    if a not in names:
      close = difflib.get_close_matches(str(a), list(map(str, names)), n=1)
      raise ValueError(
          f"{_WHO}: batch_axes names {a!r}, which is not an axis of the mesh {names}"
          f"{f' (did you mean {close[0]!r}?)' if close else ''}. Name axes of the mesh, or "
          f"pass batch_axes=() to give every device the whole batch on purpose.")
  return ax


def _abstract_leaf(x):
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


class TrainStep:
  """A jit-compiled step that differentiates only the trainable half, on one device or a mesh.

  `step = jlora.train_step(loss_fn, tx)` (or `..., mesh=mesh)`); `opt_state =
  step.init(tree)`; `tree, opt_state, loss = step(tree, opt_state, *batch)`.
  `loss_fn(tree, *batch)` receives the whole jlora tree (use
  `jlora.lora(model.apply)` inside it for the factored path). The frozen half
  is closed over as a constant of the gradient, so no full-weight gradient is
  requested. The trainable half and the optimizer state are donated; the
  frozen half is neither donated nor returned by the compiled step: the new
  tree holds the very same frozen arrays, so the `params` given to
  `jlora.apply` stay valid. An array that would be donated twice (tied
  weights: one array at two paths, trainable at one of them at least) is
  copied first, with a warning.

  On a mesh, `init` fixes the layouts: the tree's (`jlora.sharding.shardings`)
  and the optimizer state's (`jlora.sharding.state_shardings`, each moment
  laid out as its adapter; the state is created sharded). The compiled step
  takes the trainable half, the state and the frozen half with those
  shardings and each batch array split on its leading axis over the batch
  axes (anything laid out otherwise, e.g. on one device, is moved there
  first), and returns the trainable half and the state with the very same
  shardings (so donation reuses their buffers) and the loss replicated. The
  tree and the state must keep the structure `init` was given (each call
  checks, naming the first differing path).

  Attributes:
    tx: the optax transformation the step runs (`jlora.optimizer(tx)`).
    mesh: the mesh, or None.
    shardings: the tree's `NamedSharding`s (on a mesh, set by `init`).
    state_shardings: the optimizer state's (on a mesh, set by `init`).
  """

  def __init__(self, loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
               mesh: Mesh | None = None, batch_axes: Any = DEFAULT_BATCH_AXES,
               has_aux: bool = False, donate: bool = True,
               rules: Sequence[tuple[str, Any]] | None = None, base: Any = None,
               adapters: str = "derived"):
    self.loss_fn, self.tx = loss_fn, optimizer(tx)
    self.mesh, self.batch_axes = mesh, batch_axes
    self.has_aux, self.donate = has_aux, donate
    if mesh is None:
      given = [f"{k}={v!r}" for k, v, default in (
          ("batch_axes", batch_axes, DEFAULT_BATCH_AXES), ("rules", rules, None),
          ("base", base, None), ("adapters", adapters, "derived")) if v != default]
      if given:
        raise ValueError(
            f"{_WHO}: {', '.join(given)} lay the step out on a device mesh, and no mesh was "
            f"given. Pass mesh= as well, or leave {'it' if len(given) == 1 else 'them'} out.")
      self._batch_axes = ()
    elif not isinstance(mesh, Mesh):
      raise TypeError(f"{_WHO}: mesh={mesh!r} is not a jax.sharding.Mesh. Pass one, e.g. "
                      f"jax.make_mesh((2, 4), ('data', 'fsdp')), or mesh=None for one device.")
    else:
      self._batch_axes = _batch_axes_of(batch_axes, mesh)
    self._batch_devices = math.prod(dict(mesh.shape)[a] for a in self._batch_axes) \
        if mesh is not None else 1
    self._kw = dict(rules=rules, base=base, adapters=adapters)
    self.shardings = self.state_shardings = None
    self._tree_shape = self._state_shape = self._defs = None
    self._steps: dict = {}
    functools.update_wrapper(self, loss_fn, updated=())

  def batch_spec(self) -> PartitionSpec:
    """The spec of a batch array's leading axis: the `batch_axes` present in the mesh."""
    ax = self._batch_axes
    return PartitionSpec(ax if len(ax) > 1 else (ax[0] if ax else None))

  def init(self, tree: Any) -> Any:
    """The optimizer state for `tree` (its trainable half); on a mesh, fixes the layouts."""
    require_trainable(tree, _WHO)
    trainable = split(tree).trainable
    if self.mesh is None:
      return self.tx.init(trainable)
    self.shardings, _ = tree_shardings(tree, self.mesh, who=_WHO, **self._kw)
    state_shape = jax.eval_shape(self.tx.init, trainable)
    self.state_shardings = state_layout(self.tx, state_shape, tree, self.mesh, who=_WHO,
                                        **self._kw)
    self._tree_shape = jax.tree_util.tree_map(_abstract_leaf, tree)
    self._state_shape = state_shape
    self._defs = (jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(state_shape))
    self._steps.clear()
    return jax.jit(self.tx.init, out_shardings=self.state_shardings)(trainable)

  def _impl(self, trainable, opt_state, frozen, args, kwargs):
    return update(self.loss_fn, self.tx, self.has_aux, trainable, opt_state, frozen, args, kwargs)

  def _impl_unpacked(self, trainable, opt_state, frozen, /, *args, **kwargs):
    return self._impl(trainable, opt_state, frozen, args, kwargs)

  def _check(self, tree, opt_state, args, kwargs):
    """Raises, naming the path, unless the call fits what `init` and the mesh fixed."""
    if self.shardings is None:
      raise ValueError(f"{_WHO}: on a mesh, call step.init(tree) first; it fixes the shardings "
                       f"of the tree and of the optimizer state.")
    for got, want, want_def, what, fix in (
        (tree, self._tree_shape, self._defs[0], "the tree", "call opt_state = step.init(tree) "
         "for the new tree (it fixes new shardings), or step the tree init was given"),
        (opt_state, self._state_shape, self._defs[1], "the optimizer state", "pass the state "
         "step.init(tree) returned (or one restored onto jlora.sharding.abstract(state, "
         "step.state_shardings))")):
      if jax.tree_util.tree_structure(got) != want_def:
        path, got_node, want_node = structure_difference(got, want) or ("", "?", "?")
        where = repr(path) if path else "the root"
        raise ValueError(
            f"{_WHO}: {what} does not have the structure step.init(tree) was given: at {where} "
            f"it holds {got_node} where that {what.split()[-1]} held {want_node}. Either {fix}.")
    n = self._batch_devices
    if n > 1:
      for path, x in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
        shape = tuple(getattr(x, "shape", ()))
        if shape and shape[0] % n:
          name = ("args" if path[0].idx == 0 else "kwargs") + jax.tree_util.keystr(path[1:])
          ax = self._batch_axes
          over = repr(ax[0]) if len(ax) == 1 else repr(ax)
          raise ValueError(
              f"{_WHO}: the batch array {name} (shape {shape}) is split on its leading axis "
              f"over {over} ({n} devices), and {shape[0]} is not a multiple of {n}. Give every "
              f"batch array a leading size that is a multiple of {n} (drop or pad the last "
              f"batch), or pass batch_axes= naming fewer mesh axes.")

  def _compiled(self, args, kwargs):
    """`(jitted step, batch shardings or None)` for a batch of this structure."""
    if self.mesh is None:  # the batch as the step's own arguments (args_info shows them so)
      if None not in self._steps:
        self._steps[None] = jax.jit(self._impl_unpacked,
                                    donate_argnums=(0, 1) if self.donate else ())
      return self._steps[None], None
    # Keyed by structure and by which leaves have axes: a scalar's sharding is P(), an
    # array's splits its leading axis, so the two cannot share a compiled step.
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    key = (treedef, tuple(None if not hasattr(x, "shape") else len(x.shape) > 0 for x in leaves))
    if key not in self._steps:
      spec = self.batch_spec()
      batch_sh = jax.tree_util.tree_map(lambda x: _batch_sharding(self.mesh, spec, x),
                                        (args, kwargs))
      t_sh, f_sh = split(self.shardings)
      out = (t_sh, self.state_shardings, NamedSharding(self.mesh, PartitionSpec()))
      if self.has_aux:
        out = (*out, None)
      step = jax.jit(self._impl, in_shardings=(t_sh, self.state_shardings, f_sh, *batch_sh),
                     out_shardings=out, donate_argnums=(0, 1) if self.donate else ())
      self._steps[key] = step, batch_sh
    return self._steps[key]

  def _place(self, trainable, opt_state, frozen, batch, batch_sh):
    """Everything the step takes, moved to its shardings where they differ (else as it is).

    Of the batch, only committed jax arrays move (`jax.jit` refuses them laid out
    otherwise); host data and uncommitted arrays go to `jax.jit` as they are.
    """
    t_sh, f_sh = split(self.shardings)

    def move(x, s):
      if (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and s is not None
          and x.committed and not x.sharding.is_equivalent_to(s, x.ndim)):
        return jax.device_put(x, s)
      return x

    batch = jax.tree_util.tree_map(move, batch, batch_sh)
    return (jax.device_put(trainable, t_sh), jax.device_put(opt_state, self.state_shardings),
            jax.device_put(frozen, f_sh), batch)

  def _prepare(self, tree, opt_state, args, kwargs, donating: bool):
    """`(compiled step, its positional operands, its keyword operands, the frozen half)`."""
    if self.mesh is not None:
      self._check(tree, opt_state, args, kwargs)
    step, batch_sh = self._compiled(args, kwargs)
    trainable, frozen = split(tree)
    if donating:
      trainable, opt_state = unalias(trainable, opt_state, frozen, (args, kwargs), _WHO)
    if self.mesh is None:
      return step, (trainable, opt_state, frozen, *args), kwargs, frozen
    trainable, opt_state, frozen, (args, kwargs) = self._place(
        trainable, opt_state, frozen, (args, kwargs), batch_sh)
    return step, (trainable, opt_state, frozen, args, kwargs), {}, frozen

  def __call__(self, tree, opt_state, *args, **kwargs):
    step, operands, kw, frozen = self._prepare(tree, opt_state, args, kwargs,
                                               donating=self.donate)
    trainable, opt_state, *out = step(*operands, **kw)
    return (combine(trainable, frozen), opt_state, *out)

  def lower(self, tree, opt_state, *args, **kwargs):
    """The lowered step (`.compile().as_text()` shows the (partitioned) HLO)."""
    step, operands, kw, _ = self._prepare(tree, opt_state, args, kwargs, donating=False)
    return step.lower(*operands, **kw)


def train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
               mesh: Mesh | None = None, batch_axes: Any = DEFAULT_BATCH_AXES,
               has_aux: bool = False, donate: bool = True,
               rules: Sequence[tuple[str, Any]] | None = None, base: Any = None,
               adapters: str = "derived") -> TrainStep:
  """Builds a jitted LoRA train step: only adapters are differentiated and updated.

  This (or `jlora.optimizer`) is the way to train a jlora tree: a plain optax
  optimizer over the whole tree would train every frozen `w` as well. With a
  `mesh` the same step runs data, FSDP and tensor parallel: the frozen weights
  keep the layout they have (or the one `base`/`rules`/Flax metadata give),
  the adapters follow them (`jlora.sharding.partition_specs`), the optimizer
  state follows the adapters, and the batch is split on its leading axis over
  `batch_axes` (default: the `data` and `fsdp` axes the mesh has, as in FSDP
  the weights' shards and the batch's share devices).

  Args:
    loss_fn: `loss_fn(tree, *batch) -> loss` (or `(loss, aux)` with
      `has_aux=True`), taking the whole jlora tree; use
      `jlora.lora(model.apply)` inside it so the backward pass never forms a
      full weight gradient.
    tx: an optax transformation; it is wrapped with `jlora.optimizer`.
    mesh: a `jax.sharding.Mesh` to lay the step out on (on several hosts: one
      global mesh, after `jax.distributed.initialize()`), or None (default):
      the step runs where the arrays are.
    batch_axes: with a mesh, the mesh axes the batch's leading axis is split
      over: a name or a tuple of names, each an axis of the mesh; `()` gives
      every device the whole batch (tensor parallelism alone). The default
      `("data", "fsdp")` takes those of the two the mesh has; a mesh with
      neither is an error, as is a name the mesh lacks (the batch is never
      replicated silently). Every batch array's leading size must be a
      multiple of the product of these axes' sizes.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    donate: donate the buffers of the trainable half of the tree (adapters,
      `Trainable` values) and of the optimizer state (default True). Frozen
      weights are never donated; an array found twice among the donated ones,
      or also in the frozen half or the batch, is copied first.
    rules, base, adapters: with a mesh, as for `jlora.sharding.shardings`.

  Returns:
    A `TrainStep`: `step.init(tree) -> opt_state` and
    `step(tree, opt_state, *batch) -> (tree, opt_state, loss[, aux])`. The
    state must be made by `step.init` for a tree of the same structure (the
    step says where they differ otherwise).

  Raises:
    ValueError: `batch_axes`, `rules`, `base` or `adapters` without a mesh;
      `batch_axes` naming an axis the mesh lacks, or a mesh with none of the
      default ones; at `init`, a spec that does not fit the mesh (naming the
      path); at a step on a mesh, a tree or state whose structure differs from
      the one `init` was given, or a batch array whose leading size the batch
      axes do not divide (each naming the path and the fix).

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

    On a mesh (here of one device), the adapters and their moments follow the weight:

    >>> from jax.sharding import PartitionSpec as P, NamedSharding
    >>> mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
    >>> w = jax.device_put(jax.random.normal(jax.random.key(0), (4, 6)),
    ...                    NamedSharding(mesh, P("fsdp")))
    >>> t = jlora.apply({"q_proj": w}, rank=2)
    >>> loss = lambda p, x: jnp.mean((jlora.lora(lambda q, x: x @ q["q_proj"])(p, x) - 1) ** 2)
    >>> step = jlora.train_step(loss, optax.adam(1e-2), mesh=mesh)
    >>> state = step.init(t)
    >>> t, state, l0 = step(t, state, jnp.ones((8, 4)))
    >>> tuple(t["q_proj"].a.sharding.spec)
    ('fsdp',)
  """
  return TrainStep(loss_fn, tx, mesh=mesh, batch_axes=batch_axes, has_aux=has_aux,
                   donate=donate, rules=rules, base=base, adapters=adapters)
