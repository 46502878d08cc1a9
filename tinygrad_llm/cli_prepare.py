"""`tinygrad-llm prepare` and `tinygrad-llm train-classifier`: the data pipeline's command line.

tinygrad_llm/cli.py wires these in with `add_prepare_parser(subparsers)` / `add_classifier_parser(...)`
and dispatches to `run_prepare(args)` / `run_train_classifier(args)`; `python -m tinygrad_llm.cli_prepare`
runs them standalone. Exit codes: 0 done, 1 the run produced nothing usable, 2 bad input (missing path,
unknown option value, corpus unavailable), 130 interrupted (no shard or report of the run is left behind).
"""
import argparse
import os
import sys


def _filter_bound(spec):
    name, sep, bounds = spec.partition("=")
    low, sep2, high = bounds.partition(":")
    if not sep or not sep2:
        raise argparse.ArgumentTypeError(f"expected NAME=LOW:HIGH, got {spec!r}")
    try:
        return name, (float(low) if low else float("-inf"), float(high) if high else float("inf"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bounds must be numbers: {spec!r}") from None


def add_prepare_parser(subparsers):
    p = subparsers.add_parser(
        "prepare", help="clean, filter, deduplicate, classify and tokenize text into llm.c shards",
        description="Run the data pipeline over text files/directories/JSONL (or the built-in corpus) and "
                    "write <out>/<prefix>_{train,val}_NNNNNN.bin shards, <out>/report.json and, for the "
                    "character tokenizer, <out>/vocab.json.")
    src = p.add_argument_group("input")
    src.add_argument("inputs", nargs="*",
                     help="text files, directories (recursive *.txt, *.md, *.jsonl) or JSONL files")
    src.add_argument("--corpus", choices=["shakespeare"],
                     help="use the built-in corpus (downloaded once into the cache)")
    src.add_argument("--offline", action="store_true", help="never download; fail if the built-in corpus is not cached")
    src.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output directory for shards and report.json")
    out.add_argument("--prefix", default=None, help="shard name prefix (default: the corpus name or 'data')")
    out.add_argument("--tokenizer", default="char",
                     help="'char' (character vocabulary built from the kept text), a CharVocab vocab.json, or a "
                          "saved tinygrad_llm Tokenizer file (default: char)")
    out.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for validation (default 0.1)")
    out.add_argument("--split", choices=["hash", "tail"], default="hash",
                     help="hash: whole documents by content hash; tail: last fraction of every document "
                          "(the classic single-file char benchmark)")
    out.add_argument("--no-eot", action="store_true",
                     help="do not start documents with <|endoftext|> (and leave it out of a char vocabulary): "
                          "nanoGPT's 65-character shakespeare_char setup")
    out.add_argument("--shard-tokens", type=int, default=10_000_000, help="tokens per shard (default 1e7)")
    out.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                     help="tokenizer processes (default: min(4, CPUs))")
    st = p.add_argument_group("stages")
    st.add_argument("--no-clean", action="store_true", help="skip cleaning (NFC, whitespace, boilerplate)")
    st.add_argument("--keep-boilerplate", action="store_true", help="keep Project Gutenberg headers/licences")
    st.add_argument("--no-filters", action="store_true", help="skip the rule-based quality filters")
    st.add_argument("--disable-filter", action="append", default=[], metavar="NAME",
                    help="switch one filter off (repeatable)")
    st.add_argument("--filter", action="append", default=[], type=_filter_bound, metavar="NAME=LOW:HIGH",
                    help="override one filter's bounds, e.g. word_count=20:  (repeatable)")
    st.add_argument("--no-exact-dedup", action="store_true", help="skip exact (content hash) dedup")
    st.add_argument("--no-near-dedup", action="store_true", help="skip MinHash/LSH near-duplicate dedup")
    st.add_argument("--near-threshold", type=float, default=None,
                    help="Jaccard threshold for near duplicates (default 0.7; 0.1 for --corpus shakespeare, whose "
                         "modern/First Folio editions of a play have word-3-gram Jaccard 0.23-0.33 and "
                         "different plays at most 0.02)")
    st.add_argument("--near-action", choices=["drop", "keep"], default="drop",
                    help="drop: keep one document per near-duplicate cluster; keep: only report the clusters")
    st.add_argument("--near-keep", choices=["first", "longest"], default="first",
                    help="with --near-action drop, which document of a cluster stays: the first in input order "
                         "(for the built-in corpus, the modern edition) or the longest")
    st.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    st.add_argument("--shingle", choices=["word", "char"], default="word", help="shingle unit (default word)")
    st.add_argument("--ngram", type=int, default=3, help="shingle n-gram length (default 3)")
    st.add_argument("--classifier", default=None, help="a model saved by train-classifier (path prefix or .json)")
    st.add_argument("--toxicity", default=None, metavar="POLICY.toml",
                    help="drop (block) or count (log) documents by a moderation policy (docs/serving.md)")
    st.add_argument("--classifier-threshold", type=float, default=0.5,
                    help="keep documents whose probability of the keep label is at least this (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_prepare)
    return p


def run_prepare(args) -> int:
    from .data.corpus import CorpusError, iter_shakespeare
    from .data.filters import FilterConfig
    from .data.pipeline import PipelineConfig, format_report, run_pipeline
    from .tokenizer import load_tokenizer
    from .data.sources import MissingInputError, SourceStats, expand_paths, iter_documents

    def fail(message, code=2):
        print(f"prepare: error: {message}", file=sys.stderr)
        return code

    if not args.inputs and not args.corpus:
        return fail("give input paths or --corpus shakespeare")
    if not 0.0 <= args.val_fraction < 1.0:
        return fail("--val-fraction must be in [0, 1)")
    threshold = args.near_threshold if args.near_threshold is not None else (0.1 if args.corpus else 0.7)
    if not 0.0 < threshold < 1.0:
        return fail("--near-threshold must be in (0, 1)")
    try:
        files = expand_paths(args.inputs) if args.inputs else []
    except MissingInputError as e:
        return fail(str(e))
    if args.inputs and not files:
        return fail(f"no *.txt, *.md or *.jsonl files under {', '.join(args.inputs)}")
    try:
        tokenizer = "char" if args.tokenizer == "char" else load_tokenizer(args.tokenizer)
        bounds = dict(args.filter)
        filters = None if args.no_filters else FilterConfig(bounds=bounds, disabled=set(args.disable_filter))
    except (FileNotFoundError, ValueError, ImportError) as e:
        return fail(str(e))
    config = PipelineConfig(
        clean=not args.no_clean, strip_boilerplate=not args.keep_boilerplate, filters=filters,
        exact_dedup=not args.no_exact_dedup, near_dedup=not args.no_near_dedup, near_threshold=threshold,
        near_action=args.near_action, near_keep=args.near_keep, num_perm=args.num_perm, shingle=args.shingle,
        ngram=args.ngram,
        classifier=args.classifier, classifier_threshold=args.classifier_threshold, toxicity=args.toxicity,
        val_fraction=args.val_fraction, split=args.split, shard_tokens=args.shard_tokens, eot=not args.no_eot,
        workers=max(1, args.workers), prefix=args.prefix or (args.corpus or "data"))
    stats = SourceStats()

    def documents():
        if args.corpus:
            yield from iter_shakespeare(stats=stats, download=not args.offline)
        if files:
            yield from iter_documents(files, stats, args.text_field)

    if args.classifier:
        prefix = args.classifier[:-5] if args.classifier.endswith(".json") else args.classifier
        if not os.path.exists(prefix + ".json"):
            return fail(f"classifier {prefix}.json not found (train one with `train-classifier`)")
    try:
        report = run_pipeline(documents(), args.out, tokenizer, config, stats, progress=not args.no_progress)
    except CorpusError as e:
        return fail(str(e))
    except (OSError, ValueError) as e:                 # unreadable classifier, output dir not writable, ...
        return fail(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        print("prepare: interrupted; no shards or report from this run were kept", file=sys.stderr)
        return 130
    print(format_report(report))
    for path, reason in stats.skipped[:10]:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    near = next((s for s in report["stages"] if s["stage"] == "near_dedup"), None)
    if near and near.get("details", {}).get("clusters"):
        d = near["details"]
        print(f"near_dedup: {d['clusters']} clusters ({d['documents_in_clusters']} documents) at Jaccard >= "
              f"{d['threshold']} ({d['bands']} bands x {d['rows']} rows), action {d['action']}")
    print(f"report: {os.path.join(args.out, 'report.json')}")
    if report["kept_documents"] == 0:
        return fail("no document survived the pipeline; see the report for why", code=1)
    if report["tokens"] and report["tokens"]["train"]["tokens"] == 0:
        return fail("no training tokens were written", code=1)
    if report["tokens"] and args.val_fraction > 0 and report["tokens"]["val"]["tokens"] == 0:
        print("prepare: warning: the validation split is empty (too few documents for --split hash); "
              "--split tail takes the last fraction of every document instead", file=sys.stderr)
    return 0


def add_classifier_parser(subparsers):
    p = subparsers.add_parser(
        "train-classifier", help="train the linear hashed-n-gram quality/toxicity classifier on labelled JSONL",
        description="Train a fastText-like linear classifier (hashed word n-grams, tinygrad_llm autograd) on "
                    "JSONL records with a text and a label field; saves <out>.safetensors and <out>.json.")
    p.add_argument("data", help="labelled JSONL file")
    p.add_argument("--out", required=True, help="output path prefix (writes <out>.safetensors and <out>.json)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--keep-label", default=None,
                   help="the label of documents to keep (default: 1, good, keep, clean or ok if present)")
    p.add_argument("--buckets", type=int, default=1 << 18, help="hash buckets (default 2^18)")
    p.add_argument("--ngrams", type=int, default=2, help="word n-grams up to this length (default 2)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate, decayed linearly to 0 (default 0.1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share for the reported accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_train_classifier)
    return p


def run_train_classifier(args) -> int:
    from .data.classifier import load_labelled_jsonl, train_classifier
    if not os.path.exists(args.data):
        print(f"train-classifier: error: {args.data} not found", file=sys.stderr)
        return 2
    try:
        texts, labels = load_labelled_jsonl(args.data, args.text_field, args.label_field)
        model, metrics = train_classifier(texts, labels, keep_label=args.keep_label, buckets=args.buckets,
                                          ngrams=args.ngrams, epochs=args.epochs, lr=args.lr,
                                          batch_size=args.batch_size, val_fraction=args.val_fraction,
                                          seed=args.seed, log=print)
    except ValueError as e:
        print(f"train-classifier: error: {e}", file=sys.stderr)
        return 2
    paths = model.save(args.out)
    print(f"train accuracy {metrics['train_accuracy']:.3f}, val accuracy {metrics['val_accuracy']:.3f} "
          f"({metrics['val_examples']} held out); saved {', '.join(paths)}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinygrad_llm.cli_prepare")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(sub)
    add_classifier_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
