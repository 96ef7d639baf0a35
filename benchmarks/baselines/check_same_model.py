"""Checks that the four benchmark implementations are one model, on the CPU.

One set of random float32 weights (gemma2_model.init_params at the tiny size, norm
scales randomized too) is loaded into jlora's benchmark model (gemma2_model.py), the
hand-written JAX step (jax_handwritten.py), transformers' Gemma2ForCausalLM (the
PEFT baseline's model) and keras-hub's GemmaCausalLM; each computes the mean
next-token cross-entropy of one random batch, and the losses must agree. jlora's
model is checked with the plain and the fused loss. keras-hub keeps Gemma 2's
attention-logit soft-cap (50), which the other three leave out: at these logit sizes
it moves the loss by less than the tolerance, and the check prints by how much.

Then the adapted parameter counts at the full Gemma-2-2B size, from shapes only:
jlora's, the hand-written step's and PEFT's (a model on PyTorch's meta device) must
be equal (keras-hub factors the query and value kernels per head, so its count
differs and is printed, not compared).

Usage: JAX_PLATFORMS=cpu KERAS_BACKEND=jax python benchmarks/baselines/check_same_model.py
(run_gpu.sh check). Prints one JSON row; exits 1 on a mismatch.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import bench_common as C  # noqa: E402
import gemma2_model as G  # noqa: E402
import jax_handwritten as HW  # noqa: E402

NORMS = ("pre_attn", "post_attn", "pre_ffw", "post_ffw")
TOL = 2e-5  # relative, on the loss (float32 everywhere; keras-hub's attention soft-cap inside)


def reference_weights(s: dict, key) -> dict:
  """gemma2_model's parameters (unstacked blocks), float32, norm scales random too."""
  cfg = G.tiny_config(layers="unstacked", dtype=jnp.float32)
  params = G.init_params(cfg, key)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, x) in enumerate(leaves):
    if str(path[-1].key) == "scale":
      x = 0.3 * jax.random.normal(jax.random.fold_in(key, 1000 + i), x.shape, x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def jlora_model_loss(params, ids, chunk: int) -> float:
  cfg = G.tiny_config(layers="unstacked", dtype=jnp.float32, logits_dtype=jnp.float32,
                      remat="none", loss_chunk=chunk, loss_math="exp")
  return float(G.Gemma2(cfg).apply({"params": params}, ids[:, :-1], ids[:, 1:]))


def handwritten_loss(s: dict, params, ids) -> float:
  layers = [params[f"layers_{i}"] for i in range(s["num_hidden_layers"])]
  blocks = {n: jnp.stack([l[n]["kernel"] for l in layers]) for n in C.PROJECTIONS}
  blocks.update({n: jnp.stack([l[f"{n}_norm"]["scale"] for l in layers]) for n in NORMS})
  weights = dict(embed=params["embedding"], blocks=blocks, final_norm=params["final_norm"]["scale"])
  return float(HW.make_loss(s, None, "none")({}, weights, ids))


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  return float(np.mean(lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]))


def transformers_loss(s: dict, params, ids) -> float:
  import peft_torch
  import torch
  model, _ = peft_torch.build_model(s, "eager", torch.device("cpu"), tiny=True)
  model = model.float()
  t = lambda x: torch.from_numpy(np.asarray(x, np.float32).copy())
  sd = {"model.embed_tokens.weight": t(params["embedding"]),
        "model.norm.weight": t(params["final_norm"]["scale"])}
  hf_norms = dict(pre_attn="input_layernorm", post_attn="post_attention_layernorm",
                  pre_ffw="pre_feedforward_layernorm", post_ffw="post_feedforward_layernorm")
  for i in range(s["num_hidden_layers"]):
    l, pre = params[f"layers_{i}"], f"model.layers.{i}."
    for n in C.PROJECTIONS:
      sub = "self_attn" if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
      sd[f"{pre}{sub}.{n}.weight"] = t(l[n]["kernel"]).T.contiguous()
    for n, hf in hf_norms.items():
      sd[pre + hf + ".weight"] = t(l[f"{n}_norm"]["scale"])
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
  assert not missing and not unexpected, (missing, unexpected)
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(np.asarray(ids[:, :-1], np.int64))).logits
  return _nll(logits.numpy(), np.asarray(ids[:, 1:]))


