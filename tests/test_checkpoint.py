"""Adapter checkpoints: save/restore, exact resume, crash safety, rotation, sharding."""

import dataclasses
import functools
import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests.helpers import randomize_b

ROOT = pathlib.Path(__file__).resolve().parents[1]


class MLP(nn.Module):
  """A small Linen model: two adapted projections and a fully trained head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name="q_proj")(x)
    x = nn.gelu(x)
    x = nn.Dense(12, name="v_proj")(x)
    return nn.Dense(3, name="head")(x)


@functools.lru_cache
def _np_params(seed, width):
  init = jax.jit(MLP().init)
  return jax.tree.map(np.asarray, init(jax.random.key(seed), jnp.ones((1, width)))["params"])


def _params(seed=0, width=8):
  """Fresh device arrays each call (train steps donate their inputs)."""
  return jax.tree.map(jnp.asarray, _np_params(seed, width))


def _lora(params, **kw):
  """A LoRA tree with random nonzero b (apply initialises b to zeros)."""
  kw.setdefault("rank", 2)
  kw.setdefault("alpha", 4.0)
  return randomize_b(jlora.apply(params, trainable="head/kernel", key=jax.random.key(7), **kw),
                     seed=11)


def _leaves_equal(x, y):
  lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
  assert len(lx) == len(ly)
  for u, v in zip(lx, ly):
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _loss(tree, x, y):
  out = MLP().apply({"params": jlora.merge(tree)}, x)
  return jnp.mean((out - y) ** 2)


def _batches(n):
  ks = jax.random.split(jax.random.key(3), n)
  return [(jax.random.normal(k, (4, 8)), jax.random.normal(jax.random.fold_in(k, 1), (4, 3)))
          for k in ks]


# ----------------------------------------------------------------------------- save / restore


def test_save_writes_only_adapters_and_metadata(tmp_path):
  t = _lora(_params())
  path = jlora_save(tmp_path / "c", t, step=5, metadata={"run": "x"})
  meta = jlora.read_metadata(path)
  assert meta["format"] == "jlora.adapter" and meta["step"] == 5
  assert meta["jlora_version"] == jlora.__version__
  assert meta["adapter_dtype"] == "float32"
  assert meta["user"] == {"run": "x"}
  assert meta["targets"] == ["q_proj/kernel", "v_proj/kernel"]
  q = meta["adapters"]["q_proj/kernel"]
  assert (q["rank"], q["alpha"], q["a_axes"], q["stack"], q["rslora"]) == (2, 4.0, [0], 0, False)
  assert meta["trainable"]["head/kernel"]["shape"] == [12, 3]
  # The fingerprint is the base's: other adapters on it share it, another base does not.
  same_base = jlora.apply(jlora.base(t), rank=3, targets="q_proj")
  assert meta["fingerprint"] == jlora.read_metadata(
      jlora_save(tmp_path / "same_base", same_base))["fingerprint"]
  assert meta["fingerprint"] != jlora.read_metadata(
      jlora_save(tmp_path / "other_base", _lora(_params(width=6))))["fingerprint"]
  assert meta["opt_state"] is None
  # The frozen weights are not written: the checkpoint is about the size of a, b and head.
  n_written = sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(jlora.base(t)))
  assert n_written < base_bytes + 30_000
  c = jlora.count(t)
  assert c.trainable < c.frozen


def jlora_save(path, tree, **kw):
  return jlora.save(path, tree, **kw)


def test_restore_onto_lora_tree_built_from_base(tmp_path):
  t = _lora(_params())
  jlora_save(tmp_path / "c", t, step=2)
  fresh = jlora.apply(_params(), rank=2, alpha=4.0, trainable="head/kernel", key=jax.random.key(99))
  r = jlora.restore(tmp_path / "c", fresh)
  assert r.step == 2 and r.opt_state is None
  _leaves_equal(r.tree, t)
  assert r.tree["q_proj"]["kernel"].w is fresh["q_proj"]["kernel"].w


def test_restore_into_abstract_target_needs_no_base_weights(tmp_path):
  t = _lora(_params())
  jlora_save(tmp_path / "c", t)
  abstract = jax.eval_shape(lambda: jlora.split(
      jlora.apply(_params(), rank=2, alpha=4.0, trainable="head/kernel")).trainable)
  r = jlora.restore(tmp_path / "c", abstract)
  assert isinstance(r.tree["q_proj"]["kernel"], jlora.LoRA)
  assert r.tree["q_proj"]["kernel"].w is None and r.tree["q_proj"]["bias"] is None
  _leaves_equal(r.tree, jlora.split(t).trainable)
  frozen = jlora.split(jlora.apply(_params(), rank=2, alpha=4.0, trainable="head/kernel")).frozen
  merged = jlora.merge(jlora.combine(r.tree, frozen))
  np.testing.assert_allclose(merged["v_proj"]["kernel"], jlora.merge(t)["v_proj"]["kernel"])


def test_restore_without_target_rebuilds_adapters_from_metadata(tmp_path):
  t = _lora(_params(), rslora=True)
  jlora_save(tmp_path / "c", t)
  r = jlora.restore(tmp_path / "c")
  leaf = r.tree["v_proj"]["kernel"]
  assert isinstance(leaf, jlora.LoRA) and leaf.w is None and leaf.rslora and leaf.alpha == 4.0
  np.testing.assert_array_equal(leaf.b, t["v_proj"]["kernel"].b)
  np.testing.assert_array_equal(r.tree["head"]["kernel"].value, t["head"]["kernel"].value)


def test_restore_with_opt_state_and_bfloat16_adapters(tmp_path):
  t = _lora(_params(), dtype=jnp.bfloat16)
  step = jlora.train_step(_loss, optax.adam(1e-2))
  st = step.init(t)
  x, y = _batches(1)[0]
  t, st, _ = step(t, st, x, y)
  jlora_save(tmp_path / "c", t, opt_state=st, step=1)
  assert jlora.read_metadata(tmp_path / "c")["adapter_dtype"] == "bfloat16"
  base = jlora.apply(_params(), rank=2, alpha=4.0, trainable="head/kernel", dtype=jnp.bfloat16)
  r = jlora.restore(tmp_path / "c", base, opt_state=jax.eval_shape(step.init, base))
  _leaves_equal(jlora.split(r.tree).trainable, jlora.split(t).trainable)
  _leaves_equal(r.opt_state, st)
  assert jax.tree.structure(r.opt_state) == jax.tree.structure(st)


# ----------------------------------------------------------------------------- exact resume


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  data = _batches(6)
  make = lambda: jlora.apply(_params(), rank=2, trainable="head/kernel", key=jax.random.key(1))
  step = jlora.train_step(_loss, optax.adam(3e-2))

  t = make()
  st = step.init(t)
  for x, y in data:
    t, st, _ = step(t, st, x, y)

  mgr = jlora.CheckpointManager(tmp_path / "run", max_to_keep=2)
  u = make()
  su = step.init(u)
  for i, (x, y) in enumerate(data[:3]):
    u, su, _ = step(u, su, x, y)
    mgr.save(i + 1, u, opt_state=su)
  del u, su  # the "process" stops here

  mgr = jlora.CheckpointManager(tmp_path / "run", max_to_keep=2)
  base = make()
  r = mgr.restore(base, opt_state=jax.eval_shape(step.init, base))
  assert r.step == 3 == mgr.latest_step()
  u, su = r.tree, r.opt_state
  for x, y in data[r.step:]:
    u, su, _ = step(u, su, x, y)
  _leaves_equal(u, t)
  _leaves_equal(su, st)
  assert not np.array_equal(t["q_proj"]["kernel"].b, make()["q_proj"]["kernel"].b)


# ----------------------------------------------------------------------------- manager


def test_manager_keeps_the_last_n(tmp_path):
  t = _lora(_params())
  mgr = jlora.CheckpointManager(tmp_path / "run", max_to_keep=2)
  assert mgr.latest_step() is None and mgr.all_steps() == []
  for s in (10, 20, 30):
    mgr.save(s, t, metadata={"s": s})
  assert mgr.all_steps() == [20, 30]
  assert sorted(os.listdir(tmp_path / "run")) == ["20", "30"]
  r = mgr.restore(step=20)
  assert r.step == 20 and r.metadata["user"] == {"s": 20}
  with pytest.raises(FileExistsError, match="step 30 .* already"):
    mgr.save(30, t)
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 10.*20, 30"):
    mgr.restore(step=10)
  with pytest.raises(ValueError, match="max_to_keep=0"):
    jlora.CheckpointManager(tmp_path / "x", max_to_keep=0)


def test_manager_restore_when_empty(tmp_path):
  mgr = jlora.CheckpointManager(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
    mgr.restore()


_KILL_SCRIPT = """
import os, sys, time, jax, jax.numpy as jnp
import jlora
params = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (6, 10))}}
t = jlora.apply(params, rank=2, key=jax.random.key(1))
mgr = jlora.CheckpointManager(sys.argv[1], max_to_keep=2)
mgr.save(1, t)
t2 = jax.tree.map(lambda x: x + 1.0, t)
rename = os.rename
def blocked(src, dst, *a, **k):  # the save is written: block as it is put into place
  if ".jlora-tmp-" in os.path.basename(os.fspath(src)):
    print("WRITING", flush=True)
    time.sleep(600)
  return rename(src, dst, *a, **k)
