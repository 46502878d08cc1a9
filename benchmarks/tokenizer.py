"""Tokenizer benchmark: BPE training time and encode throughput, side by side with Hugging Face `tokenizers`
(training) and `tiktoken` (encoding with OUR ranks), when those happen to be installed.

    python benchmarks/tokenizer.py                          # tinyshakespeare repeated to ~7.9 MB, vocab 8192
    python benchmarks/tokenizer.py --corpus builtin         # the data pipeline's Shakespeare+Milton corpus
    python benchmarks/tokenizer.py --data my.txt --mb 20 --vocab 16384 --workers 2

What is measured (wall clock, time.perf_counter, the best of --repeat runs for ours and the baselines
alike; the machine may be shared, so read the ratios taken in the same run rather than absolute figures
across days):
    train          Tokenizer.train on the whole corpus (pre-token counting with --workers processes,
                   then the serial merge loop). HF: BpeTrainer with the same split regex, byte-level
                   alphabet and vocab size, using as many threads as it likes (all cores by default).
    encode cold    a fresh Tokenizer (empty pre-token cache) encodes the corpus once, in a fresh process
                   (spawned after training; --cold-in-this-process to time it after training in this one).
    encode warm    the same object encodes it again (every pre-token already cached).
    encode_batch   the corpus cut into 64 pieces at newline boundaries, encoded by --encode-workers processes.
    tiktoken       tiktoken.Encoding built from tok.mergeable_ranks() and tok.pattern, after a 100 kB warm-up,
                   timed right after our cold encode in each of the --repeat rounds (same load for both);
                   its ids are compared with ours on the whole corpus.

A repeated corpus has the vocabulary of one copy: both trainers count the same distinct pre-tokens, so
training time beyond counting does not grow with the repetitions, and the warm encode cache looks
better than it would on fresh text. The cold encode figure is the honest one.
"""
import argparse
import datetime
import multiprocessing
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinygrad_llm.tokenizer import PATTERNS, Tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


def load_documents(args):
    """List of texts totalling about args.mb megabytes (UTF-8), and a one-line description."""
    target = int(args.mb * 1e6)
    if args.corpus == "builtin":
        from tinygrad_llm.data.corpus import iter_shakespeare
        documents, size = [], 0
        for document in iter_shakespeare(download=True):
            documents.append(document.text)
            size += len(document.text.encode("utf-8"))
            if size >= target:
                break
        return documents, f"built-in Shakespeare+Milton corpus, first {len(documents)} documents"
    path = args.data or DEFAULT_DATA
    with open(path, encoding="utf-8") as file:
        text = file.read()
    copies = max(1, round(target / len(text.encode("utf-8"))))
    return [text * copies], f"{os.path.basename(path)} x{copies}"


