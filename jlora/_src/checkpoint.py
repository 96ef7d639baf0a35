"""Adapter checkpoints on orbax: save what trains, restore without the base weights.

A checkpoint is a directory holding two things:

* ``jlora.json``: the metadata, which is also the commit record: the format
  version, the jlora version, the step, the save's id, per target its rank,
  alpha and layout (`a_axes`, `stack`, `rslora`), array shapes and key path,
  the adapter dtype, the user's metadata, and the base tree's paths, shapes and
  dtypes with their fingerprint. It is strict JSON (a non-finite alpha is
  written as the string ``"nan"``, ``"inf"`` or ``"-inf"``).
* ``arrays-<save id>``: an orbax-checkpoint directory with the arrays that
  train (`a` and `b` of every `jlora.LoRA` leaf and the value of every
  `jlora.Trainable` leaf, never the frozen weights) and, optionally, the leaves
  of the optimizer state.

How a save commits, so that nothing is lost and no two saves are mixed:

* Every save has an id of its own, ``<host>-<pid>-<random>``, and writes both
  parts into a temporary sibling ``<name>.jlora-tmp-<id>``.
* A new checkpoint is that directory renamed into place. An overwrite moves
  the new ``arrays-<id>`` into the checkpoint, replaces ``jlora.json`` with one
  atomic rename, and only then deletes the arrays it replaced; writers take
  turns through a lock file (``.jlora-lock``). A reader reads ``jlora.json``,
  then the arrays it names, then checks that ``jlora.json`` still names them
  (else it reads again): it gets one save or the other, never a mix.
* A save killed midway leaves the previous checkpoint as it was. Its temporary
  directory is removed by a later save to the same path, or by opening a
  `CheckpointManager` on the parent, once its writer's process is known to have
  ended (same host, pid no longer running). Temporaries of running processes
  and of other hosts are never touched.
* ``overwrite=True`` replaces only a jlora checkpoint or an empty directory; a
  file or a directory of other files is refused, never deleted.

Format 1 checkpoints (``jlora/metadata`` and the arrays at the top, written by
jlora before this layout) are still read; overwriting one converts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora._src import paths as P
from jlora._src.leaf import LoRA, LoRAStack, Trainable, is_node
from jlora._src.qarray import Quantized
from jlora._src.version import VERSION

try:
  import fcntl
except ImportError:  # pragma: no cover - Windows: writers of one path are not serialized
  fcntl = None

FORMAT = "jlora.adapter"
FORMAT_VERSION = 2
_META_FILE = "jlora.json"
_ARRAYS = "arrays-"
_TMP = ".jlora-tmp-"
_DEL = ".jlora-del-"
_LOCK = ".jlora-lock"
_ADAPTER, _OPT = "adapter", "opt_state"
# Format 1: the metadata at jlora/metadata, the arrays' items at the top.
_V1_META = ("jlora", "metadata")
_V1_ENTRIES = ("adapter", "opt_state", "jlora", "_CHECKPOINT_METADATA", "_METADATA",
               "commit_success.txt")
_V1_ID = "format-1"
# A save id: an 8-hex host tag, the writer's pid, 12 random hex digits.
_ID_RE = re.compile(r"([0-9a-f]{8})-([0-9]+)-([0-9a-f]{12})", re.ASCII)
_READ_ATTEMPTS = 20


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
  keys: list[str]  # the path's components (a key may hold '/')


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))


def _dtype(x) -> str:
  if isinstance(x, Quantized):  # the fingerprint tells a quantized base from a float one
    dq = "+dq" if x.double_quant else ""
    return f"{x.kind}/{x.block_size}{dq}->{x.dtype_name}"
  dt = getattr(x, "dtype", None)
  return str(np.dtype(dt)) if dt is not None else str(np.asarray(x).dtype)


def _components(path) -> list[str]:
  """The components of a key path that `P.path_str` joins with '/' (wrapper keys dropped)."""
  return [P.key_str(k) for k in path
          if not (isinstance(k, jax.tree_util.GetAttrKey) and P.path_str((k,)) == "")]


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
    keys = _components(path)
    if isinstance(x, LoRAStack):
      raise ValueError(
          f"jlora.{fn}: the leaf at {ps!r} is a jlora.LoRAStack (several adapters); a "
          f"checkpoint holds one adapter. Save each: jlora.{fn}(..., jlora.unstack(tree, i)).")
    if isinstance(x, LoRA):
      if x.a is None or x.b is None:
        raise ValueError(
            f"jlora.{fn}: the jlora.LoRA leaf at {ps!r} has no adapters (a or b is None): this "
            f"is the frozen half of jlora.split. Pass the whole tree or its trainable half.")
      entries.append(_Entry(ps, "lora", x, keys))
      if x.w is None:
        complete = False
      else:
        base.append((ps, list(_shape(x.w)), _dtype(x.w)))
    elif isinstance(x, Trainable):
      if x.value is None:
        raise ValueError(
            f"jlora.{fn}: the jlora.Trainable leaf at {ps!r} holds None: this is the frozen "
            f"half of jlora.split. Pass the whole tree or its trainable half.")
      entries.append(_Entry(ps, "trainable", x, keys))
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


# ------------------------------------------------------------------------- save ids, temporaries


@functools.cache
def _host_tag() -> str:
  """8 hex digits naming this host and pid namespace (two containers differ)."""
  try:
    ns = str(os.stat("/proc/self/ns/pid").st_ino)
  except OSError:
    ns = ""
  return hashlib.sha256(f"{socket.gethostname()}|{ns}".encode()).hexdigest()[:8]


def _new_save_id() -> str:
  sid = f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
  if jax.process_count() > 1:  # pragma: no cover - multi-host only: every process writes there
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    raw = np.frombuffer(sid.encode().ljust(64), np.uint8)
    sid = bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).decode().strip()
  return sid


def _alive(pid: int) -> bool:
  if os.name == "nt":  # pragma: no cover - os.kill would end the process there
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. another user's process
    return True
  return True


def _abandoned(save_id: str) -> bool:
  """True only for a save whose writer is known to be gone: this host, pid not running."""
  m = _ID_RE.fullmatch(save_id)
  if m is None or m.group(1) != _host_tag():
    return False
  pid = int(m.group(2))
  return pid != os.getpid() and not _alive(pid)


def _remove_abandoned_temporaries(parent: str, name: str | None = None) -> None:
  """Deletes `<name>.jlora-tmp-<id>` siblings (any name if None) of saves that died."""
  try:
    names = os.listdir(parent)
  except FileNotFoundError:
    return
  for n in names:
    stem, sep, sid = n.partition(_TMP)
    if sep and (name is None or stem == name) and _abandoned(sid):
      shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


def _remove(path: str) -> None:
  """Deletes a checkpoint: renamed away first (readers then see it gone), then removed."""
  parent, name = os.path.split(path)
  gone = os.path.join(parent, f"{name}{_DEL}{uuid.uuid4().hex[:12]}")
  try:
    os.rename(path, gone)
  except FileNotFoundError:
    return
  shutil.rmtree(gone, ignore_errors=True)


@contextlib.contextmanager
def _locked(directory: str):
  """Serializes the writers that commit into one checkpoint directory."""
  if fcntl is None:  # pragma: no cover
    yield
    return
  fd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # pragma: no cover - platforms without directory handles
    return
  try:
    os.fsync(fd)
  except OSError:  # pragma: no cover
    pass
  finally:
    os.close(fd)


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, allow_nan=False)
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------- what a path holds


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _kind(path: str) -> str:
  """'none', 'file', 'empty' (directory), 'checkpoint' (jlora's, any version) or 'other'."""
  if not os.path.lexists(path):
    return "none"
  if not os.path.isdir(path):
    return "file"
  try:
    if not os.listdir(path):
      return "empty"
  except FileNotFoundError:
    return "none"
  for meta_file in (os.path.join(path, _META_FILE), os.path.join(path, *_V1_META)):
    try:
      meta = _read_json(meta_file)
    except (OSError, ValueError):
      continue
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
      return "checkpoint"
  return "other"


def _current_id(directory: str) -> str | None:
  """The id of the save `directory` holds now (None: none there, or unreadable)."""
  try:
    meta = _read_json(os.path.join(directory, _META_FILE))
  except FileNotFoundError:
    return _V1_ID if os.path.isfile(os.path.join(directory, *_V1_META)) else None
  except (OSError, ValueError):
    return None
  return meta.get("save_id") if isinstance(meta, dict) else None


def _id_of(meta: dict) -> str:
  return _V1_ID if meta["format_version"] == 1 else meta["save_id"]


def _arrays_dir(directory: str, meta: dict) -> str:
  return directory if meta["format_version"] == 1 else os.path.join(
      directory, _ARRAYS + meta["save_id"])


# ----------------------------------------------------------------------------- save


def _key(i: int) -> str:
  return f"{i:05d}"


def _json_float(x) -> float | str:
  """A float for strict JSON: NaN and infinities as the strings 'nan', 'inf', '-inf'."""
  x = float(x)
  return x if math.isfinite(x) else str(x)


def _same(x, y) -> bool:
  """Equality that counts two NaNs as equal."""
  if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
    return True
  return x == y


def _check_step(step, fn: str, *, optional: bool = False) -> int | None:
  if step is None and optional:
    return None
  if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
    raise TypeError(
        f"jlora.{fn}: step must be a non-negative int, got {step!r}. Pass the number of "
        f"training steps done as an int{' (or None)' if optional else ''}.")
  step = int(step)
  if step < 0:
    raise ValueError(
        f"jlora.{fn}: step must be a non-negative int, got {step}. Count the training steps "
        f"done, from 0.")
  return step


def _variant_metadata(x) -> dict:
  """The metadata of a LoRA variant: DoRA's `m` (shape, dtype), a residual init's name."""
  out = {}
  if x.m is not None:
    out.update(m_shape=list(_shape(x.m)), m_dtype=_dtype(x.m))
  if x.residual is not None:
    out["residual"] = x.residual
  return out


def _lora_arrays(x) -> dict:
  return {"a": x.a, "b": x.b} if x.m is None else {"a": x.a, "b": x.b, "m": x.m}


def _metadata(entries, base, opt_flat, step, user, save_id) -> dict:
  adapters, trainable, dtypes = {}, {}, set()
  for i, e in enumerate(entries):
    x = e.node
    if e.kind == "lora":
      adapters[e.path] = dict(
          key=_key(i), keys=e.keys, rank=x.rank, alpha=_json_float(x.alpha),
          a_axes=list(x.a_axes), stack=x.stack, rslora=bool(x.rslora),
          a_shape=list(_shape(x.a)), b_shape=list(_shape(x.b)), dtype=_dtype(x.a),
          b_dtype=_dtype(x.b), **_variant_metadata(x))
      dtypes.update({_dtype(x.a), _dtype(x.b)})
    else:
      trainable[e.path] = dict(key=_key(i), keys=e.keys, shape=list(_shape(x.value)),
                               dtype=_dtype(x.value))
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "jlora_version": VERSION,
      "save_id": save_id,
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


def _refuse(directory: str, kind: str, overwrite: bool, fn: str) -> None:
  if kind in ("file", "other"):
    what = "a file" if kind == "file" else "a directory of other files"
    raise FileExistsError(
        f"jlora.{fn}: {directory!r} exists and is not a jlora checkpoint ({what}); jlora only "
        f"replaces a checkpoint it wrote, even with overwrite=True. Save to another directory, "
        f"or move it away yourself.")
  if kind != "none" and not overwrite:
    raise FileExistsError(
        f"jlora.{fn}: {directory!r} already exists. Pass overwrite=True to replace it (the old "
        f"checkpoint stays readable until the new one is complete), or choose another "
        f"directory.")


def save(directory: str | os.PathLike, tree: Any, *, opt_state: Any = None,
         step: int | None = None, metadata: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> str:
  """Saves the adapters of a jlora tree (and optionally the optimizer state).

  Only `LoRA.a`, `LoRA.b` and `Trainable` values are written, never the frozen
  weights; the metadata records per target the rank, alpha and layout, and the
  base tree's paths, shapes and dtypes with their fingerprint, which
  `jlora.restore` checks. Everything is written to a temporary directory beside
  `directory` first and committed with an atomic rename, so a save that dies
  midway leaves an existing checkpoint intact, and a reader of an overwritten
  checkpoint gets the old save or the new one, never parts of both.

  Args:
    directory: the checkpoint directory to create.
    tree: a jlora tree (from `jlora.apply`), or its trainable half (then the
      base fingerprint is not recorded).
    opt_state: an optimizer state to save alongside (e.g. from
      `jlora.train_step(...).init(tree)`).
    step: the training step (a non-negative int), returned by `jlora.restore`.
    metadata: JSON-serializable user metadata (finite numbers only), returned
      by `jlora.restore`.
    overwrite: replace an existing jlora checkpoint (or empty directory) at
      `directory`; the old checkpoint stays readable until the new one is
      complete. Anything else at `directory` is never replaced.

  Returns:
    The checkpoint directory, as a string.

  Raises:
    FileExistsError: `directory` exists and `overwrite` is False, or it is a
      file or a directory that is not a jlora checkpoint.
    ValueError: the tree has no LoRA or Trainable leaf, two leaves share a
      path, or `step` is negative.
    TypeError: `step` is not an int, or `metadata` is not JSON-serializable.

  Example:
    >>> import tempfile, os, jax.numpy as jnp, jlora
    >>> from jlora._src.checkpoint import save, restore
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> d = save(os.path.join(tempfile.mkdtemp(), "ckpt"), t, step=3)
    >>> restore(d, t).step
    3
  """
  return _save(directory, tree, opt_state, step, metadata, overwrite, "save")


def _save(directory, tree, opt_state, step, metadata, overwrite, fn) -> str:
  directory = os.fspath(os.path.abspath(directory))
  step = _check_step(step, fn, optional=True)
  user = dict(metadata) if metadata is not None else {}
  try:
    json.dumps(user, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"jlora.{fn}: metadata is not JSON-serializable ({e}); pass plain dicts, lists, "
        f"strings and finite numbers (a NaN or infinite float as a string: str(x)).") from e
  entries, base = _entries(tree, fn)
  if not entries:
    raise ValueError(
        f"jlora.{fn}: the tree holds no jlora.LoRA or jlora.Trainable leaf, so there is no "
        f"adapter to save to {directory!r}. Call jlora.apply(params, ...) first.")
  _refuse(directory, _kind(directory), overwrite, fn)
  opt_flat = None if opt_state is None else _flat_opt(opt_state)
  save_id = _new_save_id()
  meta = _metadata(entries, base, opt_flat, step, user, save_id)
  arrays = {}
  for i, e in enumerate(entries):
    x = e.node
    arrays[_key(i)] = _lora_arrays(x) if e.kind == "lora" else {"value": x.value}
  items = {_ADAPTER: ocp.args.StandardSave(arrays)}
  if opt_flat is not None:
    items[_OPT] = ocp.args.StandardSave({_key(i): x for i, (_, x) in enumerate(opt_flat)})

  parent, name = os.path.split(directory)
  tmp = os.path.join(parent, f"{name}{_TMP}{save_id}")
  if _primary():
    os.makedirs(tmp)
    _remove_abandoned_temporaries(parent, name)
  _sync("jlora_save_prepare")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
      c.save(os.path.join(tmp, _ARRAYS + save_id), ocp.args.Composite(**items))
    if _primary():
      _write_json(os.path.join(tmp, _META_FILE), meta)
    _commit(tmp, directory, save_id, overwrite, fn)
  except BaseException:
    if _primary():
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:  # pragma: no cover - multi-host only
    ocp.multihost.sync_global_processes(name)


def _commit(tmp: str, directory: str, save_id: str, overwrite: bool, fn: str) -> None:
  """Puts the complete save in `tmp` into place: a rename, or a swap of its metadata."""
  if _primary():
    try:
      os.rename(tmp, directory)  # a new checkpoint (an empty directory is replaced)
    except OSError as e:
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
        raise
      kind = _kind(directory)
      if kind == "checkpoint" and overwrite:
        _swap(tmp, directory, save_id)
        shutil.rmtree(tmp, ignore_errors=True)
      else:  # something else appeared while saving: refused, or gone again: retried
        _refuse(directory, kind, overwrite, fn)
        os.rename(tmp, directory)
    _fsync_dir(os.path.dirname(directory))
  _sync("jlora_save_commit")


def _swap(tmp: str, directory: str, save_id: str) -> None:
  """Replaces the save in checkpoint `directory` with the one in `tmp`."""
  arrays = _ARRAYS + save_id
  with _locked(directory):
    old = _current_id(directory)
    os.rename(os.path.join(tmp, arrays), os.path.join(directory, arrays))
    os.replace(os.path.join(tmp, _META_FILE), os.path.join(directory, _META_FILE))
    _fsync_dir(directory)
    # The new save is the one readers find from now on; what it replaced goes. Under the
    # lock, arrays that are not current are left by writers killed before their swap.
    if old == _V1_ID:
      for n in _V1_ENTRIES:
        full = os.path.join(directory, n)
        if os.path.isdir(full):
          shutil.rmtree(full, ignore_errors=True)
        elif os.path.exists(full):
          os.remove(full)
    for n in os.listdir(directory):
      if n.startswith(_ARRAYS) and n != arrays and (
          fcntl is not None or n == _ARRAYS + str(old) or _abandoned(n[len(_ARRAYS):])):
        shutil.rmtree(os.path.join(directory, n), ignore_errors=True)


# ----------------------------------------------------------------------------- restore


def read_metadata(directory: str | os.PathLike) -> dict:
  """The metadata of a jlora checkpoint: targets, ranks, layout, step, fingerprint.

  Alphas come back as floats (NaN and infinities included).

  Raises:
    FileNotFoundError: there is no checkpoint at `directory`.
    ValueError: the directory is not a jlora checkpoint, its metadata is
      unreadable, or it was written by a newer format version.
  """
  directory = os.fspath(os.path.abspath(directory))
  if not os.path.isdir(directory):
    what = " (it is a file)" if os.path.exists(directory) else ""
    raise FileNotFoundError(
        f"jlora.restore: no checkpoint at {directory!r}{what}. Point to a directory written by "
        f"jlora.save, or a step of a jlora.CheckpointManager.")
  for _ in range(2):  # twice: an overwrite may convert a format-1 checkpoint meanwhile
    meta_file = os.path.join(directory, _META_FILE)
    if not os.path.isfile(meta_file):
      meta_file = os.path.join(directory, *_V1_META)
    try:
      meta = _read_json(meta_file)
      break
    except FileNotFoundError as e:
      missing = e
    except (OSError, ValueError) as e:
      raise ValueError(
          f"jlora.restore: the metadata {meta_file!r} is unreadable ({e}); the checkpoint is "
          f"corrupt. Restore an earlier checkpoint.") from e
  else:
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"jlora.restore: the checkpoint at {directory!r} was deleted "
                              f"while it was being read.") from missing
    raise ValueError(
        f"jlora.restore: {directory!r} is not a jlora checkpoint (it has no {_META_FILE} "
        f"file). Point to a directory written by jlora.save, or a step of a "
        f"jlora.CheckpointManager.")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"jlora.restore: {directory!r} is not a jlora checkpoint (its metadata "
                     f"has no format {FORMAT!r}).")
  version = meta.get("format_version")
  if version not in (1, FORMAT_VERSION) or (version == 1) != meta_file.endswith(_V1_META[-1]):
    raise ValueError(
        f"jlora.restore: {directory!r} has format version {version!r}; this jlora (version "
        f"{VERSION}) reads versions 1 and {FORMAT_VERSION}. Upgrade jlora.")
  if version != 1 and not (isinstance(meta.get("save_id"), str)
                           and _ID_RE.fullmatch(meta["save_id"])):
    raise ValueError(
        f"jlora.restore: the metadata {meta_file!r} has no valid save_id; the checkpoint is "
        f"corrupt. Restore an earlier checkpoint.")
  for m in meta.get("adapters", {}).values():
    m["alpha"] = float(m["alpha"])
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
      if not _same(mine[field], theirs):
        raise ValueError(
            f"jlora.restore: the adapter at {e.path!r} has {field} {theirs} in the checkpoint "
            f"but {field} {mine[field]} in the target. Rebuild the target with the saved "
            f"layout, e.g. jlora.apply(params, rank={{{e.path!r}: {want['rank']}, ...}}, "
            f"alpha=..., rslora={want['rslora']}); the checkpoint's metadata lists rank, alpha, "
            f"a_axes, stack and rslora per target.")
    _check_variant(e.path, x, want)
    for name in ("a", "b"):
      got = list(_shape(getattr(x, name)))
      if got != want[f"{name}_shape"]:
        raise ValueError(
            f"jlora.restore: the adapter {name!r} at {e.path!r} has shape "
            f"{tuple(want[f'{name}_shape'])} in the checkpoint and {tuple(got)} in the target "
            f"(the kernel shapes differ). Restore onto the base model the checkpoint was "
            f"trained from.")


