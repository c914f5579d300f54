"""Data: tokenizers, corpora, packing, determinism, resumable iterator, bad data (issue 2)."""

import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effjax.data import (ByteTokenizer, DataError, builtin_corpus_files, eval_batches,
                         load_corpus, load_tokenizer, make_train_iterator, pack_windows)
from effjax.data.corpus import is_validation

TOK = ByteTokenizer()


def _stream(n=20000, seed=0):
  rng = np.random.default_rng(seed)
  t = rng.integers(0, 256, n).astype(np.uint16)
  t[rng.choice(n, n // 300, replace=False)] = TOK.eos_id
  return t


def test_byte_tokenizer_round_trip():
  text = "def f(x):\n    return 'naïve ☃ 数'\n"
  ids = TOK.encode(text)
  assert ids.max() < 256 and TOK.decode(ids) == text
  assert TOK.decode(np.append(ids, TOK.eos_id)) == text  # EOS decodes to nothing
  assert TOK.token_byte_lengths[TOK.eos_id] == 0 and TOK.token_byte_lengths[:256].sum() == 256


def test_hf_tokenizer_round_trip(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(["the cat sat on the mat", "the dog sat on the log"] * 20,
                          trainers.BpeTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  hf = load_tokenizer(path)
  assert hf.eos_id == tok.token_to_id("<|endoftext|>")
  ids = hf.encode("the cat sat")
  assert hf.decode(ids).replace(" ", "") == "thecatsat"
  assert hf.token_byte_lengths.shape == (hf.vocab_size,)
  with pytest.raises(DataError, match="data.eos_token"):
    load_tokenizer(path, eos_token="<nope>")
  with pytest.raises(DataError, match="missing.json"):
    load_tokenizer(str(tmp_path / "missing.json"))


def test_packing_shift_segments_positions():
  tokens = np.array([1, 2, 3, TOK.eos_id, 4, 5, TOK.eos_id, 6, 7, 8], np.uint16)
  b = pack_windows(tokens, np.array([0]), 9, TOK.eos_id)
  np.testing.assert_array_equal(b["targets"][0], tokens[1:10])
  np.testing.assert_array_equal(b["inputs"][0], tokens[:9])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0, 1, 2, 0, 1, 2])


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_shuffle_is_deterministic_and_seeded():
  t = _stream()
  a = _take(make_train_iterator(t, seq_len=32, batch_size=4, seed=1, eos_id=256), 5)
  b = _take(make_train_iterator(t, seq_len=32, batch_size=4, seed=1, eos_id=256), 5)
  c = _take(make_train_iterator(t, seq_len=32, batch_size=4, seed=2, eos_id=256), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert not all(np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_iterator_state_round_trip_direct_and_through_orbax(tmp_path):
  t = _stream()
  it = make_train_iterator(t, seq_len=32, batch_size=4, seed=0, eos_id=256)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  it2 = make_train_iterator(t, seq_len=32, batch_size=4, seed=0, eos_id=256)
  it2.set_state(state)
  for x, y in zip(expected, _take(it2, 4)):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  # through an Orbax CheckpointManager, as the trainer saves it
  it3 = make_train_iterator(t, seq_len=32, batch_size=4, seed=0, eos_id=256)
  _take(it3, 3)
  mngr = ocp.CheckpointManager(str(tmp_path / "ck"), item_names=("data",))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it3)))
  mngr.wait_until_finished()
  it4 = make_train_iterator(t, seq_len=32, batch_size=4, seed=0, eos_id=256)
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it4)))
  for x, y in zip(expected, _take(it4, 4)):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_process_slices_union_equals_global_batch():
  t = _stream()
  whole = _take(make_train_iterator(t, seq_len=32, batch_size=8, seed=3, eos_id=256), 3)
  parts = [_take(make_train_iterator(t, seq_len=32, batch_size=2, seed=3, process_index=p,
                                     process_count=4, eos_id=256), 3) for p in range(4)]
  for step in range(3):
    joined = np.concatenate([parts[p][step]["inputs"] for p in range(4)])
    np.testing.assert_array_equal(joined, whole[step]["inputs"])


