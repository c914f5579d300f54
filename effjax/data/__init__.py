"""Data: corpora (built-in, text, token shards), tokenizers, and the grain pipeline.

  tok = load_tokenizer("byte")
  corpus = load_corpus("builtin", None, tok)
  it = make_train_iterator(corpus.train_tokens, seq_len=256, batch_size=16, seed=0,
                           eos_id=tok.eos_id)
  batch = next(it)  # {"inputs", "targets", "segment_ids", "positions"}: int32 [16, 256]
"""
from effjax.data.corpus import (CORPUS_CHOICES, Corpus, builtin_corpus_files,
                                builtin_corpus_root, expand_paths, is_validation, load_corpus,
                                read_token_shard)
from effjax.data.errors import DataError
from effjax.data.mixture import (Mixture, load_mixture, make_data_iterator, make_mixture_iterator,
                                 mixed_eval_row,
                                 mixture_eval_batches,
                                 parse_sources, token_counts)
from effjax.data.pipeline import (ShardInfo, WindowSource, eval_batches, make_train_dataset,
                                  make_train_iterator, pack, pack_windows)
from effjax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["CORPUS_CHOICES", "ByteTokenizer", "Corpus", "DataError", "HFTokenizer", "Mixture",
           "ShardInfo", "load_mixture", "make_data_iterator", "make_mixture_iterator", "mixed_eval_row", "mixture_eval_batches",
           "parse_sources", "token_counts",
           "WindowSource", "builtin_corpus_files", "builtin_corpus_root", "eval_batches",
           "expand_paths", "is_validation", "load_corpus", "load_tokenizer",
           "make_train_dataset", "make_train_iterator", "pack", "pack_windows",
           "read_token_shard"]
