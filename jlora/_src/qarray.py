"""`Quantized`: a frozen weight stored as block-quantized codes (NF4, int8, fp8).

The layout keeps the weight's axes, so a quantized weight is sliced by `lax.scan`
and sharded like the weight it stands for. Blocks are `block_size` consecutive
elements of the last axis (for a 2-D weight, 64-element blocks of its row-major
flattening, as bitsandbytes blocks the flattened weight it quantizes):

* `codes`: NF4 packs two 4-bit codes per `uint8` along the last axis (the first
  element of a pair in the high nibble, as bitsandbytes packs them), shape
  `shape[:-1] + (shape[-1] // 2,)`; int8 is `int8` and fp8 `float8_e4m3fn`, of
  the weight's shape.
* `scales`: one per block, `shape[:-1] + (shape[-1] // block_size,)`: the
  block's absolute maximum for NF4 (the code book spans [-1, 1]), absmax/127 for
  int8, absmax/448 for fp8 (448 is e4m3's largest finite value). float32, or,
  with double quantization, `uint8` codes of the dynamic 8-bit map with
  `scale_scales` (float32, one per 256 scales of each stack slice's flattened
  scales) and `scale_offset` (float32, the mean of each slice's scales, which
  is subtracted before quantizing them), as QLoRA's double quantization.

A fourth kind, `"q4_1"`, is not made by `jlora.quantize` but loaded as stored
by a GGUF file (ggml's Q4_1: blocks of 32, an affine 4-bit code): its codes
pack as NF4's, `scales` and `mins` (float16, as ggml stores them; one per
block) give `code * scale + min`, computed in float32.

Dequantizing is `codebook[code] * scale` (NF4, computed in float32),
`code * scale` (int8, fp8), `code * scale + min` (q4_1), cast to `dtype`, the weight's dtype before
quantization. The NF4 code book is Appendix E of the QLoRA paper (Dettmers et al.
2023, arXiv:2305.14314); the dynamic map of the double quantization is the 8-bit
dynamic tree quantization of Dettmers 2016 (arXiv:1511.04561): a sign, a
decimal exponent from 10^-6 to 10^0, and 2^k linearly spaced fractions for
exponent k, plus 0 and 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KINDS = ("nf4", "int8", "fp8")  # the kinds `jlora.quantize` makes
_PACKED = ("nf4", "q4_1")  # two 4-bit codes per byte

# NF4 (QLoRA, Appendix E): the 16 quantiles of N(0, 1), normalized to [-1, 1], with an exact 0.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

_INT8_MAX = 127.0
_FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
_DQ_BLOCK = 256  # scales per block of the double quantization


def _dynamic_map() -> np.ndarray:
  """The signed 8-bit dynamic tree map (256 values in [-1, 1], sorted)."""
  vals = [0.0, 1.0]
  for k in range(7):
    edges = np.linspace(0.1, 1.0, 2 ** k + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)
    vals += list(mids) + list(-mids)
  return np.sort(np.asarray(vals, np.float32))


DYNAMIC_MAP = _dynamic_map()


def _nearest(table: np.ndarray, x: jax.Array) -> jax.Array:
  """The index of the nearest value of the sorted `table` for each element of `x`."""
  mids = jnp.asarray((table[:-1] + table[1:]) / 2, x.dtype)
  return jnp.searchsorted(mids, x, side="left").astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Quantized:
  """A frozen weight as block-quantized codes and per-block scales (see the module doc).

  A registered pytree (its arrays are children; `kind`, `block_size`, the
  dequantized `dtype` and the number of leading `stack` axes are static). Made by
  `jlora.quantize`; `jlora.lora` runs matmuls with it dequantizing block-wise
  inside the computation, `jlora.merge` and `.dequantize()` give the weight.
  It is frozen: it has no gradient (its codes are integers; its scales are
  treated as constants).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> w = jax.random.normal(jax.random.key(0), (128, 256))
    >>> q = jlora.quantize({"w": w}, "nf4", targets="w")["w"]
    >>> q.shape, q.codes.shape, q.scales.shape, q.nbytes
    ((128, 256), (128, 128), (128, 4), 18432)
    >>> float(jnp.abs(q.dequantize() - w).max()) < 0.5
    True
  """

  codes: Any
  scales: Any
  scale_scales: Any = None
  scale_offset: Any = None
  mins: Any = None
  kind: str = dataclasses.field(default="nf4", metadata=dict(static=True))
  block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
  dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))
  stack: int = dataclasses.field(default=0, metadata=dict(static=True))
  transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def dtype(self):
    """The dtype of the dequantized weight."""
    return jnp.dtype(self.dtype_name)

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The shape of the weight as its codes store it (blocks along the last axis)."""
    s = tuple(self.codes.shape)
    return s[:-1] + (s[-1] * 2,) if self.kind in _PACKED else s

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of the dequantized weight (`.T` of the stored one when `transposed`)."""
    s = self.stored_shape
    return s[:-2] + (s[-1], s[-2]) if self.transposed else s

  @property
  def ndim(self) -> int:
    return len(self.codes.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.scale_scales is not None

  @property
  def nbytes(self) -> int:
    """Bytes held: codes and scales (what replaces the weight's `size * itemsize`)."""
    arrs = (self.codes, self.scales, self.scale_scales, self.scale_offset, self.mins)
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrs if a is not None)

  def astype(self, dtype) -> Quantized:
    """The same codes, dequantizing to `dtype`."""
    return dataclasses.replace(self, dtype_name=jnp.dtype(dtype).name)

  @property
  def mT(self) -> Quantized:  # noqa: N802 (the array API's name)
    """The same codes, standing for the weight with its last two axes swapped."""
    return dataclasses.replace(self, transposed=not self.transposed)

  def block_scales(self) -> jax.Array:
    """The per-block scales as float32 (undoing the double quantization)."""
    if not self.double_quant:
      return lax.stop_gradient(self.scales.astype(jnp.float32))
    s = self.stack
    sc = self.scales
    stack_shape, rest = sc.shape[:s], sc.shape[s:]
    n = math.prod(rest)
    nb = self.scale_scales.shape[-1]
    vals = jnp.take(jnp.asarray(DYNAMIC_MAP), sc.reshape(stack_shape + (n,)).astype(jnp.int32))
    vals = jnp.pad(vals, [(0, 0)] * s + [(0, nb * _DQ_BLOCK - n)])
    vals = vals.reshape(stack_shape + (nb, _DQ_BLOCK)) * self.scale_scales[..., None]
    vals = vals.reshape(stack_shape + (nb * _DQ_BLOCK,))[..., :n].reshape(sc.shape)
    return lax.stop_gradient(vals + self.scale_offset.reshape(stack_shape + (1,) * len(rest)))

  def dequantize(self, dtype=None) -> jax.Array:
    """The weight: `value(code) * scale` (`+ min`) block by block, in `dtype` (default its own)."""
    dtype = self.dtype if dtype is None else jnp.dtype(dtype)
    if self.kind == "q4_1" and self.mins is None:
      raise ValueError(f"jlora.Quantized: a q4_1 weight ({list(self.shape)}) without its "
                       f"per-block `mins`. Build it with mins=, as the GGUF loader does.")
    if self.kind in _PACKED:
      idx = jnp.stack([self.codes >> 4, self.codes & 15], axis=-1).reshape(self.stored_shape)
      vals = (jnp.take(jnp.asarray(NF4_CODEBOOK), idx.astype(jnp.int32)) if self.kind == "nf4"
              else idx.astype(jnp.float32))
    else:
      vals = self.codes.astype(jnp.float32)
    shape = self.stored_shape
    nb = shape[-1] // self.block_size
    vals = vals.reshape(shape[:-1] + (nb, self.block_size)) * self.block_scales()[..., None]
    if self.mins is not None:
      vals = vals + lax.stop_gradient(self.mins.astype(jnp.float32))[..., None]
    w = vals.reshape(shape).astype(dtype)
    return jnp.swapaxes(w, -1, -2) if self.transposed else w

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    dq += ", transposed" if self.transposed else ""
    return (f"Quantized({self.kind}{list(self.shape)} -> {self.dtype_name}, "
            f"block_size={self.block_size}{dq}, stack={self.stack})")

  # Like a LoRA leaf, a quantized weight is never silently turned into an array.
  def __jax_array__(self):
    raise _used_as_array(self)

  def __array__(self, dtype=None, copy=None):
    raise _used_as_array(self)


