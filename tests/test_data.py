"""Data: tokenizers, corpora, packing, determinism, resumable iterator, sharding, bad data."""

import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effjax.data import (ByteTokenizer, DataError, ShardInfo, builtin_corpus_files,
                         eval_batches, expand_paths, is_validation, load_corpus, load_tokenizer,
                         make_train_iterator, pack_windows)

TOK = ByteTokenizer()
EOS = TOK.eos_id


def _stream(n=20000, seed=0):
  rng = np.random.default_rng(seed)
  t = rng.integers(0, 256, n).astype(np.uint16)
  t[rng.choice(n, n // 300, replace=False)] = EOS
  return t


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _it(t, **kw):
  kw = {"seq_len": 32, "batch_size": 4, "seed": 0, "eos_id": EOS, **kw}
  return make_train_iterator(t, **kw)


# ---------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
  text = "def f(x):\n    return 'naïve ☃ 数 🙂'\n"
  ids = TOK.encode(text)
  assert ids.max() < 256 and ids.size == len(text.encode("utf-8"))
  assert TOK.decode(ids) == text
  # EOS and out-of-range ids are ignored; a cut multi-byte character is replaced
  assert TOK.decode(np.concatenate([[EOS], ids, [EOS, 999, -1]])) == text
  assert TOK.decode(TOK.encode("☃")[:2]) == "\ufffd"
  lengths = TOK.token_byte_lengths
  assert lengths.shape == (257,) and lengths[EOS] == 0 and lengths[:256].sum() == 256


def _train_hf(tmp_path, byte_level=True, specials=("<|endoftext|>",)):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  if byte_level:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = []
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                initial_alphabet=alphabet)
  tok.train_from_iterator(["the cat sat on the mat", "the dog sat on the log", "naïve ☃"] * 20,
                          trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return tok, path


def test_hf_tokenizer_round_trip_and_byte_lengths(tmp_path):
  tok, path = _train_hf(tmp_path)
  hf = load_tokenizer(path)
  assert hf.eos_id == tok.token_to_id("<|endoftext|>") and hf.vocab_size == tok.get_vocab_size()
  text = "the cat sat on the log, naïve ☃ 数"
  ids = hf.encode(text)
  assert ids.dtype == np.uint16 and hf.decode(ids) == text
  assert hf.decode(np.append(ids, [hf.eos_id, 10**6])) == text  # EOS / out of range dropped
  # a special token written in the text is plain text, never an EOS
  assert hf.eos_id not in hf.encode("a <|endoftext|> b")
  # byte-level BPE: exact byte count per token, including partial UTF-8 pieces
  lengths = hf.token_byte_lengths
  assert lengths.shape == (hf.vocab_size,) and lengths[hf.eos_id] == 0
  assert lengths[ids].sum() == len(text.encode("utf-8"))
  assert load_tokenizer(str(tmp_path)).eos_id == hf.eos_id  # a folder holding tokenizer.json


def test_hf_tokenizer_eos_and_missing_file_errors(tmp_path):
  _, path = _train_hf(tmp_path, byte_level=False, specials=("[UNK]", "</s>"))
  hf = load_tokenizer(path)
  assert hf.eos_token == "</s>"
  assert load_tokenizer(path, eos_token="[UNK]").eos_id == hf._tok.token_to_id("[UNK]")
  with pytest.raises(DataError, match="data.eos_token"):
    load_tokenizer(path, eos_token="<nope>")
  with pytest.raises(DataError, match=r"missing\.json.*'byte'"):
    load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(DataError, match="'byte'"):
    load_tokenizer("gpt2")


# ---------------------------------------------------------------------------- packing

def test_packing_shift_segments_positions():
  tokens = np.array([1, 2, 3, EOS, 4, 5, EOS, 6, 7, 8], np.uint16)
  b = pack_windows(tokens, np.array([0]), 9, EOS)
  np.testing.assert_array_equal(b["inputs"][0], tokens[:9])
  np.testing.assert_array_equal(b["targets"][0], tokens[1:10])
  # EOS opens the next document (its BOS): new segment id, position 0
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0, 1, 2, 0, 1, 2])
  assert all(v.dtype == np.int32 for v in b.values())
  b = pack_windows(tokens, np.array([0]), 9, None)  # no document structure
  np.testing.assert_array_equal(b["segment_ids"][0], np.ones(9))
  np.testing.assert_array_equal(b["positions"][0], np.arange(9))