def keras_loss(s: dict, params, ids) -> float:
  import keras_hub
  import keras_hub_lora
  bb = keras_hub_lora.backbone(s, dtype="float32")
  h, kv, hd, d = (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"],
                  s["hidden_size"])
  values = {"token_embedding/embeddings": params["embedding"],
            "final_normalization/scale": params["final_norm"]["scale"]}
  keras_norms = dict(pre_attn="pre_attention_norm", post_attn="post_attention_norm",
                     pre_ffw="pre_ffw_norm", post_ffw="post_ffw_norm")
  for i in range(s["num_hidden_layers"]):
    l, pre = params[f"layers_{i}"], f"decoder_block_{i}/"
    heads = lambda w, n: np.transpose(np.asarray(w).reshape(d, n, hd), (1, 0, 2))
    values[pre + "attention/query/kernel"] = heads(l["q_proj"]["kernel"], h)
    values[pre + "attention/key/kernel"] = heads(l["k_proj"]["kernel"], kv)
    values[pre + "attention/value/kernel"] = heads(l["v_proj"]["kernel"], kv)
    values[pre + "attention/attention_output/kernel"] = np.asarray(l["o_proj"]["kernel"]).reshape(
        h, hd, d)
    for n, k in (("gate_proj", "ffw_gating"), ("up_proj", "ffw_gating_2"),
                 ("down_proj", "ffw_linear")):
      values[pre + k + "/kernel"] = l[n]["kernel"]
    for n, k in keras_norms.items():
      values[pre + k + "/scale"] = l[f"{n}_norm"]["scale"]
  for v in bb.weights:
    v.assign(np.asarray(values.pop(v.path)))
  assert not values, sorted(values)
  lm = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
  x = dict(token_ids=np.asarray(ids[:, :-1], np.int32),
           padding_mask=np.ones(ids[:, :-1].shape, np.int32))
  return _nll(np.asarray(lm(x)), np.asarray(ids[:, 1:]))


def adapted_counts() -> dict:
  """Trainable adapter parameters at the full size, from shapes only."""
  import peft
  import peft_torch
  import torch

  import jlora
  s = C.shape_of(False)
  cfg = G.Gemma2Config(layers="unstacked")
  shapes = jax.eval_shape(lambda k: G.init_params(cfg, k), jax.random.key(0))
  out = {}
  for name, (rank, targets) in C.CONFIGS.items():
    tgt = None if name == "qv4" else "all-linear"
    tree = jax.eval_shape(lambda p, r=rank, t=tgt: jlora.apply(p, rank=r, targets=t), shapes)
    hw = jax.eval_shape(lambda r=rank, t=targets: HW.init_adapters(s, r, t, jax.random.key(0)))
    with torch.device("meta"):
      model = peft_torch.transformers.Gemma2ForCausalLM(peft_torch.gemma2_config(s, "eager"))
      model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank,
                                                         target_modules=list(targets)))
    out[name] = dict(jlora=int(jlora.count(tree).trainable),
                     handwritten=int(sum(x.size for x in jax.tree.leaves(hw))),
                     peft=int(sum(w.numel() for w in model.parameters() if w.requires_grad)))
  return out


def main() -> int:
  s = C.shape_of(True)
  key = jax.random.key(7)
  params = reference_weights(s, key)
  ids = jax.random.randint(jax.random.fold_in(key, 1), (2, 17), 0, s["vocab_size"])
  ref = jlora_model_loss(params, ids, chunk=0)
  losses = dict(jlora_model_plain=ref, jlora_model_fused=jlora_model_loss(params, ids, chunk=8),
                handwritten=handwritten_loss(s, params, ids),
                transformers=transformers_loss(s, params, ids),
                keras_hub=keras_loss(s, params, ids))
  rel = {k: abs(v - ref) / abs(ref) for k, v in losses.items()}
  counts = adapted_counts()
  ok = all(r < TOL for r in rel.values()) and all(
      len(set(c.values())) == 1 for c in counts.values())
  C.emit(dict(suite="check", name="same_model", ok=ok,
              losses={k: round(v, 6) for k, v in losses.items()},
              relative_difference={k: float(f"{v:.2e}") for k, v in rel.items()}, tolerance=TOL,
              adapted_parameters_full_size=counts))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
