"""Issue 4: Keras's Gemma LoRA parameter counts, reproduced from abstract trees.

No Keras import here except to locate keras-hub's preset metadata file.
"""

import importlib.util
import os
import pathlib
import runpy
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import pytest

import jlora
from recipes.models import gemma

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lora_count(preset, rank, **kw):
  shapes = gemma.abstract_params(preset)
  return jlora.count(jax.eval_shape(lambda p: jlora.apply(p, rank=rank, **kw), shapes))


def _keras_hub_gemma_presets():
  """keras-hub's Gemma preset metadata, read from the installed package's file.

  Located without importing keras-hub (so without Keras or its backend), and
  executed as the plain dict literal it is.
  """
  spec = importlib.util.find_spec("keras_hub")
  assert spec is not None and spec.submodule_search_locations, (
      "keras-hub is not installed; recipes/setup.sh installs it (pip install --no-deps keras-hub)")
  root = pathlib.Path(list(spec.submodule_search_locations)[0])
  path = root / "src" / "models" / "gemma" / "gemma_presets.py"
  return runpy.run_path(str(path))["backbone_presets"]


# Gemma presets of keras-hub that are neither Gemma 1 nor Gemma 2 releases.
NOT_GEMMA_1_OR_2 = {"vault_gemma_1b_en"}


def test_gemma2_2b_rank4_matches_keras_enable_lora():
  c = _lora_count("gemma2_2b_en", 4)
  assert c == jlora.Count(total=2_617_270_528, trainable=2_928_640, frozen=2_614_341_888)


def test_gemma2_2b_summary_totals_lines():
  lora = jax.eval_shape(lambda p: jlora.apply(p, rank=4), gemma.abstract_params("gemma2_2b_en"))
  assert jlora.summary(lora).splitlines()[-3:] == [
      "Total params: 2,617,270,528", "Trainable params: 2,928,640",
      "Non-trainable params: 2,614,341,888"]


def test_every_gemma1_and_gemma2_preset_matches_keras_hub_metadata():
  presets = _keras_hub_gemma_presets()
  mapped = set(presets) - NOT_GEMMA_1_OR_2
  assert mapped == set(gemma.PRESETS), (
      f"keras-hub presets not mapped: {sorted(mapped - set(gemma.PRESETS))}; mapped presets "
      f"keras-hub lacks: {sorted(set(gemma.PRESETS) - mapped)}")
  for name in sorted(mapped):
    shapes = gemma.abstract_params(name)
    assert jlora.count(shapes).total == presets[name]["metadata"]["params"], name
  # The preset descriptions' layer counts, where they are right: the 27B model has
  # 46 blocks (keras-hub's description says 42).
  for name, cfg in gemma.PRESETS.items():
    desc = presets[name]["metadata"]["description"]
    if "27b" not in name and "-layer" in desc:
      assert f"{cfg.num_layers}-layer" in desc, (name, desc)


@pytest.mark.parametrize("preset,rank", [("gemma_2b_en", 8), ("gemma_instruct_7b_en", 4),
                                         ("gemma2_9b_en", 16), ("gemma2_instruct_27b_en", 2)])
def test_trainable_count_formula(preset, rank):
  cfg = gemma.config(preset)
  d, hd = cfg.hidden_dim, cfg.head_dim
  # Keras layout: A (heads, hidden, r), B (r, head_dim) for query and value.
  per_block = (rank * (cfg.num_query_heads * d + hd) + rank * (cfg.num_key_value_heads * d + hd))
  c = _lora_count(preset, rank)
  assert c.trainable == cfg.num_layers * per_block
  assert c.frozen == jlora.count(gemma.abstract_params(preset)).total


def test_all_seven_projections_rank16_matches_keras():
  # Keras: backbone.enable_lora(16, target_layer_names=["query", "key", "value",
  # "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"]) on gemma2_2b_en.
  assert _lora_count("gemma2_2b_en", 16, targets="all-linear").trainable == 31_842_304


