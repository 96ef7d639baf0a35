"""jlora.quantize: quantized frozen bases (QLoRA), checked against a NumPy reference and the
merged path (bitsandbytes and qwix: tests/test_quantize_refs.py)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

import jlora
from tests.helpers import rand, randomize_b

KINDS = ["nf4", "int8", "fp8"]
# The NF4 code book as the QLoRA paper prints it (Appendix E), typed in independently.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def np_quantize(w, kind, bs):
  """An independent NumPy reference: blocks of `bs` along the last axis."""
  w = np.asarray(w, np.float64)
  x = w.reshape(w.shape[:-1] + (w.shape[-1] // bs, bs))
  absmax = np.abs(x).max(-1, keepdims=True)
  if kind == "nf4":
    idx = np.abs((x / absmax)[..., None] - NF4).argmin(-1)
    return (NF4[idx] * absmax).reshape(w.shape), idx.reshape(w.shape)
  if kind == "int8":
    q = np.clip(np.round(x / (absmax / 127)), -127, 127)
    return (q * absmax / 127).reshape(w.shape), q.reshape(w.shape)
  s = absmax / 448
  q = np.asarray(jnp.asarray(x / s, jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32))
  return (q * s).reshape(w.shape), q.reshape(w.shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(96, 128), (3, 40, 64)])
def test_dequantize_matches_a_numpy_reference(kind, shape):
  w = rand(shape, 1, scale=0.3)
  q = jlora.quantize({"w": w}, kind, targets="w")["w"]
  want, _ = np_quantize(w, kind, 64)
  got = np.asarray(q.dequantize(), np.float64)
  assert q.shape == shape and q.dtype == w.dtype
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  err = np.abs(got - np.asarray(w)).max()
  bound = {"nf4": 0.2, "int8": 0.01, "fp8": 0.1}[kind] * float(jnp.abs(w).max())
  assert 0 < err < bound


def test_nf4_packs_two_codes_per_byte_first_in_the_high_nibble():
  w = rand((8, 64), 2)
  q = jlora.quantize({"w": w}, "nf4", targets="w")["w"]
  _, idx = np_quantize(w, "nf4", 64)
  codes = np.asarray(q.codes)
  assert codes.dtype == np.uint8 and codes.shape == (8, 32)
  np.testing.assert_array_equal(codes >> 4, idx[:, 0::2])
  np.testing.assert_array_equal(codes & 15, idx[:, 1::2])
  assert q.nbytes == 8 * 32 + 8 * 4


@pytest.mark.parametrize("stack", [0, 1])
def test_double_quantization_of_the_scales(stack):
  shape = (2, 64, 512) if stack else (64, 512)
  w = rand(shape, 3)
  plain = jlora.quantize({"w": w}, "nf4", targets="w", stacked="w" if stack else None)["w"]
  dq = jlora.quantize({"w": w}, "nf4", targets="w", double_quant=True,
                      stacked="w" if stack else None)["w"]
  assert dq.scales.dtype == jnp.uint8 and dq.scales.shape == plain.scales.shape
  assert dq.scale_scales.shape == shape[:stack] + (2,)  # 512 scales per slice / 256
  assert dq.scale_offset.shape == shape[:stack]
  # the second level: each scale within half a step of the 8-bit dynamic map of its block
  got, want = np.asarray(dq.block_scales()), np.asarray(plain.scales)
  np.testing.assert_allclose(got, want, rtol=0.02, atol=1e-3 * want.max())
  assert np.abs(got - want).max() > 0  # it is lossy
  np.testing.assert_array_equal(np.asarray(dq.codes), np.asarray(plain.codes))
  codes = dq.codes.size  # bytes of scales: 8.1 bits per block instead of 32
  assert (dq.nbytes - codes) < (plain.nbytes - codes) / 3.5


def test_zero_blocks_and_dtypes():
  w = rand((4, 128), 4).at[1, :64].set(0.0).astype(jnp.bfloat16)
  for kind in KINDS:
    q = jlora.quantize({"w": w}, kind, targets="w")["w"]
    d = q.dequantize()
    assert d.dtype == jnp.bfloat16 and bool(jnp.isfinite(d).all())
    assert bool((d[1, :64] == 0).all())


# --------------------------------------------------------------------------- trees


def params(seed=0):
  return {"embed": {"embedding": rand((50, 64), seed)},
          "attn": {"q_proj": {"kernel": rand((64, 128), seed + 1, scale=0.2)},
                   "v_proj": {"kernel": rand((64, 128), seed + 2, scale=0.2)}},
          "mlp": {"up": {"kernel": rand((64, 192), seed + 3, scale=0.2)},
                  "down": {"kernel": rand((192, 64), seed + 4, scale=0.2)}},
          "norm": {"scale": rand((64,), seed + 5)}}


def test_quantize_selects_linear_kernels_and_composes_with_apply_in_either_order():
  p = params()
  q = jlora.quantize(p, "nf4")
  kinds = jax.tree_util.tree_map(lambda x: type(x).__name__, q,
                                 is_leaf=lambda x: isinstance(x, jlora.Quantized))
  assert kinds["embed"]["embedding"] == "ArrayImpl" and kinds["norm"]["scale"] == "ArrayImpl"
  assert {kinds["attn"]["q_proj"]["kernel"], kinds["mlp"]["down"]["kernel"]} == {"Quantized"}
  t1 = jlora.apply(q, rank=4)
  t2 = jlora.quantize(jlora.apply(p, rank=4), "nf4")
  leaves1, d1 = jax.tree_util.tree_flatten(t1)
  leaves2, d2 = jax.tree_util.tree_flatten(t2)
  assert d1 == d2
  for x, y in zip(leaves1, leaves2):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  c = jlora.count(t1)
  assert c == jlora.count(jlora.apply(p, rank=4))
  assert "nf4->float32" in jlora.summary(t1)


def mlp(p, ids):
  x = p["embed"]["embedding"][ids]
  q = x @ p["attn"]["q_proj"]["kernel"]
  v = jnp.einsum("td,df->tf", x, p["attn"]["v_proj"]["kernel"])
  h = jax.nn.gelu(x @ p["mlp"]["up"]["kernel"])
  y = h @ p["mlp"]["down"]["kernel"] + jnp.tanh(q @ v.T) @ x
  return y @ p["embed"]["embedding"].T  # a tied head


@pytest.mark.parametrize("kind", KINDS)
def test_factored_quantized_equals_the_merged_model_values_and_gradients(kind):
  targets = r"attn|mlp|embed" if kind == "int8" else "all-linear"
  q = jlora.quantize(params(), kind, targets=targets)
  t = randomize_b(jlora.apply(q, rank=4, targets="all-linear"), scale=0.3)
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 50, (24,)))
  train, frozen = jlora.split(t)
  loss_f = lambda tr: jnp.mean(jlora.lora(mlp, strict=True)(jlora.combine(tr, frozen), ids) ** 2)
  loss_m = lambda tr: jnp.mean(mlp(jlora.merge(jlora.combine(tr, frozen)), ids) ** 2)
  (lf, gf), (lm, gm) = jax.value_and_grad(loss_f)(train), jax.value_and_grad(loss_m)(train)
  np.testing.assert_allclose(lf, lm, rtol=2e-5)
  for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gm)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
  assert float(jnp.abs(jax.tree_util.tree_leaves(gf)[0]).max()) > 0


def test_merge_is_the_dequantized_weight_plus_delta_in_the_compute_dtype():
  p = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params())
  t = randomize_b(jlora.apply(jlora.quantize(p, "nf4"), rank=4), scale=0.3)
  m = jlora.merge(t)
  leaf = t["attn"]["q_proj"]["kernel"]
  want = (leaf.w.dequantize().astype(jnp.float32) + leaf.delta()).astype(jnp.bfloat16)
  assert m["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(m["attn"]["q_proj"]["kernel"], np.float32),
                                np.asarray(want, np.float32))
  up = m["mlp"]["up"]["kernel"]  # a quantized weight without adapter: dequantized
  assert isinstance(up, jax.Array) and up.dtype == jnp.bfloat16
  assert isinstance(jlora.base(t)["attn"]["q_proj"]["kernel"], jlora.Quantized)


def q4_1_leaf(seed, stored_shape):
  """A stacked, transposed q4_1 leaf from random codes, float16 scales and mins, and its NumPy
  value: `code * scale + min` in blocks of 32 along the stored last axis, then transposed."""
  rng = np.random.default_rng(seed)
  q = rng.integers(0, 16, stored_shape).astype(np.uint8)
  nb = stored_shape[:-1] + (stored_shape[-1] // 32,)
  d = (rng.random(nb) * 0.02 + 0.001).astype(np.float16)
  m = (-rng.random(nb) * 0.1).astype(np.float16)
  want = (q.reshape(nb + (32,)) * d[..., None].astype(np.float64)
          + m[..., None].astype(np.float64)).reshape(stored_shape).swapaxes(-1, -2)
  codes = (q[..., 0::2] << 4) | q[..., 1::2]  # the first of a pair in the high nibble
  leaf = jlora.Quantized(codes=jnp.asarray(codes), scales=jnp.asarray(d), mins=jnp.asarray(m),
                         kind="q4_1", block_size=32, stack=1, transposed=True)
  return leaf, want


def test_q4_1_blocks_dequantize_affinely_and_run_factored_under_scan():
  leaf, want = q4_1_leaf(3, (3, 48, 64))  # stacked (3, in=64, out=48) kernels
  assert leaf.shape == (3, 64, 48) and leaf.dtype == jnp.float32
  assert leaf.nbytes == 3 * 48 * 64 // 2 + 2 * (2 * 3 * 48 * 2)  # 5 bits per element
  np.testing.assert_allclose(np.asarray(leaf.dequantize(), np.float64), want, rtol=1e-6,
                             atol=1e-7)
  down = rand((3, 48, 64), 4, scale=0.1)
  t = randomize_b(jlora.apply({"layers": {"up": leaf, "down": down}}, rank=4,
                              targets="up|down", stacked=r"^layers/"), scale=0.3)
  x = rand((5, 64), 6)
  f = lambda t: jnp.sum(jlora.lora(stacked_model, strict=True)(t, x) ** 2)
  m = lambda t: jnp.sum(stacked_model(jlora.merge(t), x) ** 2)
  np.testing.assert_allclose(f(t), m(t), rtol=1e-5)
  merged = jlora.merge(t)["layers"]["up"]
  np.testing.assert_allclose(np.asarray(merged, np.float64),
                             want + np.asarray(t["layers"]["up"].delta()), rtol=1e-5, atol=1e-6)
  train, frozen = jlora.split(t)
  gf = jax.grad(lambda tr: f(jlora.combine(tr, frozen)))(train)
  gm = jax.grad(lambda tr: m(jlora.combine(tr, frozen)))(train)
  for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gm)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
  no_mins = jlora.Quantized(codes=leaf.codes, scales=leaf.scales, kind="q4_1", block_size=32)
  with pytest.raises(ValueError, match="q4_1 weight .* without its per-block `mins`"):
    no_mins.dequantize()


def stacked_model(p, x):
  def layer(h, w):
    h = h + jax.nn.relu(h @ w["up"]) @ w["down"]
    return h, None
  body = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return jax.lax.scan(body, x, p["layers"])[0]


@pytest.mark.parametrize("double_quant", [False, True])
def test_scanned_layers_stay_quantized_per_slice(double_quant):
  p = {"layers": {"up": rand((3, 64, 256), 1, scale=0.1), "down": rand((3, 256, 64), 2, scale=0.1)}}
  q = jlora.quantize(p, "nf4", targets="up|down", stacked="layers", double_quant=double_quant)
  t = randomize_b(jlora.apply(q, rank=4, targets="up", stacked="layers"), scale=0.3)
  x = rand((8, 64), 3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing dequantized outside the matmuls
    got = jax.jit(jlora.lora(stacked_model, strict=True))(t, x)
    g = jax.grad(lambda tr: jlora.lora(stacked_model, strict=True)(
        jlora.combine(tr, jlora.split(t).frozen), x).sum())(jlora.split(t).trainable)
  want = stacked_model(jlora.merge(t), x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  gm = jax.grad(lambda tr: stacked_model(jlora.merge(jlora.combine(tr, jlora.split(t).frozen)),
                                         x).sum())(jlora.split(t).trainable)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(gm)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def deep(p, x):
  for i in range(len(p)):
    x = jnp.tanh(x @ p[i]["kernel"])
  return x


def test_no_dequantized_copy_is_kept_for_the_backward_pass():
  """Eight 512 x 512 float32 kernels: between the passes the gradient keeps no weight-sized
  float array (the backward pass dequantizes again, each dequantization tied to its matmul's
  operand). The compiled step's peak memory is measured on a GPU: benchmarks/qlora_gpu.py."""
  n, d = 8, 512
  p = [{"kernel": rand((d, d), i, scale=d ** -0.5)} for i in range(n)]
  t = jlora.apply(jlora.quantize(p, "nf4", targets="kernel"), rank=4, targets="kernel")
  train, frozen = jlora.split(t)
  x = rand((16, d), 99)
  loss = lambda tr, fr, x: jnp.sum(jlora.lora(deep)(jlora.combine(tr, fr), x) ** 2)
  _, vjp = jax.vjp(lambda tr: loss(tr, frozen, x), train)
  kept = [v.shape for v in jax.tree_util.tree_leaves(vjp)
          if jnp.issubdtype(v.dtype, jnp.floating) and v.size >= d * d]
  assert kept == [], kept
  # and the dequantization is in the step's jaxpr once per use: twice per layer (forward, and
  # backward for dx), never once for both passes
  jaxpr = jax.make_jaxpr(jax.grad(loss))(train, frozen, x)
  barriers = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 2 * n - 1  # (the first layer's dx is not needed)


