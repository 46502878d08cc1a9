"""Data pipeline: text → clean → quality filters → dedup → classifier → token shards → loader → feed.

Stages stream documents and report what they kept and why they dropped the rest; see docs/data.md.
Nothing here imports the autograd engine except the classifier (imported lazily by the pipeline).
"""
from .sources import Document, SourceStats, MissingInputError, iter_documents, expand_paths
from .corpus import CorpusError, UnsafeArchiveError, iter_shakespeare, shakespeare_dir, safe_extract_texts, cache_dir
from .clean import clean_text, strip_gutenberg
from .filters import FilterConfig, FILTER_NAMES, check_document, document_stats
from .dedup import (MinHasher, shingle_hashes, exact_jaccard, estimated_jaccard, lsh_params, lsh_candidate_pairs,
                    near_duplicate_clusters, ExactDeduplicator, UnionFind)
from .shards import (ShardWriter, ShardError, write_shard, read_shard, read_header, write_token_shards,
                     SHARD_MAGIC, EOT)
from .loader import DataLoader, shard_paths
from .feed import Data, RandomWindows, ShardBatches, build_data, builtin_corpus_dir
from .pipeline import PipelineConfig, run_pipeline, format_report
from .classifier import QualityClassifier, train_classifier, load_labelled_jsonl   # engine imported only to train

__all__ = [
    "Document", "SourceStats", "MissingInputError", "iter_documents", "expand_paths",
    "CorpusError", "UnsafeArchiveError", "iter_shakespeare", "shakespeare_dir", "safe_extract_texts", "cache_dir",
    "clean_text", "strip_gutenberg", "FilterConfig", "FILTER_NAMES", "check_document", "document_stats",
    "MinHasher", "shingle_hashes", "exact_jaccard", "estimated_jaccard", "lsh_params", "lsh_candidate_pairs",
    "near_duplicate_clusters", "ExactDeduplicator", "UnionFind",
    "ShardWriter", "ShardError", "write_shard", "read_shard", "read_header", "write_token_shards",
    "SHARD_MAGIC", "EOT", "DataLoader", "shard_paths",
    "Data", "RandomWindows", "ShardBatches", "build_data", "builtin_corpus_dir", "PipelineConfig", "run_pipeline", "format_report",
    "QualityClassifier", "train_classifier", "load_labelled_jsonl",
]