def _check_variant(ps, x, want):
  """Refuses a target whose DoRA magnitude or residual init differs from the checkpoint's."""
  saved_dora, dora = "m_shape" in want, x.m is not None
  if saved_dora != dora:
    raise ValueError(
        f"jlora.restore: the adapter at {ps!r} is {'DoRA' if saved_dora else 'plain LoRA'} in "
        f"the checkpoint but {'DoRA' if dora else 'plain LoRA'} in the target. Rebuild the target "
        f"with jlora.apply(params, ..., dora={saved_dora}).")
  if dora and list(_shape(x.m)) != want["m_shape"]:
    raise ValueError(
        f"jlora.restore: DoRA's magnitude at {ps!r} has shape {tuple(want['m_shape'])} in the "
        f"checkpoint and {tuple(_shape(x.m))} in the target. Restore onto the base model the "
        f"checkpoint was trained from.")
  if want.get("residual") != x.residual:
    raise ValueError(
        f"jlora.restore: the adapter at {ps!r} was trained on the residual of "
        f"init={want.get('residual')!r} in the checkpoint, but the target's is "
        f"{x.residual!r}: the frozen weights differ. Rebuild the target with jlora.apply(params, "
        f"..., init={want.get('residual') or 'he_uniform'!r}) (the same rank and alpha), then "
        f"restore.")