def test_pipeline_rows_are_packed_stream_windows():
  t = _stream()
  for batch in _take(_it(t), 3):
    assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in batch.values())
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    for row, tgt in zip(batch["inputs"], batch["targets"]):
      starts = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(t, 32) == row).all(1))
      assert any(s % 32 == 0 and t[s + 32] == tgt[-1] for s in starts)
    seg, pos, inp = batch["segment_ids"], batch["positions"], batch["inputs"]
    np.testing.assert_array_equal(np.diff(seg, axis=1), (inp[:, 1:] == EOS).astype(int))
    np.testing.assert_array_equal(pos[:, 1:], np.where(inp[:, 1:] == EOS, 0, pos[:, :-1] + 1))


# ---------------------------------------------------------------------------- determinism

def test_shuffle_is_deterministic_and_seeded():
  t = _stream()
  a, b, c = (_take(_it(t, seed=s), 5) for s in (1, 1, 2))
  _assert_same(a, b)
  assert not all(np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_epoch_covers_every_window_once_and_reshuffles():
  t = np.arange(32 * 40 + 1, dtype=np.uint16)  # 40 windows whose first token names them
  first = lambda bs: np.concatenate([b["inputs"][:, 0] for b in bs]) // 32
  one = _take(_it(t, batch_size=8, num_epochs=1), 5)
  assert sorted(first(one)) == list(range(40))
  with pytest.raises(StopIteration):
    _take(_it(t, batch_size=8, num_epochs=1), 6)
  two = first(_take(_it(t, batch_size=8), 10))
  assert sorted(two[40:]) == list(range(40)) and not np.array_equal(two[:40], two[40:])


def test_iterator_state_round_trip_direct_and_through_orbax(tmp_path):
  t = _stream()
  it = _it(t)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  it2 = _it(t)
  it2.set_state(state)
  _assert_same(expected, _take(it2, 4))
  # through an Orbax CheckpointManager, as the trainer saves it
  it3 = _it(t)
  _take(it3, 3)
  mngr = ocp.CheckpointManager(str(tmp_path / "ck"), item_names=("data",))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it3)))
  mngr.wait_until_finished()
  it4 = _it(t)
  next(it4)  # the restore must override whatever position it4 had
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it4)))
  _assert_same(expected, _take(it4, 4))
  mngr.close()


def test_process_slices_union_equals_global_batch():
  t = _stream()
  whole = _take(_it(t, batch_size=8, seed=3), 3)
  parts = [_take(_it(t, batch_size=2, seed=3, process_index=p, process_count=4), 3)
           for p in range(4)]
  for step in range(3):
    for k in whole[step]:
      joined = np.concatenate([parts[p][step][k] for p in range(4)])
      np.testing.assert_array_equal(joined, whole[step][k])
  ev = eval_batches(t, seq_len=32, batch_size=8, num_batches=2, eos_id=EOS)
  ev_parts = [eval_batches(t, seq_len=32, batch_size=4, num_batches=2, process_index=p,
                           process_count=2, eos_id=EOS) for p in range(2)]
  for i in range(2):
    np.testing.assert_array_equal(
        np.concatenate([ev_parts[0][i]["inputs"], ev_parts[1][i]["inputs"]]), ev[i]["inputs"])
  with pytest.raises(DataError, match="process_index"):
    ShardInfo(process_index=2, process_count=2)


def test_eval_batches_fixed_and_bounded():
  t = _stream(5000)
  a = eval_batches(t, seq_len=32, batch_size=4, num_batches=100, eos_id=EOS)
  assert len(a) == (len(t) - 1) // 32 // 4  # as many full batches as fit
  rows = np.concatenate([b["inputs"] for b in a])
  np.testing.assert_array_equal(rows.reshape(-1), t[:rows.size])  # in order, no overlap
  _assert_same(a[:2], eval_batches(t, seq_len=32, batch_size=4, num_batches=2, eos_id=EOS))
  with pytest.raises(DataError, match="129"):  # 4 x 32 + 1 tokens needed
    eval_batches(t[:50], seq_len=32, batch_size=4, num_batches=1)
  with pytest.raises(DataError, match="training split"):
    _it(t[:100])


# ---------------------------------------------------------------------------- corpora