jax.tree_util.register_dataclass(Quantized)


def is_quantized(x: Any) -> bool:
  return isinstance(x, Quantized)


def _used_as_array(q: Quantized) -> TypeError:
  return TypeError(
      f"jlora.Quantized: a quantized weight ({q.kind}{list(q.shape)}) was used as an array: a "
      f"quantized tree was passed to a function not wrapped in jlora.lora (such as a Flax "
      f"model.apply), or to jnp.asarray. Run the function with jlora.lora(fn)(tree, ...), or "
      f"dequantize with fn(jlora.merge(tree), ...).")


def quantize_array(w: jax.Array, kind: str, block_size: int, double_quant: bool, stack: int
                   ) -> Quantized:
  """Block-quantizes `w` (blocks of `block_size` along its last axis); see the module doc."""
  shape = tuple(w.shape)
  nb = shape[-1] // block_size
  x = w.astype(jnp.float32).reshape(shape[:-1] + (nb, block_size))
  absmax = jnp.max(jnp.abs(x), axis=-1)
  if kind == "nf4":
    scales = absmax
    safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
    idx = _nearest(NF4_CODEBOOK, x / safe).reshape(shape[:-1] + (shape[-1] // 2, 2))
    codes = (idx[..., 0] << 4) | idx[..., 1]
  elif kind == "int8":
    scales = absmax / _INT8_MAX
    safe = jnp.where(scales > 0, scales, 1.0)[..., None]
    codes = jnp.clip(jnp.round(x / safe), -_INT8_MAX, _INT8_MAX).astype(jnp.int8).reshape(shape)
  else:  # fp8
    scales = absmax / _FP8_MAX
    safe = jnp.where(scales > 0, scales, 1.0)[..., None]
    codes = jnp.clip(x / safe, -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn).reshape(shape)
  scale_scales = scale_offset = None
  if double_quant:
    scales, scale_scales, scale_offset = _quantize_scales(scales, stack)
  return Quantized(codes=codes, scales=scales, scale_scales=scale_scales,
                   scale_offset=scale_offset, kind=kind, block_size=block_size,
                   dtype_name=jnp.dtype(w.dtype).name, stack=stack)


def _quantize_scales(scales: jax.Array, stack: int):
  """Double quantization: each stack slice's scales, less their mean, in 8-bit blocks of 256."""
  stack_shape, rest = scales.shape[:stack], scales.shape[stack:]
  n = math.prod(rest)
  nb = -(-n // _DQ_BLOCK)
  flat = scales.reshape(stack_shape + (n,))
  offset = jnp.mean(flat, axis=-1)
  centred = jnp.pad(flat - offset[..., None], [(0, 0)] * stack + [(0, nb * _DQ_BLOCK - n)])
  blocks = centred.reshape(stack_shape + (nb, _DQ_BLOCK))
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
  idx = _nearest(DYNAMIC_MAP, blocks / safe)
  idx = idx.reshape(stack_shape + (nb * _DQ_BLOCK,))[..., :n].reshape(scales.shape)
  return idx, absmax, offset
