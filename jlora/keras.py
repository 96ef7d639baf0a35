"""Keras 3 / keras-hub (keras-nlp) interop: train a Keras model's LoRA with pure JAX.

A Keras model on the JAX backend becomes a parameter pytree and a pure
function; jlora adapts, trains and writes the adapters back as Keras's own
LoRA weights, so `enable_lora`'s `save_lora_weights`, `load_lora_weights` and
Keras inference keep working::

    import jlora, jlora.keras as jk, keras_hub, optax

    lm = keras_hub.models.GemmaCausalLM.from_preset("gemma2_2b_en")
    params = jk.params(lm)                  # {"decoder_block_0/attention/query/kernel": ...}
    forward = jk.apply_fn(lm)               # forward(tree, inputs) -> logits, pure
    tree = jlora.apply(params, rank=4)      # the targets and factoring of enable_lora(4)

    def loss_fn(tree, inputs, labels):
      logits = forward(tree, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    step = jlora.train_step(loss_fn, optax.adamw(1e-4))
    opt_state = step.init(tree)
    for inputs, labels in batches:
      tree, opt_state, loss = step(tree, opt_state, inputs, labels)

    jk.write_back(lm, tree)                 # lm.backbone.enable_lora(4) + the trained A, B
    lm.backbone.save_lora_weights("gemma.lora.h5")

Keras is imported lazily: `import jlora.keras` works without it, and the
functions raise an `ImportError` with the install line when it is missing.
Keras must run on its JAX backend: set `KERAS_BACKEND=jax` in the environment
before Keras is first imported (`os.environ.setdefault("KERAS_BACKEND", "jax")`
at the top of the program); jlora never sets it, and its functions raise, with
that fix, when Keras runs on another backend. Keras 3.13.2 or newer is needed
(the oldest tested; a few Keras internals are read, see `_Internals`).

Minimal install without TensorFlow (keras-hub's declared requirements pull in
tensorflow-text, which building and training models on the JAX backend never
uses; Gemma's SentencePiece tokenizer does need it)::

    pip install "keras>=3.13.2" regex tokenizers
    pip install --no-deps "keras-hub>=0.32"   # or keras-nlp, the same package's old name
    pip install kagglehub                     # only for from_preset downloads
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import jax

from jlora._src import paths as P
from jlora._src.leaf import LoRA, Trainable, is_node
from jlora._src.transform import lora
from jlora._src.tree import merge as merge_tree

__all__ = ["apply_fn", "keras_variables", "params", "write_back"]

INSTALL = ('pip install "keras>=3.13.2" regex tokenizers && '
           'pip install --no-deps "keras-hub>=0.32"')
MODES = ("auto", "lora", "merge")
OLDEST_KERAS = (3, 13, 2)  # the oldest Keras CI tests (the free Colab TPU image's)

_LORA_A, _LORA_B, _KERNEL = "lora_kernel_a", "lora_kernel_b", "kernel"
_BACKEND_FIX = ("Set the environment variable KERAS_BACKEND=jax before the first `import keras` "
                "(e.g. os.environ.setdefault('KERAS_BACKEND', 'jax') at the top of the program), "
                "then restart the Python process.")


def _keras():
  """Imports Keras and checks that it runs on the JAX backend and is new enough."""
  try:
    import keras  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    try:
      installed = importlib.util.find_spec("keras") is not None
    except (ImportError, ValueError):
      installed = False
    if not installed:
      raise ImportError(f"jlora.keras needs Keras 3 (and keras-hub for keras-nlp models), which "
                        f"is not installed. Install it without TensorFlow: {INSTALL}") from e
    backend = os.environ.get("KERAS_BACKEND", "tensorflow (Keras's default)")
    raise ImportError(f"jlora.keras needs Keras's JAX backend; Keras is installed but could not "
                      f"be imported on the backend {backend} ({e}). {_BACKEND_FIX}") from e
  backend = keras.backend.backend()
  if backend != "jax":
    raise RuntimeError(
        f"jlora.keras needs Keras's JAX backend, but Keras runs on {backend!r}. {_BACKEND_FIX}")
  _Internals.check(keras.version())
  return keras


class _Internals:
  """The Keras internals jlora.keras reads, which Keras has no public API for.

  * `Layer._flatten_layers`: a model's layers, in the order keras-hub's
    `Backbone.enable_lora` walks them (and indexes `_lora_enabled_layers` by);
  * `Dense._kernel` / `EinsumDense._kernel`: the kernel variable itself (the
    `kernel` property returns `kernel + lora_a @ lora_b` once LoRA is enabled);
  * keras-hub `Backbone._lora_rank` / `_lora_enabled_layers`: the bookkeeping
    `save_lora_weights` and `load_lora_weights` read.

  They are tested with Keras 3.13.2 to 3.15.1; `check` refuses an older Keras,
  and a missing attribute raises naming the Keras version.
  """

  @staticmethod
  def check(version: str) -> None:
    got = tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())
    if got < OLDEST_KERAS:
      raise RuntimeError(
          f"jlora.keras needs keras>={'.'.join(map(str, OLDEST_KERAS))}; this is keras "
          f"{version}. Upgrade it: {INSTALL}")

  @staticmethod
  def _missing(what: str) -> RuntimeError:
    import keras  # pylint: disable=import-outside-toplevel
    return RuntimeError(
        f"jlora.keras: this Keras ({keras.version()}) has no {what}, which jlora.keras reads "
        f"(tested with Keras 3.13.2 to 3.15.1). Install a tested Keras, e.g. "
        f"pip install 'keras==3.15.1'.")

  @classmethod
  def layers(cls, model) -> list:
    """The model's layers (itself excluded), in `Backbone.enable_lora`'s order."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:
      raise cls._missing("Layer._flatten_layers")
    return list(flatten(include_self=False))

  @staticmethod
  def kernel(layer):
    """The kernel variable of a Dense/EinsumDense layer (None for other layers)."""
    return getattr(layer, "_kernel", None)

  @classmethod
  def set_lora_layers(cls, backbone, rank: int, indices: list[int]) -> None:
    """Records the one rank and the indices of the LoRA layers, as `enable_lora` does."""
    for name in ("_lora_rank", "_lora_enabled_layers"):
      if not hasattr(backbone, name):
        raise cls._missing(f"Backbone.{name}")
    backbone._lora_rank = rank  # pylint: disable=protected-access
    backbone._lora_enabled_layers = indices  # pylint: disable=protected-access


