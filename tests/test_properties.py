"""Property tests over random kernel shapes, ranks, stack axes and both layouts.

The structural properties (counts, shapes, dtypes, split/combine) are checked on
abstract trees (`jax.eval_shape`), which costs no compilation per shape; the
numerical merge property runs on concrete arrays with fewer examples, with
random `a` and `b` (never the zero `b` of init).
"""

import dataclasses
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

import jlora

SETTINGS = dict(deadline=None, derandomize=True, database=None)


@st.composite
def cases(draw):
  """A kernel shape, stack axes, a layout with its input axes, and a valid rank."""
  ndim = draw(st.integers(2, 4))
  kshape = tuple(draw(st.lists(st.integers(2, 6), min_size=ndim, max_size=ndim)))
  n_stack = draw(st.integers(0, 2))
  stack_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=n_stack, max_size=n_stack)))
  layout = draw(st.sampled_from(["keras", "fan"]))
  if layout == "keras":
    a_axes, in_axes = tuple(range(ndim - 1)), None
  else:
    a_axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1,
                                       max_size=ndim - 1))))
    in_axes = a_axes
  fan_in = math.prod(kshape[i] for i in a_axes)
  fan_out = math.prod(kshape[i] for i in range(ndim) if i not in a_axes)
  rank = draw(st.integers(1, min(fan_in, fan_out) - 1))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  return dict(kshape=kshape, stack_shape=stack_shape, layout=layout, in_axes=in_axes,
              a_axes=a_axes, rank=rank, dtype=dtype, fan_in=fan_in, fan_out=fan_out)


def _apply(c, params):
  stacked = {"^layers/": len(c["stack_shape"])}
  return jlora.apply(params, rank=c["rank"], targets="kernel", layout=c["layout"],
                     in_axes=c["in_axes"], stacked=stacked)


@settings(max_examples=25, **SETTINGS)
@given(cases())
def test_counts_shapes_dtypes_and_round_trips(c):
  shape = c["stack_shape"] + c["kshape"]
  params = {"layers": {"kernel": jax.ShapeDtypeStruct(shape, c["dtype"]),
                       "bias": jax.ShapeDtypeStruct(shape[-1:], c["dtype"])}}
  lp = jax.eval_shape(lambda p: _apply(c, p), params)
  leaf = lp["layers"]["kernel"]
  assert jlora.is_lora(leaf) and not jlora.is_lora(lp["layers"]["bias"])
  n_stack, r = math.prod(c["stack_shape"]), c["rank"]
  assert leaf.stack == len(c["stack_shape"]) and leaf.a_axes == c["a_axes"] and leaf.rank == r
  assert leaf.a.shape == c["stack_shape"] + tuple(c["kshape"][i] for i in c["a_axes"]) + (r,)
  assert leaf.b.shape[:leaf.stack + 1] == c["stack_shape"] + (r,)
  assert leaf.a.dtype == leaf.b.dtype == jnp.float32 and leaf.w.dtype == c["dtype"]
  assert leaf.shape == shape
  trainable = n_stack * r * (c["fan_in"] + c["fan_out"])
  frozen = math.prod(shape) + shape[-1]
  assert jlora.count(lp) == (trainable + frozen, trainable, frozen)
  # merge keeps shapes and dtypes; base gives the original tree back.
  merged = jax.eval_shape(jlora.merge, lp)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), merged) == jax.tree.map(
      lambda x: (x.shape, x.dtype), params)
  assert jlora.base(lp) == params
  # split / combine: an exact round trip, with the counts split between the halves.
  t, f = jlora.split(lp)
  assert jlora.count(t) == (trainable, trainable, 0) and jlora.count(f) == (frozen, 0, frozen)
  back = jlora.combine(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(lp)
  assert all(u is v for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(lp)))


@settings(max_examples=15, **SETTINGS)
@given(cases(), st.integers(0, 2**31 - 1))
def test_merge_matches_reference(c, seed):
  rng = np.random.default_rng(seed)
  shape = c["stack_shape"] + c["kshape"]
  w = jnp.asarray(rng.standard_normal(shape, np.float32), c["dtype"])
  # apply's layout metadata, random adapters (abstract apply: one compilation per example).
  spec = jax.eval_shape(lambda p: _apply(c, p), {"layers": {"kernel": w}})["layers"]["kernel"]
  a = jnp.asarray(rng.standard_normal(spec.a.shape, np.float32))
  b = jnp.asarray(rng.standard_normal(spec.b.shape, np.float32))
  leaf = dataclasses.replace(spec, w=w, a=a, b=b)
  got = jlora.merge({"k": leaf})["k"]
  assert got.shape == shape and got.dtype == c["dtype"]
  # Reference: per stack slice, (prod(a dims), r) @ (r, prod(b dims)), axes put back.
  s, nd = leaf.stack, len(c["kshape"])
  b_axes = [i for i in range(nd) if i not in c["a_axes"]]
  a2 = np.asarray(leaf.a, np.float64).reshape(c["stack_shape"] + (c["fan_in"], c["rank"]))
  b2 = np.asarray(b, np.float64).reshape(c["stack_shape"] + (c["rank"], c["fan_out"]))
  ab = (a2 @ b2).reshape(c["stack_shape"] + tuple(c["kshape"][i] for i in c["a_axes"])
                         + tuple(c["kshape"][i] for i in b_axes))
  ab = np.moveaxis(ab, list(range(s, s + nd)), [s + i for i in [*c["a_axes"], *b_axes]])
  expected = np.asarray(w, np.float64) + leaf.scale * ab
  tol = 1e-5 if c["dtype"] == jnp.float32 else float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol, atol=tol)
