"""The Gemma notebook's training pieces (recipes.models.gemma): the chunked tied-head loss and the
SentencePiece batch layout. The loss must equal the full-logit loss, gradients included, and
its step must never hold float32 logits for the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recipes.models import gemma
from tests.helpers import iter_eqns

pytestmark = pytest.mark.slow  # the demo model's own training pieces


def _inputs(seed, b=3, t=7, d=16, v=50):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float32)
  y = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  w = jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32)  # padding: weight 0
  return h, e, y, w


def _full(h, e, y, w, soft_cap):
  z = jnp.einsum("btd,vd->btv", h, e)
  if soft_cap:
    z = soft_cap * jnp.tanh(z / soft_cap)
  ce = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[..., None], -1)[..., 0]
  return (ce * w).sum() / w.sum()


@pytest.mark.parametrize("soft_cap,chunk", [(30.0, 4), (None, 5), (5.0, 64)])
def test_lm_loss_equals_the_full_logit_loss_with_gradients(soft_cap, chunk):
  h, e, y, w = _inputs(0)
  f = lambda h: gemma.lm_loss(h, e, y, w, soft_cap=soft_cap, chunk=chunk)
  g = lambda h: _full(h, e, y, w, soft_cap)
  np.testing.assert_allclose(f(h), g(h), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(h), jax.grad(g)(h), rtol=1e-4, atol=1e-6)


def test_lm_loss_never_forms_logits_for_the_whole_batch():
  h, e, y, w = _inputs(1, b=4, t=32, v=300)
  jaxpr = jax.make_jaxpr(jax.grad(lambda h: gemma.lm_loss(h, e, y, w, soft_cap=30.0, chunk=16)))(h)
  biggest = max(v.aval.size for eqn in iter_eqns(jaxpr.jaxpr) for v in eqn.outvars
                if hasattr(v.aval, "size"))
  assert biggest == 16 * 300  # one chunk of logits, not 4·32·300


class _Pieces:
  """A stand-in SentencePiece processor: one id per character (ids from 3, as Gemma's)."""

  def encode(self, text):
    return [3 + (ord(c) % 200) for c in text]


def test_encode_lays_out_bos_eos_padding_and_shifted_labels():
  x, y, w = gemma.encode(_Pieces(), ["ab", "a much longer text"], seq_len=6)
  ids0 = [2, 3 + ord("a"), 3 + ord("b"), 1, 0, 0, 0]
  np.testing.assert_array_equal(x["token_ids"][0], ids0[:6])
  np.testing.assert_array_equal(y[0], ids0[1:])
  np.testing.assert_array_equal(x["padding_mask"][0], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(w[0], [1, 1, 1, 0, 0, 0])
  assert x["token_ids"][1, 0] == 2 and w[1].all()  # truncated: no eos, no padding