def test_the_backward_pass_forms_no_weight_sized_gradient():
  p = [{"kernel": rand((256, 384), i, scale=0.05)} for i in range(2)]
  t = randomize_b(jlora.apply(jlora.quantize(p, "int8", targets="kernel"), rank=4,
                              targets="kernel"))
  train, frozen = jlora.split(t)
  x = rand((8, 256), 7)
  f = lambda tr: jnp.sum(jlora.lora(lambda p, x: jnp.tanh(x @ p[0]["kernel"])[:, :256]
                                    @ p[1]["kernel"], strict=True)(jlora.combine(tr, frozen), x))
  jaxpr = jax.make_jaxpr(jax.grad(f))(train)
  shapes = [tuple(e.outvars[0].aval.shape) for e in _eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"]
  assert shapes and (256, 384) not in shapes and (384, 256) not in shapes


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in _subjaxprs(e.params):
      yield from _eqns(sub)


def _subjaxprs(params):
  for v in params.values():
    vs = v if isinstance(v, (tuple, list)) else [v]
    for u in vs:
      if hasattr(u, "eqns"):
        yield u
      elif hasattr(u, "jaxpr") and hasattr(u.jaxpr, "eqns"):
        yield u.jaxpr


def test_train_step_keeps_the_codes_and_no_optimizer_state_for_them():
  t = jlora.apply(jlora.quantize(params(), "nf4", double_quant=True), rank=4)
  codes = np.asarray(t["mlp"]["up"]["kernel"].codes).copy()
  ids = jnp.asarray(np.random.default_rng(6).integers(0, 50, (4, 12)))
  loss = lambda tr, ids: jnp.mean(jax.vmap(lambda i: jlora.lora(mlp)(tr, i))(ids) ** 2)
  step = jlora.train_step(loss, optax.adamw(1e-2))
  opt = step.init(t)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(opt))
  assert n_state <= 2 * jlora.count(t).trainable + 8
  losses = []
  for _ in range(4):
    t, opt, lv = step(t, opt, ids)
    losses.append(float(lv))
  assert losses[-1] < losses[0]
  assert isinstance(t["mlp"]["up"]["kernel"], jlora.Quantized)
  np.testing.assert_array_equal(np.asarray(t["mlp"]["up"]["kernel"].codes), codes)


