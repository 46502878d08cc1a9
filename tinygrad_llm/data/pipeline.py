"""The data pipeline: sources → clean → filters → exact dedup → near dedup → classifier → shards.

Every stage counts documents and UTF-8 bytes in and out and names why it dropped what it dropped;
`run_pipeline` returns (and writes as `report.json` next to the shards) one table of those counts.

Memory: documents stream through the per-document stages one at a time. Near-dedup has to see every
signature before it can decide, so pass 1 writes the survivors of the earlier stages to a temporary
JSONL spill file in the output directory and keeps only their (num_perm,) uint32 signatures in memory
(512 bytes per document at num_perm=128); pass 2 reads the spill back for the classifier and the
tokenizer. The spill is deleted at the end, also when the run fails.
"""
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .clean import CleanStats, clean_text
from .dedup import ExactDeduplicator, MinHasher, lsh_params, near_duplicate_clusters
from .filters import FilterConfig, check_document
from ..tokenizer import CharVocab
from .shards import EOT, write_token_shards
from .sources import SourceStats

REPORT_NAME = "report.json"
MAX_LISTED_GROUPS = 1000                 # duplicate groups listed by name in the report (all are counted)


@dataclass
class StageReport:
    """One row of the report table."""
    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    drops: Counter = field(default_factory=Counter)
    details: dict = field(default_factory=dict)

    def took(self, doc_bytes, kept, reason=None):
        self.docs_in += 1
        self.bytes_in += doc_bytes
        if kept:
            self.docs_out += 1
            self.bytes_out += doc_bytes
        else:
            self.drops[reason] += 1

    def as_dict(self):
        mb_per_s = self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else None
        return {"stage": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "dropped": dict(sorted(self.drops.items())),
                "seconds": round(self.seconds, 4), "mb_per_s": None if mb_per_s is None else round(mb_per_s, 2),
                **({"details": self.details} if self.details else {})}


@dataclass
class PipelineConfig:
    """What `prepare` runs. `filters=None` switches the rule-based filters off."""
    clean: bool = True
    strip_boilerplate: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.7
    near_action: str = "drop"            # "drop": keep one document per cluster; "keep": report only
    near_keep: str = "first"             # which one: "first" in input order or "longest"
    num_perm: int = 128
    shingle: str = "word"
    ngram: int = 3
    minhash_seed: int = 1
    classifier: str = None               # path of a saved QualityClassifier
    classifier_threshold: float = 0.5
    toxicity: str = None                 # a moderation policy TOML (tinygrad_llm.moderation): block or log
    val_fraction: float = 0.1
    split: str = "hash"
    shard_tokens: int = 10_000_000
    eot: bool = True                     # start every document with <|endoftext|>
    workers: int = 1
    prefix: str = "data"


class _Timer:
    def __init__(self, report):
        self.report = report

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.report.seconds += time.perf_counter() - self.t0


def _nbytes(text):
    return len(text.encode("utf-8"))