def test_fan_layout_gives_the_standard_count():
  # A (hidden, r), B (r, heads * head_dim), as PEFT factors q_proj / v_proj.
  c = _lora_count("gemma2_2b_en", 4, layout="fan",
                  in_axes={r"attention/(query|value)/kernel$": (1,)})
  assert c.trainable == 798_720


def test_abstract_params_shapes_and_dtype():
  shapes = gemma.abstract_params("gemma2_27b_en")
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in shapes.values())
  assert {x.dtype for x in shapes.values()} == {jnp.dtype("bfloat16")}
  assert shapes["decoder_block_45/attention/query/kernel"].shape == (32, 4608, 128)
  assert shapes["decoder_block_0/attention/attention_output/kernel"].shape == (32, 128, 4608)
  assert shapes["decoder_block_0/ffw_linear/kernel"].shape == (36864, 4608)
  assert "decoder_block_46/attention/query/kernel" not in shapes
  g1 = gemma.abstract_params("gemma_2b_en", dtype="float32")
  assert "decoder_block_0/post_ffw_norm/scale" not in g1
  assert g1["decoder_block_0/attention/key/kernel"] == jax.ShapeDtypeStruct((1, 2048, 256),
                                                                             jnp.float32)


def test_unknown_preset_and_bad_config_errors():
  with pytest.raises(ValueError, match=r"'gemma2_2b' is not a Gemma 1 or Gemma 2 preset.*"
                                       r"gemma2_2b_en"):
    gemma.config("gemma2_2b")
  with pytest.raises(ValueError, match="intermediate_dim=33 must be even"):
    gemma.small_config(intermediate_dim=33)
  with pytest.raises(ValueError, match="multiple of num_key_value_heads=3"):
    gemma.small_config(num_key_value_heads=3)


def test_gemma_module_imports_nothing_heavy():
  code = ("import sys; import recipes.models.gemma; "
          "print(sorted(m for m in ('jax', 'keras', 'keras_hub', 'flax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=True)
  # The architecture table imports nothing heavy: jax, Keras and Flax come only when used.
  assert out.stdout.strip() == "[]"


def _run_measured(argv, env, timeout):
  """Runs `argv` (killed after `timeout` seconds): `(returncode, stdout, stderr, peak RSS in KiB)`.

  The peak is that process's own (`os.wait4`), not the maximum over every child this process
  has reaped (`RUSAGE_CHILDREN`), which another test's child may have set.
  """
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=REPO, env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read(), usage.ru_maxrss


@pytest.mark.slow
def test_recipe_cli_memory_and_output():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  rc, stdout, stderr, peak_kb = _run_measured(
      [sys.executable, "-m", "recipes.gemma_param_count", "--preset", "gemma2_2b_en", "--rank",
       "4"], env, timeout=60)
  assert rc == 0, stderr
  lines = stdout.splitlines()
  assert lines[-3:] == ["Total params: 2,617,270,528", "Trainable params: 2,928,640",
                        "Non-trainable params: 2,614,341,888"]
  assert peak_kb < 2 * 1024 * 1024
  bad = subprocess.run([sys.executable, "-m", "recipes.gemma_param_count", "--preset",
                        "gemma3_1b"], capture_output=True, text=True, cwd=REPO, env=env)
  assert bad.returncode == 2 and "not a Gemma 1 or Gemma 2 preset" in bad.stderr


def test_recipe_in_process_other_preset_and_table(capsys):
  from recipes import gemma_param_count as recipe
  assert recipe.main(["--preset", "gemma_7b_en", "--rank", "8", "--table"]) == 0
  text = capsys.readouterr().out
  cfg = gemma.config("gemma_7b_en")
  expect = cfg.num_layers * 2 * 8 * (16 * 3072 + 256)
  assert f"Trainable params: {expect:,}" in text
  assert "decoder_block_27/attention/value/kernel" in text  # the table's rows