def test_quantized_embedding_rows_are_gathered_without_a_full_copy():
  p = params()
  q = jlora.quantize(p, "nf4", targets="embedding")
  assert isinstance(q["embed"]["embedding"], jlora.Quantized)
  ids = jnp.asarray([3, 7, 7, 49])
  f = lambda p, ids: p["embed"]["embedding"][ids]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jlora.lora(f, strict=True)(q, ids)
  np.testing.assert_array_equal(got, jlora.merge(q)["embed"]["embedding"][ids])
  t = randomize_b(jlora.apply(q, rank=2, targets="embedding"))
  np.testing.assert_allclose(jlora.lora(f, strict=True)(t, ids), f(jlora.merge(t), ids),
                             rtol=1e-5, atol=1e-6)


def test_an_op_without_a_quantized_form_dequantizes_with_a_warning_or_raises_when_strict():
  q = jlora.quantize(params(), "int8")
  f = lambda p: jnp.sum(p["mlp"]["up"]["kernel"] ** 2)
  with pytest.warns(jlora.MaterializeWarning, match=r"dequantizing the int8 weight at "
                    r"'mlp/up/kernel'.*`integer_pow`"):
    got = jlora.lora(f)(q)
  np.testing.assert_allclose(got, f(jlora.merge(q)), rtol=1e-5)
  with pytest.raises(ValueError, match=r"strict=True.*quantized weight at 'mlp/up/kernel'"):
    jlora.lora(f, strict=True)(q)
  with pytest.raises(TypeError, match=r"quantized weight .* was used as an array.*jlora.lora"):
    jnp.asarray(q["mlp"]["up"]["kernel"])


