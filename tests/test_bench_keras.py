"""The keras-hub benchmark's two implementations (benchmarks/baselines/keras_hub_lora.py
`--impl keras|jlora`) train one LoRA: on the tiny Gemma 2, from the same weights, they adapt
the same variables with the same shapes, start from the same loss and, started from the same
adapters, follow the same loss curve.

Each case builds and compiles the model twice (about 30-60 s on two CPU cores): the slow lane.
"""

import dataclasses
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jlora  # noqa: E402
import jlora.keras as jk  # noqa: E402

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(BENCH, "baselines"))
import bench_common as C  # noqa: E402
import keras_hub_lora as K  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 6
LR = 1e-2  # large enough that a few steps move the loss far beyond bf16's rounding


def _shape(head_dim):
  # all16's rank 16 needs heads wider than TINY's 16 for jlora.apply (rank < 16 there; the
  # script's docstring says why): the same tiny model with 32-wide heads.
  s = C.shape_of(True)
  if head_dim:
    s["head_dim"] = head_dim
  return s


@pytest.mark.parametrize("config, head_dim", [("qv4", None), ("all16", 32)])
def test_jlora_impl_trains_enable_lora_s_adapters(config, head_dim):
  s = _shape(head_dim)
  x, y = K.batch_of(s, C.TINY_BATCH, C.TINY_SEQ)
  ke = K.keras_impl(s, config, x, y, lr=LR)
  jl = K.jlora_impl(s, config, x, y, lr=LR)

  # The same base weights (Keras's LoRA kernels are the LoRA leaves' w).
  kp, jp = jk.params(ke.model), jk.params(jl.model)
  assert kp.keys() == jp.keys()
  for p in kp:
    base = lambda v: v.w if jlora.is_lora(v) else v
    np.testing.assert_array_equal(base(kp[p]), base(jp[p]), err_msg=p)

  # The same trainable variables, by Keras path, with the same shapes and dtypes.
  tree = jl.state[0]
  ours = jk.keras_variables(jlora.split(tree).trainable)
  keras_trainable = {v.path: v for v in ke.model.trainable_variables}
  assert {p: (v.shape, v.dtype) for p, v in ours.items()} == {
      p: (tuple(v.shape), jnp.dtype(v.dtype)) for p, v in keras_trainable.items()}
  assert jl.trainable == ke.trainable == sum(int(np.prod(v.shape)) for v in ours.values())
  assert ke.total == jl.total == jlora.count(tree).frozen

  # Start jlora from Keras's random A (B is zeros in both); copies, as both steps donate them.
  keras_a = {v.path: val for v, val in zip(ke.model.trainable_variables, ke.state[0])}
  for p, leaf in tree.items():
    if jlora.is_lora(leaf):
      a = keras_a[p.rpartition("/")[0] + "/lora_kernel_a"]
      tree[p] = dataclasses.replace(leaf, a=jnp.array(a, copy=True))

  lk = np.array([float(ke.step()) for _ in range(STEPS)])
  lj = np.array([float(jl.step()) for _ in range(STEPS)])
  np.testing.assert_allclose(lj[0], lk[0], rtol=1e-6)  # the base model's loss, both ways
  drop = lk[0] - lk[-1]
  assert drop > 0.05 and lj[0] - lj[-1] > 0.05, (lk, lj)  # both train
  # Adam's epsilon differs (Keras 1e-7 outside the bias correction, optax 1e-8 inside) and
  # Keras rounds W + A·B to bf16: the curves agree to a small part of the drop.
  assert np.max(np.abs(lk - lj)) < 0.05 * drop, (lk, lj)


def test_rows_name_the_implementation():
  args = ["qv4", "--tiny", "--warmup", "1", "--steps", "1", "--rounds", "1"]
  ke = K.main(args)
  jl = K.main([*args, "--impl", "jlora"])
  assert (ke["suite"], ke["name"], ke["impl"]) == ("keras", "qv4", "keras")
  assert (jl["suite"], jl["name"], jl["impl"]) == ("keras", "qv4_jlora", "jlora")
  assert jl["trainable"] == ke["trainable"] and jl["total"] == ke["total"]
  assert jl["loss_first"] == ke["loss_first"]
  assert ke["optimizer"] == "keras.optimizers.AdamW" and jl["optimizer"] == "optax.adamw"
  assert jl["jlora"] == jlora.__version__ and "jlora" not in ke
