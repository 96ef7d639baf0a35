"""Adapter checkpoints on orbax: save what trains, restore without the base weights.

A checkpoint is a directory written by orbax-checkpoint with three items:

* ``adapter``: the arrays that train: `a` and `b` of every `jlora.LoRA` leaf and
  the value of every `jlora.Trainable` leaf (never the frozen weights);
* ``opt_state`` (optional): the leaves of the optimizer state;
* ``jlora``: JSON metadata: the format version, the jlora version, the step,
  per target its rank, alpha and layout (`a_axes`, `stack`, `rslora`) and array
  shapes, the adapter dtype, the user's metadata, and the base tree's
  paths, shapes and dtypes with their fingerprint.

A save writes into a temporary sibling directory and renames it into place, so
a save that dies midway leaves whatever was there before untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora._src import paths as P
from jlora._src.leaf import LoRA, Trainable, is_node

FORMAT = "jlora.adapter"
FORMAT_VERSION = 1
_TMP = ".jlora-tmp-"
_OLD = ".jlora-old-"
_ADAPTER, _OPT, _META = "adapter", "opt_state", "jlora"


class Restored(NamedTuple):
  """What `jlora.restore` returns.

  Attributes:
    tree: the target with its adapters (and `Trainable` values) filled in.
    opt_state: the optimizer state, when a target for it was given, else None.
    step: the step saved with the checkpoint, or None.
    metadata: the checkpoint's metadata (see `read_metadata`).
  """

  tree: Any
  opt_state: Any
  step: int | None
  metadata: dict


# ----------------------------------------------------------------------------- tree walking


class _Entry(NamedTuple):
  path: str
  kind: str  # "lora" | "trainable"
  node: Any


def _version() -> str:
  try:
    import jlora  # pylint: disable=import-outside-toplevel
    return str(getattr(jlora, "__version__", "unknown"))
  except ImportError:  # pragma: no cover - only while the package itself is importing
    return "unknown"


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))


def _dtype(x) -> str:
  dt = getattr(x, "dtype", None)
  return str(np.dtype(dt)) if dt is not None else str(np.asarray(x).dtype)


def _entries(tree: Any, fn: str = "save"
             ) -> tuple[list[_Entry], list[tuple[str, list[int], str]] | None]:
  """The adapted/trainable nodes of `tree` and its base leaves (None if not all there)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
  entries, base, complete, seen = [], [], True, set()
  for path, x in flat:
    ps = P.path_str(path)
    if ps in seen:
      raise ValueError(
          f"jlora.{fn}: the path {ps!r} appears twice in the tree (two keys that join to the "
          f"same '/'-separated path). Rename one of them so every leaf has its own path.")
    seen.add(ps)
    if isinstance(x, LoRA):
      if x.a is None or x.b is None:
        raise ValueError(
            f"jlora.{fn}: the jlora.LoRA leaf at {ps!r} has no adapters (a or b is None): this "
            f"is the frozen half of jlora.split. Pass the whole tree or its trainable half.")
      entries.append(_Entry(ps, "lora", x))
      if x.w is None:
        complete = False
      else:
        base.append((ps, list(_shape(x.w)), _dtype(x.w)))
    elif isinstance(x, Trainable):
      if x.value is None:
        raise ValueError(
            f"jlora.{fn}: the jlora.Trainable leaf at {ps!r} holds None: this is the frozen "
            f"half of jlora.split. Pass the whole tree or its trainable half.")
      entries.append(_Entry(ps, "trainable", x))
      base.append((ps, list(_shape(x.value)), _dtype(x.value)))
    else:
      base.append((ps, list(_shape(x)), _dtype(x)))
  return entries, (base if complete else None)


def _base_list(tree: Any) -> list[tuple[str, list[int], str]] | None:
  return _entries(tree, "fingerprint")[1]


