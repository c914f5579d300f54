"""effjax.data.prepare: every input format, shards equal the tokenizer's output, resume, errors."""

import gzip
import json
import os

import numpy as np
import pytest

from effjax.data import ByteTokenizer, DataError, load_corpus, load_tokenizer, read_token_shard
from effjax.data.prepare import PrepareArgs, main, prepare

TOK = ByteTokenizer()
EOS = TOK.eos_id
DOCS = [f"doc {i}: " + "héllo wörld " * (i % 7 + 1) for i in range(60)]


def _documents(out):
  """{(split): [doc token arrays]} read back from the shards of a prepared directory."""
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  docs = {}
  for split, info in manifest["splits"].items():
    if not info["shards"]:
      docs[split] = []
      continue
    stream = np.concatenate([read_token_shard(os.path.join(out, s["file"]), "uint16", 1 << 20)
                             for s in info["shards"]])
    assert stream[0] == manifest["settings"]["eos_id"]
    cuts = np.flatnonzero(stream == manifest["settings"]["eos_id"])
    docs[split] = [stream[a + 1:b] for a, b in zip(cuts, list(cuts[1:]) + [stream.size])]
  return manifest, docs


def _check_rows(out, texts, tokenizer):
  """Prepared shards hold exactly tokenizer.encode(text) for every row, each in one split."""
  manifest, docs = _documents(out)
  got = sorted(tuple(d.tolist()) for split in docs.values() for d in split)
  want = sorted(tuple(tokenizer.encode(t).tolist()) for t in texts)
  assert got == want
  assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(texts)
  assert manifest["tokens"] == sum(len(t) + 1 for t in want)
  return manifest


def _jsonl(path, texts, key="text", gz=False):
  data = "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(data)
  return str(path)


def _args(src, out, **kw):
  return PrepareArgs(source=str(src), out=str(out), shard_tokens=kw.pop("shard_tokens", 300),
                     val_percent=kw.pop("val_percent", 20), **kw)


def test_text_files_shards_equal_tokenizer_output(tmp_path):
  for i, t in enumerate(DOCS[:12]):
    (tmp_path / f"f{i:02d}.txt").write_text(t)
  prepare(_args(tmp_path / "*.txt", tmp_path / "out"), quiet=True)
  m = _check_rows(str(tmp_path / "out"), DOCS[:12], TOK)
  assert m["settings"]["dtype"] == "uint16" and len(m["fingerprint"]) == 64
  # every full shard holds exactly shard_tokens tokens (only the last of a split is short)
  for info in m["splits"].values():
    assert all(s["tokens"] == 300 for s in info["shards"][:-1])


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_and_gz_with_hf_tokenizer(tmp_path, gz):
  from tests.test_data import _train_hf
  _, tok_path = _train_hf(tmp_path)
  hf = load_tokenizer(tok_path)
  src = _jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), DOCS, gz=gz)
  prepare(_args(src, tmp_path / "out", tokenizer=tok_path), quiet=True)
  _check_rows(str(tmp_path / "out"), DOCS, hf)


