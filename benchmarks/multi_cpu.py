"""jlora.stack on the CPU: the two kernels of `jlora.lora(stack_kernel=...)`, same inputs.

A 4-layer MLP of 512 x 2048 / 2048 x 512 kernels, 16 rank-8 adapters on all of them, 16
examples x 64 tokens, each example on its own adapter; the forward pass and the gradient of
a sum loss with respect to the stack, jitted; median of 5 rounds of 5 calls. Writes
benchmarks/results/multi_cpu.json.
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def main():
  rng = np.random.default_rng(0)
  params = {f"l{i}": {"up": jnp.asarray(rng.standard_normal((512, 2048), np.float32) * 0.02),
                      "down": jnp.asarray(rng.standard_normal((2048, 512), np.float32) * 0.02)}
            for i in range(4)}
  trees = [jlora.apply(params, rank=8, targets="up|down", key=jax.random.key(i))
           for i in range(16)]
  s = jlora.select(jlora.stack(trees), jnp.arange(16))
  x = jnp.asarray(rng.standard_normal((16, 64, 512), np.float32))

  def model(p, x):
    for i in range(4):
      x = x + jax.nn.gelu(x @ p[f"l{i}"]["up"]) @ p[f"l{i}"]["down"]
    return x

  rows = {}
  for kernel in ("gather", "dense"):
    f = jlora.lora(model, stack_kernel=kernel)
    tr, fr = jlora.split(s)
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda tr: jnp.sum(f(jlora.combine(tr, fr), x))))
    for name, fn in (("forward", lambda: fwd(s, x)), ("grad", lambda: grad(tr))):
      jax.block_until_ready(fn())
      times = []
      for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(5):
          jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) / 5)
      rows[f"{name}_{kernel}"] = dict(median_s=round(statistics.median(times), 5),
                                      rounds_s=[round(t, 5) for t in times])
  out = dict(what=__doc__.splitlines()[0], jax=jax.__version__, cpus=os.cpu_count(), rows=rows)
  print(json.dumps(out, indent=1))
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "multi_cpu.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