def _model_variables(model) -> tuple[list, list]:
  if not getattr(model, "built", False):
    raise ValueError(
        f"jlora.keras: the {type(model).__name__} is not built, so it has no weights yet. "
        f"Build it first, e.g. by calling it once on a batch.")
  tv, ntv = list(model.trainable_variables), list(model.non_trainable_variables)
  seen = {}
  for v in tv + ntv:
    if v.path in seen:
      raise ValueError(
          f"jlora.keras: two variables of the model share the path {v.path!r}; jlora keys the "
          f"tree by variable path. Give the layers unique names.")
    seen[v.path] = v
  return tv, ntv


def _kernel_layers(model) -> dict[str, Any]:
  """`{kernel variable path: layer}` for every layer that supports `enable_lora`."""
  out = {}
  # The same traversal keras-hub's `Backbone.enable_lora` uses.
  for layer in _Internals.layers(model):
    kernel = _Internals.kernel(layer)
    if hasattr(layer, "enable_lora") and kernel is not None and hasattr(kernel, "path"):
      out[kernel.path] = layer
  return out


def _sibling(kernel_path: str, name: str) -> str:
  head, _, _ = kernel_path.rpartition("/")
  return f"{head}/{name}" if head else name


def _flat(tree) -> dict[str, Any]:
  flat = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
    flat[P.path_str(path)] = x
  return flat


def params(model, *, copy: bool = True) -> dict[str, Any]:
  """The weights of a Keras model as a flat dict `{variable path: array}`.

  Keys are Keras's `variable.path` (e.g. `"decoder_block_0/attention/query/kernel"`),
  so `jlora.apply` patterns and Keras layer names line up. Layers on which
  Keras LoRA is already enabled (`enable_lora`, or `load_lora_weights`) come
  back as one `jlora.LoRA` leaf at the kernel's path, holding the kernel, Keras's
  `lora_kernel_a`/`lora_kernel_b` and its alpha: training continues where Keras
  left off.

  Args:
    model: a built Keras model or layer on the JAX backend (a keras-hub task
      such as `GemmaCausalLM`, or its backbone).
    copy: copy the arrays (default), so the tree and the Keras model share no
      buffers: Keras's jitted `fit`/`predict`/`generate` donate their
      variables' buffers, which would delete the tree's. `copy=False` saves
      the memory of one copy of the weights (`jlora.train_step` never donates
      the frozen half); then don't use the tree after running Keras's own
      `fit`/`predict`/`generate`.

  Returns:
    A flat dict of arrays (and `jlora.LoRA` leaves) covering every trainable
    and non-trainable variable of the model.
  """
  _keras()
  _model_variables(model)
  take = (lambda x: jax.numpy.array(x, copy=True)) if copy else (lambda x: x)
  layers = _kernel_layers(model)
  out, used = {}, set()
  for kpath, layer in layers.items():
    if not getattr(layer, "lora_enabled", False):
      continue
    ka, kb = layer.lora_kernel_a, layer.lora_kernel_b
    kernel = _Internals.kernel(layer)
    ndim = len(kernel.shape)
    out[kpath] = LoRA(w=take(kernel.value), a=take(ka.value), b=take(kb.value),
                      alpha=float(layer.lora_alpha), a_axes=tuple(range(ndim - 1)))
    used |= {kpath, ka.path, kb.path}
  tv, ntv = _model_variables(model)
  for v in tv + ntv:
    if v.path not in used:
      out[v.path] = take(v.value)
  return out


