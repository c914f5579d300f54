"""Data: corpora (built-in, text, token shards), tokenizers, and the grain pipeline."""
from effjax.data.corpus import Corpus, builtin_corpus_files, load_corpus, read_token_shard
from effjax.data.errors import DataError
from effjax.data.pipeline import eval_batches, make_train_iterator, pack_windows
from effjax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "Corpus", "DataError", "HFTokenizer", "builtin_corpus_files",
           "eval_batches", "load_corpus", "load_tokenizer", "make_train_iterator",
           "pack_windows", "read_token_shard"]
