"""Checkpoints under bad input, restarts, strays and concurrent processes: nothing lost or mixed."""

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jlora
from tests.helpers import randomize_b

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree(seed=0, alpha=4.0, params=None):
  """A LoRA tree with random a and b (b is zeros at init, which would hide mix-ups)."""
  rng = np.random.default_rng(seed)
  if params is None:
    params = {"q_proj": {"kernel": jnp.asarray(rng.standard_normal((6, 10), np.float32))},
              "head": {"kernel": jnp.asarray(rng.standard_normal((10, 3), np.float32))}}
  t = randomize_b(jlora.apply(params, rank=2, alpha=4.0, targets="q_proj", trainable="head",
                              key=jax.random.key(seed)), seed)
  # Set on the leaves: jlora.apply refuses the non-finite alphas some tests need.
  return jax.tree.map(lambda x: dataclasses.replace(x, alpha=alpha) if jlora.is_lora(x) else x,
                      t, is_leaf=jlora.is_lora)


def _shifted(t, s):
  """`t` with every trained array shifted by `s` (so the arrays tell which save they are)."""
  def f(x):
    if isinstance(x, jlora.LoRA):
      return dataclasses.replace(x, a=x.a + s, b=x.b + s)
    if isinstance(x, jlora.Trainable):
      return jlora.Trainable(x.value + s)
    return x
  return jax.tree.map(f, t, is_leaf=lambda x: isinstance(x, (jlora.LoRA, jlora.Trainable)))