def _hash(base) -> str:
  blob = json.dumps([[p, list(s), d] for p, s, d in base], separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint(tree: Any) -> str:
  """A hash of the base tree's paths, shapes and dtypes (not its values).

  A LoRA tree and its `jlora.base` have the same fingerprint: a `LoRA` leaf
  counts as its frozen `w`, a `Trainable` leaf as its value. Works on abstract
  trees (`jax.ShapeDtypeStruct` leaves) too.

  Raises:
    ValueError: the tree is the trainable half of `jlora.split` (its frozen
      weights are missing).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jlora._src.checkpoint import fingerprint
    >>> p = {"q_proj": jnp.ones((4, 6))}
    >>> fingerprint(jlora.apply(p, rank=2)) == fingerprint(p)
    True
  """
  base = _base_list(tree)
  if base is None:
    raise ValueError(
        "jlora.fingerprint: the tree's LoRA leaves have no frozen weight `w` (it is the "
        "trainable half of jlora.split); pass the whole tree or the base params.")
  return _hash(base)


def _fmt(shape, dtype) -> str:
  return f"{dtype}{tuple(shape)}"


# ----------------------------------------------------------------------------- save


def _key(i: int) -> str:
  return f"{i:05d}"


def _metadata(entries, base, opt_flat, step, user) -> dict:
  adapters, trainable, dtypes = {}, {}, set()
  for i, e in enumerate(entries):
    x = e.node
    if e.kind == "lora":
      adapters[e.path] = dict(
          key=_key(i), rank=x.rank, alpha=float(x.alpha), a_axes=list(x.a_axes), stack=x.stack,
          rslora=bool(x.rslora), a_shape=list(_shape(x.a)), b_shape=list(_shape(x.b)),
          dtype=_dtype(x.a), b_dtype=_dtype(x.b))
      dtypes.update({_dtype(x.a), _dtype(x.b)})
    else:
      trainable[e.path] = dict(key=_key(i), shape=list(_shape(x.value)), dtype=_dtype(x.value))
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "jlora_version": _version(),
      "step": step,
      "targets": list(adapters),
      "adapters": adapters,
      "trainable": trainable,
      "adapter_dtype": (dtypes.pop() if len(dtypes) == 1 else sorted(dtypes) or None),
      "fingerprint": None if base is None else _hash(base),
      "base": None if base is None else [[p, s, d] for p, s, d in base],
      "opt_state": None if opt_flat is None else [
          [ps, list(_shape(x)), _dtype(x)] for ps, x in opt_flat],
      "user": user,
  }


def _flat_opt(opt_state):
  flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  return [(P.path_str(p), x) for p, x in flat]