def test_fingerprint_and_checkpoint_with_a_quantized_base(tmp_path):
  from jlora._src.checkpoint import fingerprint
  p = params()
  fp = {k: fingerprint(jlora.quantize(p, k)) for k in KINDS}
  fp["dq"] = fingerprint(jlora.quantize(p, "nf4", double_quant=True))
  fp["float"] = fingerprint(p)
  assert len(set(fp.values())) == 5
  t = randomize_b(jlora.apply(jlora.quantize(p, "nf4"), rank=4))
  jlora.save(tmp_path / "ad", t)
  fresh = jlora.apply(jlora.quantize(p, "nf4"), rank=4)
  got = jlora.restore(tmp_path / "ad", fresh).tree
  for x, y in zip(jax.tree_util.tree_leaves(jlora.split(got).trainable),
                  jax.tree_util.tree_leaves(jlora.split(t).trainable)):
    np.testing.assert_array_equal(x, y)
  files = sum(f.stat().st_size for f in (tmp_path / "ad").rglob("*") if f.is_file())
  assert files < 200_000  # adapters only: the codes are not saved


def test_peft_export_of_a_quantized_tree_is_an_ordinary_lora_adapter(tmp_path):
  p = {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": rand((64, 64), 1)},
                                            "v_proj": {"kernel": rand((64, 64), 2)}}}}}
  key_map = lambda path: (path.replace("/kernel", ".weight").replace("layers_0", "layers.0")
                          .replace("/", "."), True)
  tf = randomize_b(jlora.apply(p, rank=4))
  tq = jlora.quantize(tf, "nf4")  # the same adapters over a quantized base
  assert isinstance(tq["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].w, jlora.Quantized)
  jlora.hf.export_peft(tmp_path / "f", tf, key_map=key_map)
  jlora.hf.export_peft(tmp_path / "q", tq, key_map=key_map)
  from safetensors.numpy import load_file
  a = load_file(tmp_path / "f" / "adapter_model.safetensors")
  b = load_file(tmp_path / "q" / "adapter_model.safetensors")
  assert a.keys() == b.keys() and len(a) == 4
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_sharded_codes_follow_the_weight_and_the_step_matches_one_device():
  devs = np.array(jax.devices()[:4]).reshape(2, 2)
  mesh = Mesh(devs, ("data", "model"))
  p = {"layers": {"up": rand((2, 64, 256), 1, scale=0.1), "down": rand((2, 256, 64), 2,
                                                                        scale=0.1)}}
  specs = {"layers": {"up": PS(None, None, "model"), "down": PS(None, "model", None)}}
  q = jlora.quantize(p, "nf4", targets="up|down", stacked="layers")
  t = randomize_b(jlora.apply(q, rank=4, targets="up|down", stacked="layers"), scale=0.3)
  s = jlora.sharding.partition_specs(t, base=specs)
  up = s["layers"]["up"]
  assert tuple(up.w.codes) == (None, None, "model") and tuple(up.w.scales) == ()
  assert tuple(s["layers"]["down"].w.codes) == (None, "model")
  x = rand((8, 64), 3)
  loss = lambda t, x: jnp.mean(jlora.lora(stacked_model)(t, x) ** 2)
  placed = jax.tree_util.tree_map(lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp)),
                                  t, s, is_leaf=lambda x: isinstance(x, PS))
  ref_step = jlora.train_step(loss, optax.sgd(0.1))
  t_copy = jax.tree_util.tree_map(jnp.copy, t)
  t1, _, l1 = ref_step(t_copy, ref_step.init(t_copy), x)
  assert placed["layers"]["up"].w.codes.sharding.spec == PS(None, None, "model")
  step = jlora.train_step(loss, optax.sgd(0.1), mesh=mesh, batch_axes="data")
  t2, _, l2 = step(placed, step.init(placed), x)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(jlora.split(t1).trainable),
                  jax.tree_util.tree_leaves(jlora.split(t2).trainable)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_arguments_name_the_path_and_the_fix():
  p = params()
  with pytest.raises(ValueError, match=r"kind='nf3' is not one of"):
    jlora.quantize(p, "nf3")
  with pytest.raises(ValueError, match=r"block_size=0 must be a positive even int"):
    jlora.quantize(p, "nf4", block_size=0)
  with pytest.raises(ValueError, match=r"block_size=128 does not divide the last axis \(64\) of "
                                       r"the kernel at 'mlp/down/kernel'.*Pass block_size=64"):
    jlora.quantize(p, "nf4", block_size=128)
  q = jlora.quantize(p, "nf4")
  with pytest.raises(ValueError, match=r"'attn/q_proj/kernel' is already quantized"):
    jlora.quantize(q, "nf4", targets="q_proj")
  with pytest.raises(TypeError, match=r"matched 'norm/scale', a jlora.Trainable leaf"):
    jlora.quantize(jlora.apply(p, rank=2, trainable="norm"), "nf4", targets="norm")
  with pytest.raises(ValueError, match=r"jlora.quantize: targets='nope' matched no kernel"):
    jlora.quantize(p, "nf4", targets="nope")
  # 4 bits per weight and a float32 scale per 64: 1/8 + 1/64 of float32's bytes
  assert math.isclose(q["attn"]["q_proj"]["kernel"].nbytes / (64 * 128 * 4), 1 / 8 + 1 / 64)