def test_eval_batches_fixed_and_bounded():
  t = _stream(5000)
  a = eval_batches(t, seq_len=32, batch_size=4, num_batches=100, eos_id=256)
  assert len(a) == (len(t) - 1) // 32 // 4  # as many full batches as fit
  np.testing.assert_array_equal(a[0]["inputs"][0], t[:32])
  with pytest.raises(DataError, match="validation split"):
    eval_batches(t[:50], seq_len=32, batch_size=4, num_batches=1)


def test_builtin_corpus_fingerprint_stable_and_split_disjoint(tmp_path):
  root, files = builtin_corpus_files()
  assert len(files) > 300 and "pydoc_data/topics.py" in files
  assert not any("/test/" in f or f.startswith("test/") for f in files)
  c1 = load_corpus("builtin", None, TOK, cache_dir=str(tmp_path))
  c2 = load_corpus("builtin", None, TOK, cache_dir=str(tmp_path))  # from the cache
  assert c1.fingerprint == c2.fingerprint
  np.testing.assert_array_equal(c1.val_tokens, c2.val_tokens)
  assert c1.num_files_val > 0 and c1.num_files_train > 10 * c1.num_files_val
  val = {f for f in files if is_validation(f, 5)}
  assert val and not val & (set(files) - val)


def test_val_split_is_stable_when_files_are_added():
  names = [f"pkg/mod{i}.py" for i in range(200)]
  before = {n for n in names if is_validation(n, 10)}
  after = {n for n in names + ["pkg/new.py"] if is_validation(n, 10)} - {"pkg/new.py"}
  assert before == after and 5 < len(before) < 40


def test_text_corpus_and_bad_data(tmp_path):
  d = tmp_path / "txt"
  d.mkdir()
  for i in range(30):
    (d / f"f{i}.txt").write_text(f"document {i}\n" * 50)
  c = load_corpus("text", str(d / "*.txt"), TOK, cache_dir=str(tmp_path / "cache"))
  assert c.train_tokens.size > 0 and c.val_tokens.size > 0
  with pytest.raises(DataError, match="nothing-here"):
    load_corpus("text", str(tmp_path / "nothing-here" / "*.txt"), TOK)
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(DataError, match="empty"):
    load_corpus("text", str(tmp_path / "empty.txt"), TOK, cache_dir=str(tmp_path / "cache"))
  with pytest.raises(DataError, match="builtin, text, tokens"):
    load_corpus("parquet", None, TOK)


def test_token_shards_header_raw_and_errors(tmp_path):
  toks = np.arange(1000, dtype=np.uint16) % 256
  header = np.zeros(256, np.int32)
  header[:3] = [20240520, 1, toks.size]
  train = tmp_path / "fw_train_000.bin"
  train.write_bytes(header.tobytes() + toks.tobytes())
  val = tmp_path / "fw_val_000.bin"
  val.write_bytes(toks[:300].tobytes())  # raw, headerless
  c = load_corpus("tokens", str(tmp_path / "fw_*.bin"), TOK)
  assert c.train_tokens.size == 1000 and c.val_tokens.size == 300
  bad = tmp_path / "trunc.bin"
  bad.write_bytes(header.tobytes() + toks[:-10].tobytes())
  with pytest.raises(DataError, match="trunc.bin"):
    load_corpus("tokens", str(bad), TOK)
  odd = tmp_path / "odd.bin"
  odd.write_bytes(b"\x01\x02\x03")
  with pytest.raises(DataError, match="odd.bin"):
    load_corpus("tokens", str(odd), TOK)
  big = tmp_path / "big.bin"
  big.write_bytes(np.array([5, 300, 7], np.uint16).tobytes())
  with pytest.raises(DataError, match="big.bin"):
    load_corpus("tokens", str(big), TOK)
