"""Helpers shared by the test modules."""

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

import jlora


def rand(shape, seed=0, dtype=jnp.float32, scale=1.0):
  """Fresh normal values, std `scale` (numpy's generator: no XLA compile per shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def random_params(shapes, seed=0):
  """Random arrays for an abstract parameter tree (`jax.eval_shape(model.init, ...)`).

  Norm `scale`s are 1 + 0.1·N(0, 1), every other leaf 0.2·N(0, 1); each leaf comes from a
  numpy generator seeded by `(seed, its key path)` (no XLA compile per shape).
  """
  def draw(path, x):
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    z = rng.standard_normal(x.shape, np.float32)
    return jnp.asarray(1.0 + 0.1 * z if path[-1].key == "scale" else 0.2 * z)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def randomize_b(tree, seed=1):
  """Random `b` everywhere (at init `b` is zero, which would hide errors)."""
  def f(x):
    if jlora.is_lora(x):
      return dataclasses.replace(x, b=rand(x.b.shape, seed, x.b.dtype))
    return x
  return jax.tree.map(f, tree, is_leaf=jlora.is_lora)


def iter_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations (scan, remat, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for x in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(x, jex_core.ClosedJaxpr):
          yield from iter_eqns(x.jaxpr)
        elif isinstance(x, jex_core.Jaxpr):
          yield from iter_eqns(x)


def variable_value(v):
  """The value of a Flax NNX `Variable` (`get_value()` on flax >= 0.12, `.value` before)."""
  get = getattr(type(v), "get_value", None)
  return get(v) if get is not None else v.value


REPO = pathlib.Path(__file__).resolve().parent.parent


def run_notebook(name: str, timeout: int) -> str:
  """Executes colab/NAME top to bottom in a fresh kernel; returns the text the cells printed.

  The caller sets the environment (the kernel inherits it), e.g. with monkeypatch.
  """
  import nbclient
  import nbformat

  nb = nbformat.read(REPO / "colab" / name, as_version=4)
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)


# pytest's filterwarnings (pyproject.toml), for the Python code a Background job runs.
_PYTEST_WARNINGS = """
import warnings
warnings.simplefilter("error")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="orbax.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="flax.*")
"""


class Background:
  """A subprocess a test needs, run beside the tests that come before it (see conftest.py).

  Most tests keep one of CI's two cores busy (tracing and XLA compilation are single-threaded),
  so work that can run in a process of its own (a notebook, a multi-device worker, a recipe's
  command line) is started right after collection and runs on the other core; its test then
  only waits for the result and asserts on it. The jobs of the selected tests run one at a
  time, in the order of their first tests (`conftest.pytest_collection_finish`); a job no
  selected test needs never starts, and a test that gets to its job first runs it itself.

  Args:
    argv: the command, run in the repository root; `{out}` in an argument is replaced by
      `self.out`, a fresh temporary folder (removed by `stop`).
    env: `env(os.environ) -> dict`, the command's environment.
    timeout: seconds before the process (and its process group) is killed.
  """

  def __init__(self, argv, *, env=dict, timeout: float):
    self.argv, self.env, self.timeout = list(argv), env, timeout
    self.out = None
    self._lock = threading.Lock()  # held for a whole run
    self._proc_lock = threading.Lock()  # guards _proc and _stopped
    self._proc = None
    self._stopped = False
    self._result = None

  @classmethod
  def notebook(cls, name: str, *, timeout: int, **env):
    """colab/NAME run by `run_notebook` in a subprocess; `env` is added to (None: removed from)
    the environment the kernel inherits, with the repository on PYTHONPATH."""
    code = ("import sys\n"
            "from tests.helpers import run_notebook\n"
            + _PYTEST_WARNINGS +
            "sys.stdout.write(run_notebook(sys.argv[1], int(sys.argv[2])))\n")

    def make_env(base):
      out = {**base, "PYTHONPATH": str(REPO), **env}
      return {k: v for k, v in out.items() if v is not None}

    return cls([sys.executable, "-c", code, name, str(timeout)], env=make_env,
               timeout=2 * timeout)

  @classmethod
  def module(cls, name: str, *args: str, timeout: int):
    """`python -m NAME ARGS` (e.g. a recipe's command line), under pytest's warning filters."""
    code = ("import runpy, sys\n"
            + _PYTEST_WARNINGS +
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")

    def make_env(base):
      return {**base, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                base.get("PYTHONPATH")]))}

    return cls([sys.executable, "-c", code, name, *args], env=make_env, timeout=timeout)

  def run(self) -> tuple[int | str, str, str]:
    """Runs the command once (later calls wait for that run): `(returncode, stdout, stderr)`."""
    with self._lock:
      if self._result is None:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
          with self._proc_lock:
            if self._stopped:
              self._result = ("not run: the session is over", "", "")
              return self._result
            if any("{out}" in a for a in self.argv):
              self.out = pathlib.Path(tempfile.mkdtemp(prefix="jlora-test-"))
            argv = [a.replace("{out}", str(self.out)) for a in self.argv]
            self._proc = subprocess.Popen(argv, cwd=REPO, env=self.env(dict(os.environ)),
                                          stdout=out, stderr=err, text=True,
                                          start_new_session=True)
          try:
            rc = self._proc.wait(timeout=self.timeout)
          except subprocess.TimeoutExpired:
            self._kill()
            rc = f"killed after {self.timeout} s"
          out.seek(0)
          err.seek(0)
          self._result = (rc, out.read(), err.read())
    return self._result

  def output(self) -> str:
    """The command's stdout; fails the calling test if the command failed."""
    rc, out, err = self.run()
    cmd = " ".join(a if "\n" not in a else "<code>" for a in self.argv)
    assert rc == 0, f"{cmd} exited with {rc}; stderr ends:\n{err[-4000:]}"
    return out

  def _kill(self) -> None:
    """Kills the process group if it is running (a notebook's kernel polls for its parent and
    exits with it)."""
    p = self._proc
    if p is not None and p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()

  def stop(self) -> None:
    """At the end of the session: a job not started never starts, a running one is killed
    (its test never ran: -x, Ctrl-C), and `self.out` is removed."""
    with self._proc_lock:
      self._stopped = True
    self._kill()
    with self._lock:  # the run, if any, is over
      if self.out is not None:
        shutil.rmtree(self.out, ignore_errors=True)
