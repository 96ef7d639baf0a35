"""Hugging Face interop: PEFT LoRA adapters to and from jlora trees, merged safetensors.

A *key map* ties jlora paths to Hugging Face tensor names. It is a callable
`key_map(path) -> (name, transpose) | None` taking a '/'-joined jlora path:

* `name` is the Hugging Face tensor name, with one `{}` per leading stack axis
  of the jlora leaf (layers stacked for `lax.scan`), filled in with the index
  along that axis: `"model.layers.{}.self_attn.q_proj.weight"`;
* `transpose` is True where the Hugging Face tensor is the transpose of the
  jlora slice: a torch `nn.Linear` weight is `(out, in)`, a Flax kernel
  `(in, out)`;
* None means the leaf has no Hugging Face counterpart.

`llama_key_map` is the map of `jlora.models.llama` (and of any Flax tree laid
out the same way). PEFT adapters hold, per adapted `nn.Linear` module `m`,
`base_model.model.{m}.lora_A.weight` of shape `(r, in)` and
`base_model.model.{m}.lora_B.weight` of shape `(out, r)`, with the update
`scale * B @ A` and `scale = lora_alpha / r` (`/ sqrt(r)` with `use_rslora`).
A jlora `LoRA` leaf on an `(in, out)` kernel holds `a (in, r)` and `b (r, out)`,
so `a == A.T`, `b == B.T` and the scales agree: alpha carries over as is.
"""

from __future__ import annotations

import collections
import json
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src import paths as P
from jlora._src.leaf import LoRA, Trainable, is_node
from jlora._src.tree import merge

KeyMap = Callable[[str], "tuple[str, bool] | None"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])"
                     r"(?:\.[A-Za-z0-9_-]+)?\.weight$")
_LEAF_NAMES = {"kernel": ("weight", True), "embedding": ("weight", False),
               "scale": ("weight", False), "bias": ("bias", False)}


def llama_key_map(path: str) -> tuple[str, bool] | None:
  """The Hugging Face name of a leaf of a Llama-family Flax tree.

  Covers the tree of `jlora.models.llama` (layers stacked on a leading axis)
  and the same layout with one dict per layer (`layers/0/...`): `kernel`
  becomes the transposed `weight`, `embedding` and `scale` become `weight`,
  everything under `model.` except `lm_head`.

  Example:
    >>> from jlora._src.peft import llama_key_map
    >>> llama_key_map("layers/self_attn/q_proj/kernel")
    ('model.layers.{}.self_attn.q_proj.weight', True)
    >>> llama_key_map("layers/3/mlp/down_proj/kernel")
    ('model.layers.3.mlp.down_proj.weight', True)
    >>> llama_key_map("embed_tokens/embedding")
    ('model.embed_tokens.weight', False)
    >>> llama_key_map("lm_head/kernel")
    ('lm_head.weight', True)
    >>> llama_key_map("rope/cache") is None
    True
  """
  parts = path.split("/")
  if len(parts) < 2 or parts[-1] not in _LEAF_NAMES:
    return None
  suffix, transpose = _LEAF_NAMES[parts[-1]]
  module = parts[:-1]
  if module == ["lm_head"]:
    return f"lm_head.{suffix}", transpose
  if module[0] == "layers" and len(module) > 1:
    rest = module[1:] if module[1].isdigit() else ["{}", *module[1:]]
    return ".".join(["model", "layers", *rest, suffix]), transpose
  if module[0] in ("embed_tokens", "norm") and len(module) == 1:
    return f"model.{module[0]}.{suffix}", transpose
  return None


def _resolve(key_map) -> KeyMap:
  if key_map == "llama":
    return llama_key_map
  if not callable(key_map):
    raise TypeError(f"jlora: key_map must be 'llama' or a callable path -> (name, transpose) | "
                    f"None; got {key_map!r}.")
  return key_map