def save(directory: str | os.PathLike, tree: Any, *, opt_state: Any = None,
         step: int | None = None, metadata: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> str:
  """Saves the adapters of a jlora tree (and optionally the optimizer state).

  Only `LoRA.a`, `LoRA.b` and `Trainable` values are written, never the frozen
  weights; the metadata records per target the rank, alpha and layout, and the
  base tree's paths, shapes and dtypes with their fingerprint, which
  `jlora.restore` checks. The checkpoint is written to a temporary directory
  beside `directory` and renamed into place when complete, so a save that dies
  midway leaves an existing checkpoint intact.

  Args:
    directory: the checkpoint directory to create.
    tree: a jlora tree (from `jlora.apply`), or its trainable half (then the
      base fingerprint is not recorded).
    opt_state: an optimizer state to save alongside (e.g. from
      `jlora.train_step(...).init(tree)`).
    step: the training step, returned by `jlora.restore`.
    metadata: JSON-serializable user metadata, returned by `jlora.restore`.
    overwrite: replace an existing checkpoint at `directory` (the old one stays
      in place until the new one is complete).

  Returns:
    The checkpoint directory, as a string.

  Raises:
    FileExistsError: `directory` exists and `overwrite` is False.
    ValueError: the tree has no LoRA or Trainable leaf, or two leaves share a
      path.
    TypeError: `step` is not an int, or `metadata` is not JSON-serializable.

  Example:
    >>> import tempfile, os, jax.numpy as jnp, jlora
    >>> from jlora._src.checkpoint import save, restore
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> d = save(os.path.join(tempfile.mkdtemp(), "ckpt"), t, step=3)
    >>> restore(d, t).step
    3
  """
  directory = os.fspath(os.path.abspath(directory))
  if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
    raise TypeError(f"jlora.save: step must be an int or None, got {step!r}.")
  step = None if step is None else int(step)
  user = dict(metadata) if metadata is not None else {}
  try:
    json.dumps(user)
  except (TypeError, ValueError) as e:
    raise TypeError(f"jlora.save: metadata is not JSON-serializable ({e}); pass plain dicts, "
                    f"lists, strings and numbers.") from e
  entries, base = _entries(tree)
  if not entries:
    raise ValueError(
        f"jlora.save: the tree holds no jlora.LoRA or jlora.Trainable leaf, so there is no "
        f"adapter to save to {directory!r}. Call jlora.apply(params, ...) first.")
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(
        f"jlora.save: {directory!r} already exists. Pass overwrite=True to replace it (the old "
        f"checkpoint is kept until the new one is complete), or choose another directory.")
  opt_flat = None if opt_state is None else _flat_opt(opt_state)
  meta = _metadata(entries, base, opt_flat, step, user)
  arrays = {}
  for i, e in enumerate(entries):
    x = e.node
    arrays[_key(i)] = {"a": x.a, "b": x.b} if e.kind == "lora" else {"value": x.value}
  items = {_ADAPTER: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}
  if opt_flat is not None:
    items[_OPT] = ocp.args.StandardSave({_key(i): x for i, (_, x) in enumerate(opt_flat)})

  parent, name = os.path.split(directory)
  # One name on every process (orbax writes each host's shards into it); a
  # leftover of an earlier interrupted save under that name is removed first.
  tmp = os.path.join(parent, f"{name}{_TMP}0")
  if _primary():
    os.makedirs(parent, exist_ok=True)
    for n in os.listdir(parent):
      if n.startswith(f"{name}{_TMP}"):
        shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
  _sync("jlora_save_prepare")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
      c.save(tmp, ocp.args.Composite(**items))
    _commit(tmp, directory, overwrite)
  except BaseException:
    if _primary() and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:  # pragma: no cover - multi-host only
    ocp.multihost.sync_global_processes(name)


def _commit(tmp: str, directory: str, overwrite: bool) -> None:
  """Moves a complete checkpoint into place; an existing one is replaced last."""
  if _primary():
    if os.path.exists(directory):
      if not overwrite:
        raise FileExistsError(
            f"jlora.save: {directory!r} appeared while saving; pass overwrite=True to replace it.")
      old = f"{directory}{_OLD}{uuid.uuid4().hex[:12]}"
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  _sync("jlora_save_commit")


# ----------------------------------------------------------------------------- restore


def read_metadata(directory: str | os.PathLike) -> dict:
  """The metadata of a jlora checkpoint: targets, ranks, layout, step, fingerprint.

  Raises:
    FileNotFoundError: there is no checkpoint at `directory`.
    ValueError: the directory is not a jlora checkpoint, its metadata is
      unreadable, or it was written by a newer format version.
  """
  directory = os.fspath(os.path.abspath(directory))
  if not os.path.isdir(directory):
    parent, name = os.path.split(directory)
    olds = [n for n in (os.listdir(parent) if os.path.isdir(parent) else [])
            if n.startswith(name + _OLD)]
    hint = (f" An interrupted overwrite left the previous checkpoint at "
            f"{os.path.join(parent, olds[0])!r}; rename it back, or open the parent directory "
            f"with jlora.CheckpointManager, which does so." if olds else "")
    raise FileNotFoundError(f"jlora.restore: no checkpoint at {directory!r}.{hint}")
  meta_file = os.path.join(directory, _META, "metadata")
  if not os.path.isfile(meta_file):
    raise ValueError(
        f"jlora.restore: {directory!r} is not a jlora checkpoint (it has no {_META}/metadata "
        f"file). Point to a directory written by jlora.save or jlora.CheckpointManager.")
  try:
    with open(meta_file, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(
        f"jlora.restore: the metadata {meta_file!r} is unreadable ({e}); the checkpoint is "
        f"corrupt. Restore an earlier checkpoint.") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"jlora.restore: {directory!r} is not a jlora checkpoint (its metadata "
                     f"has no format {FORMAT!r}).")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"jlora.restore: {directory!r} has format version {meta.get('format_version')!r}; this "
        f"jlora (version {_version()}) reads version {FORMAT_VERSION}. Upgrade jlora.")
  return meta