def test_builtin_corpus_fingerprint_stable_and_split_disjoint(tmp_path):
  files = builtin_corpus_files()
  assert len(files) > 300 and "pydoc_data/topics.py" in files and files == sorted(files)
  assert not any(p in ("test", "tests", "site-packages", "idlelib")
                 for f in files for p in f.split("/")[:-1])
  c1 = load_corpus("builtin", None, TOK, cache_dir=str(tmp_path))
  c2 = load_corpus("builtin", None, TOK, cache_dir=str(tmp_path))  # from the cache
  assert len(os.listdir(tmp_path)) == 2
  assert c1.fingerprint == c2.fingerprint and len(c1.fingerprint) == 64
  np.testing.assert_array_equal(c1.train_tokens, c2.train_tokens)
  np.testing.assert_array_equal(c1.val_tokens, c2.val_tokens)
  val = {f for f in files if is_validation(f, 5)}
  assert c1.num_files_val == len(val) > 0 and c1.num_files_train == len(files) - len(val)
  assert c1.num_files_train > 10 * c1.num_files_val
  assert c1.train_tokens.dtype == np.uint16
  # byte tokenizer: tokens = bytes + one EOS between files
  assert c1.train_tokens.size == c1.num_bytes_train + c1.num_files_train - 1
  assert c1.val_tokens.size == c1.num_bytes_val + c1.num_files_val - 1


def _write_docs(d, n, prefix="f"):
  d.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    (d / f"{prefix}{i}.txt").write_text(f"document {prefix}{i}\n" * 20)


def test_val_split_is_stable_when_files_are_added(tmp_path):
  names = [f"pkg/mod{i}.py" for i in range(200)]
  before = {n for n in names if is_validation(n, 10)}
  after = {n for n in names + ["pkg/new.py"] if is_validation(n, 10)} - {"pkg/new.py"}
  assert before == after and 5 < len(before) < 40
  # relative names come from each pattern's own root: adding files elsewhere keeps them
  _write_docs(tmp_path / "a", 30)
  _write_docs(tmp_path / "other" / "deep", 3, prefix="g")
  one = dict(expand_paths(str(tmp_path / "a" / "*.txt")))
  both = dict(expand_paths(f"{tmp_path}/a/*.txt, {tmp_path}/other/**/*.txt"))
  assert set(one) <= set(both) and "f3.txt" in one and "deep/g0.txt" in both
  c1 = load_corpus("text", str(tmp_path / "a" / "*.txt"), TOK, val_percent=20,
                   cache_dir=str(tmp_path / "cache"))
  val_files = [n for n in one if is_validation(n, 20)]
  assert c1.num_files_val == len(val_files) > 0
  assert c1.num_bytes_val == sum(os.path.getsize(one[n]) for n in val_files)


def test_text_corpus_single_file_splits_at_line_and_caches(tmp_path):
  f = tmp_path / "one.txt"
  f.write_text("".join(f"line {i} naïve\n" for i in range(400)))
  c = load_corpus("text", str(f), TOK, val_percent=10, cache_dir=str(tmp_path / "c"))
  data = f.read_bytes()
  assert c.num_bytes_train + c.num_bytes_val == len(data) and c.num_bytes_val > 0
  assert TOK.decode(c.train_tokens) + TOK.decode(c.val_tokens) == data.decode()
  assert TOK.decode(c.val_tokens).startswith("line ")  # cut at a line boundary
  assert abs(c.num_bytes_val / len(data) - 0.10) < 0.01
  # second load reads the cache; a corrupt cache file is rebuilt
  for name in os.listdir(tmp_path / "c"):
    (tmp_path / "c" / name).write_bytes(b"garbage")
  c2 = load_corpus("text", str(f), TOK, val_percent=10, cache_dir=str(tmp_path / "c"))
  np.testing.assert_array_equal(c.train_tokens, c2.train_tokens)
  assert c2.fingerprint == c.fingerprint
  c3 = load_corpus("text", str(f), TOK, val_percent=20, cache_dir=str(tmp_path / "c"))
  assert c3.val_tokens.size > c.val_tokens.size  # the cache key includes val_percent


