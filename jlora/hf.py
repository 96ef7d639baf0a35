"""Hugging Face interop: PEFT LoRA adapters to and from jlora trees, merged safetensors.

A *key map* ties jlora paths to Hugging Face tensor names. It is a callable
`key_map(path) -> (name, transpose) | None` taking a '/'-joined jlora path:

* `name` is the Hugging Face tensor name, with one `{}` per leading stack axis
  of the jlora leaf (layers stacked for `lax.scan`), filled in with the index
  along that axis: `"model.layers.{}.self_attn.q_proj.weight"`;
* `transpose` is True where the Hugging Face tensor is the transpose of the
  jlora slice: a torch `nn.Linear` weight is `(out, in)`, a Flax kernel
  `(in, out)`;
* None means the leaf has no Hugging Face counterpart.

`export_peft`, `import_peft` and `export_merged` take the key map of their
tree's layout (`key_map=`, required); a dict's `.get` is one::

    key_map = {
        "layers/self_attn/q_proj/kernel": ("model.layers.{}.self_attn.q_proj.weight", True),
        "norm/scale": ("model.norm.weight", False),
    }.get

(`peft_key_map` in the checkout's `recipes/models/llama.py` is the full map of
the recipes' Llama layout.)

PEFT adapters hold, per adapted `nn.Linear` module `m`,
`base_model.model.{m}.lora_A.weight` of shape `(r, in)` and
`base_model.model.{m}.lora_B.weight` of shape `(out, r)`, with the update
`scale * B @ A` and `scale = lora_alpha / r` (`/ sqrt(r)` with `use_rslora`).
A jlora `LoRA` leaf on an `(in, out)` kernel holds `a (in, r)` and `b (r, out)`,
so `a == A.T`, `b == B.T` and the scales agree: alpha carries over as is.
"""

from jlora._src.peft import KeyMap, export_merged, export_peft, import_peft

__all__ = ["KeyMap", "export_merged", "export_peft", "import_peft"]