def keras_variables(tree) -> dict[str, Any]:
  """A jlora tree flattened to the Keras variables it stands for, by path.

  A `jlora.LoRA` leaf at `".../kernel"` becomes `".../kernel"` (w),
  `".../lora_kernel_a"` (a) and `".../lora_kernel_b"` (b), as Keras names them
  after `enable_lora`; `jlora.Trainable` leaves are unwrapped; `None` holes
  (from `jlora.split`) are dropped. For a layout-`"keras"` tree the shapes are
  Keras's too, so `keras_variables(jlora.split(tree).trainable)` lists exactly
  what `model.trainable_variables` holds after `enable_lora`.
  """
  out = {}
  for p, x in _flat(tree).items():
    if isinstance(x, LoRA):
      for name, val in ((_KERNEL, x.w), (_LORA_A, x.a), (_LORA_B, x.b)):
        if val is not None:
          out[_sibling(p, name)] = val
    elif isinstance(x, Trainable):
      if x.value is not None:
        out[p] = x.value
    elif x is not None:
      out[p] = x
  return out


def apply_fn(model, *, mode: str = "auto") -> Callable[..., Any]:
  """A pure function `f(tree, *args, **kwargs) -> outputs` running the Keras model.

  `tree` is `jk.params(model)`, possibly with `jlora.LoRA`/`jlora.Trainable`
  leaves from `jlora.apply`; `args` and `kwargs` go to the model's `call`
  (through Keras's `stateless_call`, so nothing in the model changes and the
  function can be jitted, differentiated and sharded).

  Args:
    model: a built Keras model on the JAX backend.
    mode: how LoRA leaves are computed. `"lora"`: factored, through
      `jlora.lora` (`x·w + s·(x·a)·b`, no full-weight gradient); `"merge"`:
      `jlora.merge` folds each adapter into its kernel first (Keras's own
      computation); `"auto"` (default): `"lora"`. Layers on which Keras LoRA
      is enabled are always run by Keras itself from their `w`, `a`, `b`.

  Returns:
    `f(tree, *args, **kwargs)`. Updated non-trainable state (BatchNorm
    statistics, dropout seeds) is discarded.

  Raises:
    ValueError (when `f` is called): the tree misses a variable of the model or
      holds one the model does not have, or a LoRA leaf on a Keras-LoRA layer
      has another rank or alpha than the layer.
  """
  if mode not in MODES:
    raise ValueError(f"jlora.keras.apply_fn: mode={mode!r} is not one of {MODES}.")
  factored = mode != "merge"
  _keras()
  _model_variables(model)

  def run(adapted, feed, *args, **kwargs):
    tv, ntv = _model_variables(model)
    values = {**feed, **adapted}
    paths = {v.path for v in tv + ntv}
    missing = sorted(paths - set(values))
    extra = sorted(set(values) - paths)
    if missing or extra:
      raise ValueError(
          f"jlora.keras: the tree does not match the model's variables: missing "
          f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unknown "
          f"{extra[:5]}{' ...' if len(extra) > 5 else ''}. Build the tree with "
          f"jlora.keras.params(model) from this model (after any enable_lora on it).")
    out, _ = model.stateless_call([values[v.path] for v in tv], [values[v.path] for v in ntv],
                                  *args, **kwargs)
    return out

  def f(tree, *args, **kwargs):
    layers = _kernel_layers(model)
    adapted, feed = {}, {}
    for p, x in _flat(tree).items():
      layer = layers.get(p)
      if isinstance(x, LoRA) and layer is not None and getattr(layer, "lora_enabled", False):
        _check_keras_lora(p, x, layer)
        feed[p], feed[layer.lora_kernel_a.path], feed[layer.lora_kernel_b.path] = x.w, x.a, x.b
      elif isinstance(x, LoRA):
        if x.w is None or x.a is None or x.b is None:
          raise ValueError(
              f"jlora.keras: the LoRA leaf at {p!r} has a missing field: it is one half of "
              f"jlora.split. Pass jlora.combine(trainable, frozen).")
        adapted[p] = x
      elif isinstance(x, Trainable):
        feed[p] = x.value
      else:
        feed[p] = x
    if factored and adapted:
      return lora(run)(adapted, feed, *args, **kwargs)
    return run(merge_tree(adapted) if adapted else adapted, feed, *args, **kwargs)

  return f