def _sharding_of(x):
  sh = getattr(x, "sharding", None)
  return sh if sh is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(x, shape=None, dtype=None) -> jax.ShapeDtypeStruct:
  if x is None:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=_sharding_of(None))
  return jax.ShapeDtypeStruct(_shape(x), np.dtype(x.dtype), sharding=_sharding_of(x))


def _check_base(directory, meta, base):
  saved = [(p, list(s), d) for p, s, d in meta["base"]]
  if _hash(base) == meta["fingerprint"]:
    return
  mine = {p: (list(s), d) for p, s, d in base}
  theirs = {p: (s, d) for p, s, d in saved}
  diffs = []
  for p, s, d in saved:
    if p not in mine:
      diffs.append(f"the checkpoint's base has {p!r} ({_fmt(s, d)}), the target has no such "
                   f"leaf")
    elif mine[p] != (s, d):
      diffs.append(f"at {p!r} the checkpoint's base has {_fmt(s, d)}, the target has "
                   f"{_fmt(*mine[p])}")
  for p, s, d in base:
    if p not in theirs:
      diffs.append(f"the target has {p!r} ({_fmt(s, d)}), the checkpoint's base has no such "
                   f"leaf")
  first = diffs[0] if diffs else "the leaves are in a different order"
  raise ValueError(
      f"jlora.restore: the checkpoint at {directory!r} was trained on a different base model: "
      f"{first} (first of {max(len(diffs), 1)} differences). Restore onto the base params it "
      f"was trained from, or pass check_base=False to skip this check.")


def _check_entries(directory, meta, entries):
  adapters, trainable = meta["adapters"], meta["trainable"]
  t_lora = [e.path for e in entries if e.kind == "lora"]
  t_train = [e.path for e in entries if e.kind == "trainable"]
  fix = (f"Build the target with the same jlora.apply arguments as the saved tree (targets: "
         f"{meta['targets'][:8]}{' ...' if len(meta['targets']) > 8 else ''}).")
  for what, mine, theirs, kind in (("checkpoint", t_lora, adapters, "adapter"),
                                   ("target", list(adapters), set(t_lora), "adapter"),
                                   ("checkpoint", t_train, trainable, "jlora.Trainable leaf"),
                                   ("target", list(trainable), set(t_train),
                                    "jlora.Trainable leaf")):
    missing = [p for p in mine if p not in theirs]
    if missing:
      raise ValueError(f"jlora.restore: the {what} has no {kind} at {missing[:8]} "
                       f"({directory!r}). {fix}")
  for e in entries:
    x = e.node
    if e.kind == "trainable":
      want = trainable[e.path]
      if list(_shape(x.value)) != want["shape"]:
        raise ValueError(
            f"jlora.restore: the jlora.Trainable leaf at {e.path!r} has shape "
            f"{tuple(want['shape'])} in the checkpoint and {_shape(x.value)} in the target. "
            f"Restore onto the model the checkpoint was trained from.")
      continue
    want = adapters[e.path]
    mine = dict(rank=x.rank, alpha=float(x.alpha), a_axes=tuple(x.a_axes), stack=x.stack,
                rslora=bool(x.rslora))
    for field in ("rank", "stack", "a_axes", "rslora", "alpha"):
      theirs = tuple(want[field]) if field == "a_axes" else want[field]
      if mine[field] != theirs:
        raise ValueError(
            f"jlora.restore: the adapter at {e.path!r} has {field} {theirs} in the checkpoint "
            f"but {field} {mine[field]} in the target. Rebuild the target with the saved "
            f"layout, e.g. jlora.apply(params, rank={{{e.path!r}: {want['rank']}, ...}}, "
            f"alpha=..., rslora={want['rslora']}); the checkpoint's metadata lists rank, alpha, "
            f"a_axes, stack and rslora per target.")
    for name in ("a", "b"):
      got = list(_shape(getattr(x, name)))
      if got != want[f"{name}_shape"]:
        raise ValueError(
            f"jlora.restore: the adapter {name!r} at {e.path!r} has shape "
            f"{tuple(want[f'{name}_shape'])} in the checkpoint and {tuple(got)} in the target "
            f"(the kernel shapes differ). Restore onto the base model the checkpoint was "
            f"trained from.")