def _assert_trained_equal(x, y):
  tx, ty = jlora.split(x).trainable, jlora.split(y).trainable
  assert jax.tree.structure(tx) == jax.tree.structure(ty)
  for u, v in zip(jax.tree.leaves(tx), jax.tree.leaves(ty)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _listing(root):
  return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


# ----------------------------------------------------------------------------- manager steps


def test_a_restarted_run_cannot_save_below_the_newest_step(tmp_path):
  t = _tree()
  mgr = jlora.CheckpointManager(tmp_path / "run", max_to_keep=2)
  for s in (10, 20):
    assert os.path.isdir(mgr.save(s, _shifted(t, s)))
  before = _listing(tmp_path / "run")
  # The restarted run saves step 5: refused, nothing written or deleted.
  again = jlora.CheckpointManager(tmp_path / "run", max_to_keep=2)
  with pytest.raises(ValueError, match=r"CheckpointManager.save: step 5 is not newer than the "
                     r"newest checkpoint, step 20, .*new directory.*overwrite=True"):
    again.save(5, t)
  with pytest.raises(FileExistsError, match=r"step 20 is already saved.*overwrite=True"):
    again.save(20, t)
  assert _listing(tmp_path / "run") == before
  assert again.all_steps() == [10, 20]
  _assert_trained_equal(again.restore(t).tree, _shifted(t, 20))


def test_overwrite_true_rewinds_the_run_to_the_step(tmp_path):
  t = _tree()
  mgr = jlora.CheckpointManager(tmp_path / "run", max_to_keep=3)
  for s in (10, 20, 30):
    mgr.save(s, _shifted(t, s))
  # Replacing the newest step keeps the others.
  path = mgr.save(30, _shifted(t, 31), overwrite=True)
  assert os.path.isdir(path) and mgr.all_steps() == [10, 20, 30]
  _assert_trained_equal(mgr.restore(t).tree, _shifted(t, 31))
  # An older step: it is saved and becomes the newest; the later ones are deleted.
  path = mgr.save(15, _shifted(t, 15), overwrite=True)
  assert os.path.isdir(path) and path == mgr.path(15)
  assert mgr.all_steps() == [10, 15] and mgr.latest_step() == 15
  r = mgr.restore(t)
  assert r.step == 15
  _assert_trained_equal(r.tree, _shifted(t, 15))
  _assert_trained_equal(mgr.restore(t, step=10).tree, _shifted(t, 10))


@pytest.mark.parametrize("step, err, match", [
    (5.7, TypeError, r"step must be a non-negative int, got 5.7"),
    (5.0, TypeError, r"step must be a non-negative int, got 5.0"),
    (True, TypeError, r"step must be a non-negative int, got True"),
    ("7", TypeError, r"step must be a non-negative int, got '7'"),
    (-1, ValueError, r"step must be a non-negative int, got -1"),
    (np.int32(-3), ValueError, r"step must be a non-negative int, got -3"),
])
def test_manager_steps_are_non_negative_ints(tmp_path, step, err, match):
  mgr = jlora.CheckpointManager(tmp_path / "run")
  with pytest.raises(err, match=r"jlora.CheckpointManager.save: " + match):
    mgr.save(step, _tree())
  with pytest.raises(err, match=match):
    jlora.save(tmp_path / "c", _tree(), step=step)
  assert os.listdir(tmp_path / "run") == [] and not (tmp_path / "c").exists()


@pytest.mark.parametrize("bad", [True, 2.5, "3", 0])
def test_max_to_keep_is_a_positive_int(tmp_path, bad):
  with pytest.raises(ValueError, match=rf"max_to_keep={bad!r} must be an int >= 1, or None"):
    jlora.CheckpointManager(tmp_path / "run", max_to_keep=bad)


def test_manager_step_arguments_are_checked(tmp_path):
  mgr = jlora.CheckpointManager(tmp_path / "run", max_to_keep=np.int64(2))
  assert mgr.max_to_keep == 2 and type(mgr.max_to_keep) is int
  with pytest.raises(TypeError, match=r"CheckpointManager.path: step must be a non-negative int, "
                     r"got 1.5"):
    mgr.path(1.5)
  with pytest.raises(ValueError, match=r"CheckpointManager.restore: step must be a "
                     r"non-negative int, got -2"):
    mgr.restore(step=-2)


def test_manager_accepts_numpy_int_steps(tmp_path):
  t = _tree()
  mgr = jlora.CheckpointManager(tmp_path / "run")
  path = mgr.save(np.int64(3), t)
  assert path == str(tmp_path / "run" / "3") and mgr.all_steps() == [3]
  r = mgr.restore(t, step=np.int32(3))
  assert r.step == 3 and type(r.step) is int


def test_stray_folders_are_not_steps_and_are_never_deleted(tmp_path):
  root = tmp_path / "run"
  (root / "99").mkdir(parents=True)  # an empty numeric folder
  (root / "50").mkdir()
  (root / "50" / "notes.txt").write_text("mine")  # a user's folder
  (root / "60" / "jlora").mkdir(parents=True)  # half a checkpoint, no commit
  (root / "60" / "jlora" / "metadata").write_text("{")
  mgr = jlora.CheckpointManager(root, max_to_keep=1)
  assert mgr.latest_step() is None and mgr.all_steps() == []
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    mgr.restore()
  t = _tree()
  for s in (1, 2, 3):
    mgr.save(s, _shifted(t, s))
  assert mgr.all_steps() == [3]
  assert sorted(os.listdir(root)) == ["3", "50", "60", "99"]
  shutil.copytree(root / "3", root / "004")  # a checkpoint, but not under a step's name
  assert mgr.all_steps() == [3] and mgr.latest_step() == 3
  assert jlora.restore(root / "004", t).step == 3
  assert (root / "50" / "notes.txt").read_text() == "mine"
  with pytest.raises(FileExistsError, match=r"'.*50' exists and is not a jlora checkpoint"):
    mgr.save(50, t, overwrite=True)
  assert (root / "50" / "notes.txt").read_text() == "mine" and mgr.all_steps() == [3]


# ----------------------------------------------------------------------------- save(overwrite=True)


def test_overwrite_refuses_a_regular_file(tmp_path):
  f = tmp_path / "c"
  f.write_text("user data")
  with pytest.raises(FileExistsError, match=r"jlora.save: '.*c' exists and is not a jlora "
                     r"checkpoint \(a file\).*another directory"):
    jlora.save(f, _tree(), overwrite=True)
  assert f.read_text() == "user data" and os.listdir(tmp_path) == ["c"]


def test_overwrite_refuses_a_folder_of_user_files(tmp_path):
  d = tmp_path / "c"
  (d / "sub").mkdir(parents=True)
  (d / "sub" / "a.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=r"jlora.save: '.*c' exists and is not a jlora "
                     r"checkpoint.*another directory"):
    jlora.save(d, _tree(), overwrite=True)
  assert _listing(d) == ["sub", "sub/a.txt"] and os.listdir(tmp_path) == ["c"]


def test_overwrite_replaces_an_empty_folder_and_a_checkpoint(tmp_path):
  t = _tree()
  (tmp_path / "c").mkdir()
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jlora.save(tmp_path / "c", t)
  jlora.save(tmp_path / "c", _shifted(t, 1), step=1, overwrite=True)
  jlora.save(tmp_path / "c", _shifted(t, 2), step=2, overwrite=True)
  r = jlora.restore(tmp_path / "c", t)
  assert r.step == 2
  _assert_trained_equal(r.tree, _shifted(t, 2))
  assert os.listdir(tmp_path) == ["c"]


# ----------------------------------------------------------------------------- metadata


def _strict_json(path):
  def bad(c):
    raise ValueError(f"not JSON: {c}")
  return json.loads(pathlib.Path(path).read_text(), parse_constant=bad)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_non_finite_alpha_round_trips(tmp_path, alpha):
  t = _tree(alpha=alpha)
  path = jlora.save(tmp_path / "c", t, step=1)
  meta = jlora.read_metadata(path)
  got = meta["adapters"]["q_proj/kernel"]["alpha"]
  assert (math.isnan(got) if math.isnan(alpha) else got == alpha)
  for f in pathlib.Path(path).rglob("*"):  # every JSON file jlora wrote is valid JSON
    if f.is_file() and f.suffix == ".json" or f.name == "metadata":
      _strict_json(f)
  r = jlora.restore(path, _tree(seed=5, alpha=alpha))
  _assert_trained_equal(r.tree, t)
  leaf = jlora.restore(path).tree["q_proj"]["kernel"]
  assert (math.isnan(leaf.alpha) if math.isnan(alpha) else leaf.alpha == alpha)
  with pytest.raises(ValueError, match=r"'q_proj/kernel' has alpha .* in the checkpoint but "
                     r"alpha 4.0"):
    jlora.restore(path, _tree(seed=5))


def test_user_metadata_must_be_strict_json(tmp_path):
  with pytest.raises(TypeError, match=r"jlora.save: metadata is not JSON-serializable.*NaN or "
                     r"infinite.*str\(x\)"):
    jlora.save(tmp_path / "c", _tree(), metadata={"loss": float("nan")})
  assert not (tmp_path / "c").exists()


def test_keys_holding_a_slash_keep_their_structure(tmp_path):
  rng = np.random.default_rng(3)
  params = {"a/b": {"c": jnp.asarray(rng.standard_normal((6, 10), np.float32))},
            "d": {"e/f": {"g": jnp.asarray(rng.standard_normal((4, 5), np.float32))}}}
  t = jlora.apply(params, rank=2, targets=["a/b/c", "d/e/f/g"], key=jax.random.key(0))
  t = _shifted(t, 0.5)
  path = jlora.save(tmp_path / "c", t)
  r = jlora.restore(path)
  assert set(r.tree) == {"a/b", "d"} and set(r.tree["d"]) == {"e/f"}
  assert isinstance(r.tree["a/b"]["c"], jlora.LoRA)
  np.testing.assert_array_equal(r.tree["a/b"]["c"].b, t["a/b"]["c"].b)
  np.testing.assert_array_equal(r.tree["d"]["e/f"]["g"].a, t["d"]["e/f"]["g"].a)
  fresh = jlora.apply(params, rank=2, targets=["a/b/c", "d/e/f/g"])
  _assert_trained_equal(jlora.restore(path, fresh).tree, t)


# ----------------------------------------------------------------------------- temporaries, crashes


def _dead_pid():
  """The pid of a process that has ended."""
  out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True).stdout
  return int(out)


