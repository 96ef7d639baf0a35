"""jlora.quantize against the reference implementations: bitsandbytes' NF4 (and its double
quantization) and qwix's quantizers (main stack only: the Colab stack has neither)."""

import numpy as np
import pytest
import torch

import jlora
from jlora._src.qarray import DYNAMIC_MAP, NF4_CODEBOOK

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is in the test extra")
qwix_qarray = pytest.importorskip("qwix._src.core.qarray", reason="qwix is in the test extra")


def draw(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05


@pytest.mark.parametrize("shape", [(256, 128), (96, 576)])
def test_nf4_is_bit_exact_with_bitsandbytes(shape):
  w = draw(shape, 1)
  packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                     compress_statistics=False)
  q = jlora.quantize({"w": w}, "nf4", targets="w")["w"]
  np.testing.assert_array_equal(np.asarray(q.codes).ravel(), packed.numpy().ravel())
  np.testing.assert_array_equal(np.asarray(q.scales).ravel(), state.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(q.dequantize()),
                                bnbf.dequantize_4bit(packed, state).numpy())
  np.testing.assert_array_equal(NF4_CODEBOOK, bnbf.get_4bit_type("nf4", device="cpu").numpy())


def test_double_quantization_agrees_with_bitsandbytes():
  w = draw((512, 512), 2)  # 4096 scales: 16 second-level blocks
  packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                     compress_statistics=True)
  q = jlora.quantize({"w": w}, "nf4", targets="w", double_quant=True)["w"]
  # the 8-bit dynamic map: the same 256 values (to float32 rounding)
  np.testing.assert_allclose(DYNAMIC_MAP, bnbf.create_dynamic_map(signed=True).numpy(),
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(float(q.scale_offset), float(state.offset), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.scale_scales), state.state2.absmax.numpy(), rtol=1e-6)
  same = np.asarray(q.scales).ravel() == state.absmax.numpy()
  assert same.mean() > 0.99  # ties at a boundary of the map may round the other way
  ref = bnbf.dequantize_4bit(packed, state).numpy()
  got = np.asarray(q.dequantize())
  rows = np.repeat(same.reshape(512, 8), 64, axis=1)
  np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(got, ref, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("kind,qtype", [("nf4", "nf4"), ("fp8", "float8_e4m3fn")])
def test_codes_agree_with_qwix(kind, qtype):
  import jax.numpy as jnp
  w = jnp.asarray(draw((64, 256), 3))
  how = qwix_qarray.HowToQuantize(qtype=qtype if kind == "nf4" else jnp.float8_e4m3fn,
                                  channelwise_axes=(0,), tiled_axes={1: 64})
  ref = qwix_qarray.quantize(w, how)
  q = jlora.quantize({"w": w}, kind, targets="w")["w"]
  np.testing.assert_allclose(np.asarray(q.scales), np.asarray(ref.scale).reshape(64, 4),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(qwix_qarray.dequantize(ref)),
                             rtol=1e-5, atol=1e-7)


def test_int8_arithmetic_agrees_with_qwix():
  """qwix's symmetric int8 maps absmax to 127.5 (its bound), jlora's to 127 (LLM.int8's): the
  codes differ, the arithmetic (code times block scale) is the same."""
  import jax.numpy as jnp
  w = jnp.asarray(draw((64, 256), 4))
  how = qwix_qarray.HowToQuantize(qtype=jnp.int8, channelwise_axes=(0,), tiled_axes={1: 64})
  ref = qwix_qarray.quantize(w, how)
  q = jlora.Quantized(codes=ref.qvalue, scales=jnp.asarray(ref.scale).reshape(64, 4),
                      kind="int8", block_size=64)
  np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(qwix_qarray.dequantize(ref)),
                             rtol=1e-6, atol=1e-8)
  ours = jlora.quantize({"w": w}, "int8", targets="w")["w"]
  err = np.abs(np.asarray(ours.dequantize()) - np.asarray(w)).max()
  assert err <= float(jnp.abs(w).max()) / 127 / 2 * 1.0001