os.rename = blocked
mgr.save(2, t2)
"""


def test_a_killed_save_leaves_the_previous_checkpoint_restorable(tmp_path):
  root = tmp_path / "run"
  with subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(root)], cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
    try:
      line = proc.stdout.readline()
      assert line.strip() == "WRITING", proc.stderr.read()
      assert any(".jlora-tmp-" in n for n in os.listdir(root))
      assert os.listdir(root / "1")
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  t = jlora.apply({"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (6, 10))}}, rank=2,
                  key=jax.random.key(5))
  mgr = jlora.CheckpointManager(root, max_to_keep=2)
  assert mgr.all_steps() == [1]
  assert not any(".jlora-tmp-" in n for n in os.listdir(root))  # cleaned up
  r = mgr.restore(t)
  want = jlora.apply({"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (6, 10))}},
                     rank=2, key=jax.random.key(1))
  _leaves_equal(r.tree, want)


def test_an_interrupted_commit_leaves_the_previous_save(tmp_path, monkeypatch):
  t = _lora(_params())
  path = jlora_save(tmp_path / "c", t, step=1)

  rename = os.rename

  def killed(src, dst, *a, **k):
    if ".jlora-tmp-" in os.path.basename(os.fspath(src)):  # written, about to be put in place
      raise KeyboardInterrupt  # as if the process stopped between writing and committing
    return rename(src, dst, *a, **k)

  monkeypatch.setattr(os, "rename", killed)
  with pytest.raises(KeyboardInterrupt):
    jlora_save(path, jax.tree.map(lambda x: x + 1.0, t), step=2, overwrite=True)
  assert os.listdir(tmp_path) == ["c"]  # the temporary directory is gone
  r = jlora.restore(path, t)
  assert r.step == 1
  _leaves_equal(r.tree, t)


def test_overwrite(tmp_path):
  t = _lora(_params())
  path = jlora_save(tmp_path / "c", t, step=1)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jlora_save(path, t, step=2)
  assert jlora.restore(path).step == 1
  jlora_save(path, t, step=2, overwrite=True)
  assert jlora.restore(path).step == 2
  assert os.listdir(tmp_path) == ["c"]


def test_failed_save_leaves_the_existing_checkpoint(tmp_path):
  t = _lora(_params())
  path = jlora_save(tmp_path / "c", t, step=1)
  with pytest.raises(TypeError, match="not JSON"):
    jlora_save(path, t, step=2, metadata={"bad": object()}, overwrite=True)
  with pytest.raises(ValueError, match="no jlora.LoRA or jlora.Trainable"):
    jlora_save(path, _params(), overwrite=True)
  assert jlora.restore(path).step == 1
  assert os.listdir(tmp_path) == ["c"]


# ----------------------------------------------------------------------------- bad input


def test_fingerprint_mismatch_names_the_first_differing_path(tmp_path):
  jlora_save(tmp_path / "c", _lora(_params()))
  other = jlora.apply(_params(width=6), rank=2, alpha=4.0, trainable="head/kernel")
  with pytest.raises(ValueError, match=r"different base model.*'q_proj/kernel'.*\(8, 16\).*"
                     r"\(6, 16\).*check_base=False"):
    jlora.restore(tmp_path / "c", other)
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim == 1 else x,
                    _params())
  with pytest.raises(ValueError, match=r"'head/bias'.*float32.*bfloat16"):
    jlora.restore(tmp_path / "c", jlora.apply(bf, rank=2, alpha=4.0, trainable="head/kernel"))


def test_rank_alpha_layout_and_target_mismatches(tmp_path):
  jlora_save(tmp_path / "c", _lora(_params()))
  p = _params()
  with pytest.raises(ValueError, match=r"'q_proj/kernel'.*rank 2.*rank 3"):
    jlora.restore(tmp_path / "c", jlora.apply(p, rank=3, alpha=4.0, trainable="head/kernel"))
  with pytest.raises(ValueError, match=r"'q_proj/kernel'.*alpha 4.0.*alpha 2.0"):
    jlora.restore(tmp_path / "c", jlora.apply(p, rank=2, alpha=2.0, trainable="head/kernel"))
  with pytest.raises(ValueError, match=r"'q_proj/kernel'.*rslora"):
    jlora.restore(tmp_path / "c", jlora.apply(p, rank=2, alpha=4.0, rslora=True,
                                             trainable="head/kernel"))
  with pytest.raises(ValueError, match=r"checkpoint has no adapter at \['head/kernel'\]"):
    jlora.restore(tmp_path / "c", jlora.apply(p, rank=2, alpha=4.0, targets="proj|head"))
  with pytest.raises(ValueError, match=r"target has no adapter at \['v_proj/kernel'\]"):
    jlora.restore(tmp_path / "c", jlora.apply(p, rank=2, alpha=4.0, targets="q_proj",
                                             trainable="head/kernel"))


def test_layout_mismatch_on_a_stacked_kernel(tmp_path):
  w = {"layers": {"wq": jax.random.normal(jax.random.key(0), (3, 4, 2, 5))}}
  jlora_save(tmp_path / "c", jlora.apply(w, rank=2, stacked="layers"))
  with pytest.raises(ValueError, match=r"'layers/wq'.*a_axes \(0, 1\).*a_axes \(0,\)"):
    jlora.restore(tmp_path / "c", jlora.apply(w, rank=2, stacked="layers", layout="fan",
                                             in_axes=(0,)))
  with pytest.raises(ValueError, match=r"'layers/wq'.*stack 1.*stack 0"):
    jlora.restore(tmp_path / "c", jlora.apply(w, rank=2, layout="fan", in_axes=(0, 1)),
                 check_base=False)


def test_opt_state_mismatch(tmp_path):
  t = _lora(_params())
  st = jlora.train_step(_loss, optax.adam(1e-2)).init(t)
  jlora_save(tmp_path / "c", t, opt_state=st)
  sgd = jlora.train_step(_loss, optax.sgd(1e-2, momentum=0.9)).init(t)
  with pytest.raises(ValueError, match=r"optimizer state.*differs at .*Build `opt_state`"):
    jlora.restore(tmp_path / "c", t, opt_state=sgd)
  jlora_save(tmp_path / "d", t)
  with pytest.raises(ValueError, match="holds no optimizer state"):
    jlora.restore(tmp_path / "d", t, opt_state=st)


# Reading damaged arrays fails in one of orbax's concurrent reads; the others
# may report to a closed event loop after the error, which Python logs as an
# unraisable exception. The error itself is what the test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint at .*nope"):
    jlora.restore(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a jlora checkpoint"):
    jlora.restore(tmp_path / "empty")
  t = _lora(_params())
  path = pathlib.Path(jlora_save(tmp_path / "c", t))
  meta_file = path / "jlora.json"
  good = meta_file.read_text()
  meta_file.write_text(good[:40])
  with pytest.raises(ValueError, match="metadata .* unreadable"):
    jlora.restore(path, t)
  meta = json.loads(good)
  meta["format_version"] = 99
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="format version 99"):
    jlora.restore(path, t)
  meta_file.write_text(good)
  for f in (path / f"arrays-{meta['save_id']}" / "adapter").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"garbage" * 3)
  with pytest.raises(ValueError, match="could not read the arrays.*corrupt"):
    jlora.restore(path, t)
  time.sleep(0.5)  # let late callbacks of the failed reads land inside this test
  gc.collect()


def test_bad_arguments(tmp_path):
  t = _lora(_params())
  with pytest.raises(TypeError, match="step must be a non-negative int"):
    jlora_save(tmp_path / "c", t, step=1.5)
  with pytest.raises(ValueError, match="jlora.save: the path 'a/value' appears twice"):
    jlora_save(tmp_path / "d",
               {"a": {"value": t["q_proj"]["kernel"]}, "a/value": t["v_proj"]["kernel"]})


# ----------------------------------------------------------------------------- sharding


def test_restore_onto_named_sharding_single_device(tmp_path):
  t = _lora(_params())
  jlora_save(tmp_path / "c", t)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
  abstract = jax.eval_shape(lambda: jlora.split(
      jlora.apply(_params(), rank=2, alpha=4.0, trainable="head/kernel")).trainable)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract)
  r = jlora.restore(tmp_path / "c", abstract)
  assert r.tree["q_proj"]["kernel"].a.sharding == sh
  _leaves_equal(r.tree, jlora.split(t).trainable)


def test_restore_onto_a_four_device_mesh(tmp_path):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  params = {"layers": {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (2, 8, 12))}}}
  t = jlora.apply(params, rank=4, stacked="layers", key=jax.random.key(1))
  t = jax.tree.map(lambda x: x + 0.5, t)
  t = jax.device_put(t, NamedSharding(mesh, P()))
  jlora.save(tmp_path / "c", t)
  abstract = jax.eval_shape(
      lambda: jlora.split(jlora.apply(params, rank=4, stacked="layers")).trainable)
  sh_a = NamedSharding(mesh, P(None, "model", None))
  sh_b = NamedSharding(mesh, P(None, None, "model"))
  leaf = abstract["layers"]["q_proj"]["kernel"]
  leaf = dataclasses.replace(
      leaf, a=jax.ShapeDtypeStruct(leaf.a.shape, leaf.a.dtype, sharding=sh_a),
      b=jax.ShapeDtypeStruct(leaf.b.shape, leaf.b.dtype, sharding=sh_b))
  r = jlora.restore(tmp_path / "c", {"layers": {"q_proj": {"kernel": leaf}}})
  got = r.tree["layers"]["q_proj"]["kernel"]
  assert got.a.sharding == sh_a and got.b.sharding == sh_b, (got.a.sharding, got.b.sharding)
  assert len(got.a.addressable_shards) == 4 and got.a.addressable_shards[0].data.shape == (2, 4, 4)
  assert len(got.b.addressable_shards) == 4 and got.b.addressable_shards[0].data.shape == (2, 4, 6)
  np.testing.assert_array_equal(np.asarray(got.a), np.asarray(t["layers"]["q_proj"]["kernel"].a))
  np.testing.assert_array_equal(np.asarray(got.b), np.asarray(t["layers"]["q_proj"]["kernel"].b))


def test_more_bad_input(tmp_path, monkeypatch):
  t = _lora(_params())
  trainable, frozen = jlora.split(t)
  with pytest.raises(ValueError, match="Trainable leaf at 'head/kernel' holds None"):
    jlora_save(tmp_path / "f", frozen)
  with pytest.raises(ValueError, match="LoRA leaf at 'q' has no adapters"):
    jlora_save(tmp_path / "f", {"q": frozen["q_proj"]["kernel"]})
  # A checkpoint of the trainable half has no fingerprint; restoring skips that check.
  path = jlora_save(tmp_path / "half", trainable)
  assert jlora.read_metadata(path)["fingerprint"] is None
  other = jlora.apply(_params(width=6), rank=2, alpha=4.0, trainable="head/kernel")
  with pytest.raises(ValueError, match=r"adapter 'a' at 'q_proj/kernel' has shape \(8, 2\) in "
                     r"the checkpoint and \(6, 2\)"):
    jlora.restore(path, other)
  head = {"head": {"kernel": jlora.Trainable(jnp.ones((12, 3)))}}
  jlora_save(tmp_path / "h", head)
  with pytest.raises(ValueError, match=r"Trainable leaf at 'head/kernel' has shape \(12, 3\) in "
                     r"the checkpoint and \(12, 4\)"):
    jlora.restore(tmp_path / "h", {"head": {"kernel": jlora.Trainable(jnp.ones((12, 4)))}},
                 check_base=False)
  with pytest.raises(ValueError, match=r"the target has no jlora.Trainable leaf at \['head/k"):
    jlora.restore(tmp_path / "h", {"head": {"kernel": jnp.ones((12, 3))}})
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "jlora.json").write_text('{"format": "other"}')
  with pytest.raises(ValueError, match="not a jlora checkpoint .its metadata has no format"):
    jlora.restore(tmp_path / "x")
  # A checkpoint that appeared at the path while saving is not replaced without overwrite.
  rename = os.rename

  def appears_first(src, dst, *a, **k):
    if ".jlora-tmp-" in os.path.basename(os.fspath(src)) and not os.path.exists(dst):
      shutil.copytree(tmp_path / "h", dst)  # another process's checkpoint, just committed
    return rename(src, dst, *a, **k)

  monkeypatch.setattr(os, "rename", appears_first)
  with pytest.raises(FileExistsError, match="'.*g' already exists. Pass overwrite=True"):
    jlora_save(tmp_path / "g", t, step=3)
  monkeypatch.undo()
  assert jlora.restore(tmp_path / "g").step is None  # the one that appeared, intact
  assert sorted(os.listdir(tmp_path / "g")) == sorted(os.listdir(tmp_path / "h"))


def test_a_stale_temporary_directory_is_removed(tmp_path):
  pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout)  # has ended
  t = _lora(_params())
  host = jlora.read_metadata(jlora_save(tmp_path / "probe", t))["save_id"].split("-")[0]
  run = tmp_path / "run"
  stale = run / f"c.jlora-tmp-{host}-{pid}-{'a' * 12}"
  (stale / "junk").mkdir(parents=True)
  jlora_save(run / "c", t, step=4)
  assert os.listdir(run) == ["c"] and jlora.restore(run / "c", t).step == 4