def _lookup(key_map: KeyMap, ps: str, fn: str):
  out = key_map(ps)
  if out is None:
    return None
  try:
    name, transpose = out
  except (TypeError, ValueError):
    name, transpose = None, None
  if not isinstance(name, str) or not isinstance(transpose, bool):
    raise TypeError(f"jlora.{fn}: key_map({ps!r}) returned {out!r}; it must return a "
                    f"(name: str, transpose: bool) pair, or None for leaves without a Hugging "
                    f"Face name.")
  return name, transpose


# ----------------------------------------------------------------------------- file writing


def _save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata={"format": "pt"})


def _replace_files(files: dict[str, Callable[[str], None]], fn: str) -> None:
  """Writes each file to a temporary name beside it, then renames all into place."""
  tmps = {}
  try:
    for final, write in files.items():
      tmp = f"{final}.jlora-tmp-{uuid.uuid4().hex[:12]}"
      tmps[final] = tmp
      write(tmp)
    for final, tmp in tmps.items():
      os.replace(tmp, final)
  except BaseException:
    for tmp in tmps.values():
      if os.path.exists(tmp):
        os.remove(tmp)
    raise


def _refuse_existing(paths: list[str], overwrite: bool, fn: str) -> None:
  there = [p for p in paths if os.path.exists(p)]
  if there and not overwrite:
    raise FileExistsError(f"jlora.{fn}: {there[0]!r} already exists. Pass overwrite=True to "
                          f"replace it, or write elsewhere.")


def _np(x, dtype=None) -> np.ndarray:
  arr = np.asarray(jax.device_get(x))
  return arr if dtype is None else arr.astype(jnp.dtype(dtype))


# ----------------------------------------------------------------------------- export


def _num(x: float):
  return int(x) if float(x).is_integer() else float(x)