def _read_arrays(directory, items):
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
    return c.restore(directory, ocp.args.Composite(**items))


def _tree_from_metadata(meta, arrays):
  """Nested dicts from the saved key paths, with LoRA and Trainable leaves."""
  out: dict = {}
  for ps, m in meta["adapters"].items():
    v = arrays[m["key"]]
    _put(out, m.get("keys", ps.split("/")),
         LoRA(w=None, a=v["a"], b=v["b"], alpha=m["alpha"], a_axes=tuple(m["a_axes"]),
              stack=m["stack"], rslora=m["rslora"], m=v.get("m"), residual=m.get("residual")))
  for ps, m in meta["trainable"].items():
    _put(out, m.get("keys", ps.split("/")), Trainable(arrays[m["key"]]["value"]))
  return out


def _put(d, keys, leaf):
  for k in keys[:-1]:
    d = d.setdefault(k, {})
  d[keys[-1]] = leaf


def _items(directory, meta, target, opt_state, check_base):
  """The orbax restore arguments for `meta`'s arrays, after checking `target` against it."""
  items: dict[str, Any] = {}
  if target is None:
    abstract = {}
    for m in meta["adapters"].values():
      abstract[m["key"]] = {"a": _abstract(None, m["a_shape"], m["dtype"]),
                            "b": _abstract(None, m["b_shape"], m.get("b_dtype", m["dtype"]))}
      if "m_shape" in m:
        abstract[m["key"]]["m"] = _abstract(None, m["m_shape"], m["m_dtype"])
    for m in meta["trainable"].values():
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
        abstract[meta["adapters"][e.path]["key"]] = {
            k: _abstract(v) for k, v in _lora_arrays(x).items()}
      else:
        abstract[meta["trainable"][e.path]["key"]] = {"value": _abstract(x.value)}
  items[_ADAPTER] = ocp.args.StandardRestore(abstract)

  opt_def = None
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
  return items, entries, opt_def


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
  * None: the adapters come back as nested dicts keyed by the saved key paths'
    components (as strings), with `LoRA(w=None, a, b, ...)` and `Trainable`
    leaves.

  Concrete targets place the arrays like the target's arrays; structs without
  a sharding and None place them on the first local device.

  The metadata and the arrays always come from one save: when another process
  overwrites the checkpoint while it is read, it is read again.

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
    FileNotFoundError: no checkpoint at `directory`, or it was deleted while
      being read.
    ValueError: not a jlora checkpoint, corrupt files, a different base model
      (the message names the first differing path), a rank, alpha or layout
      mismatch, targets that differ, or an optimizer state that differs.
    RuntimeError: other saves replaced the checkpoint during every attempt to
      read it.

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
  for attempt in range(_READ_ATTEMPTS):
    meta = read_metadata(directory)
    items, entries, opt_def = _items(directory, meta, target, opt_state, check_base)
    try:
      got, err = _read_arrays(_arrays_dir(directory, meta), items), None
    except Exception as e:  # pylint: disable=broad-except  # orbax and tensorstore raise many types
      got, err = None, e
    if _current_id(directory) == _id_of(meta):  # still current: none of it was deleted meanwhile
      if err is not None:
        raise ValueError(
            f"jlora.restore: could not read the arrays of the checkpoint at {directory!r} "
            f"({type(err).__name__}: {str(err)[:500]}); the checkpoint is incomplete or "
            f"corrupt. Restore an earlier checkpoint.") from err
      break
    if not os.path.isdir(directory):
      raise FileNotFoundError(
          f"jlora.restore: the checkpoint at {directory!r} was deleted while it was being read "
          f"(e.g. by a jlora.CheckpointManager keeping only its newest checkpoints). Restore a "
          f"newer one.") from err
    time.sleep(0.005 * (attempt + 1))  # another save replaced it meanwhile: read that one
  else:
    raise RuntimeError(
        f"jlora.restore: the checkpoint at {directory!r} was replaced by another save during "
        f"each of {_READ_ATTEMPTS} attempts to read it. Read it while its writer pauses, or "
        f"read the numbered steps of a jlora.CheckpointManager, which are written once.")

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
        new.append(dataclasses.replace(x, a=v["a"], b=v["b"], m=v.get("m")))
      elif e is not None:
        new.append(Trainable(arrays[meta["trainable"][ps]["key"]]["value"]))
      else:
        new.append(x)
    tree = jax.tree_util.tree_unflatten(treedef, new)
  opt = None
  if opt_def is not None:
    o = got[_OPT]
    opt = jax.tree_util.tree_unflatten(opt_def, [o[_key(i)] for i in range(opt_def.num_leaves)])
  return Restored(tree, opt, meta.get("step"), meta)