def _check_keras_lora(path, leaf, layer):
  if leaf.stack or leaf.a_axes != tuple(range(leaf.ndim - 1)):
    raise ValueError(
        f"jlora.keras: the LoRA leaf at {path!r} (a_axes={leaf.a_axes}, stack={leaf.stack}) "
        f"does not have Keras's factoring, but Keras LoRA is enabled on its layer. Apply "
        f"jlora with layout='keras' to this model.")
  if leaf.rank != layer.lora_rank or abs(leaf.scale * leaf.rank - layer.lora_alpha) > 1e-6 * max(
      1.0, abs(layer.lora_alpha)):
    raise ValueError(
        f"jlora.keras: the LoRA leaf at {path!r} has rank {leaf.rank} and scale {leaf.scale}, "
        f"but the Keras layer has lora_rank={layer.lora_rank} and lora_alpha="
        f"{layer.lora_alpha} (scale {layer.lora_alpha / layer.lora_rank}). Write the tree "
        f"back with jlora.keras.write_back(model, tree) first, or rebuild the tree from "
        f"jlora.keras.params(model).")


def _backbone(model):
  """The keras-hub `Backbone` of `model` (itself or `model.backbone`), or None."""
  for m in (model, getattr(model, "backbone", None)):
    if m is not None and hasattr(m, "save_lora_weights") and hasattr(m, "enable_lora"):
      return m
  return None


def write_back(model, tree, *, frozen: bool = False, merge: bool = False) -> None:
  """Writes a jlora tree's adapters into the Keras model as Keras's own LoRA weights.

  For every `jlora.LoRA` leaf, Keras LoRA is enabled on the layer owning the
  kernel (when not yet enabled) with the leaf's rank, and the trained `a`/`b`
  are assigned to `lora_kernel_a`/`lora_kernel_b`, the layer's `lora_alpha` set
  so Keras's scale equals the leaf's. On a keras-hub backbone with a single
  rank this goes through `backbone.enable_lora(rank, target_layer_names)`
  when the adapted layers are exactly those names select (Keras's usual
  freezing included), else through each layer's `enable_lora` with the
  backbone's LoRA bookkeeping kept, so `save_lora_weights` and
  `load_lora_weights` work either way. `jlora.Trainable` leaves are assigned
  to their variables.

  Note: `save_lora_weights` stores the rank but not alpha; with
  `alpha != rank` a reloaded model needs `layer.lora_alpha` set again.

  Args:
    model: the Keras model the tree came from (`jk.params(model)`).
    tree: the trained jlora tree.
    frozen: also assign the frozen weights (each `LoRA.w` and plain leaf).
      Not needed after `jlora.train_step`, which never changes them.
    merge: instead of enabling Keras LoRA, fold each adapter into its kernel
      (`w + scale·a@b` in the kernel's dtype) — for deployment, or for a
      factoring Keras cannot represent (`layout="fan"`, stacked leaves).

  Raises:
    ValueError: a path of the tree is not a variable of the model, a LoRA leaf
      sits on a kernel whose layer has no `enable_lora`, its factoring is not
      Keras's (use `merge=True` or `layout="keras"`), or it disagrees with a
      Keras LoRA already enabled on the layer.
  """
  _keras()
  tv, ntv = _model_variables(model)
  variables = {v.path: v for v in tv + ntv}
  layers = _kernel_layers(model)
  flat = _flat(tree)
  unknown = [p for p in flat if p not in variables]
  if unknown:
    raise ValueError(
        f"jlora.keras.write_back: {unknown[:5]} {'are' if len(unknown) > 1 else 'is'} not a "
        f"variable path of the model. Write back into the model the tree came from "
        f"(jlora.keras.params(model)).")

  lora_leaves = {p: x for p, x in flat.items() if isinstance(x, LoRA)}
  for p, x in lora_leaves.items():
    if x.w is None or x.a is None or x.b is None:
      raise ValueError(f"jlora.keras.write_back: the LoRA leaf at {p!r} has a missing field: "
                       f"pass the whole tree, jlora.combine(trainable, frozen).")
    layer = layers.get(p)
    if merge:
      if layer is not None and getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"jlora.keras.write_back: merge=True, but Keras LoRA is enabled on the layer of "
            f"{p!r}; its kernel would get the adapter twice. Write the adapters with "
            f"merge=False.")
      continue
    if layer is None:
      raise ValueError(
          f"jlora.keras.write_back: the LoRA leaf at {p!r} is on a variable whose layer has no "
          f"enable_lora (Keras supports LoRA on Dense and EinsumDense kernels). Pass "
          f"merge=True to fold the adapter into the weight instead.")
    if x.stack or x.a_axes != tuple(range(x.ndim - 1)):
      raise ValueError(
          f"jlora.keras.write_back: the LoRA leaf at {p!r} is factored with a_axes={x.a_axes}, "
          f"stack={x.stack}; Keras LoRA factors all kernel axes but the last into A "
          f"(a_axes={tuple(range(x.ndim - 1))}). Apply jlora with layout='keras', or pass "
          f"merge=True to fold the adapter into the weight.")
    if getattr(layer, "lora_enabled", False) and layer.lora_rank != x.rank:
      raise ValueError(
          f"jlora.keras.write_back: Keras LoRA is enabled on the layer of {p!r} with rank "
          f"{layer.lora_rank}, the tree's adapter has rank {x.rank}. Keras enables LoRA once "
          f"per layer: write into a fresh model, or train with rank={layer.lora_rank}.")

  if merge:
    merged = merge_tree(lora_leaves) if lora_leaves else {}
    for p, w in merged.items():
      _assign(variables[p], w)
  else:
    _enable(model, {p: (layers[p], x.rank) for p, x in lora_leaves.items()})
    for p, x in lora_leaves.items():
      layer = layers[p]
      _assign(layer.lora_kernel_a, x.a)
      _assign(layer.lora_kernel_b, x.b)
      layer.lora_alpha = x.scale * x.rank
      if frozen:
        _assign(_Internals.kernel(layer), x.w)
  for p, x in flat.items():
    if isinstance(x, Trainable):
      variables[p].trainable = True
      _assign(variables[p], x.value)
    elif frozen and not isinstance(x, LoRA):
      _assign(variables[p], x)


