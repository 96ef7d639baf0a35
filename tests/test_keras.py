"""Issue 4: keras-hub (keras-nlp) Gemma interop — equivalence with `enable_lora`, training,
write-back.

Needs the `keras-nlp` extra (Keras 3 + keras-hub, JAX backend), which the test set-up installs.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import jlora  # noqa: E402
import jlora.keras as jk  # noqa: E402
from recipes.models import gemma  # noqa: E402
from tests.helpers import randomize_b  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RANK = 3


def _inputs(vocab, batch=2, length=8, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (batch, length)).astype("int32")
  mask = np.ones((batch, length), "int32")
  mask[0, -2:] = 0  # some padding, so the mask path is exercised
  return {"token_ids": jnp.asarray(ids), "padding_mask": jnp.asarray(mask)}


@pytest.mark.parametrize("generation,dtype", [(1, "float32"), (2, "bfloat16")])
def test_equivalent_to_keras_enable_lora(generation, dtype):
  cfg = gemma.small_config(generation, num_layers=generation, dtype=dtype)
  keras.utils.set_random_seed(generation)
  bb = keras_hub.models.GemmaBackbone(**cfg.backbone_kwargs())

  # The abstract tree has exactly Keras's variable paths, shapes and dtypes.
  abstract = gemma.abstract_params(cfg)
  assert {v.path: (tuple(v.shape), jnp.dtype(v.dtype)) for v in bb.weights} == {
      p: (x.shape, x.dtype) for p, x in abstract.items()}
  assert jlora.count(abstract).total == bb.count_params()

  params = jk.params(bb)
  assert all(isinstance(x, jax.Array) for x in params.values())
  # Random a and b (b nonzero, so the adapters change the outputs).
  tree = randomize_b(jlora.apply(params, rank=RANK, layout="keras"), generation, scale=0.3, a=True)
  x = _inputs(cfg.vocabulary_size, seed=generation)
  ours_merge = jax.jit(jk.apply_fn(bb, mode="merge"))(tree, x)
  ours_lora = jax.jit(jk.apply_fn(bb, mode="lora"))(tree, x)
  base_out = jax.jit(jk.apply_fn(bb))(params, x)
  ours_abstract = jax.eval_shape(lambda p: jlora.apply(p, rank=RANK), abstract)

  bb.enable_lora(RANK)
  # Same trainable variables: names (mapped), shapes, count.
  keras_trainable = {v.path: tuple(v.shape) for v in bb.trainable_variables}
  ours_trainable = {p: x.shape for p, x in jk.keras_variables(jlora.split(tree).trainable).items()}
  assert keras_trainable == ours_trainable
  assert len(keras_trainable) == 4 * cfg.num_layers
  assert sum(int(np.prod(s)) for s in keras_trainable.values()) == jlora.count(tree).trainable
  assert jlora.count(ours_abstract) == jlora.count(tree)
  assert bb.count_params() == jlora.count(tree).total

  # Identical A and B in both: the same outputs.
  for path, value in jk.keras_variables(jlora.split(tree).trainable).items():
    # A copy: Keras's jitted predict donates its variables' buffers.
    dict((v.path, v) for v in bb.trainable_variables)[path].assign(jnp.array(value, copy=True))
  theirs = np.asarray(bb.predict_on_batch(x), np.float32)  # Keras's own (jitted) inference
  merged, factored, base = (np.asarray(o, np.float32) for o in (ours_merge, ours_lora, base_out))
  assert np.abs(theirs).mean() > 0.1
  # Without the adapters the output differs a lot: the comparisons below are not vacuous.
  assert np.abs(base - theirs).mean() > 0.2 * np.abs(theirs).mean()
  if dtype == "float32":
    np.testing.assert_allclose(merged, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(factored, theirs, rtol=1e-5, atol=1e-5)
  else:
    # Merged: Keras's own computation (bf16 kernel + f32 delta, cast to bf16), bit for bit.
    np.testing.assert_array_equal(merged, theirs)
    # Factored: the adapter branch runs in bf16, so bf16 rounding noise only.
    assert np.abs(factored - theirs).mean() < 0.03 * np.abs(theirs).mean()

  # Keras's LoRA comes back as jlora leaves, and runs through Keras's own path.
  back = jk.params(bb)
  leaf = back["decoder_block_0/attention/value/kernel"]
  assert isinstance(leaf, jlora.LoRA) and leaf.alpha == RANK and leaf.a_axes == (0, 1)
  ref = tree["decoder_block_0/attention/value/kernel"]
  np.testing.assert_array_equal(np.asarray(leaf.b), np.asarray(ref.b))
  np.testing.assert_array_equal(np.asarray(leaf.w, np.float32), np.asarray(ref.w, np.float32))
  via_keras = jax.jit(jk.apply_fn(bb))(back, x)
  np.testing.assert_array_equal(np.asarray(via_keras, np.float32), theirs)


def _patterned_batch(vocab, batch=8, length=12, seed=0):
  """Token sequences with a learnable next-token rule: t, t + 3, t + 6, ... (mod vocab)."""
  start = np.random.default_rng(seed).integers(0, vocab, (batch, 1))
  ids = ((start + 3 * np.arange(length)) % vocab).astype("int32")
  return {"token_ids": jnp.asarray(ids), "padding_mask": jnp.ones_like(jnp.asarray(ids))}


# Keras 3.15's Variable.__array__ predates NumPy 2's `copy` keyword; save_lora_weights trips it.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_finetune_write_back_and_save_lora_weights(tmp_path):
  cfg = gemma.small_config(2, num_layers=1, dtype="float32")
  keras.utils.set_random_seed(7)
  lm = keras_hub.models.GemmaCausalLM(
      backbone=keras_hub.models.GemmaBackbone(**cfg.backbone_kwargs()), preprocessor=None)
  keras_before = {v.path: np.array(v.value) for v in lm.weights}

  params = jk.params(lm)
  forward = jk.apply_fn(lm)  # factored through jlora.lora
  tree = jlora.apply(params, rank=4, key=jax.random.key(3))
  frozen_before = {p: np.array(x) for p, x in jlora.base(tree).items()}
  batch = _patterned_batch(cfg.vocabulary_size)

  def loss_fn(tree, batch):
    logits = forward(tree, batch)[:, :-1]
    labels = batch["token_ids"][:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  step = jlora.train_step(loss_fn, optax.adam(5e-2))
  opt_state = step.init(tree)
  losses = []
  for _ in range(20):
    tree, opt_state, loss = step(tree, opt_state, batch)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0] and all(np.diff(losses[:6]) < 0), losses

  # Frozen weights bitwise unchanged, in the tree and in the Keras model.
  for p, x in jlora.base(tree).items():
    assert np.array_equal(np.asarray(x), frozen_before[p]), p
  for v in lm.weights:
    assert np.array_equal(np.asarray(v.value), keras_before[v.path]), v.path
  assert not np.array_equal(np.asarray(tree["decoder_block_0/attention/query/kernel"].b), 0)

  # Factorings Keras cannot hold are refused before anything changes.
  fan = jlora.apply(params, rank=2, layout="fan",
                    in_axes={r"attention/(query|value)/kernel$": (1,)})
  with pytest.raises(ValueError, match="layout='keras'"):
    jk.write_back(lm, fan)
  with pytest.raises(ValueError, match="not a variable path of the model"):
    jk.write_back(lm, {"decoder_block_9/attention/query/kernel": jnp.ones((2, 2))})
  assert not any(getattr(lyr, "lora_enabled", False) for lyr in lm.backbone._flatten_layers())

  jk.write_back(lm, tree)
  bb = lm.backbone
  assert sorted(v.path for v in bb.trainable_variables) == sorted(
      jk.keras_variables(jlora.split(tree).trainable))
  ours = np.asarray(jax.jit(forward)(tree, batch))
  theirs = np.asarray(lm.predict_on_batch(batch))
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
  assert np.asarray(tree["decoder_block_0/attention/value/kernel"].a).size  # still alive
  for v in lm.weights:  # the kernels stayed the same; Keras added lora_kernel_a/b
    if v.path in keras_before:
      assert np.array_equal(np.asarray(v.value), keras_before[v.path]), v.path

  # Keras's own adapter file round-trips into a fresh model with the same base weights.
  path = str(tmp_path / "gemma.lora.h5")
  bb.save_lora_weights(path)
  lm2 = keras_hub.models.GemmaCausalLM(
      backbone=keras_hub.models.GemmaBackbone(**cfg.backbone_kwargs()), preprocessor=None)
  for v in lm2.weights:
    v.assign(keras_before[v.path])
  # merge=True folds the adapters into the kernels instead (deployment).
  jk.write_back(lm2, tree, merge=True)
  np.testing.assert_allclose(np.asarray(lm2.predict_on_batch(batch)), ours, rtol=1e-5,
                             atol=1e-5)
  for v in lm2.weights:
    v.assign(keras_before[v.path])
  lm2.backbone.load_lora_weights(path)
  np.testing.assert_array_equal(np.asarray(lm2.predict_on_batch(batch)), theirs)
  # And the written-back model comes back into jlora as LoRA leaves.
  again = jk.params(lm)
  assert jlora.count(again) == jlora.count(tree)
  np.testing.assert_array_equal(
      np.asarray(again["decoder_block_0/attention/query/kernel"].a),
      np.asarray(tree["decoder_block_0/attention/query/kernel"].a))


def test_import_jlora_without_keras():
  code = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("keras", "keras_hub", "keras_nlp", "tensorflow"):
      raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import jlora, jlora.keras as jk
from recipes.models import gemma
assert "keras" not in sys.modules
try:
  jk.params(None)
except ImportError as e:
  print("ImportError:", e)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  assert "ImportError: jlora.keras needs Keras 3" in out.stdout
  assert "pip install --no-deps" in out.stdout


def test_keras_nlp_name_is_the_same_package():
  import keras_nlp
  assert keras_nlp.models.GemmaBackbone is keras_hub.models.GemmaBackbone
  assert keras_nlp.models.GemmaCausalLM is keras_hub.models.GemmaCausalLM


def test_errors_name_the_fix():
  with pytest.raises(ValueError, match="mode='typo' is not one of"):
    jk.apply_fn(None, mode="typo")
  with pytest.raises(ValueError, match="is not built"):
    jk.params(keras.layers.Dense(3))


def test_keras_older_than_the_tested_one_is_refused(monkeypatch):
  layer = keras.layers.Dense(3)
  layer.build((None, 4))
  monkeypatch.setattr(keras, "version", lambda: "3.12.1")
  with pytest.raises(RuntimeError, match=r"jlora.keras needs keras>=3.13.2; this is keras "
                                         r"3.12.1\. Upgrade it"):
    jk.params(layer)


def test_import_leaves_the_keras_backend_to_the_program():
  """`import jlora.keras` sets no KERAS_BACKEND; Keras on another backend (or unimportable on
  its default one) is refused, naming the fix."""
  code = """
import os, sys
import jlora.keras as jk
assert "KERAS_BACKEND" not in os.environ, os.environ["KERAS_BACKEND"]
if sys.argv[1] == "numpy":
  os.environ["KERAS_BACKEND"] = "numpy"
  import keras
  assert keras.backend.backend() == "numpy"
try:
  jk.params(None)
except (ImportError, RuntimeError) as e:
  print(type(e).__name__ + ":", e)
"""
  env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
  outs = {}
  for backend in ("numpy", "default"):
    out = subprocess.run([sys.executable, "-c", code, backend], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    outs[backend] = out.stdout
  assert "RuntimeError: jlora.keras needs Keras's JAX backend, but Keras runs on 'numpy'. Set " \
         "the environment variable KERAS_BACKEND=jax before the first `import keras`" in \
         outs["numpy"], outs["numpy"]
  # Without TensorFlow (this environment), Keras's default backend cannot even be imported.
  assert "ImportError: jlora.keras needs Keras's JAX backend; Keras is installed but could not " \
         "be imported on the backend tensorflow (Keras's default)" in outs["default"], outs
  assert "KERAS_BACKEND=jax" in outs["default"]