def test_q4_1_table_rows_are_gathered_with_their_mins():
  leaf, _ = q4_1_leaf(5, (1, 24, 64))
  table = jlora.Quantized(codes=leaf.codes[0], scales=leaf.scales[0], mins=leaf.mins[0],
                          kind="q4_1", block_size=32)
  ids = jnp.asarray([0, 5, 23, 5])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jlora.lora(lambda t, i: t["e"][i], strict=True)({"e": table}, ids)
  np.testing.assert_array_equal(got, table.dequantize()[ids])


def test_dora_over_a_quantized_base_and_pissa_refused_on_codes():
  p = params()
  t = randomize_b(jlora.apply(jlora.quantize(p, "nf4"), rank=4, dora=True), scale=0.3)
  ids = jnp.asarray(np.random.default_rng(8).integers(0, 50, (12,)))
  np.testing.assert_allclose(jlora.lora(mlp, strict=True)(t, ids), mlp(jlora.merge(t), ids),
                             rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match=r"init='pissa' replaces the weight at "
                                       r"'attn/q_proj/kernel'.*jlora.quantize\(jlora.apply"):
    jlora.apply(jlora.quantize(p, "nf4"), rank=4, init="pissa")
  # the other order quantizes the residual
  q = jlora.quantize(jlora.apply(p, rank=4, init="pissa"), "nf4")
  assert isinstance(q["attn"]["q_proj"]["kernel"].w, jlora.Quantized)