def cut_at_newlines(text, pieces):
    """Cut text into about `pieces` parts, each cut just after a newline followed by a non-space
    character (where the built-in split patterns always end a pre-token, so ids do not change)."""
    parts, start, step = [], 0, max(1, len(text) // pieces)
    while start < len(text):
        cut = start + step
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        parts.append(text[start:cut])
        start = cut
    return parts


def _encode_all(tokenizer, documents):
    return [tokenizer.encode_ordinary(d) for d in documents]


def cold_encode_rounds(merges, pattern, documents, repeat, with_tiktoken):
    """Our cold encode and tiktoken's encode, one after the other in each of `repeat` rounds (so both see
    the same load on a shared machine). Returns (our best s, tiktoken best s or None, our ids, tiktoken's
    ids or None, tiktoken version or None)."""
    encoding = version = None
    if with_tiktoken:
        try:
            import tiktoken
            encoding = tiktoken.Encoding(name="ours", pat_str=pattern,
                                         mergeable_ranks=Tokenizer(merges, pattern).mergeable_ranks(),
                                         special_tokens={})
            encoding.encode_ordinary(documents[0][:100_000])
            version = tiktoken.__version__
        except ImportError:
            pass
    cold_s = tiktoken_s = float("inf")
    ours = theirs = None
    for _ in range(repeat):                 # a new Tokenizer each run: the pre-token cache starts empty
        fresh = Tokenizer(merges, pattern)
        start = time.perf_counter()
        ours = _encode_all(fresh, documents)
        cold_s = min(cold_s, time.perf_counter() - start)
        if encoding is not None:
            start = time.perf_counter()
            theirs = [encoding.encode_ordinary(d) for d in documents]
            tiktoken_s = min(tiktoken_s, time.perf_counter() - start)
    return cold_s, (tiktoken_s if encoding is not None else None), ours, theirs, version


def _cold_encode_rounds_star(args):
    return cold_encode_rounds(*args)


def machine_line():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import regex
    return (f"{cpu}, {usable} usable cores (nproc), Python {platform.python_version()}, numpy {np.__version__}, "
            f"regex {regex.__version__}")


def gpt2_byte_to_unicode():
    """GPT-2's reversible byte -> printable character table used by HF byte-level BPE: printable Latin-1
    bytes stand for themselves, the others are shifted to code points 256, 257, ... in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def train_hugging_face(documents, vocab_size, pattern):
    """Seconds to train HF byte-level BPE with our split regex, and its vocabulary as a set of bytes."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    start = time.perf_counter()
    hf.train_from_iterator(documents, trainer=trainer)
    seconds = time.perf_counter() - start
    to_byte = {char: byte for byte, char in gpt2_byte_to_unicode().items()}
    vocabulary = {bytes(to_byte[char] for char in token) for token in hf.get_vocab()}
    return seconds, vocabulary, tokenizers.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=["file", "builtin"], default="file")
    parser.add_argument("--data", help=f"text file for --corpus file (default {DEFAULT_DATA})")
    parser.add_argument("--mb", type=float, default=7.9, help="corpus size to aim for, in MB (default 7.9)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--pattern", default="gpt4", choices=sorted(PATTERNS))
    parser.add_argument("--workers", type=int, default=1, help="processes counting pre-tokens in training")
    parser.add_argument("--encode-workers", type=int, default=2, help="processes for encode_batch")
    parser.add_argument("--repeat", type=int, default=1, help="report the best of this many runs (default 1)")
    parser.add_argument("--no-baselines", action="store_true", help="skip tokenizers/tiktoken even if installed")
    parser.add_argument("--cold-in-this-process", action="store_true",
                        help="time the cold encode (and tiktoken) after training in this process, not in a fresh one")
    args = parser.parse_args()

    documents, description = load_documents(args)
    corpus_mb = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    rows = []     # (what, ours, baseline, ratio note)

    def best_of(function):
        """(smallest seconds over args.repeat runs, result of the last run)"""
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = function()
            best = min(best, time.perf_counter() - start)
        return best, result

    train_s, tok = best_of(lambda: Tokenizer.train(documents, args.vocab, pattern=args.pattern,
                                                   workers=args.workers, progress=False))
    # Cold encode and tiktoken, side by side (see cold_encode_rounds), in a fresh process: after the training
    # runs above our encode (millions of small Python objects) was up to a third slower in this process,
    # most likely from the heap they leave fragmented, while tiktoken's (Rust) did not change; a program
    # that loads a tokenizer and encodes does not carry that. --cold-in-this-process times it here instead.
    job = (tok.merges, tok.pattern, documents, args.repeat, not args.no_baselines)
    if args.cold_in_this_process:
        cold_s, tiktoken_s, ours, theirs, tiktoken_version = cold_encode_rounds(*job)
    else:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            cold_s, tiktoken_s, ours, theirs, tiktoken_version = pool.map(_cold_encode_rounds_star, [job])[0]
    warm = Tokenizer(tok.merges, tok.pattern)
    _encode_all(warm, documents)
    warm_s, ours_again = best_of(lambda: _encode_all(warm, documents))
    assert ours_again == ours
    pieces = [piece for d in documents for piece in cut_at_newlines(d, max(1, 64 // len(documents)))]
    batch_s, batch_ids = best_of(lambda: Tokenizer(tok.merges, tok.pattern).encode_batch(
        pieces, workers=args.encode_workers))
    batch_equal = [i for ids in batch_ids for i in ids] == [i for ids in ours for i in ids]
    decode_s, decoded = best_of(lambda: [warm.decode(ids) for ids in ours])
    n_tokens = sum(map(len, ours))
    assert decoded == documents, "decode(encode(corpus)) differs from the corpus"

    hf_note, tiktoken_note = "not installed", "not installed"
    hf_train_s = None
    if tiktoken_s is not None:
        tiktoken_note = f"tiktoken {tiktoken_version}; ids equal to ours on the whole corpus: {theirs == ours}"
    if not args.no_baselines:
        try:
            hf_runs = [train_hugging_face(documents, args.vocab, tok.pattern) for _ in range(args.repeat)]
            hf_train_s = min(seconds for seconds, _, _ in hf_runs)
            _, hf_vocab, hf_version = hf_runs[-1]
            shared = len(hf_vocab & set(tok.mergeable_ranks())) / len(hf_vocab)
            hf_note = f"tokenizers {hf_version}; {shared:.1%} of HF's vocabulary is in ours"
        except ImportError:
            pass

    def ratio(ours_value, theirs_value, higher_is_better):
        if theirs_value is None:
            return "-"
        value = ours_value / theirs_value
        return f"{value:.2f}x ({'ours/theirs' if higher_is_better else 'our time/theirs'})"

    def speed(seconds):
        return corpus_mb / seconds

    rows.append((f"train, vocab {args.vocab} (s)", f"{train_s:.2f}",
                 f"{hf_train_s:.2f} (HF tokenizers)" if hf_train_s else "-", ratio(train_s, hf_train_s, False)))
    rows.append(("encode cold (MB/s)", f"{speed(cold_s):.2f}",
                 f"{speed(tiktoken_s):.2f} (tiktoken, our ranks)" if tiktoken_s else "-",
                 ratio(speed(cold_s), speed(tiktoken_s) if tiktoken_s else None, True)))
    rows.append(("encode warm cache (MB/s)", f"{speed(warm_s):.2f}", "", ""))
    rows.append((f"encode_batch, {args.encode_workers} processes (MB/s)", f"{speed(batch_s):.2f}",
                 f"ids equal to encode: {batch_equal}", ""))
    rows.append(("decode (MB/s)", f"{speed(decode_s):.2f}", "", ""))

    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    print(f"command: {command}")
    print(f"machine: {machine_line()}")
    print(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"corpus:  {description}, {corpus_mb:.2f} MB, {n_tokens:,} tokens "
          f"({corpus_mb * 1e6 / n_tokens:.2f} bytes/token), pattern {args.pattern}, training workers {args.workers}, best of {args.repeat}")
    print(f"baselines: {hf_note}; {tiktoken_note}")
    print()
    header = ("measure", "tinygrad_llm", "baseline", "ratio")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |")


if __name__ == "__main__":
    main()