def export_peft(directory: str | os.PathLike, tree: Any, *, key_map: str | KeyMap = "llama",
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                dtype: Any = None, overwrite: bool = False) -> str:
  """Writes the adapters of a jlora tree as a PEFT LoRA adapter.

  Creates `adapter_config.json` and `adapter_model.safetensors` in
  `directory`, loadable with `peft.PeftModel.from_pretrained(model, directory)`
  on the Hugging Face model whose weights the key map names. Stacked leaves
  become one PEFT module per slice; `a`/`b` are transposed to PEFT's
  `lora_A (r, in)`/`lora_B (out, r)`. Ranks and alphas that differ between
  targets go to `rank_pattern`/`alpha_pattern`.

  Args:
    directory: the adapter directory (created if needed).
    tree: a jlora tree whose `LoRA` leaves sit on 2-D `(in, out)` kernels
      (after their stack axes) that the key map names as transposed
      `...weight` tensors of `nn.Linear` modules.
    key_map: `"llama"` (`llama_key_map`) or a callable, see the module doc.
    base_model_name_or_path: recorded in the config (e.g. the hub id).
    task_type: PEFT's task type (e.g. `"CAUSAL_LM"`), recorded in the config.
    dtype: cast the adapter tensors (default: keep the adapters' dtype).
    overwrite: replace an existing adapter in `directory`.

  Returns:
    The directory, as a string.

  Raises:
    ValueError: no LoRA leaf; a `Trainable` leaf (PEFT LoRA files hold LoRA
      factors only); a kernel that is not 2-D or not `(in, out)`; a path the
      key map does not name; a stack count that does not match the name's
      `{}` fields; LoRA leaves that mix `rslora`.
    FileExistsError: the adapter files exist and `overwrite` is False.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp, jlora
    >>> from jlora._src.peft import export_peft
    >>> params = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 8, 8))}}}}
    >>> t = jlora.apply(params, rank=2, stacked="^layers/")
    >>> d = export_peft(os.path.join(tempfile.mkdtemp(), "adapter"), t)
    >>> sorted(os.listdir(d))
    ['adapter_config.json', 'adapter_model.safetensors']
  """
  key_map = _resolve(key_map)
  directory = os.fspath(os.path.abspath(directory))
  tensors: dict[str, np.ndarray] = {}
  modules: dict[str, tuple[int, float]] = {}
  rslora = set()
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
    ps = P.path_str(path)
    if isinstance(x, Trainable):
      raise ValueError(
          f"jlora.export_peft: {ps!r} is a jlora.Trainable leaf; PEFT LoRA adapters hold LoRA "
          f"factors only. Fold it in with jlora.export_merged, keep it with jlora.save, or "
          f"leave it out of the tree given here (e.g. replace it with its .value).")
    if not isinstance(x, LoRA):
      continue
    if x.a is None or x.b is None:
      raise ValueError(f"jlora.export_peft: the LoRA leaf at {ps!r} has no adapters (the "
                       f"frozen half of jlora.split); pass the whole tree or its trainable half.")
    if x.ndim != 2 or tuple(x.a_axes) != (0,):
      raise ValueError(
          f"jlora.export_peft: the LoRA leaf at {ps!r} adapts a {x.ndim}-d kernel (a_axes "
          f"{x.a_axes}, stack {x.stack}, a {tuple(x.a.shape)}, b {tuple(x.b.shape)}); PEFT "
          f"LoRA covers 2-D (in, out) Linear kernels only. Reshape the kernel to 2-D (e.g. "
          f"merge the head axes) before jlora.apply, or export merged weights with "
          f"jlora.export_merged.")
    named = _lookup(key_map, ps, "export_peft")
    if named is None:
      raise ValueError(
          f"jlora.export_peft: key_map has no Hugging Face name for the LoRA leaf at {ps!r}. "
          f"Pass a key_map that maps it, e.g. lambda p: ('model.layers.{{}}.q_proj.weight', "
          f"True) for a stacked kernel.")
    name, transpose = named
    n_fields = name.count("{}")
    if not transpose or not name.endswith(".weight"):
      raise ValueError(
          f"jlora.export_peft: key_map maps the LoRA leaf at {ps!r} to {name!r} with "
          f"transpose={transpose}; PEFT adapts nn.Linear modules, whose '<module>.weight' is "
          f"the transpose of the (in, out) kernel. Return (<module>.weight, True) for it.")
    if n_fields != x.stack:
      raise ValueError(
          f"jlora.export_peft: the LoRA leaf at {ps!r} has {x.stack} stack axes but its "
          f"Hugging Face name {name!r} has {n_fields} '{{}}' fields; the key map needs one "
          f"'{{}}' per stack axis (build the tree with jlora.apply(..., stacked=...) to match).")
    rslora.add(bool(x.rslora))
    a, b = _np(x.a, dtype), _np(x.b, dtype)
    for idx in np.ndindex(*a.shape[:x.stack]):
      module = name.format(*idx)[:-len(".weight")]
      if module in modules:
        raise ValueError(f"jlora.export_peft: key_map maps two leaves to {module!r} (the "
                         f"second is {ps!r}); each module needs its own name.")
      modules[module] = (x.rank, float(x.alpha))
      tensors[f"{_PREFIX}{module}.lora_A.weight"] = a[idx].T
      tensors[f"{_PREFIX}{module}.lora_B.weight"] = b[idx].T
  if not modules:
    raise ValueError("jlora.export_peft: the tree holds no jlora.LoRA leaf, so there is no "
                     "adapter to export. Call jlora.apply(params, ...) first.")
  if len(rslora) > 1:
    raise ValueError("jlora.export_peft: some LoRA leaves use rslora and some do not; a PEFT "
                     "config has a single use_rslora flag. Build the tree with one setting.")
  r = collections.Counter(v[0] for v in modules.values()).most_common(1)[0][0]
  alpha = collections.Counter(v[1] for v in modules.values()).most_common(1)[0][0]
  config = {
      "peft_type": "LORA",
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": r,
      "lora_alpha": _num(alpha),
      "target_modules": sorted(modules),
      "rank_pattern": {re.escape(m): v[0] for m, v in modules.items() if v[0] != r},
      "alpha_pattern": {re.escape(m): _num(v[1]) for m, v in modules.items() if v[1] != alpha},
      "use_rslora": rslora.pop(),
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "use_dora": False,
      "layers_to_transform": None,
      "layers_pattern": None,
  }
  cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
  _refuse_existing([cfg_path, w_path], overwrite, "export_peft")
  os.makedirs(directory, exist_ok=True)

  def write_config(p):
    with open(p, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)

  _replace_files({w_path: lambda p: _save_safetensors(tensors, p), cfg_path: write_config},
                 "export_peft")
  return directory