def _read_arrays(directory, items):
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
      return c.restore(directory, ocp.args.Composite(**items))
  except Exception as e:  # orbax and tensorstore raise many types for damaged data
    raise ValueError(
        f"jlora.restore: could not read the arrays of the checkpoint at {directory!r} "
        f"({type(e).__name__}: {str(e)[:500]}); the checkpoint is incomplete or corrupt. "
        f"Restore an earlier checkpoint.") from e


def _tree_from_metadata(meta, arrays):
  """Nested dicts from the saved '/'-joined paths, with LoRA and Trainable leaves."""
  out: dict = {}
  for ps, m in meta["adapters"].items():
    v = arrays[m["key"]]
    _put(out, ps, LoRA(None, v["a"], v["b"], m["alpha"], tuple(m["a_axes"]), m["stack"],
                       m["rslora"]))
  for ps, m in meta["trainable"].items():
    _put(out, ps, Trainable(arrays[m["key"]]["value"]))
  return out


def _put(d, ps, leaf):
  parts = ps.split("/")
  for k in parts[:-1]:
    d = d.setdefault(k, {})
  d[parts[-1]] = leaf


def restore(directory: str | os.PathLike, target: Any = None, *, opt_state: Any = None,
            check_base: bool = True) -> Restored:
  """Restores a checkpoint written by `jlora.save`; no base weights needed.

  The target decides where the arrays go:

  * a jlora tree built from the base params (`jlora.apply(params, ...)` with
    the same arguments): its `a`, `b` and `Trainable` values are replaced, the
    frozen weights kept as they are, and the base tree's paths, shapes and
    dtypes are checked against the checkpoint's fingerprint;
  * an abstract tree, e.g. the trainable half as `jax.ShapeDtypeStruct`s from
    `jax.eval_shape(lambda: jlora.split(jlora.apply(params, ...)).trainable)`:
    the arrays are read straight onto each struct's sharding (a
    `NamedSharding` shards them over a mesh) and dtype;
  * None: the adapters come back as nested dicts keyed by the saved paths,
    with `LoRA(w=None, a, b, ...)` and `Trainable` leaves.

  Concrete targets place the arrays like the target's arrays; structs without
  a sharding and None place them on the first local device.

  Args:
    directory: a checkpoint directory written by `jlora.save`.
    target: the tree to restore into (see above).
    opt_state: a target for the optimizer state, concrete or abstract (e.g.
      `jax.eval_shape(step.init, tree)`); None to skip it.
    check_base: compare the target's base tree (when it has one) with the
      checkpoint's fingerprint.

  Returns:
    `Restored(tree, opt_state, step, metadata)`.

  Raises:
    FileNotFoundError: no checkpoint at `directory`.
    ValueError: not a jlora checkpoint, corrupt files, a different base model
      (the message names the first differing path), a rank, alpha or layout
      mismatch, targets that differ, or an optimizer state that differs.

  Example:
    >>> import tempfile, os, jax, jax.numpy as jnp, jlora
    >>> from jlora._src.checkpoint import save, restore
    >>> params = {"q_proj": jnp.ones((4, 6))}
    >>> d = save(os.path.join(tempfile.mkdtemp(), "ckpt"), jlora.apply(params, rank=2))
    >>> abstract = jax.eval_shape(lambda: jlora.split(jlora.apply(params, rank=2)).trainable)
    >>> restore(d, abstract).tree["q_proj"].a.shape
    (4, 2)
  """
  directory = os.fspath(os.path.abspath(directory))
  meta = read_metadata(directory)
  items: dict[str, Any] = {}
  if target is None:
    abstract = {}
    for ps, m in meta["adapters"].items():
      abstract[m["key"]] = {"a": _abstract(None, m["a_shape"], m["dtype"]),
                            "b": _abstract(None, m["b_shape"], m.get("b_dtype", m["dtype"]))}
    for ps, m in meta["trainable"].items():
      abstract[m["key"]] = {"value": _abstract(None, m["shape"], m["dtype"])}
    entries = None
  else:
    entries, base = _entries(target, "restore")
    if check_base and base is not None and meta.get("fingerprint") is not None:
      _check_base(directory, meta, base)
    _check_entries(directory, meta, entries)
    abstract = {}
    for e in entries:
      x = e.node
      if e.kind == "lora":
        abstract[meta["adapters"][e.path]["key"]] = {"a": _abstract(x.a), "b": _abstract(x.b)}
      else:
        abstract[meta["trainable"][e.path]["key"]] = {"value": _abstract(x.value)}
  items[_ADAPTER] = ocp.args.StandardRestore(abstract)

  opt_leaves = opt_def = None
  if opt_state is not None:
    saved = meta.get("opt_state")
    if saved is None:
      raise ValueError(
          f"jlora.restore: the checkpoint at {directory!r} holds no optimizer state; pass "
          f"opt_state=None and initialize a new one (e.g. step.init(tree)).")
    flat, opt_def = jax.tree_util.tree_flatten_with_path(opt_state)
    mine = [[P.path_str(p), list(_shape(x)), _dtype(x)] for p, x in flat]
    if mine != [list(s) for s in saved]:
      first = next((i for i, (u, v) in enumerate(zip(saved, mine)) if list(u) != v),
                   min(len(saved), len(mine)))
      at = (lambda lst: f"{lst[first][0]!r} {_fmt(*lst[first][1:])}" if first < len(lst)
            else "<end>")
      raise ValueError(
          f"jlora.restore: the optimizer state in {directory!r} differs at leaf {first}: the "
          f"checkpoint has {at(saved)}, the target has {at(mine)} ({len(saved)} vs {len(mine)} "
          f"leaves). Build `opt_state` with the optimizer the checkpoint was trained with, "
          f"e.g. jax.eval_shape(step.init, tree).")
    items[_OPT] = ocp.args.StandardRestore(
        {_key(i): _abstract(x) for i, (_, x) in enumerate(flat)})
    opt_leaves = [x for _, x in flat]

  got = _read_arrays(directory, items)
  arrays = got[_ADAPTER]
  if target is None:
    tree = _tree_from_metadata(meta, arrays)
  else:
    leaves, treedef = jax.tree_util.tree_flatten(target, is_leaf=is_node)
    by_path = {e.path: e for e in entries}
    flat_paths = [P.path_str(p) for p, _ in
                  jax.tree_util.tree_flatten_with_path(target, is_leaf=is_node)[0]]
    new = []
    for ps, x in zip(flat_paths, leaves):
      e = by_path.get(ps)
      if e is not None and e.kind == "lora":
        v = arrays[meta["adapters"][ps]["key"]]
        new.append(LoRA(x.w, v["a"], v["b"], x.alpha, x.a_axes, x.stack, x.rslora))
      elif e is not None:
        new.append(Trainable(arrays[meta["trainable"][ps]["key"]]["value"]))
      else:
        new.append(x)
    tree = jax.tree_util.tree_unflatten(treedef, new)
  opt = None
  if opt_leaves is not None:
    o = got[_OPT]
    opt = jax.tree_util.tree_unflatten(opt_def, [o[_key(i)] for i in range(len(opt_leaves))])
  return Restored(tree, opt, meta.get("step"), meta)


