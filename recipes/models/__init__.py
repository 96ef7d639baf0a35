"""Small, readable Flax models and loaders for real checkpoints (needs the `flax` extra).

Import the submodules explicitly; this package imports nothing heavy:

* `recipes.models.llama`: a Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU),
  loaders for GGUF and Hugging Face safetensors, a GGUF tokenizer, ChatML and
  greedy generation.
* `recipes.models.bert`: a BERT encoder (MiniLM and friends) with a safetensors
  loader and mean pooling.
"""

__all__ = ["bert", "llama"]