# ----------------------------------------------------------------------------- import


def _read_config(directory: str) -> dict:
  cfg_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(
        f"jlora.import_peft: no {CONFIG_NAME} in {directory!r}. Point to the directory that "
        f"PeftModel.save_pretrained (or jlora.export_peft) wrote.")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      cfg = json.load(f)
  except ValueError as e:
    raise ValueError(f"jlora.import_peft: {cfg_path!r} is not valid JSON ({e}); the file is "
                     f"corrupt. Save the adapter again.") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"jlora.import_peft: {cfg_path!r} holds {type(cfg).__name__}, not a PEFT "
                     f"config object.")
  if cfg.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"jlora.import_peft: {cfg_path!r} is a {cfg.get('peft_type')} adapter; "
                     f"only PEFT LoRA adapters (peft_type LORA) map to jlora.LoRA leaves.")
  for flag, why in (("use_dora", "DoRA's magnitude vector"), ("lora_bias", "LoRA biases"),
                    ("fan_in_fan_out", "fan_in_fan_out (Conv1D) weights")):
    if cfg.get(flag):
      raise ValueError(f"jlora.import_peft: {cfg_path!r} sets {flag}=true; jlora.LoRA has no "
                       f"{why}. Export the adapter without it.")
  return cfg


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  w_path = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(w_path):
    legacy = os.path.join(directory, "adapter_model.bin")
    hint = (" The directory has adapter_model.bin (a torch pickle); save it again with "
            "PeftModel.save_pretrained(..., safe_serialization=True)." if os.path.exists(legacy)
            else "")
    raise FileNotFoundError(f"jlora.import_peft: no {WEIGHTS_NAME} in {directory!r}.{hint}")
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(w_path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ValueError(f"jlora.import_peft: {w_path!r} is not a readable safetensors file ({e}); "
                     f"the file is corrupt or truncated. Save the adapter again.") from e


def _pattern(pattern: dict | None, module: str, default):
  """PEFT's rank/alpha pattern rule: a key matches a module name ending in it."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def import_peft(directory: str | os.PathLike, params: Any, *, key_map: str | KeyMap = "llama",
                dtype: Any = jnp.float32) -> Any:
  """Reads a PEFT LoRA adapter into a jlora tree built on `params`.

  Each module of the adapter is found in `params` through the key map; the
  kernel there becomes a `jlora.LoRA` leaf with `a = lora_A.T`,
  `b = lora_B.T`, PEFT's alpha (`lora_alpha` or `alpha_pattern`) and
  `use_rslora`. A stacked kernel gathers the modules of all its slices; slices
  the adapter does not cover (PEFT's `layers_to_transform`) get zero adapters.

  Args:
    directory: a directory with `adapter_config.json` and
      `adapter_model.safetensors` (from `PeftModel.save_pretrained`).
    params: the base parameter tree (plain arrays, concrete or abstract).
    key_map: `"llama"` (`llama_key_map`) or a callable, see the module doc.
    dtype: the adapters' dtype (default float32, as `jlora.apply`).

  Returns:
    `params` with a `LoRA` leaf at every adapted kernel.

  Raises:
    FileNotFoundError: a missing file.
    ValueError: corrupt files; a non-LoRA, DoRA or bias-carrying adapter; a
      tensor key that is not `lora_A`/`lora_B`; a module no leaf of `params`
      maps to; shapes that do not fit the kernel; ranks or alphas that differ
      between the slices of one stacked kernel; `params` already holding LoRA.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp, jlora
    >>> from jlora._src.peft import export_peft, import_peft
    >>> params = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 8, 8))}}}}
    >>> d = export_peft(os.path.join(tempfile.mkdtemp(), "a"),
    ...                 jlora.apply(params, rank=2, stacked="^layers/"))
    >>> import_peft(d, params)["layers"]["self_attn"]["q_proj"]["kernel"].a.shape
    (2, 8, 2)
  """
  key_map = _resolve(key_map)
  directory = os.fspath(os.path.abspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"jlora.import_peft: no adapter directory at {directory!r}.")
  cfg = _read_config(directory)
  raw = _read_tensors(directory)
  halves: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for k, v in raw.items():
    m = _KEY_RE.match(k)
    if m is None:
      raise ValueError(
          f"jlora.import_peft: the adapter holds the tensor {k!r}, which is not a "
          f"'base_model.model.<module>.lora_A/lora_B.weight' factor (modules_to_save, "
          f"trainable tokens and biases are not supported). Save the adapter without it.")
    halves[m["module"]][m["half"]] = v
  for module, h in halves.items():
    if set(h) != {"A", "B"}:
      missing = "lora_B" if "A" in h else "lora_A"
      raise ValueError(f"jlora.import_peft: the adapter has no {missing} for {module!r}; the "
                       f"file is incomplete. Save the adapter again.")

  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
  owner: dict[str, tuple[int, tuple[int, ...]]] = {}
  for i, (path, x) in enumerate(flat):
    ps = P.path_str(path)
    named = _lookup(key_map, ps, "import_peft")
    if named is None or not hasattr(x, "shape"):
      continue
    if is_node(x):
      raise ValueError(f"jlora.import_peft: the leaf at {ps!r} is already a jlora "
                       f"{type(x).__name__}; import onto the base params (jlora.base(tree)).")
    name, _ = named
    n = name.count("{}")
    if name.endswith(".weight"):
      for idx in np.ndindex(*x.shape[:n]):
        owner[name.format(*idx)[:-len(".weight")]] = (i, idx)
  unknown = sorted(set(halves) - set(owner))
  if unknown:
    near = P.nearest(sorted(owner), unknown[0], 3)
    raise ValueError(
        f"jlora.import_peft: the adapter adapts {unknown[0]!r}, but the key map names no leaf "
        f"of params so (nearest names: {near}; {len(unknown)} modules unmatched). Pass the "
        f"params of the adapter's base model, or a key_map that names its leaves.")

  by_leaf: dict[int, dict[tuple[int, ...], str]] = collections.defaultdict(dict)
  for module in halves:
    i, idx = owner[module]
    by_leaf[i][idx] = module
  rslora = bool(cfg.get("use_rslora", False))
  out = [x for _, x in flat]
  for i, slices in by_leaf.items():
    path, w = flat[i]
    ps = P.path_str(path)
    name, transpose = _lookup(key_map, ps, "import_peft")
    n = name.count("{}")
    kshape = tuple(w.shape[n:])
    if len(kshape) != 2 or not transpose:
      raise ValueError(
          f"jlora.import_peft: the adapter adapts {next(iter(slices.values()))!r}, which the "
          f"key map ties to {ps!r} of shape {tuple(w.shape)} with transpose={transpose}; PEFT "
          f"LoRA modules are nn.Linear, so the leaf must be a 2-D (in, out) kernel (after "
          f"{n} stack axes) mapped with transpose=True.")
    ranks, alphas = {}, {}
    for idx, module in slices.items():
      A, B = halves[module]["A"], halves[module]["B"]
      r = A.shape[0]
      if A.ndim != 2 or B.ndim != 2 or A.shape[1] != kshape[0] or B.shape != (kshape[1], r):
        raise ValueError(
            f"jlora.import_peft: {module!r} has lora_A {tuple(A.shape)} and lora_B "
            f"{tuple(B.shape)}, which do not fit the kernel {kshape} (in, out) at {ps!r}: "
            f"expected (r, {kshape[0]}) and ({kshape[1]}, r). Pass the params of the adapter's "
            f"base model.")
      ranks[idx] = r
      alphas[idx] = float(_pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
    for what, vals in (("rank", ranks), ("lora_alpha", alphas)):
      if len(set(vals.values())) > 1:
        detail = {slices[k]: v for k, v in sorted(vals.items())[:4]}
        raise ValueError(
            f"jlora.import_peft: the modules stacked in {ps!r} have different {what}s "
            f"({detail}); a stacked jlora.LoRA leaf has one {what}. Import onto params with "
            f"one dict per layer, or use an adapter with a uniform {what}.")
    r, alpha = next(iter(ranks.values())), next(iter(alphas.values()))
    stack_shape = tuple(w.shape[:n])
    a = np.zeros(stack_shape + (kshape[0], r), np.float32)
    b = np.zeros(stack_shape + (r, kshape[1]), np.float32)
    for idx, module in slices.items():
      a[idx] = halves[module]["A"].astype(np.float32).T
      b[idx] = halves[module]["B"].astype(np.float32).T
    out[i] = LoRA(w, jnp.asarray(a, dtype), jnp.asarray(b, dtype), alpha, (0,), n, rslora)
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- merged export


def export_merged(path: str | os.PathLike, tree: Any, *, key_map: str | KeyMap = "llama",
                  dtype: Any = None, overwrite: bool = False) -> str:
  """Writes `jlora.merge(tree)` as one safetensors file with Hugging Face names.

  Every leaf is written under its key-map name (stacked leaves one slice per
  name, kernels transposed to `(out, in)`), ready for
  `model.load_state_dict` or `from_pretrained` next to a `config.json`.

  Args:
    path: the `.safetensors` file to write.
    tree: a jlora tree, or plain params.
    key_map: `"llama"` (`llama_key_map`) or a callable, see the module doc.
    dtype: cast every tensor (e.g. `jnp.bfloat16`); default: the merged dtype.
    overwrite: replace an existing file.

  Returns:
    The file path, as a string.

  Raises:
    ValueError: a leaf the key map does not name, a name given twice, a
      transposed leaf that is not 2-D after its stack axes.
    FileExistsError: the file exists and `overwrite` is False.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, jlora
    >>> from jlora._src.peft import export_merged
    >>> params = {"norm": {"scale": jnp.ones(8)},
    ...           "layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 8, 16))}}}}
    >>> f = export_merged(os.path.join(tempfile.mkdtemp(), "model.safetensors"),
    ...                   jlora.apply(params, rank=2, targets="up_proj", stacked="^layers/"))
    >>> from safetensors.numpy import load_file
    >>> sorted((k, v.shape) for k, v in load_file(f).items())  # doctest: +NORMALIZE_WHITESPACE
    [('model.layers.0.mlp.up_proj.weight', (16, 8)),
     ('model.layers.1.mlp.up_proj.weight', (16, 8)), ('model.norm.weight', (8,))]
  """
  key_map = _resolve(key_map)
  path = os.fspath(os.path.abspath(path))
  _refuse_existing([path], overwrite, "export_merged")
  flat = jax.tree_util.tree_flatten_with_path(merge(tree))[0]
  named, unmapped = [], []
  for p, x in flat:
    ps = P.path_str(p)
    nm = _lookup(key_map, ps, "export_merged")
    if nm is None:
      unmapped.append(ps)
    else:
      named.append((ps, x, *nm))
  if unmapped:
    raise ValueError(
        f"jlora.export_merged: key_map has no Hugging Face name for {unmapped[:5]}"
        f"{' ...' if len(unmapped) > 5 else ''}; every leaf is written. Extend the key_map, "
        f"or drop these leaves from the tree first.")
  tensors: dict[str, np.ndarray] = {}
  for ps, x, name, transpose in named:
    n = name.count("{}")
    arr = _np(x, dtype)
    if arr.ndim < n or (transpose and arr.ndim - n != 2):
      raise ValueError(
          f"jlora.export_merged: {ps!r} has shape {arr.shape}, but its name {name!r} has {n} "
          f"'{{}}' stack fields{' and asks for a transpose of the 2-D rest' if transpose else ''}"
          f". Fix the key_map for this leaf.")
    for idx in np.ndindex(*arr.shape[:n]):
      hf = name.format(*idx)
      if hf in tensors:
        raise ValueError(f"jlora.export_merged: key_map gives the name {hf!r} twice (again for "
                         f"{ps!r}); each tensor needs its own name.")
      tensors[hf] = arr[idx].T if transpose else arr[idx]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _replace_files({path: lambda t: _save_safetensors(tensors, t)}, "export_merged")
  return path