def test_parquet_named_column(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  table = pa.table({"id": list(range(len(DOCS))), "body": DOCS})
  pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
  prepare(_args(tmp_path / "d.parquet", tmp_path / "out", text_column="body"), quiet=True)
  _check_rows(str(tmp_path / "out"), DOCS, TOK)
  with pytest.raises(DataError, match=r"d.parquet' row 0: no column 'text'.*body"):
    prepare(_args(tmp_path / "d.parquet", tmp_path / "out2"), quiet=True)


def test_hf_dataset_directory(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
  prepare(_args(tmp_path / "ds", tmp_path / "out"), quiet=True)
  _check_rows(str(tmp_path / "out"), DOCS, TOK)


def _source(tmp_path, fmt):
  if fmt == "jsonl":
    return _jsonl(tmp_path / "d.jsonl", DOCS)
  if fmt == "text":
    for i, t in enumerate(DOCS):
      (tmp_path / f"f{i:02d}.txt").write_text(t)
    return str(tmp_path / "*.txt")
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": DOCS[:30]}), tmp_path / "a.parquet", row_group_size=5)
  pq.write_table(pa.table({"text": DOCS[30:]}), tmp_path / "b.parquet", row_group_size=5)
  return str(tmp_path / "*.parquet")


@pytest.mark.parametrize("fmt", ["jsonl", "text", "parquet"])
def test_resume_after_interruption_is_identical_and_rerun_skips(tmp_path, fmt):
  """Resuming skips the consumed rows (whole files, parquet row groups, jsonl lines) and
  writes the same bytes as an uninterrupted run."""
  src = _source(tmp_path, fmt)
  full = prepare(_args(src, tmp_path / "full", batch_rows=4), quiet=True)
  with pytest.raises(KeyboardInterrupt):
    prepare(_args(src, tmp_path / "cut", batch_rows=4), quiet=True, _stop_after_shards=2)
  assert os.path.exists(tmp_path / "cut" / "progress.json")
  assert not os.path.exists(tmp_path / "cut" / "manifest.json")
  resumed = prepare(_args(src, tmp_path / "cut", batch_rows=4), quiet=True)
  assert resumed["fingerprint"] == full["fingerprint"]
  files = sorted(f for f in os.listdir(tmp_path / "full") if f.endswith(".bin"))
  assert files == sorted(f for f in os.listdir(tmp_path / "cut") if f.endswith(".bin"))
  for f in files:
    assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f
  assert not os.path.exists(tmp_path / "cut" / "progress.json")
  # a finished directory is skipped; other settings on it are refused
  mtime = os.path.getmtime(tmp_path / "cut" / files[0])
  assert prepare(_args(src, tmp_path / "cut", batch_rows=4), quiet=True) == resumed
  assert os.path.getmtime(tmp_path / "cut" / files[0]) == mtime
  with pytest.raises(DataError, match="other settings.*shard_tokens"):
    prepare(_args(src, tmp_path / "cut", shard_tokens=500), quiet=True)


def test_prepared_dir_trains_as_token_corpus(tmp_path):
  src = _jsonl(tmp_path / "d.jsonl", DOCS)
  prepare(_args(src, tmp_path / "out"), quiet=True)
  corpus = load_corpus("tokens", str(tmp_path / "out"), TOK)
  _, docs = _documents(str(tmp_path / "out"))
  assert corpus.train_tokens.size == sum(d.size + 1 for d in docs["train"])
  assert corpus.val_tokens.size == sum(d.size + 1 for d in docs["val"])
  from tests.test_data import _train_hf
  _, tok_path = _train_hf(tmp_path)
  with pytest.raises(DataError, match="prepared with tokenizer 'byte'"):
    load_corpus("tokens", str(tmp_path / "out"), load_tokenizer(tok_path))


def test_errors_name_file_and_row(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"text": "ok"}\n{"body": "x"}\n')
  with pytest.raises(DataError, match=r"bad.jsonl' row 1 \(line 2\): no column 'text'"):
    prepare(_args(bad, tmp_path / "o1"), quiet=True)
  bad.write_bytes(b'{"text": "ok"}\n{"text": ""}\n{"text": "z"}\n')
  with pytest.raises(DataError, match=r"bad.jsonl' row 1: empty text.*--skip_empty"):
    prepare(_args(bad, tmp_path / "o2"), quiet=True)
  m = prepare(_args(bad, tmp_path / "o3", skip_empty=True, val_percent=0), quiet=True)
  assert m["skipped_empty"] == 1 and m["splits"]["train"]["documents"] == 2
  bad.write_bytes(b'{"text": "ok"}\n{"text": "a\xff"}\n')
  with pytest.raises(DataError, match=r"bad.jsonl' row 1 \(line 2\): undecodable UTF-8"):
    prepare(_args(bad, tmp_path / "o4"), quiet=True)
  (tmp_path / "t.txt").write_bytes(b"abc\xfe\xff")
  with pytest.raises(DataError, match=r"t.txt' \(row 0\): undecodable UTF-8 bytes at byte 3"):
    prepare(_args(tmp_path / "t.txt", tmp_path / "o5"), quiet=True)
  # a vocabulary larger than uint16 when uint16 is asked
  from tokenizers import Tokenizer, models
  vocab = {f"t{i}": i for i in range(70000)}
  vocab["<|endoftext|>"] = 70000
  Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "big.json"))
  with pytest.raises(DataError, match=r"big.json' has 70001 ids.*--dtype=uint32"):
    prepare(_args(tmp_path / "t.txt", tmp_path / "o6", tokenizer=str(tmp_path / "big.json"),
                  dtype="uint16"), quiet=True)


def test_cli_exit_code_and_message(tmp_path, capsys):
  assert main([f"--source={tmp_path}/nothing*.jsonl", f"--out={tmp_path}/o", "--quiet"]) == 2
  assert "no file matches" in capsys.readouterr().err


def test_missing_optional_extra_says_what_to_install(tmp_path, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
  with pytest.raises(DataError, match=r"pip install -e '.\[data\]' \(installs datasets\)"):
    prepare(_args("hf:some/dataset", tmp_path / "o"), quiet=True)
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  (tmp_path / "x.parquet").write_bytes(b"PAR1")
  with pytest.raises(DataError, match=r"installs pyarrow\) to read parquet"):
    prepare(_args(tmp_path / "x.parquet", tmp_path / "o2"), quiet=True)