# ----------------------------------------------------------------------------- manager


_STEP_RE = re.compile(r"^\d+$")


class CheckpointManager:
  """Numbered checkpoints in one directory, keeping the newest `max_to_keep`.

  Each `save(step, tree, ...)` writes `directory/<step>` with `jlora.save`
  (atomically: a save killed midway leaves the earlier checkpoints as they
  were) and then deletes the oldest checkpoints beyond `max_to_keep`. Opening
  a manager removes the temporary directories of interrupted saves and puts
  back a checkpoint whose overwrite was interrupted.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> from jlora._src.checkpoint import CheckpointManager
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> mgr = CheckpointManager(tempfile.mkdtemp(), max_to_keep=2)
    >>> for step in (1, 2, 3):
    ...   _ = mgr.save(step, t)
    >>> mgr.all_steps()
    [2, 3]
    >>> mgr.restore(t).step
    3
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
    """Opens (and creates) `directory`; `max_to_keep=None` keeps every checkpoint."""
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(
          f"jlora.CheckpointManager: max_to_keep={max_to_keep!r} must be an int >= 1, or None "
          f"to keep every checkpoint.")
    self.directory = os.fspath(os.path.abspath(directory))
    self.max_to_keep = max_to_keep
    if _primary():
      os.makedirs(self.directory, exist_ok=True)
      _recover(self.directory)
    _sync("jlora_manager_init")

  def path(self, step: int) -> str:
    """The directory of `step`'s checkpoint."""
    return os.path.join(self.directory, str(int(step)))

  def all_steps(self) -> list[int]:
    """The steps with a complete checkpoint, oldest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if _STEP_RE.match(n) and os.path.isdir(os.path.join(self.directory, n)))

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, tree: Any, *, opt_state: Any = None,
           metadata: Mapping[str, Any] | None = None) -> str:
    """Saves `tree` (and `opt_state`) as `step`, then drops checkpoints beyond `max_to_keep`.

    Raises:
      FileExistsError: `step` is already saved.
    """
    path = self.path(step)
    if os.path.exists(path):
      raise FileExistsError(
          f"jlora.CheckpointManager.save: step {step} is already saved in {self.directory!r}. "
          f"Save under a new step, or delete {path!r} first.")
    out = save(path, tree, opt_state=opt_state, step=step, metadata=metadata)
    if self.max_to_keep is not None and _primary():
      for old in self.all_steps()[:-self.max_to_keep]:
        shutil.rmtree(self.path(old), ignore_errors=True)
    _sync("jlora_manager_rotate")
    return out

  def restore(self, target: Any = None, *, step: int | None = None, opt_state: Any = None,
              check_base: bool = True) -> Restored:
    """`jlora.restore` of `step` (default: the latest).

    Raises:
      FileNotFoundError: there is no checkpoint yet, or none for `step`.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(
            f"jlora.CheckpointManager.restore: no checkpoint in {self.directory!r} yet. Start "
            f"from the initial tree (check latest_step() is None first).")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
          f"jlora.CheckpointManager.restore: no checkpoint for step {step} in "
          f"{self.directory!r}; saved steps: {', '.join(map(str, steps)) or 'none'}.")
    return restore(self.path(step), target, opt_state=opt_state, check_base=check_base)


def _recover(root: str) -> None:
  """Deletes leftovers of interrupted saves; puts back an interrupted overwrite's original."""
  for n in os.listdir(root):
    full = os.path.join(root, n)
    if _TMP in n:
      shutil.rmtree(full, ignore_errors=True)
    elif _OLD in n:
      final = os.path.join(root, n.split(_OLD)[0])
      if os.path.exists(final):
        shutil.rmtree(full, ignore_errors=True)
      else:
        os.rename(full, final)

