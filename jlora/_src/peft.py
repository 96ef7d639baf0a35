"""PEFT LoRA adapters to and from jlora trees, merged safetensors (see `jlora.hf`)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src import paths as P
from jlora._src.apply import dora_magnitude, residual_init
from jlora._src.leaf import LoRA, Trainable, is_node
from jlora._src.tree import merge

KeyMap = Callable[[str], "tuple[str, bool] | None"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])"
                     r"(?:\.(?P<name>[A-Za-z0-9_-]+))?\.weight$")
# DoRA's magnitude: '<module>.lora_magnitude_vector' as PEFT saves it, with '.<name>.weight'
# in a live model's state dict.
_MAG_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector"
                     r"(?:\.(?P<name>[A-Za-z0-9_-]+)\.weight)?$")
_MAG = "M"


def _resolve(key_map, fn: str) -> KeyMap:
  if not callable(key_map):
    raise TypeError(f"jlora.hf.{fn}: key_map must be a callable path -> (name, transpose) | "
                    f"None; got {key_map!r}. Write the map of your tree's layout, e.g. "
                    f"key_map={{'layers/q_proj/kernel': ('model.layers.{{}}.q_proj.weight', "
                    f"True)}}.get (see jlora.hf's module docstring).")
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
    raise TypeError(f"jlora.hf.{fn}: key_map({ps!r}) returned {out!r}; it must return a "
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
    raise FileExistsError(f"jlora.hf.{fn}: {there[0]!r} already exists. Pass overwrite=True to "
                          f"replace it, or write elsewhere.")


def _np(x, dtype=None) -> np.ndarray:
  arr = np.asarray(jax.device_get(x))
  return arr if dtype is None else arr.astype(jnp.dtype(dtype))


# ----------------------------------------------------------------------------- export


def _num(x: float):
  return int(x) if float(x).is_integer() else float(x)


def _exact(module: str) -> str:
  """A PEFT rank/alpha pattern that selects `module` and no other module name."""
  return "^" + re.escape(module)


def export_peft(directory: str | os.PathLike, tree: Any, *, key_map: KeyMap,
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                dtype: Any = None, overwrite: bool = False) -> str:
  """Writes the adapters of a jlora tree as a PEFT LoRA adapter.

  Creates `adapter_config.json` and `adapter_model.safetensors` in
  `directory`, loadable with `peft.PeftModel.from_pretrained(model, directory)`
  on the Hugging Face model whose weights the key map names. Stacked leaves
  become one PEFT module per slice; `a`/`b` are transposed to PEFT's
  `lora_A (r, in)`/`lora_B (out, r)`. Ranks and alphas that differ between
  targets go to `rank_pattern`/`alpha_pattern`, each anchored (`^`) to its one
  module. DoRA leaves write `use_dora` and each module's
  `lora_magnitude_vector`; a tree made with `init="pissa"`/`"olora"` (its `w`
  the residual) writes that `init_lora_weights`, so PEFT, loading the adapter
  onto the original base model, rebuilds the same residual (as it does for
  its own unconverted PiSSA/OLoRA adapters). To share a plain LoRA adapter
  instead, convert it in PEFT (`save_pretrained(...,
  path_initial_model_for_weight_conversion=...)`).

  Args:
    directory: the adapter directory (created if needed).
    tree: a jlora tree whose `LoRA` leaves sit on 2-D `(in, out)` kernels
      (after their stack axes) that the key map names as transposed
      `...weight` tensors of `nn.Linear` modules.
    key_map: the key map of the tree's layout (`path -> (name, transpose) |
      None`), see the module docstring.
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
      `{}` fields; LoRA leaves that mix `rslora`, DoRA and plain LoRA, or
      residual inits; an alpha that is not a finite number (the config is strict
      JSON).
    FileExistsError: the adapter files exist and `overwrite` is False.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 8, 8))}}}}
    >>> t = jlora.apply(params, rank=2, stacked="^layers/")
    >>> q = "layers/self_attn/q_proj/kernel"
    >>> names = {q: ("model.layers.{}.self_attn.q_proj.weight", True)}
    >>> d = jlora.hf.export_peft(os.path.join(tempfile.mkdtemp(), "adapter"), t, key_map=names.get)
    >>> sorted(os.listdir(d))
    ['adapter_config.json', 'adapter_model.safetensors']
  """
  key_map = _resolve(key_map, "export_peft")
  directory = os.fspath(os.path.abspath(directory))
  tensors: dict[str, np.ndarray] = {}
  modules: dict[str, tuple[int, float]] = {}
  rslora, dora, residual = set(), set(), set()
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
    ps = P.path_str(path)
    if isinstance(x, Trainable):
      raise ValueError(
          f"jlora.hf.export_peft: {ps!r} is a jlora.Trainable leaf; PEFT LoRA adapters hold LoRA "
          f"factors only. Fold it in with jlora.hf.export_merged, keep it with jlora.save, or "
          f"leave it out of the tree given here (e.g. replace it with its .value).")
    if not isinstance(x, LoRA):
      continue
    if x.a is None or x.b is None:
      raise ValueError(f"jlora.hf.export_peft: the LoRA leaf at {ps!r} has no adapters (the "
                       f"frozen half of jlora.split); pass the whole tree or its trainable half.")
    if x.ndim != 2 or tuple(x.a_axes) != (0,):
      raise ValueError(
          f"jlora.hf.export_peft: the LoRA leaf at {ps!r} adapts a {x.ndim}-d kernel (a_axes "
          f"{x.a_axes}, stack {x.stack}, a {tuple(x.a.shape)}, b {tuple(x.b.shape)}); PEFT "
          f"LoRA covers 2-D (in, out) Linear kernels only. Reshape the kernel to 2-D (e.g. "
          f"merge the head axes) before jlora.apply, or export merged weights with "
          f"jlora.hf.export_merged.")
    named = _lookup(key_map, ps, "export_peft")
    if named is None:
      raise ValueError(
          f"jlora.hf.export_peft: key_map has no Hugging Face name for the LoRA leaf at {ps!r}. "
          f"Pass a key_map that maps it, e.g. lambda p: ('model.layers.{{}}.q_proj.weight', "
          f"True) for a stacked kernel.")
    name, transpose = named
    n_fields = name.count("{}")
    if not transpose or not name.endswith(".weight"):
      raise ValueError(
          f"jlora.hf.export_peft: key_map maps the LoRA leaf at {ps!r} to {name!r} with "
          f"transpose={transpose}; PEFT adapts nn.Linear modules, whose '<module>.weight' is "
          f"the transpose of the (in, out) kernel. Return (<module>.weight, True) for it.")
    if n_fields != x.stack:
      raise ValueError(
          f"jlora.hf.export_peft: the LoRA leaf at {ps!r} has {x.stack} stack axes but its "
          f"Hugging Face name {name!r} has {n_fields} '{{}}' fields; the key map needs one "
          f"'{{}}' per stack axis (build the tree with jlora.apply(..., stacked=...) to match).")
    leaf_alpha = x.alpha
    if (isinstance(leaf_alpha, bool) or not isinstance(leaf_alpha, (int, float, np.number))
        or not math.isfinite(leaf_alpha)):
      raise ValueError(
          f"jlora.hf.export_peft: the LoRA leaf at {ps!r} has alpha {leaf_alpha!r}; PEFT's "
          f"lora_alpha must be a finite number (a NaN or infinite alpha makes the adapted "
          f"weight NaN or inf, and is no valid JSON). Rebuild the leaf with a finite alpha, e.g. "
          f"jlora.apply(params, ..., alpha=16.0).")
    rslora.add(bool(x.rslora))
    dora.add(x.m is not None)
    residual.add(x.residual)
    a, b = _np(x.a, dtype), _np(x.b, dtype)
    mag = None if x.m is None else _np(x.m, dtype)
    for idx in np.ndindex(*a.shape[:x.stack]):
      module = name.format(*idx)[:-len(".weight")]
      if module in modules:
        raise ValueError(f"jlora.hf.export_peft: key_map maps two leaves to {module!r} (the "
                         f"second is {ps!r}); each module needs its own name.")
      modules[module] = (x.rank, float(x.alpha))
      tensors[f"{_PREFIX}{module}.lora_A.weight"] = a[idx].T
      tensors[f"{_PREFIX}{module}.lora_B.weight"] = b[idx].T
      if mag is not None:
        tensors[f"{_PREFIX}{module}.lora_magnitude_vector"] = mag[idx]
  if not modules:
    raise ValueError("jlora.hf.export_peft: the tree holds no jlora.LoRA leaf, so there is no "
                     "adapter to export. Call jlora.apply(params, ...) first.")
  if len(rslora) > 1:
    raise ValueError("jlora.hf.export_peft: some LoRA leaves use rslora and some do not; a PEFT "
                     "config has a single use_rslora flag. Build the tree with one setting.")
  if len(dora) > 1:
    raise ValueError("jlora.hf.export_peft: some LoRA leaves are DoRA (they have a magnitude m) "
                     "and some are not; a PEFT config has a single use_dora flag. Build the tree "
                     "with one setting (jlora.apply(..., dora=True) for all targets, or none).")
  if len(residual) > 1:
    raise ValueError(
        f"jlora.hf.export_peft: the LoRA leaves were made with different inits "
        f"({sorted(map(str, residual))}: LoRA.residual); a PEFT config has a single "
        f"init_lora_weights, and PEFT rebuilds the residual weights from it when it loads the "
        f"adapter. Build the tree with one init.")
  init = residual.pop()
  r = collections.Counter(v[0] for v in modules.values()).most_common(1)[0][0]
  alpha = collections.Counter(v[1] for v in modules.values()).most_common(1)[0][0]
  config = {
      "peft_type": "LORA",
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": r,
      "lora_alpha": _num(alpha),
      "target_modules": sorted(modules),
      # PEFT matches a pattern against every module name that ends in it ('enc.q' also hits
      # 'dec.enc.q'); '^' anchors it to its one module.
      "rank_pattern": {_exact(m): v[0] for m, v in modules.items() if v[0] != r},
      "alpha_pattern": {_exact(m): _num(v[1]) for m, v in modules.items() if v[1] != alpha},
      "use_rslora": rslora.pop(),
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      # PEFT rebuilds the residual of a PiSSA/OLoRA adapter from the base weights it loads it on
      "init_lora_weights": True if init is None else init,
      "inference_mode": True,
      "modules_to_save": None,
      "use_dora": dora.pop(),
      "layers_to_transform": None,
      "layers_pattern": None,
  }
  cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
  _refuse_existing([cfg_path, w_path], overwrite, "export_peft")
  os.makedirs(directory, exist_ok=True)

  def write_config(p):
    with open(p, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True, allow_nan=False)

  _replace_files({w_path: lambda p: _save_safetensors(tensors, p), cfg_path: write_config},
                 "export_peft")
  return directory


# ----------------------------------------------------------------------------- import

# PEFT LoraConfig fields (peft 0.21 and older) that leave a saved adapter's weights as they are:
# metadata, training-only options, settings of initializations that keep the base weights.
_NO_EFFECT = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "lora_dropout", "megatron_config", "megatron_core",
    "runtime_config", "eva_config", "loftq_config", "corda_config", "lora_ga_config",
    "velora_config", "qalora_group_size"})
# The fields import_peft reads; each is checked in _read_config.
_READ = frozenset({
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights",
    "bias", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "modules_to_save", "use_dora"})
# Fields that, when set, make PEFT compute something a jlora.LoRA leaf does not.
_UNSUPPORTED = {
    "lora_bias": "a trained bias beside lora_B",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) base weights",
    "alora_invocation_tokens": "Activated LoRA (the adapter acts only from its invocation "
                               "tokens on)",
    "use_qalora": "QA-LoRA (lora_A reads group-pooled inputs)",
    "layer_replication": "layers replicated in the base model, whose layers then differ from "
                         "params'",
    "target_parameters": "LoRA on bare nn.Parameter tensors (e.g. MoE experts)",
    "trainable_token_indices": "trained embedding rows (trainable tokens)",
    "kasa_config": "KaSA (it truncates singular values of the base weights)",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow (it routes each token between several adapters)",
    "monteclora_config": "MonteCLoRA (sampled variational factors)",
    "ensure_weight_tying": "adapters tied between the input embedding and the LM head",
    "enable_lora": "the merged QKV layers of early PEFT (enable_lora)",
}
_MERGE_FIX = ("Merge the adapter in PEFT (model.merge_and_unload()) and load the merged "
              "weights as params")


def _init_kind(v) -> str:
  """PEFT's `init_lora_weights`: 'keep' (the base weights as they are), 'residual', 'loftq',
  or 'unknown' (PEFT refuses it), as peft.tuners.lora.LoraLayer.update_layer reads it."""
  if v is None or isinstance(v, bool):
    return "keep"
  if not isinstance(v, str):
    return "unknown"
  if v.lower() in ("gaussian", "mica") or v in ("eva", "orthogonal"):
    return "keep"
  if v.startswith(("pissa", "corda")) or v.lower() == "olora" or v == "lora_ga":
    return "residual"
  return "loftq" if v == "loftq" else "unknown"


def _rebuilt_init(v) -> str | None:
  """The residual init import_peft rebuilds as PEFT does ('pissa', 'olora'), else None."""
  if isinstance(v, str) and v == "pissa":
    return "pissa"
  if isinstance(v, str) and v.lower() == "olora":
    return "olora"
  return None


def _why_not_rebuilt(v) -> str:
  if isinstance(v, str) and v.startswith("pissa_niter_"):
    return ("PEFT's 'pissa_niter_<n>' draws a random sketch from torch's generator when it "
            "loads the adapter, which jlora cannot reproduce")
  return "this init needs data or state the adapter does not hold"


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_regex(cfg_path: str, what: str, text: str, wrap=lambda t: t) -> None:
  try:
    re.compile(wrap(text))
  except re.error as e:
    raise ValueError(f"jlora.hf.import_peft: in {cfg_path!r}, the {what} {text!r} is not a valid "
                     f"regex ({e}). Fix it (PEFT fails on it too).") from e


def _check_names(cfg: dict, cfg_path: str, field: str, regex_ok: bool, wrap=None) -> None:
  """`field` is None, a list of str, or (when `regex_ok`) one str regex."""
  v = cfg.get(field)
  if v is None or (regex_ok and isinstance(v, str)):
    if isinstance(v, str) and not (field == "target_modules" and v.lower() == "all-linear"):
      _check_regex(cfg_path, field, v)
    return
  if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
    kind = "a list of names or a regex (a str)" if regex_ok else "a list of names"
    raise ValueError(f"jlora.hf.import_peft: {cfg_path!r} has {field}={v!r}; it must be {kind}. "
                     f"Fix the config.")
  if wrap is not None:
    for x in v:
      _check_regex(cfg_path, f"{field} entry", x, wrap)


def _check_config(cfg: dict, cfg_path: str) -> None:
  """Refuses a config whose adapter PEFT would load to other weights than jlora, or not at all."""
  bad = lambda what, fix: ValueError(f"jlora.hf.import_peft: {cfg_path!r} has {what}; {fix} Fix "
                                     f"the config.")
  for flag, why in _UNSUPPORTED.items():
    if cfg.get(flag):
      raise ValueError(
          f"jlora.hf.import_peft: {cfg_path!r} sets {flag}={json.dumps(cfg[flag])}: {why}, which a "
          f"jlora.LoRA leaf does not compute, so the imported weights would differ from PEFT's. "
          f"{_MERGE_FIX}, or use an adapter trained without {flag}.")
  for key, v in cfg.items():
    if key not in _NO_EFFECT and key not in _READ and key not in _UNSUPPORTED and v not in (
        None, False, "", [], {}):
      raise ValueError(
          f"jlora.hf.import_peft: {cfg_path!r} sets {key!r}={v!r}, a PEFT option jlora does not "
          f"know (from a newer PEFT?); it may change the weights the adapter gives. Remove it "
          f"from the config if it does not, or: {_MERGE_FIX}.")
  init = cfg.get("init_lora_weights")
  kind = _init_kind(init)
  if kind == "residual" and _rebuilt_init(init) is None:
    raise ValueError(
        f"jlora.hf.import_peft: {cfg_path!r} has init_lora_weights={init!r}: PEFT trains such an "
        f"adapter on residual base weights (the base weights minus the adapter's initial "
        f"product) and rebuilds them when it loads the adapter; jlora rebuilds them for 'pissa' "
        f"and 'olora' only ({_why_not_rebuilt(init)}), so the imported weights would differ "
        f"from PEFT's. Convert the adapter to plain LoRA "
        f"with PEFT first: peft_model.save_pretrained(out_dir, "
        f"path_initial_model_for_weight_conversion=<the adapter saved right after "
        f"initialization>) (PEFT's 'convert PiSSA/OLoRA/CorDA to LoRA'; the result says "
        f"init_lora_weights true and has twice the rank), then import out_dir.")
  if kind == "loftq":
    raise ValueError(
        f"jlora.hf.import_peft: {cfg_path!r} has init_lora_weights='loftq': PEFT then replaces "
        f"the base weights with a quantized backbone (LoftQ) as it loads the adapter, which "
        f"jlora does not do. Import onto the LoftQ backbone's weights (PEFT's LoftQ scripts save "
        f"them beside the adapter), with a config that says init_lora_weights true, as PEFT's "
        f"LoftQ example saves it.")
  if kind == "unknown":
    raise ValueError(
        f"jlora.hf.import_peft: {cfg_path!r} has init_lora_weights={init!r}, which is not a value "
        f"PEFT documents (true, false, 'gaussian', 'eva', 'orthogonal', 'mica'; 'pissa', "
        f"'pissa_niter_<n>', 'olora', 'corda', 'loftq', 'lora_ga' change the base weights); "
        f"PEFT refuses it too. Fix the config.")
  if "r" in cfg and not (_is_int(cfg["r"]) and cfg["r"] > 0):
    raise bad(f"r={cfg['r']!r}", "the LoRA rank must be a positive int.")
  if "lora_alpha" in cfg and not _is_finite(cfg["lora_alpha"]):
    raise bad(f"lora_alpha={cfg['lora_alpha']!r}",
              "it must be a finite number (PEFT scales the update by lora_alpha / r).")
  for field, ok, kind in (("rank_pattern", lambda x: _is_int(x) and x > 0, "positive int"),
                          ("alpha_pattern", _is_finite, "finite number")):
    pattern = cfg.get(field)
    if pattern is None:
      continue
    if not isinstance(pattern, dict):
      raise bad(f"{field}={pattern!r}", f"it must be a dict {{regex: {kind}}}.")
    for key, value in pattern.items():
      _check_regex(cfg_path, f"{field} key", key, lambda k: rf"(.*\.)?({k})$")
      if not ok(value):
        raise bad(f"{field}[{key!r}]={value!r}", f"each value must be a {kind}.")
  for flag in ("use_rslora", "use_dora"):
    if not isinstance(cfg.get(flag, False), bool):
      raise bad(f"{flag}={cfg[flag]!r}", "it must be true or false.")
  if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
    raise bad(f"bias={cfg['bias']!r}", "PEFT takes 'none', 'all' or 'lora_only'.")
  _check_names(cfg, cfg_path, "target_modules", regex_ok=True)
  _check_names(cfg, cfg_path, "exclude_modules", regex_ok=True)
  _check_names(cfg, cfg_path, "modules_to_save", regex_ok=False,
               wrap=lambda m: rf"(^|.*\.){m}($|\..*)")
  _check_names(cfg, cfg_path, "layers_pattern", regex_ok=True,
               wrap=lambda p: rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
  layers = cfg.get("layers_to_transform")
  if not (layers is None or _is_int(layers) or (
      isinstance(layers, list) and all(_is_int(x) for x in layers))):
    raise bad(f"layers_to_transform={layers!r}", "it must be an int or a list of ints.")
  # PEFT's LoraConfig refuses these combinations.
  for field in ("layers_to_transform", "layers_pattern"):
    if isinstance(cfg.get("target_modules"), str) and cfg.get(field) is not None:
      raise bad(f"{field}={cfg[field]!r} with the regex target_modules="
                f"{cfg['target_modules']!r}",
                f"PEFT refuses {field} unless target_modules is a list of names.")
  if cfg.get("layers_pattern") and layers is None:
    raise bad(f"layers_pattern={cfg['layers_pattern']!r} and no layers_to_transform",
              "PEFT refuses a layers_pattern without layers_to_transform.")


def _read_config(directory: str) -> tuple[dict, str]:
  cfg_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(
        f"jlora.hf.import_peft: no {CONFIG_NAME} in {directory!r}. Point to the directory that "
        f"PeftModel.save_pretrained (or jlora.hf.export_peft) wrote.")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      cfg = json.load(f)
  except ValueError as e:
    raise ValueError(f"jlora.hf.import_peft: {cfg_path!r} is not valid JSON ({e}); the file is "
                     f"corrupt. Save the adapter again.") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"jlora.hf.import_peft: {cfg_path!r} holds {type(cfg).__name__}, not a PEFT "
                     f"config object.")
  if cfg.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"jlora.hf.import_peft: {cfg_path!r} is a {cfg.get('peft_type')} adapter; "
                     f"only PEFT LoRA adapters (peft_type LORA) map to jlora.LoRA leaves.")
  _check_config(cfg, cfg_path)
  return cfg, cfg_path


def _read_tensors(directory: str) -> tuple[dict[str, np.ndarray], str]:
  w_path = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(w_path):
    legacy = os.path.join(directory, "adapter_model.bin")
    hint = (" The directory has adapter_model.bin (a torch pickle); save it again with "
            "PeftModel.save_pretrained(..., safe_serialization=True)." if os.path.exists(legacy)
            else "")
    raise FileNotFoundError(f"jlora.hf.import_peft: no {WEIGHTS_NAME} in {directory!r}.{hint}")
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(w_path), w_path
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ValueError(f"jlora.hf.import_peft: {w_path!r} is not a readable safetensors file ({e}); "
                     f"the file is corrupt or truncated. Save the adapter again.") from e


def _tensor_kind(key: str) -> str:
  if key.endswith(".bias"):
    return "a bias (PEFT's bias='all'/'lora_only', or lora_bias)"
  if "lora_embedding_" in key:
    return "a LoRA factor of an embedding layer"
  if "trainable_tokens" in key:
    return "trainable tokens"
  if not key.startswith(_PREFIX):
    return f"a tensor without PEFT's {_PREFIX!r} prefix"
  return "a whole weight (PEFT's modules_to_save) or another kind of tensor"


def _split_keys(raw: dict[str, np.ndarray], adapter_name: str | None, w_path: str):
  """{module: {'A': lora_A, 'B': lora_B}} of one adapter of the file.

  PEFT writes keys without an adapter name (`<module>.lora_A.weight`); a state dict taken from a
  live model has one (`<module>.lora_A.<name>.weight`). A file of several adapters needs
  `adapter_name` to pick one.
  """
  if adapter_name is not None and not isinstance(adapter_name, str):
    raise TypeError(f"jlora.hf.import_peft: adapter_name must be a str or None (the <name> in keys "
                    f"'<module>.lora_A.<name>.weight'); got {adapter_name!r}.")
  found: dict[str | None, dict] = collections.defaultdict(
      lambda: collections.defaultdict(dict))
  for k, v in raw.items():
    m = _KEY_RE.match(k)
    mag = _MAG_RE.match(k) if m is None else None
    if mag is not None:
      found[mag["name"]][mag["module"]][_MAG] = v
      continue
    if m is None:
      raise ValueError(
          f"jlora.hf.import_peft: the adapter holds the tensor {k!r}, which is not a "
          f"'{_PREFIX}<module>.lora_A/lora_B.weight' factor but {_tensor_kind(k)}; a jlora.LoRA "
          f"leaf has no place for it, and leaving it out would change the weights. "
          f"{_MERGE_FIX}, or save the adapter without it.")
    found[m["name"]][m["module"]][m["half"]] = v
  listing = ", ".join("(no name)" if n is None else repr(n)
                      for n in sorted(found, key=lambda n: (n is not None, n or "")))
  if adapter_name is None:
    if len(found) > 1:
      pick = next((n for n in sorted(found, key=str) if n is not None), None)
      raise ValueError(
          f"jlora.hf.import_peft: {w_path!r} holds the tensors of several adapters ({listing}: "
          f"the <name> in keys '<module>.lora_A.<name>.weight'); jlora reads one. Pick it, "
          f"e.g. import_peft(..., adapter_name={pick!r}).")
    chosen = next(iter(found), None)
  elif adapter_name in found:
    chosen = adapter_name
  elif list(found) == [None]:
    chosen = None  # PEFT's own format: one adapter, loaded under any name
  else:
    raise ValueError(
        f"jlora.hf.import_peft: {w_path!r} holds no tensor of adapter {adapter_name!r} (keys "
        f"'<module>.lora_A.{adapter_name}.weight'); it holds {listing}. Pass one of those, or "
        f"adapter_name=None for a file of one adapter.")
  halves = dict(found.get(chosen, {}))
  for module, h in halves.items():
    if not {"A", "B"} <= set(h):
      missing = "lora_B" if "A" in h else "lora_A"
      raise ValueError(f"jlora.hf.import_peft: the adapter has no {missing} for {module!r}; the "
                       f"file is incomplete. Save the adapter again.")
  return halves


def _pattern(pattern: dict | None, module: str, default):
  """PEFT's rank/alpha pattern rule: a key matches a module name ending in it."""
  return _pattern_key(pattern, module, default)[0]


def _pattern_key(pattern: dict | None, module: str, default):
  """(value, key) of the first key of `pattern` matching `module` (peft's get_pattern_key);
  (default, None) if none does."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value, key
  return default, None


def _deselected_by(cfg: dict, module: str) -> str | None:
  """The config field that keeps PEFT from putting a LoRA layer on `module`, or None.

  Follows peft.tuners.tuners_utils.check_target_module_exists (peft 0.21). Where
  target_modules is missing PEFT takes its default for the model type, which a config does
  not name: every module counts as selected then. 'all-linear' selects every module except
  `lm_head`, the usual output layer.
  """
  ex = cfg.get("exclude_modules")
  if ex and (re.fullmatch(ex, module) if isinstance(ex, str) else
             module in ex or any(module.endswith(f".{e}") for e in ex)):
    return "exclude_modules"
  if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.get("modules_to_save") or ()):
    return "modules_to_save"
  target = cfg.get("target_modules")
  if isinstance(target, str) and target.lower() != "all-linear":
    return None if re.fullmatch(target, module) else "target_modules"
  if isinstance(target, str):  # PEFT expands it to a list of Linear layers, the output one out
    if module.split(".")[-1] == "lm_head":
      return "target_modules"
  elif target is not None:
    if module in target:
      return None
    if not any(module.endswith(f".{t}") for t in target):
      return "target_modules"
  layers = cfg.get("layers_to_transform")
  if layers is None or layers == []:
    return None
  pats = cfg.get("layers_pattern")
  if not pats:
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
  else:
    for p in [pats] if isinstance(pats, str) else pats:
      m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
      if m is not None:
        break
  if m is None:
    return "layers_to_transform"
  idx = int(m["idx"])
  return None if (idx == layers if _is_int(layers) else idx in layers) else "layers_to_transform"


def import_peft(directory: str | os.PathLike, params: Any, *, key_map: KeyMap,
                dtype: Any = jnp.float32, adapter_name: str | None = None) -> Any:
  """Reads a PEFT LoRA adapter into a jlora tree built on `params`.

  Each module of the adapter is found in `params` through the key map; the
  kernel there becomes a `jlora.LoRA` leaf with `a = lora_A.T`,
  `b = lora_B.T`, PEFT's alpha (`lora_alpha` or `alpha_pattern`) and
  `use_rslora`. A stacked kernel gathers the modules of all its slices; slices
  the adapter does not cover (PEFT's `layers_to_transform`) get zero adapters.
  A DoRA adapter (`use_dora`) gives DoRA leaves with `m` its
  `lora_magnitude_vector`. An adapter saved with `init_lora_weights="pissa"` or
  `"olora"` (not converted) imports as PEFT loads it: the frozen `w` becomes the
  residual PEFT rebuilds from the base weights (`jlora.apply`'s init of that
  name, with the adapter's rank and scale), and `a`, `b` the trained factors.

  The adapter either imports to the weights PEFT loads it to, or is refused:
  the config's rank (`r`, `rank_pattern`) must be the tensors', alphas finite
  numbers, every module with tensors one that the config selects
  (`target_modules`, `exclude_modules`, `layers_to_transform`,
  `modules_to_save`, as PEFT reads them), and the config may not ask for what a
  `jlora.LoRA` leaf does not compute: an `init_lora_weights` that changes the
  base weights in a way jlora does not rebuild (`"pissa_niter_<n>"`, whose
  random sketch PEFT draws anew as it loads, `"corda"`, `"lora_ga"`: convert the
  adapter to plain LoRA with PEFT's `save_pretrained(...,
  path_initial_model_for_weight_conversion=...)` first; `"loftq"`), LoRA
  biases, trainable tokens, Activated LoRA and the like, or an option jlora
  does not know.

  Args:
    directory: a directory with `adapter_config.json` and
      `adapter_model.safetensors` (from `PeftModel.save_pretrained`).
    params: the base parameter tree (plain arrays, concrete or abstract).
    key_map: the key map of the tree's layout (`path -> (name, transpose) |
      None`), see the module docstring.
    dtype: the adapters' dtype (default float32, as `jlora.apply`).
    adapter_name: for a file whose keys name their adapter
      (`<module>.lora_A.<name>.weight`, as a live model's state dict does) and
      hold several: the one to read. Default: the file must hold one adapter.

  Returns:
    `params` with a `LoRA` leaf at every adapted kernel.

  Raises:
    FileNotFoundError: a missing file.
    ValueError: corrupt files; a config as above; a tensor key that is not
      `lora_A`/`lora_B`; several adapters and no `adapter_name`; a module no
      leaf of `params` maps to, or two leaves do; shapes that do not fit the
      kernel; ranks or alphas that differ between the slices of one stacked
      kernel; `params` already holding LoRA.
    TypeError: `adapter_name` is not a str.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 8, 8))}}}}
    >>> q = "layers/self_attn/q_proj/kernel"
    >>> names = {q: ("model.layers.{}.self_attn.q_proj.weight", True)}
    >>> d = jlora.hf.export_peft(os.path.join(tempfile.mkdtemp(), "a"),
    ...                          jlora.apply(params, rank=2, stacked="^layers/"), key_map=names.get)
    >>> back = jlora.hf.import_peft(d, params, key_map=names.get)
    >>> back["layers"]["self_attn"]["q_proj"]["kernel"].a.shape
    (2, 8, 2)
  """
  key_map = _resolve(key_map, "import_peft")
  directory = os.fspath(os.path.abspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"jlora.hf.import_peft: no adapter directory at {directory!r}.")
  cfg, cfg_path = _read_config(directory)
  raw, w_path = _read_tensors(directory)
  halves = _split_keys(raw, adapter_name, w_path)
  for module in halves:
    field = _deselected_by(cfg, module)
    if field is not None:
      raise ValueError(
          f"jlora.hf.import_peft: the adapter holds lora_A/lora_B for {module!r}, a module its "
          f"config does not select ({field}={cfg.get(field)!r} in {cfg_path!r}); PEFT puts no "
          f"LoRA layer there and drops these tensors without a word, so its weights would "
          f"differ from jlora's. Fix {field} in the config, or remove the module's tensors.")

  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
  owner: dict[str, list[tuple[int, tuple[int, ...]]]] = collections.defaultdict(list)
  for i, (path, x) in enumerate(flat):
    ps = P.path_str(path)
    named = _lookup(key_map, ps, "import_peft")
    if named is None or not hasattr(x, "shape"):
      continue
    if is_node(x):
      raise ValueError(f"jlora.hf.import_peft: the leaf at {ps!r} is already a jlora "
                       f"{type(x).__name__}; import onto the base params (jlora.base(tree)).")
    name, _ = named
    n = name.count("{}")
    if name.endswith(".weight"):
      for idx in np.ndindex(*x.shape[:n]):
        owner[name.format(*idx)[:-len(".weight")]].append((i, idx))
  unknown = sorted(set(halves) - set(owner))
  if unknown:
    near = P.nearest(sorted(owner), unknown[0], 3)
    raise ValueError(
        f"jlora.hf.import_peft: the adapter adapts {unknown[0]!r}, but the key map names no leaf "
        f"of params so (nearest names: {near}; {len(unknown)} modules unmatched). Pass the "
        f"params of the adapter's base model, or a key_map that names its leaves.")

  by_leaf: dict[int, dict[tuple[int, ...], str]] = collections.defaultdict(dict)
  for module in halves:
    if len(owner[module]) > 1:
      both = [P.path_str(flat[i][0]) for i, _ in owner[module][:2]]
      raise ValueError(
          f"jlora.hf.import_peft: key_map maps both {both[0]!r} and {both[1]!r} to {module!r}, "
          f"which the adapter adapts; one Hugging Face module needs one leaf. Fix the key_map.")
    i, idx = owner[module][0]
    by_leaf[i][idx] = module
  rslora = bool(cfg.get("use_rslora", False))
  dora = bool(cfg.get("use_dora", False))
  _check_magnitudes(halves, dora, cfg_path)
  residual = _rebuilt_init(cfg.get("init_lora_weights"))
  out = [x for _, x in flat]
  for i, slices in by_leaf.items():
    path, w = flat[i]
    ps = P.path_str(path)
    name, transpose = _lookup(key_map, ps, "import_peft")
    n = name.count("{}")
    kshape = tuple(w.shape[n:])
    if len(kshape) != 2 or not transpose:
      raise ValueError(
          f"jlora.hf.import_peft: the adapter adapts {next(iter(slices.values()))!r}, which the "
          f"key map ties to {ps!r} of shape {tuple(w.shape)} with transpose={transpose}; PEFT "
          f"LoRA modules are nn.Linear, so the leaf must be a 2-D (in, out) kernel (after "
          f"{n} stack axes) mapped with transpose=True.")
    ranks, alphas = {}, {}
    for idx, module in slices.items():
      A, B = halves[module]["A"], halves[module]["B"]
      if (A.ndim != 2 or B.ndim != 2 or A.shape[1] != kshape[0]
          or B.shape != (kshape[1], A.shape[0])):
        raise ValueError(
            f"jlora.hf.import_peft: {module!r} has lora_A {tuple(A.shape)} and lora_B "
            f"{tuple(B.shape)}, which do not fit the kernel {kshape} (in, out) at {ps!r}: "
            f"expected (r, {kshape[0]}) and ({kshape[1]}, r). Pass the params of the adapter's "
            f"base model.")
      r = A.shape[0]
      want, key = _pattern_key(cfg.get("rank_pattern"), module, cfg.get("r", 8))
      if r != want:
        why = (f"rank_pattern[{key!r}]" if key is not None else "r" if "r" in cfg else
               "r, PEFT's default")
        raise ValueError(
            f"jlora.hf.import_peft: {cfg_path!r} gives rank {want} for {module!r} ({why}), but its "
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} have rank {r}; PEFT refuses "
            f"this adapter (a size mismatch). If the tensors are right, set "
            f"{'that rank_pattern entry' if key is not None else 'r'} to {r} in the config.")
      ranks[idx] = r
      alphas[idx] = float(_pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
    for what, vals in (("rank", ranks), ("lora_alpha", alphas)):
      if len(set(vals.values())) > 1:
        detail = {slices[k]: v for k, v in sorted(vals.items())[:4]}
        raise ValueError(
            f"jlora.hf.import_peft: the modules stacked in {ps!r} have different {what}s "
            f"({detail}); a stacked jlora.LoRA leaf has one {what}. Import onto params with "
            f"one dict per layer, or use an adapter with a uniform {what}.")
    r, alpha = next(iter(ranks.values())), next(iter(alphas.values()))
    stack_shape = tuple(w.shape[:n])
    a = np.zeros(stack_shape + (kshape[0], r), np.float32)
    b = np.zeros(stack_shape + (r, kshape[1]), np.float32)
    for idx, module in slices.items():
      a[idx] = halves[module]["A"].astype(np.float32).T
      b[idx] = halves[module]["B"].astype(np.float32).T
    leaf = LoRA(w=w, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), alpha=alpha,
                a_axes=(0,), stack=n, rslora=rslora)
    out[i] = _imported_variant(leaf, slices, halves, dora, residual, ps, dtype)
  return jax.tree_util.tree_unflatten(treedef, out)


def _check_magnitudes(halves, dora: bool, cfg_path: str) -> None:
  """DoRA adapters hold a magnitude for every module; others hold none."""
  for module, h in halves.items():
    if dora and _MAG not in h:
      raise ValueError(
          f"jlora.hf.import_peft: {cfg_path!r} sets use_dora=true, but the adapter holds no "
          f"lora_magnitude_vector for {module!r}; the file is incomplete. Save the adapter "
          f"again.")
    if not dora and _MAG in h:
      raise ValueError(
          f"jlora.hf.import_peft: the adapter holds DoRA's lora_magnitude_vector for {module!r}, "
          f"but {cfg_path!r} does not set use_dora=true, so PEFT ignores it; the config and the "
          f"tensors disagree. Set use_dora in the config if the adapter was trained with DoRA, "
          f"or remove the magnitude tensors.")


def _imported_variant(leaf: LoRA, slices, halves, dora: bool, residual, ps, dtype) -> LoRA:
  """`leaf` with the residual PEFT rebuilds from the base (PiSSA/OLoRA) and DoRA's magnitude.

  PEFT adapts only the covered slices of a stacked kernel; the others keep their weights (a
  residual init leaves them whole, and DoRA's magnitude there is the weight's own norm, so
  with their zero adapters they compute the weights unchanged)."""
  n, w = leaf.stack, leaf.w
  covered = np.zeros(tuple(w.shape[:n]), bool)
  for idx in slices:
    covered[idx] = True
  if residual is not None:
    # PEFT's pissa_init/olora_init run on the base weight with the adapter's rank and scale
    w_res, _, _ = residual_init(w, residual, leaf.rank, leaf.scale, leaf.a_axes, n)
    mask = jnp.asarray(covered.reshape(covered.shape + (1,) * (w.ndim - n)))
    leaf = dataclasses.replace(leaf, w=jnp.where(mask, w_res, w), residual=residual)
  if dora:
    mag = np.array(dora_magnitude(leaf), np.float32)  # the weight's norm where not covered
    for idx, module in slices.items():
      got = halves[module][_MAG]
      if got.shape != mag[idx].shape:
        raise ValueError(
            f"jlora.hf.import_peft: {module!r} has lora_magnitude_vector of shape "
            f"{tuple(got.shape)}, which does not fit the kernel at {ps!r}: expected "
            f"{tuple(mag[idx].shape)} (one per output feature).")
      mag[idx] = got.astype(np.float32)
    leaf = dataclasses.replace(leaf, m=jnp.asarray(mag, dtype))
  return leaf


# ----------------------------------------------------------------------------- merged export


def export_merged(path: str | os.PathLike, tree: Any, *, key_map: KeyMap,
                  dtype: Any = None, overwrite: bool = False) -> str:
  """Writes `jlora.merge(tree)` as one safetensors file with Hugging Face names.

  Every leaf is written under its key-map name (stacked leaves one slice per
  name, kernels transposed to `(out, in)`), ready for
  `model.load_state_dict` or `from_pretrained` next to a `config.json`.

  Args:
    path: the `.safetensors` file to write.
    tree: a jlora tree, or plain params.
    key_map: the key map of the tree's layout (`path -> (name, transpose) |
      None`), see the module docstring.
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
    >>> params = {"norm": {"scale": jnp.ones(8)},
    ...           "layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 8, 16))}}}}
    >>> names = {"norm/scale": ("model.norm.weight", False),
    ...          "layers/mlp/up_proj/kernel": ("model.layers.{}.mlp.up_proj.weight", True)}
    >>> t = jlora.apply(params, rank=2, targets="up_proj", stacked="^layers/")
    >>> f = jlora.hf.export_merged(os.path.join(tempfile.mkdtemp(), "model.safetensors"), t,
    ...                            key_map=names.get)
    >>> from safetensors.numpy import load_file
    >>> sorted((k, v.shape) for k, v in load_file(f).items())  # doctest: +NORMALIZE_WHITESPACE
    [('model.layers.0.mlp.up_proj.weight', (16, 8)),
     ('model.layers.1.mlp.up_proj.weight', (16, 8)), ('model.norm.weight', (8,))]
  """
  key_map = _resolve(key_map, "export_merged")
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
        f"jlora.hf.export_merged: key_map has no Hugging Face name for {unmapped[:5]}"
        f"{' ...' if len(unmapped) > 5 else ''}; every leaf is written. Extend the key_map, "
        f"or drop these leaves from the tree first.")
  tensors: dict[str, np.ndarray] = {}
  for ps, x, name, transpose in named:
    n = name.count("{}")
    arr = _np(x, dtype)
    if arr.ndim < n or (transpose and arr.ndim - n != 2):
      raise ValueError(
          f"jlora.hf.export_merged: {ps!r} has shape {arr.shape}, but its name {name!r} has {n} "
          f"'{{}}' stack fields{' and asks for a transpose of the 2-D rest' if transpose else ''}"
          f". Fix the key_map for this leaf.")
    for idx in np.ndindex(*arr.shape[:n]):
      hf = name.format(*idx)
      if hf in tensors:
        raise ValueError(f"jlora.hf.export_merged: key_map gives the name {hf!r} twice (again for "
                         f"{ps!r}); each tensor needs its own name.")
      tensors[hf] = arr[idx].T if transpose else arr[idx]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _replace_files({path: lambda t: _save_safetensors(tensors, t)}, "export_merged")
  return path