def _progress(total=None, desc="", enabled=True, unit="doc"):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def run_pipeline(documents, out_dir, tokenizer="char", config: PipelineConfig = None, source_stats: SourceStats = None,
                 progress=True):
    """Run every stage over `documents` (an iterable of Documents) and write shards into `out_dir`.

    `tokenizer`: "char" (build a CharVocab from the kept text, saved as out_dir/vocab.json), an object
    with encode_ordinary/vocab_size/special_tokens, or None (stop before tokenization). Returns the
    report dict (also written to out_dir/report.json, last, so its presence means the run finished)."""
    config = config or PipelineConfig()
    os.makedirs(out_dir, exist_ok=True)
    report_path = os.path.join(out_dir, REPORT_NAME)
    if os.path.exists(report_path):
        os.remove(report_path)                        # a stale report must not vouch for new shards
    spill_path = os.path.join(out_dir, f".{config.prefix}_spill.jsonl.tmp")
    stages = {n: StageReport(n) for n in ("read", "clean", "filters", "exact_dedup", "near_dedup", "classifier",
                                          "toxicity")}
    clean_stats = CleanStats()
    exact = ExactDeduplicator()
    hasher = None
    if config.near_dedup:
        hasher = MinHasher(config.num_perm, config.minhash_seed, config.shingle, config.ngram)
    signatures, ids, titles, sizes, exact_groups = [], [], [], [], {}
    pending, pending_chars = [], 0
    t_start = time.perf_counter()
    moderator = None
    if config.toxicity:                               # the server's moderation policy, as a document filter
        from ..moderation import Moderator
        moderator = Moderator.from_policy(config.toxicity)
        if moderator.blocklist_action == "redact":
            raise ValueError(f"{config.toxicity}: the pipeline drops or keeps documents; a redact action would "
                             f"rewrite them (use block or log)")
        stages["toxicity"].details = {"policy": config.toxicity, "blocklist": moderator.blocklist_action,
                                      "classifier": moderator.classifier_action, "flagged": 0}
    classifier = None
    if config.classifier:                             # load first: a bad path fails before any work
        from .classifier import QualityClassifier
        classifier = QualityClassifier.load(config.classifier)
        stages["classifier"].details = {"model": config.classifier, "threshold": config.classifier_threshold,
                                        "keep_label": classifier.keep_label}
    try:
        # ---- pass 1: per-document stages, spill the survivors ----------------------------------------
        bar = _progress(desc="clean/filter/dedup", enabled=progress)
        with open(spill_path, "w", encoding="utf-8") as spill:
            it = iter(documents)
            while True:
                with _Timer(stages["read"]):
                    doc = next(it, None)
                if doc is None:
                    break
                if bar is not None:
                    bar.update(1)
                raw_bytes = _nbytes(doc.text)
                stages["read"].took(raw_bytes, True)
                with _Timer(stages["clean"]):
                    text = doc.text
                    if config.clean:
                        text = clean_text(text, config.strip_boilerplate, stats=clean_stats)
                    stages["clean"].docs_in += 1
                    stages["clean"].bytes_in += raw_bytes
                    if text.strip():
                        stages["clean"].docs_out += 1
                        stages["clean"].bytes_out += _nbytes(text)
                    else:
                        stages["clean"].drops["empty_after_cleaning"] += 1
                        continue
                size = _nbytes(text)
                if config.filters is not None:
                    with _Timer(stages["filters"]):
                        reason = check_document(text, config.filters)
                        stages["filters"].took(size, reason is None, reason)
                    if reason is not None:
                        continue
                if config.exact_dedup:
                    with _Timer(stages["exact_dedup"]):
                        first = exact.check(text, doc.id)
                        stages["exact_dedup"].took(size, first is None, "duplicate_content")
                    if first is not None:
                        exact_groups.setdefault(first, []).append(doc.id)
                        continue
                if hasher is not None:                     # signatures are computed in batches of ~1 MB
                    pending.append(text)
                    pending_chars += len(text)
                    if pending_chars >= 1 << 20:
                        with _Timer(stages["near_dedup"]):
                            signatures.append(hasher.signatures(pending))
                        pending, pending_chars = [], 0
                ids.append(doc.id)
                titles.append(doc.meta.get("title"))
                sizes.append(size)
                spill.write(json.dumps({"id": doc.id, "text": text}, ensure_ascii=False) + "\n")
        if pending:
            with _Timer(stages["near_dedup"]):
                signatures.append(hasher.signatures(pending))
            pending = []
        if bar is not None:
            bar.close()

        # ---- near dedup over all signatures ----------------------------------------------------------
        near = stages["near_dedup"]
        keep = np.ones(len(ids), dtype=bool)
        if hasher is not None and ids:
            with _Timer(near):
                sig = np.concatenate(signatures)
                bands, rows = lsh_params(config.near_threshold, config.num_perm)
                priority = np.array(sizes) if config.near_keep == "longest" else None
                cluster_keep, clusters = near_duplicate_clusters(sig, config.near_threshold, bands, rows,
                                                                 priority=priority)
                if config.near_action == "drop":
                    keep = cluster_keep
            near.details = {"threshold": config.near_threshold, "num_perm": config.num_perm,
                            "shingles": f"{config.shingle} {config.ngram}-grams", "bands": bands, "rows": rows,
                            "action": config.near_action, "keep": config.near_keep, "clusters": len(clusters),
                            "documents_in_clusters": sum(map(len, clusters)),
                            "groups": [[{"id": ids[i], "title": titles[i], "kept": bool(keep[i])} for i in c]
                                       for c in clusters[:MAX_LISTED_GROUPS]]}
        signatures = None
        if config.exact_dedup:
            stages["exact_dedup"].details = {"groups": [[first] + dupes for first, dupes in
                                                        list(exact_groups.items())[:MAX_LISTED_GROUPS]]}

        # ---- pass 2: near-dedup decisions, classifier, vocabulary ------------------------------------
        final = np.zeros(len(ids), dtype=bool)
        chars, scores = set(), []
        with open(spill_path, encoding="utf-8") as spill:
            for i, line in enumerate(spill):
                text = json.loads(line)["text"]
                size = _nbytes(text)
                if hasher is not None:
                    near.took(size, bool(keep[i]), "near_duplicate")
                    if not keep[i]:
                        continue
                if classifier is not None:
                    with _Timer(stages["classifier"]):
                        score = float(classifier.predict_proba([text])[0])
                        scores.append(score)
                        ok = score >= config.classifier_threshold
                        stages["classifier"].took(size, ok, "below_threshold")
                    if not ok:
                        continue
                if moderator is not None:
                    with _Timer(stages["toxicity"]):
                        ok, reason, _ = moderator.filter_document(text)
                        stages["toxicity"].took(size, ok, reason)
                        stages["toxicity"].details["flagged"] += reason == "toxicity_flagged"
                    if not ok:
                        continue
                final[i] = True
                if isinstance(tokenizer, str):
                    chars.update(text)

        if scores:
            stages["classifier"].details["p_keep"] = {"min": round(min(scores), 4),
                                                      "median": round(float(np.median(scores)), 4),
                                                      "max": round(max(scores), 4)}

        # ---- pass 3: tokenization into shards ---------------------------------------------------------
        token_report = None
        if tokenizer is not None:
            if isinstance(tokenizer, str):
                if tokenizer != "char":
                    raise ValueError(f"unknown tokenizer {tokenizer!r}")
                tokenizer = CharVocab(sorted(chars), special_tokens=(EOT,) if config.eot else ())
                tokenizer.save(os.path.join(out_dir, "vocab.json"))
            t0 = time.perf_counter()

            def kept_texts():
                with open(spill_path, encoding="utf-8") as spill:
                    for i, line in enumerate(spill):
                        if final[i]:
                            yield json.loads(line)["text"]

            bar = _progress(total=int(final.sum()), desc="tokenize", enabled=progress)
            token_report = write_token_shards(kept_texts(), tokenizer, out_dir, config.prefix, config.val_fraction,
                                              config.split, config.shard_tokens, config.workers, bar, config.eot)
            if bar is not None:
                bar.close()
            seconds = time.perf_counter() - t0
            token_report.update(vocab_size=tokenizer.vocab_size, seconds=round(seconds, 4),
                                dtype="uint16" if tokenizer.vocab_size <= 65536 else "uint32",
                                workers=config.workers, split=config.split, val_fraction=config.val_fraction)
    finally:
        if os.path.exists(spill_path):
            os.remove(spill_path)

    rows = [stages["read"], stages["clean"]]
    if config.filters is not None:
        rows.append(stages["filters"])
    if config.exact_dedup:
        rows.append(stages["exact_dedup"])
    if config.near_dedup:
        rows.append(stages["near_dedup"])
    if config.classifier:
        rows.append(stages["classifier"])
    if config.toxicity:
        rows.append(stages["toxicity"])
    stages["clean"].details = {"gutenberg_stripped": clean_stats.gutenberg_stripped}
    if source_stats is not None:                      # files the readers skipped are the read stage's drops
        read = stages["read"]
        for reason in ("empty", "binary", "unreadable", "bad_json", "missing_field"):
            count = getattr(source_stats, reason)
            if count:
                read.drops[reason] += count
                read.docs_in += count
        read.bytes_in = max(read.bytes_in, source_stats.bytes_read)
    report = {
        "stages": [s.as_dict() for s in rows],
        "sources": source_stats.as_dict() if source_stats is not None else None,
        "kept_documents": int(final.sum()),
        "kept_bytes": int(sum(s.bytes_out for s in rows[-1:])),
        "tokens": token_report,
        "config": {k: (v.__dict__ if isinstance(v, FilterConfig) else v) for k, v in config.__dict__.items()},
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    if report["config"].get("filters"):
        report["config"]["filters"] = {"bounds": {k: list(v) for k, v in config.filters.bounds.items()},
                                       "disabled": sorted(config.filters.disabled)}
    with open(report_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False, default=str)
    os.replace(report_path + ".tmp", report_path)
    return report


def format_report(report) -> str:
    """The report's stage table as fixed-width text."""
    head = f"{'stage':<12} {'docs in':>8} {'docs out':>8} {'MB in':>9} {'MB out':>9} {'s':>7}  dropped"
    lines = [head, "-" * len(head)]
    for s in report["stages"]:
        drops = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"{s['stage']:<12} {s['docs_in']:>8} {s['docs_out']:>8} {s['bytes_in'] / 1e6:>9.3f} "
                     f"{s['bytes_out'] / 1e6:>9.3f} {s['seconds']:>7.2f}  {drops}")
    src = report.get("sources")
    if src:
        skipped = {k: src[k] for k in ("empty", "binary", "unreadable", "bad_json", "missing_field") if src.get(k)}
        lines.append(f"sources: {src['files']} files, {src['documents']} documents"
                     + (f"; skipped {', '.join(f'{k} {v}' for k, v in skipped.items())}" if skipped else "")
                     + (f"; invalid UTF-8 replaced in {src['invalid_utf8_docs']} documents "
                        f"({src['invalid_utf8_bytes']} sequences)" if src.get("invalid_utf8_docs") else ""))
    tok = report.get("tokens")
    if tok:
        lines.append(f"tokens: train {tok['train']['tokens']:,} in {len(tok['train']['shards'])} shard(s) "
                     f"({tok['train']['documents']} docs), val {tok['val']['tokens']:,} in "
                     f"{len(tok['val']['shards'])} shard(s) ({tok['val']['documents']} docs); "
                     f"vocab {tok['vocab_size']}, {tok['dtype']}")
    return "\n".join(lines)