# ----------------------------------------------------------------------------- manager


_STEP_RE = re.compile(r"(0|[1-9][0-9]*)", re.ASCII)


class CheckpointManager:
  """Numbered checkpoints in one directory, keeping the newest `max_to_keep`.

  Each `save(step, tree, ...)` writes `directory/<step>` with `jlora.save`
  (atomically: a save killed midway leaves the earlier checkpoints as they
  were) and then deletes the oldest checkpoints beyond `max_to_keep`.

  Steps only go up: saving a step that is not newer than the newest checkpoint
  (a run restarted in the same directory) raises, unless `overwrite=True` asks
  to replace the run from that step on. Only committed checkpoints count as
  steps: any other entry of `directory` (an empty `7/`, a folder of your own)
  is never listed, rotated or deleted.

  Opening a manager (e.g. in an evaluator process while training saves)
  removes only the temporaries of saves whose process has ended, never those of
  a save in progress.

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
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(
        max_to_keep, (int, np.integer)) or max_to_keep < 1):
      raise ValueError(
          f"jlora.CheckpointManager: max_to_keep={max_to_keep!r} must be an int >= 1, or None "
          f"to keep every checkpoint.")
    self.directory = os.fspath(os.path.abspath(directory))
    self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
    if _primary():
      os.makedirs(self.directory, exist_ok=True)
      _recover(self.directory)
    _sync("jlora_manager_init")

  def path(self, step: int) -> str:
    """The directory of `step`'s checkpoint."""
    return os.path.join(self.directory, str(_check_step(step, "CheckpointManager.path")))

  def all_steps(self) -> list[int]:
    """The steps with a committed checkpoint, oldest first."""
    try:
      names = os.listdir(self.directory)
    except FileNotFoundError:
      return []
    return sorted(int(n) for n in names if _STEP_RE.fullmatch(n)
                  and _kind(os.path.join(self.directory, n)) == "checkpoint")

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, tree: Any, *, opt_state: Any = None,
           metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
    """Saves `tree` (and `opt_state`) as `step`, then drops checkpoints beyond `max_to_keep`.

    Args:
      step: the training step, a non-negative int newer than every saved step.
      tree: a jlora tree, as for `jlora.save`.
      opt_state: an optimizer state to save alongside.
      metadata: JSON-serializable user metadata.
      overwrite: replace the run from `step` on: `step`'s checkpoint is
        replaced if there is one, and once the new one is saved, the
        checkpoints newer than `step` are deleted, so `step` becomes the
        latest.

    Returns:
      The checkpoint directory of `step`, as a string.

    Raises:
      FileExistsError: `step` is already saved, or `directory/<step>` is
        something other than a jlora checkpoint.
      ValueError: `step` is older than the newest checkpoint, or negative.
      TypeError: `step` is not an int.
    """
    fn = "CheckpointManager.save"
    step = _check_step(step, fn)
    steps = self.all_steps()
    if not overwrite and step in steps:
      raise FileExistsError(
          f"jlora.{fn}: step {step} is already saved in {self.directory!r}. Save under a newer "
          f"step, or pass overwrite=True to replace it.")
    if not overwrite and steps and step < steps[-1]:
      raise ValueError(
          f"jlora.{fn}: step {step} is not newer than the newest checkpoint, step {steps[-1]}, "
          f"in {self.directory!r} (a run restarted in the same directory?). Resume with "
          f"restore() and save later steps, save a new run to a new directory, or pass "
          f"overwrite=True to replace the run from step {step} on (deleting the checkpoints "
          f"after it).")
    out = _save(self.path(step), tree, opt_state, step, metadata, overwrite, fn)
    if _primary():
      if overwrite:
        for s in self.all_steps():
          if s > step:
            _remove(self.path(s))
      if self.max_to_keep is not None:
        for old in self.all_steps()[:-self.max_to_keep]:
          _remove(self.path(old))
    _sync("jlora_manager_rotate")
    return out

  def restore(self, target: Any = None, *, step: int | None = None, opt_state: Any = None,
              check_base: bool = True) -> Restored:
    """`jlora.restore` of `step` (default: the latest).

    With the default, a checkpoint that another process's manager rotates away
    while it is read is replaced by the newer latest one.

    Raises:
      FileNotFoundError: there is no checkpoint yet, or none for `step`.
    """
    if step is not None:
      step = _check_step(step, "CheckpointManager.restore")
      steps = self.all_steps()
      if step not in steps:
        raise FileNotFoundError(
            f"jlora.CheckpointManager.restore: no checkpoint for step {step} in "
            f"{self.directory!r}; saved steps: {', '.join(map(str, steps)) or 'none'}.")
      return restore(self.path(step), target, opt_state=opt_state, check_base=check_base)
    for _ in range(_READ_ATTEMPTS):
      steps = self.all_steps()
      if not steps:
        raise FileNotFoundError(
            f"jlora.CheckpointManager.restore: no checkpoint in {self.directory!r} yet. Start "
            f"from the initial tree (check latest_step() is None first).")
      try:
        return restore(self.path(steps[-1]), target, opt_state=opt_state,
                       check_base=check_base)
      except FileNotFoundError:
        if steps[-1] in self.all_steps():
          raise
    raise RuntimeError(  # pragma: no cover - needs 20 rotations during 20 reads
        f"jlora.CheckpointManager.restore: the newest checkpoint in {self.directory!r} was "
        f"deleted while being read {_READ_ATTEMPTS} times. Pass step= to read a kept one.")


def _recover(root: str) -> None:
  """Deletes what saves that died left behind; never anything a running save still uses."""
  _remove_abandoned_temporaries(root)
  for n in os.listdir(root):
    full = os.path.join(root, n)
    if _DEL in n:  # a checkpoint being deleted: whoever started it, it goes
      shutil.rmtree(full, ignore_errors=True)
    elif _STEP_RE.fullmatch(n) and os.path.isdir(full):
      current = _current_id(full)
      try:
        names = [] if current is None else os.listdir(full)
      except FileNotFoundError:  # deleted meanwhile
        continue
      for m in names:
        sid = m[len(_ARRAYS):]
        if m.startswith(_ARRAYS) and sid != current and _abandoned(sid):
          shutil.rmtree(os.path.join(full, m), ignore_errors=True)