def _sid(pid, host):
  return f"{host}-{pid}-{np.random.default_rng(pid).bytes(6).hex()}"


def test_only_temporaries_of_ended_processes_are_removed(tmp_path):
  root = tmp_path / "run"
  t = _tree()
  mgr = jlora.CheckpointManager(root)
  mgr.save(1, t)
  host = jlora.read_metadata(root / "1")["save_id"].split("-")[0]  # this host's tag
  dead, other_host = _dead_pid(), "0" * 8 if host != "0" * 8 else "1" * 8
  names = {
      f"2.jlora-tmp-{_sid(dead, host)}": False,  # its writer has ended: removed
      f"2.jlora-tmp-{_sid(os.getppid(), host)}": True,  # a running process's save: kept
      f"2.jlora-tmp-{_sid(os.getpid(), host)}": True,  # one of this process's saves: kept
      f"2.jlora-tmp-{_sid(dead, other_host)}": True,  # another host's: kept
      "2.jlora-tmp-0": True,  # no owner to check: kept
      f"1.jlora-del-{'c' * 12}": False,  # a deletion that was cut short: finished
  }
  for n in names:
    (root / n / "arrays").mkdir(parents=True)
  inside = {f"arrays-{_sid(dead, host)}": False, f"arrays-{_sid(os.getppid(), host)}": True}
  for n in inside:
    (root / "1" / n).mkdir()
  jlora.CheckpointManager(root)  # opening one (an evaluator) cleans up
  assert sorted(os.listdir(root)) == sorted(["1"] + [n for n, keep in names.items() if keep])
  kept = {n for n, keep in inside.items() if keep}
  assert {n for n in os.listdir(root / "1") if n.startswith("arrays-")} == kept | {
      f"arrays-{jlora.read_metadata(root / '1')['save_id']}"}
  _assert_trained_equal(mgr.restore(t).tree, t)
  # A save to a path removes the abandoned temporaries of that path only.
  (root / f"2.jlora-tmp-{_sid(dead, host)}").mkdir()
  (root / f"3.jlora-tmp-{_sid(dead, host)}").mkdir()
  mgr.save(2, t)
  left = sorted(n for n in os.listdir(root) if ".jlora-tmp-" in n)
  assert left == sorted([n for n, keep in names.items() if keep and ".jlora-tmp-" in n]
                        + [f"3.jlora-tmp-{_sid(dead, host)}"])