def test_text_corpus_with_hf_tokenizer(tmp_path):
  _, path = _train_hf(tmp_path)
  hf = load_tokenizer(path)
  _write_docs(tmp_path / "docs", 12)
  c = load_corpus("text", str(tmp_path / "docs" / "*.txt"), hf, cache_dir=str(tmp_path / "c"))
  assert c.train_tokens.max() < hf.vocab_size and (c.train_tokens == hf.eos_id).any()
  text = hf.decode(c.train_tokens) + hf.decode(c.val_tokens)
  assert text.count("document f3\n") == 20


def test_text_corpus_bad_data(tmp_path):
  with pytest.raises(DataError, match="nothing-here"):
    load_corpus("text", str(tmp_path / "nothing-here" / "*.txt"), TOK)
  with pytest.raises(DataError, match="absent.txt"):
    load_corpus("text", f"{tmp_path}/absent.txt", TOK)
  with pytest.raises(DataError, match="directory"):
    load_corpus("text", str(tmp_path), TOK)
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(DataError, match="empty.*empty.txt"):
    load_corpus("text", str(tmp_path / "empty.txt"), TOK, cache_dir=str(tmp_path / "cache"))
  with pytest.raises(DataError, match="builtin, text, tokens"):
    load_corpus("parquet", None, TOK)
  with pytest.raises(DataError, match="data.paths"):
    load_corpus("text", "", TOK)


def _shard(path, toks, magic=20240520, dtype=np.uint16, count=None):
  header = np.zeros(256, np.int32)
  header[:3] = [magic, 1 if dtype == np.uint16 else 7, len(toks) if count is None else count]
  path.write_bytes(header.tobytes() + np.asarray(toks, dtype).tobytes())


def test_token_shards_header_raw_and_val_selection(tmp_path):
  toks = (np.arange(1000) % 256).astype(np.uint16)
  toks[::100] = EOS
  _shard(tmp_path / "fw_train_000.bin", toks)
  _shard(tmp_path / "fw_train_001.bin", toks[:500], magic=20240801, dtype=np.uint32)
  (tmp_path / "fw_val_000.bin").write_bytes(toks[:300].tobytes())  # raw, headerless
  c = load_corpus("tokens", str(tmp_path / "fw_*.bin"), TOK)
  np.testing.assert_array_equal(c.train_tokens, np.concatenate([toks, toks[:500]]))  # as is
  np.testing.assert_array_equal(c.val_tokens, toks[:300])
  assert (c.num_files_train, c.num_files_val) == (2, 1)
  assert c.num_bytes_val == int((toks[:300] != EOS).sum())
  assert load_corpus("tokens", str(tmp_path / "fw_*.bin"), TOK).fingerprint == c.fingerprint
  # no "val" file: the last one is validation; a single file: its tail
  c = load_corpus("tokens", str(tmp_path / "fw_train_*.bin"), TOK)
  assert c.train_tokens.size == 1000 and c.val_tokens.size == 500
  c = load_corpus("tokens", str(tmp_path / "fw_train_000.bin"), TOK, val_percent=10)
  assert c.train_tokens.size == 900 and c.val_tokens[0] == EOS  # cut at a document start
  np.testing.assert_array_equal(np.concatenate([c.train_tokens, c.val_tokens]), toks)


def test_token_shards_bad_data(tmp_path):
  toks = (np.arange(1000) % 256).astype(np.uint16)
  _shard(tmp_path / "trunc.bin", toks[:-10], count=1000)
  with pytest.raises(DataError, match="truncated shard.*trunc.bin"):
    load_corpus("tokens", str(tmp_path / "trunc.bin"), TOK)
  (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
  with pytest.raises(DataError, match="odd.bin.*multiple"):
    load_corpus("tokens", str(tmp_path / "odd.bin"), TOK)
  (tmp_path / "big.bin").write_bytes(np.array([5, 300, 7], np.uint16).tobytes())
  with pytest.raises(DataError, match="300.*big.bin"):
    load_corpus("tokens", str(tmp_path / "big.bin"), TOK)
  (tmp_path / "zero.bin").write_bytes(b"")
  with pytest.raises(DataError, match="zero.bin.*empty"):
    load_corpus("tokens", str(tmp_path / "zero.bin"), TOK)
  with pytest.raises(DataError, match=r"shard_\*.bin"):
    load_corpus("tokens", str(tmp_path / "shard_*.bin"), TOK)
  with pytest.raises(DataError, match="token_dtype"):
    load_corpus("tokens", str(tmp_path / "big.bin"), TOK, token_dtype="int8")
