"""Every error jlora raises: the message names the key path and the fix."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


PARAMS = {"block": {"q_proj": {"kernel": _rand((8, 12))}, "k_proj": {"kernel": _rand((8, 12))},
                    "einsum": {"w": _rand((4, 8, 6))}, "ids": jnp.ones((3, 4), jnp.int32),
                    "mask": jnp.ones((4,), jnp.int32), "bias": _rand((12,))}}


# apply: arguments ------------------------------------------------------------------------------

def test_unknown_init():
  with pytest.raises(ValueError, match=r"init='xavier' is not one of \('he_uniform', 'gaussian', "
                                       r"'pissa', 'olora'\) or 'pissa_niter_<n>'"):
    jlora.apply(PARAMS, init="xavier")


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset targets='all_linear'; did you mean "
                                       "'all-linear'"):
    jlora.apply(PARAMS, targets="all_linear")


def test_invalid_regex():
  with pytest.raises(ValueError, match=r"targets='q_\(proj' is not a valid regular expression"):
    jlora.apply(PARAMS, targets="q_(proj")


def test_bad_pattern_type():
  with pytest.raises(TypeError, match="targets must be a regular expression, a list of them or a "
                                      "callable .* got int"):
    jlora.apply(PARAMS, targets=5)


def test_no_target_matched_lists_nearest_paths():
  with pytest.raises(ValueError, match=r"targets='query' matched no kernel .* Nearest candidate "
                                       r"paths: \[.*'block/q_proj/kernel'.*\]") as e:
    jlora.apply(PARAMS, targets="query")
  assert "block/bias" not in str(e.value)  # candidates are kernels only
  assert "targets='all-linear'" in str(e.value)
  with pytest.raises(ValueError, match=r"targets=None matched no kernel .*'block/k_proj/kernel'"):
    jlora.apply({"block": {"k_proj": {"kernel": _rand((8, 12))}}})


def test_no_target_in_a_tree_without_kernels():
  with pytest.raises(ValueError, match=r"matched no kernel .* Nearest candidate paths: \[\]"):
    jlora.apply({"scale": _rand((4,))}, targets="scale")


# apply: leaves ---------------------------------------------------------------------------------

def test_non_floating_leaf():
  with pytest.raises(TypeError, match=r"targets='ids' matched 'block/ids' of dtype int32; only "
                                      r"floating kernels can carry LoRA"):
    jlora.apply(PARAMS, targets="ids")
  with pytest.raises(TypeError, match=r"matched 'block/mask' of dtype int32"):
    jlora.apply(PARAMS, targets=lambda path, leaf: path.endswith("mask"))


def test_callable_selects_a_vector():
  with pytest.raises(ValueError, match=r"the targets callable selected 'block/bias' with kernel "
                                       r"shape \(12,\); LoRA needs ndim >= 2 .* Return False"):
    jlora.apply(PARAMS, targets=lambda path, leaf: "bias" in path or "q_proj" in path)


def test_already_lora():
  lp = jlora.apply(PARAMS, rank=2)
  with pytest.raises(ValueError, match=re.escape(
      "the leaf at 'block/q_proj/kernel' is already a jlora.LoRA. Apply LoRA to the base tree "
      "instead: jlora.apply(jlora.base(tree), ...)")):
    jlora.apply(lp, rank=2)
  lt = jlora.apply(PARAMS, rank=2, trainable="einsum")
  with pytest.raises(ValueError, match="'block/einsum/w' is already a jlora.Trainable"):
    jlora.apply(lt, rank=2, targets="k_proj", trainable="einsum")
  with pytest.raises(ValueError, match="'block/q_proj/kernel' is already a jlora.LoRA"):
    jlora.apply(lp, rank=2, targets="all-linear")


def test_target_and_trainable_overlap():
  with pytest.raises(ValueError, match=r"'block/q_proj/kernel' matches both `targets` and "
                                       r"`trainable`.* Narrow one"):
    jlora.apply(PARAMS, targets="q_proj", trainable="q_proj")


# apply: rank, layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(rank):
  with pytest.raises(ValueError, match=rf"rank {rank} for 'block/q_proj/kernel' must be >= 1 .* "
                                       rf"use e.g. rank=4"):
    jlora.apply(PARAMS, rank=rank)


@pytest.mark.parametrize("rank", [8, 20])
def test_rank_not_low(rank):
  with pytest.raises(ValueError, match=rf"rank {rank} for 'block/q_proj/kernel' \(kernel \(8, "
                                       rf"12\), factored as 8 x 12 in layout 'keras'\) must be "
                                       rf">= 1 and < 8.* smaller rank, e.g. rank="
                                       rf"{{'block/q_proj/kernel': 7, '.\*': {rank}}}"):
    jlora.apply(PARAMS, rank=rank)


def test_rank_too_large_for_keras_last_axis():
  # Keras layout factors (4, 8) x 6: rank 6 is too large although 4 * 8 = 32.
  with pytest.raises(ValueError, match=r"rank 6 for 'block/einsum/w' .* factored as 32 x 6 .* "
                                       r"< 6"):
    jlora.apply(PARAMS, rank=6, targets="einsum")


@pytest.mark.parametrize("rank", [2.0, True, "4"])
def test_rank_not_an_int(rank):
  with pytest.raises(TypeError, match=rf"rank for 'block/q_proj/kernel' must be an int, got "
                                      rf"{re.escape(repr(rank))}"):
    jlora.apply(PARAMS, rank=rank)


def test_rank_mapping_without_a_match():
  with pytest.raises(ValueError, match=r"no rank pattern matches target 'block/q_proj/kernel'; "
                                       r"patterns: \['k_proj'\].* catch-all"):
    jlora.apply(PARAMS, rank={"k_proj": 2}, targets="_proj")


def test_unknown_layout():
  with pytest.raises(ValueError, match=r"layout='peft' for 'block/q_proj/kernel' is not one of "
                                       r"\('keras', 'fan'\)"):
    jlora.apply(PARAMS, layout="peft")


def test_fan_layout_needs_in_axes_for_nd_kernels():
  with pytest.raises(ValueError, match=r"layout='fan' needs the input axes of the 3-d kernel at "
                                       r"'block/einsum/w' \(shape \(4, 8, 6\)\).* in_axes="):
    jlora.apply(PARAMS, targets="einsum", layout="fan")


@pytest.mark.parametrize("in_axes", [(0, 1, 2), (3,), (1, 1), (), (-4,)])
def test_in_axes_do_not_fit(in_axes):
  with pytest.raises(ValueError, match=r"in_axes=.* does not fit the kernel at 'block/einsum/w' "
                                       r"of shape \(4, 8, 6\): give between 1 and 2 distinct axes"):
    jlora.apply(PARAMS, targets="einsum", layout="fan", in_axes=in_axes)


# combine ---------------------------------------------------------------------------------------

def test_combine_different_paths():
  t, f = jlora.split(jlora.apply(PARAMS, rank=2))
  other = jlora.split(jlora.apply({"x": PARAMS}, rank=2)).frozen
  with pytest.raises(ValueError, match=r"do not have the same structure \(paths only in "
                                       r"trainable: \['block/.*only in frozen: \['x/block/"):
    jlora.combine(t, other)


def test_combine_different_metadata():
  t, _ = jlora.split(jlora.apply(PARAMS, rank=2))
  _, f = jlora.split(jlora.apply(PARAMS, rank=2, alpha=4.0))
  with pytest.raises(ValueError, match=r"same paths but different node types or static LoRA "
                                       r"metadata \(alpha"):
    jlora.combine(t, f)


def test_combine_different_metadata_names_the_path_and_both_values():
  t, _ = jlora.split(jlora.apply(PARAMS, rank=2, targets="_proj"))
  _, f = jlora.split(jlora.apply(PARAMS, rank=2, targets="_proj", alpha={"q_": 4.0, ".*": 2.0}))
  with pytest.raises(ValueError, match=r"at 'block/q_proj/kernel': alpha 2.0 in trainable, 4.0 in "
                                       r"frozen\)\. Pass the two halves of one jlora.split"):
    jlora.combine(t, f)
  _, f = jlora.split(jlora.apply(PARAMS, rank=2, targets="_proj", rslora=True))
  with pytest.raises(ValueError, match=r"at 'block/k_proj/kernel': rslora False in trainable, True "
                                       r"in frozen"):
    jlora.combine(t, f)
  with pytest.raises(ValueError, match=r"at 'block/ids': a jlora.Trainable in trainable, a plain "
                                       r"leaf in frozen"):
    jlora.combine({**t, "block": {**t["block"], "ids": jlora.Trainable(None)}},
                  {**f, "block": {**f["block"], "ids": None}})


def test_combine_nan_alpha_says_why():
  # A NaN alpha (a LoRA leaf built by hand, or an old checkpoint) is never equal to itself.
  leaf = jlora.apply({"q_proj": _rand((8, 12))}, rank=2)["q_proj"]
  t = {"q_proj": dataclasses.replace(leaf, w=None, alpha=float("nan"))}
  f = {"q_proj": dataclasses.replace(leaf, a=None, b=None, alpha=float("nan"))}
  with pytest.raises(ValueError, match=r"at 'q_proj': alpha nan in both halves, and nan is never "
                                       r"equal to itself.* finite alpha"):
    jlora.combine(t, f)


def test_combine_both_halves_hold_a_value():
  t, _ = jlora.split(jlora.apply(PARAMS, rank=2))
  with pytest.raises(ValueError, match=r"both halves hold a value at 'block/q_proj/kernel/a'"):
    jlora.combine(t, t)


# optimizer / train_step ------------------------------------------------------------------------

def test_optimizer_on_a_plain_tree():
  with pytest.raises(ValueError, match=r"jlora.optimizer: the tree holds no jlora.LoRA or "
                                       r"jlora.Trainable leaf.* Call jlora.apply"):
    jlora.optimizer(optax.adam(1e-3), PARAMS)


def test_train_step_init_on_a_plain_tree():
  step = jlora.train_step(lambda p: 0.0, optax.adam(1e-3))
  with pytest.raises(ValueError, match=r"jlora.train_step: the tree holds no jlora.LoRA"):
    step.init(PARAMS)