_KILLED_OVERWRITE = """
import os, sys, time
import jlora
from tests.test_checkpoint_faults import _shifted, _tree
t = _tree()
jlora.save(sys.argv[1], _shifted(t, 1), step=1)
real = os.replace
def blocked(src, dst, **k):
  if str(dst).endswith("jlora.json"):  # the new arrays are in place, the metadata not swapped
    print("SWAPPING", flush=True)
    time.sleep(600)
  return real(src, dst, **k)
os.replace = blocked
jlora.save(sys.argv[1], _shifted(t, 2), step=2, overwrite=True)
"""


def test_an_overwrite_killed_before_its_swap_leaves_the_old_save(tmp_path):
  path = tmp_path / "c"
  with subprocess.Popen([sys.executable, "-c", _KILLED_OVERWRITE, str(path)], cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
    try:
      assert proc.stdout.readline().strip() == "SWAPPING", proc.stderr.read()
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  t = _tree()
  assert len([n for n in os.listdir(path) if n.startswith("arrays-")]) == 2
  r = jlora.restore(path, t)
  assert r.step == 1
  _assert_trained_equal(r.tree, _shifted(t, 1))
  # The next overwrite removes the dead writer's leftovers, inside and beside the checkpoint.
  jlora.save(path, _shifted(t, 3), step=3, overwrite=True)
  assert os.listdir(tmp_path) == ["c"]
  sid = jlora.read_metadata(path)["save_id"]
  assert sorted(os.listdir(path)) == [".jlora-lock", f"arrays-{sid}", "jlora.json"]
  _consistent(jlora.restore(path, t), t)


# ----------------------------------------------------------------------------- reads during writes


def test_a_read_that_overlaps_an_overwrite_reads_the_new_save(tmp_path, monkeypatch):
  t = _tree()
  path = jlora.save(tmp_path / "c", _shifted(t, 1), step=1)
  real, calls = ocp.Checkpointer.restore, []

  def overwritten_meanwhile(self, directory, *a, **k):
    calls.append(directory)
    if len(calls) == 1:  # another process replaces the checkpoint during the first read
      jlora.save(path, _shifted(t, 2), step=2, overwrite=True)
    return real(self, directory, *a, **k)

  monkeypatch.setattr(ocp.Checkpointer, "restore", overwritten_meanwhile)
  r = jlora.restore(path, t)
  assert r.step == 2 and len(calls) == 2 and calls[0] != calls[1]
  _consistent(r, t)


def test_a_read_that_never_sees_one_save_twice_fails_clearly(tmp_path, monkeypatch):
  t = _tree()
  path = jlora.save(tmp_path / "c", _shifted(t, 1), step=1)
  real, step = ocp.Checkpointer.restore, [1]

  def always_overwritten(self, directory, *a, **k):
    step[0] += 1
    jlora.save(path, _shifted(t, step[0]), step=step[0], overwrite=True)
    return real(self, directory, *a, **k)

  monkeypatch.setattr(ocp.Checkpointer, "restore", always_overwritten)
  with pytest.raises(RuntimeError, match=r"jlora.restore: the checkpoint at '.*c' was replaced "
                     r"by another save during each of (\d+) attempts") as e:
    jlora.restore(path, t)
  attempts = int(re.search(r"each of (\d+) attempts", str(e.value)).group(1))
  assert step[0] - 1 == attempts > 1  # one save between the reads of each attempt
  monkeypatch.setattr(ocp.Checkpointer, "restore", real)
  _consistent(jlora.restore(path, t), t)


def test_a_checkpoint_deleted_while_read(tmp_path, monkeypatch):
  t = _tree()
  mgr = jlora.CheckpointManager(tmp_path / "run", max_to_keep=1)
  mgr.save(1, _shifted(t, 1))
  real = ocp.Checkpointer.restore

  def rotated_meanwhile(self, directory, *a, **k):
    if mgr.latest_step() == 1:  # the trainer saves step 2; step 1 is rotated away
      mgr.save(2, _shifted(t, 2))
    return real(self, directory, *a, **k)

  monkeypatch.setattr(ocp.Checkpointer, "restore", rotated_meanwhile)
  with pytest.raises(FileNotFoundError, match=r"jlora.restore: the checkpoint at '.*1' was "
                     r"deleted while it was being read.*Restore a newer one"):
    jlora.restore(mgr.path(1), t)
  # The manager's restore of the latest step moves on to the newer one.
  mgr.save(3, _shifted(t, 3))

  def rotated_again(self, directory, *a, **k):
    if mgr.latest_step() == 3:
      mgr.save(4, _shifted(t, 4))
    return real(self, directory, *a, **k)

  monkeypatch.setattr(ocp.Checkpointer, "restore", rotated_again)
  r = mgr.restore(t)
  assert r.step == 4 and mgr.all_steps() == [4]
  _consistent(r, t)


# ----------------------------------------------------------------------------- format 1


def _save_format_1(path, tree, step):
  """A checkpoint as jlora wrote it before format 2: metadata in jlora/metadata, no save id,
  no key components (from a format-2 save's metadata, written here with orbax by hand)."""
  scratch = path.parent / f"format-2-{path.name}"
  meta = jlora.read_metadata(jlora.save(scratch, tree, step=step))
  shutil.rmtree(scratch)
  meta["format_version"] = 1
  del meta["save_id"]
  arrays = {}
  for kind in ("adapters", "trainable"):
    for m in meta[kind].values():
      node = functools.reduce(lambda d, k: d[k], m.pop("keys"), tree)
      arrays[m["key"]] = ({"a": node.a, "b": node.b} if kind == "adapters"
                          else {"value": node.value})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
    c.save(path, ocp.args.Composite(adapter=ocp.args.StandardSave(arrays),
                                    jlora=ocp.args.JsonSave(meta)))


def test_format_1_checkpoints_are_read_and_converted_by_an_overwrite(tmp_path):
  t = _tree()
  _save_format_1(tmp_path / "run" / "7", _shifted(t, 7), 7)
  assert jlora.read_metadata(tmp_path / "run" / "7")["format_version"] == 1
  mgr = jlora.CheckpointManager(tmp_path / "run")
  assert mgr.all_steps() == [7]
  r = mgr.restore(t)
  assert r.step == 7
  _consistent(r, t)
  _assert_trained_equal(jlora.restore(mgr.path(7)).tree, jlora.split(_shifted(t, 7)).trainable)
  mgr.save(7, _shifted(t, 8), overwrite=True)
  assert sorted(os.listdir(mgr.path(7))) == [
      ".jlora-lock", f"arrays-{jlora.read_metadata(mgr.path(7))['save_id']}", "jlora.json"]
  r = mgr.restore(t)
  assert r.step == 7 and r.metadata["format_version"] == 2
  _assert_trained_equal(r.tree, _shifted(t, 8))


# ----------------------------------------------------------------------------- concurrent processes


_WRITER = """
import os, sys
import jax
import jlora
from tests.test_checkpoint_faults import _shifted, _tree
mode, path, first, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t = _tree()
jax.block_until_ready(_shifted(t, first))
print("READY", flush=True)
sys.stdin.readline()
mgr = jlora.CheckpointManager(path, max_to_keep=2) if mode == "manager" else None
s = first
while not os.path.exists(stop):  # save until the reader has seen enough
  if mgr is not None:
    out = mgr.save(s, _shifted(t, s))
    assert out == mgr.path(s) and mgr.latest_step() == s, (out, mgr.all_steps())
  else:
    out = jlora.save(path, _shifted(t, s), step=s, overwrite=True)
  assert os.path.isdir(out), out
  s += 1
print(s - 1, flush=True)
os._exit(0)  # skip the interpreter's teardown
"""


def _writers(*argvs):
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, *map(str, a)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for a in argvs]
  for p in procs:
    line = p.stdout.readline()
    assert line.strip() == "READY", p.communicate()[1][-3000:]
  for p in procs:
    p.stdin.write("go\n")
    p.stdin.flush()
  return procs