def _assign(variable, x):
  """Assigns a copy of `x`, placed as the variable's current value is.

  A copy, because Keras keeps the very array it is given and its jitted
  fit/predict functions donate their variables' buffers (they would delete the
  tree's); placed like the variable, because a tree trained sharded over a mesh
  must not leave Keras with weights on mixed devices.
  """
  y = jax.numpy.array(x, copy=True)
  sharding = getattr(getattr(variable, "value", None), "sharding", None)
  if sharding is not None:
    y = jax.device_put(y, sharding)
  variable.assign(y)


def _enable(model, targets: dict[str, tuple[Any, int]]) -> None:
  """Enables Keras LoRA on the layers of `targets` ({kernel path: (layer, rank)})."""
  todo = {p: (layer, r) for p, (layer, r) in targets.items()
          if not getattr(layer, "lora_enabled", False)}
  if not todo:
    return
  backbone = _backbone(model)
  ranks = {r for _, r in todo.values()}
  all_layers = ([lyr for lyr in _Internals.layers(backbone) if lyr.weights]
                if backbone is not None else [])
  if backbone is not None and len(ranks) == 1:
    names = sorted({layer.name for layer, _ in todo.values()})
    by_name = {id(lyr) for lyr in all_layers if lyr.name in names and hasattr(lyr, "enable_lora")}
    already = any(getattr(lyr, "lora_enabled", False) for lyr in all_layers)
    if not already and by_name == {id(layer) for layer, _ in todo.values()}:
      backbone.enable_lora(next(iter(ranks)), target_layer_names=names)
      return
  for layer, r in todo.values():
    layer.enable_lora(r)
  # Keep the bookkeeping `save_lora_weights`/`load_lora_weights` read, as
  # `Backbone.enable_lora` builds it: indices into the backbone's layers that
  # have weights, and the one rank (Keras stores a single rank per model).
  enabled = [(i, lyr) for i, lyr in enumerate(all_layers) if getattr(lyr, "lora_enabled", False)]
  enabled_ranks = {lyr.lora_rank for _, lyr in enabled}
  if backbone is not None and len(enabled_ranks) == 1:
    _Internals.set_lora_layers(backbone, enabled_ranks.pop(), [i for i, _ in enabled])