def _finish(procs, stop):
  """Stops the writers; their last steps."""
  stop.touch()
  last = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    last.append(int(out.split()[-1]))
  return last


def _consistent(r, t):
  """The arrays read are those of the save whose metadata came with them."""
  assert r.metadata["step"] == r.step
  _assert_trained_equal(r.tree, _shifted(t, r.step))


# Reading a directory that another process is deleting can make one of orbax's
# concurrent reads fail after the read as a whole already failed (and is retried);
# Python logs that as an unraisable exception. The reads themselves are checked.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_evaluator_opening_managers_does_not_break_training(tmp_path):
  root, stop = tmp_path / "run", tmp_path / "stop"
  t = _tree()
  procs = _writers(("manager", root, 1, stop))
  seen = set()
  try:
    # The evaluator opens a manager again and again while the trainer saves, until it has
    # seen four of the trainer's steps (a trainer that fails ends the loop too).
    while len(seen) < 4 and procs[0].poll() is None:
      mgr = jlora.CheckpointManager(root, max_to_keep=2)
      if mgr.latest_step() is not None:
        r = mgr.restore(t)
        _consistent(r, t)
        seen.add(r.step)
  finally:
    [last] = _finish(procs, stop)
  assert len(seen) == 4 and last >= 4
  mgr = jlora.CheckpointManager(root, max_to_keep=2)
  assert mgr.all_steps() == [last - 1, last] and sorted(os.listdir(root)) == sorted(
      [str(last - 1), str(last)])
  _consistent(mgr.restore(t), t)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_two_writers_and_a_reader_never_mix_saves(tmp_path):
  path, stop = tmp_path / "c", tmp_path / "stop"
  t = _tree()
  jlora.save(path, _shifted(t, 0), step=0)
  procs = _writers(("save", path, 1000, stop), ("save", path, 2000, stop))
  seen = set()
  try:
    # Both writers overwrite `path` again and again; the reader reads it until it has seen
    # saves of both (every read checked: the metadata and arrays of one save).
    while not ({s // 1000 for s in seen} >= {1, 2} and len(seen) >= 6) and all(
        p.poll() is None for p in procs):
      r = jlora.restore(path, t)
      _consistent(r, t)
      seen.add(r.step)
  finally:
    last = _finish(procs, stop)
  assert {s // 1000 for s in seen} >= {1, 2} and len(seen) >= 6
  r = jlora.restore(path, t)
  _consistent(r, t)
  assert r.step in last
  assert sorted(os.listdir(tmp_path)) == ["c", "stop"]
  assert sorted(os.listdir(path)) == [".jlora-lock", f"arrays-{r.metadata['save_id']}",
                                      "jlora.json"]
