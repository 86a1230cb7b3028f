"""Corpora and calibration windows: the GPTQ protocol reproduced on small fixtures, the bundled
wiki-offline corpus, caching, and one HaqError (naming the path) per kind of bad input."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from haq.data import wiki_offline
from haq.data import windows as windows_module
from haq.data.sources import dataset_identity
from haq.data.windows import calib_windows, eval_windows
from haq.errors import HaqError

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
HAS_PANDAS = importlib.util.find_spec("pandas") is not None
HAS_DATASETS = importlib.util.find_spec("datasets") is not None
C4_VAL = "c4-validation.00000-of-00008.json.gz"
C4_TRAIN = "c4-train.00000-of-01024.json.gz"


def char_tokenizer(reverse: bool = False) -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII, newline, tab; [UNK] otherwise): counts are exact."""
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    if reverse:
        chars.reverse()
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")


def ids(tok, text: str) -> list[int]:
    return tok(text, verbose=False)["input_ids"]


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 7))) for _ in range(n))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("HAQ_WIKITEXT2", raising=False)
    monkeypatch.delenv("HAQ_C4", raising=False)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


# ---------------------------------------------------------------------------------------------
# GPTQ references, transcribed from IST-DASLab/gptq datautils.py (random.seed(s) + random.randint
# draw the same numbers as random.Random(s).randint).


def hf_wikitext_rows(path) -> list[str]:
    """The HF wikitext loading script: one row per line, newline kept, blank lines as ""."""
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def gptq_stream_eval(enc: list[int], seqlen: int) -> torch.Tensor:
    nsamples = len(enc) // seqlen
    return torch.tensor([enc[i * seqlen : (i + 1) * seqlen] for i in range(nsamples)])


def gptq_stream_calib(enc: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, len(enc) - seqlen - 1)
        out.append(enc[i : i + seqlen])
    return torch.tensor(out)


def gptq_c4(docs: list[str], tok, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's loop verbatim, `>=` included (fixtures have no doc of exactly seqlen tokens, where
    GPTQ's randint(0, -1) would crash)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        while True:
            i = rng.randint(0, len(docs) - 1)
            tmp = ids(tok, docs[i])
            if len(tmp) >= seqlen:
                break
        i = rng.randint(0, len(tmp) - seqlen - 1)
        out.append(tmp[i : i + seqlen])
    return torch.tensor(out)


# ---------------------------------------------------------------------------------------------
# Fixtures on disk

WT2_TEST = " \n = Alpha = \n \n The alpha text is here .\n More alpha @-@ text .\n \n = = Beta = = \n \n Beta line .\n"


def write_wikitext2(folder, test: str = WT2_TEST, train: str | None = None, names=("wiki.test.raw", "wiki.train.raw")):
    folder.mkdir(parents=True, exist_ok=True)
    train = train if train is not None else " \n = Train = \n \n" + "".join(f" {words(random.Random(k), 12)} .\n" for k in range(40))
    (folder / names[0]).write_text(test * 20, encoding="utf-8")
    (folder / names[1]).write_text(train, encoding="utf-8")
    return folder


def c4_docs(seed: int, n: int, seqlen: int) -> list[str]:
    """Docs of 5..3*seqlen characters, none of exactly seqlen (GPTQ's crash case)."""
    rng = random.Random(seed)
    docs = []
    while len(docs) < n:
        text = words(rng, rng.randint(1, 3 * seqlen // 4))[: 3 * seqlen]
        if len(text) != seqlen:
            docs.append(text)
    return docs


def write_jsonl_gz(path, texts) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25", "url": "http://x"}) + "\n")


@pytest.fixture
def c4_dir(tmp_path):
    folder = tmp_path / "c4"
    folder.mkdir()
    write_jsonl_gz(folder / C4_VAL, c4_docs(1, 60, 32))
    write_jsonl_gz(folder / C4_TRAIN, c4_docs(2, 80, 32))
    return folder


# ---------------------------------------------------------------------------------------------
# wiki-offline


def test_wiki_offline_splits_disjoint_deterministic_and_92_4_4():
    splits = {s: wiki_offline.documents(s) for s in ("train", "valid", "test")}
    titles = {s: {d.split("\n", 1)[0] for d in docs} for s, docs in splits.items()}
    assert not titles["train"] & titles["valid"] and not titles["train"] & titles["test"]
    assert not titles["valid"] & titles["test"]
    assert wiki_offline.documents.__wrapped__("test") == splits["test"]  # re-read, not the cache
    total = sum(len(d) for d in splits.values())
    for split, share in (("train", 0.92), ("valid", 0.04), ("test", 0.04)):
        assert abs(len(splits[split]) / total - share) < 0.01, split


def test_wiki_offline_eval_windows_are_the_test_stream_cut(tok):
    seqlen = 512
    stream = ids(tok, wiki_offline.text("test"))
    windows = eval_windows("wiki-offline", tok, seqlen=seqlen)
    assert windows.dtype == torch.long and windows.shape == (len(stream) // seqlen, seqlen)
    assert windows.flatten().tolist() == stream[: windows.numel()]  # non-overlapping, tail dropped
    assert torch.equal(eval_windows("wiki-offline", tok, seqlen=seqlen, max_windows=3), windows[:3])


@pytest.fixture
def fake_wiki_offline(monkeypatch):
    """Tiny split texts: tokenizing the real 4.4 MB train split takes longer than this test file may."""
    windows_module._stream.cache_clear()
    monkeypatch.setattr(wiki_offline, "text", lambda split: {"train": "t" * 300, "test": "e" * 300}[split])
    yield
    windows_module._stream.cache_clear()


def test_wiki_offline_calib_uses_train_and_eval_uses_test(tok, fake_wiki_offline):
    calib = calib_windows("wiki-offline", tok, nsamples=4, seqlen=16)
    assert calib.shape == (4, 16) and set(calib.flatten().tolist()) == set(ids(tok, "t"))
    assert set(eval_windows("wiki-offline", tok, seqlen=16).flatten().tolist()) == set(ids(tok, "e"))


# ---------------------------------------------------------------------------------------------
# Plain text and jsonl


def test_text_file_eval_and_calib_match_gptq(tmp_path, tok):
    path = tmp_path / "corpus.txt"
    text = "\n".join(words(random.Random(k), 30) for k in range(20))
    path.write_text(text, encoding="utf-8")
    enc = ids(tok, text)
    assert torch.equal(eval_windows(str(path), tok, seqlen=64), gptq_stream_eval(enc, 64))
    calib = calib_windows(str(path), tok, nsamples=8, seqlen=64, seed=3)
    assert torch.equal(calib, gptq_stream_calib(enc, 8, 64, seed=3))
    assert torch.equal(calib, calib_windows(str(path), tok, nsamples=8, seqlen=64, seed=3))
    assert not torch.equal(calib, calib_windows(str(path), tok, nsamples=8, seqlen=64, seed=4))


def test_calib_windows_may_overlap_and_exceed_distinct_windows(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghijklmnopq", encoding="utf-8")  # 17 tokens: one start offset or two
    windows = calib_windows(str(path), tok, nsamples=10, seqlen=16)
    assert windows.shape == (10, 16)


def test_jsonl_texts_joined_by_blank_line(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    texts = [words(random.Random(k), 25) for k in range(10)]
    path.write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(texts)) + "\n")
    enc = ids(tok, "\n\n".join(texts))
    assert torch.equal(eval_windows(str(path), tok, seqlen=50), gptq_stream_eval(enc, 50))
    assert torch.equal(calib_windows(str(path), tok, 5, 50, seed=1), gptq_stream_calib(enc, 5, 50, 1))


# ---------------------------------------------------------------------------------------------
# Wikitext2


def test_wikitext2_raw_folder_matches_gptq(tmp_path, tok):
    folder = write_wikitext2(tmp_path / "wikitext-2-raw")
    test_rows = hf_wikitext_rows(folder / "wiki.test.raw")
    assert test_rows[:3] == ["", " = Alpha = \n", ""]
    test_enc = ids(tok, "\n\n".join(test_rows))
    train_enc = ids(tok, " ".join(hf_wikitext_rows(folder / "wiki.train.raw")))
    assert torch.equal(eval_windows(str(folder), tok, seqlen=40), gptq_stream_eval(test_enc, 40))
    assert torch.equal(calib_windows(str(folder), tok, 6, 40, seed=0), gptq_stream_calib(train_enc, 6, 40, 0))


def test_wikitext2_layouts_and_env_var_agree(tmp_path, tok, monkeypatch):
    raw = write_wikitext2(tmp_path / "raw")
    txt = write_wikitext2(tmp_path / "txt", names=("test.txt", "train.txt"))
    nested = write_wikitext2(tmp_path / "zip" / "wikitext-2-raw")
    expected = eval_windows(str(raw), tok, seqlen=40)
    assert torch.equal(eval_windows(str(txt), tok, seqlen=40), expected)
    assert torch.equal(eval_windows(str(tmp_path / "zip"), tok, seqlen=40), expected)
    monkeypatch.setenv("HAQ_WIKITEXT2", str(nested))
    assert torch.equal(eval_windows("wikitext2", tok, seqlen=40), expected)
    assert dataset_identity("wikitext2")["name"] == "wikitext2"


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed: parquet reading is optional")
def test_wikitext2_parquet_matches_raw(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = write_wikitext2(tmp_path / "raw")
    folder = tmp_path / "wikitext" / "wikitext-2-raw-v1"  # the HF dataset repo layout
    folder.mkdir(parents=True)
    for split in ("test", "train"):
        rows = hf_wikitext_rows(raw / f"wiki.{split}.raw")
        pq.write_table(pa.table({"text": rows}), folder / f"{split}-00000-of-00001.parquet")
    path = str(tmp_path / "wikitext")
    assert torch.equal(eval_windows(path, tok, seqlen=40), eval_windows(str(raw), tok, seqlen=40))
    assert torch.equal(calib_windows(path, tok, 4, 40, seed=2), calib_windows(str(raw), tok, 4, 40, seed=2))


@pytest.mark.skipif(HAS_PYARROW or HAS_PANDAS, reason="checks the message shown when no parquet reader is installed")
def test_wikitext2_parquet_without_pyarrow_says_what_to_install(tmp_path, tok):
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(HaqError, match="pip install pyarrow") as err:
        eval_windows(str(tmp_path), tok, seqlen=8)
    assert str(tmp_path) in str(err.value)


@pytest.mark.skipif(HAS_DATASETS, reason="checks the message shown when `datasets` is not installed")
def test_wikitext2_saved_dataset_without_datasets_says_what_to_install(tmp_path, tok):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["test", "train"]}')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "data-00000-of-00001.arrow").write_bytes(b"")
    with pytest.raises(HaqError, match="pip install datasets") as err:
        eval_windows(str(tmp_path), tok, seqlen=8)
    assert str(tmp_path) in str(err.value)


@pytest.mark.skipif(not HAS_DATASETS, reason="datasets not installed: save_to_disk folders are optional")
def test_wikitext2_saved_dataset_matches_raw(tmp_path, tok):
    import datasets

    raw = write_wikitext2(tmp_path / "raw")
    rows = {s: hf_wikitext_rows(raw / f"wiki.{s}.raw") for s in ("test", "train")}
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": r}) for s, r in rows.items()}).save_to_disk(
        str(tmp_path / "disk")
    )
    assert torch.equal(eval_windows(str(tmp_path / "disk"), tok, seqlen=40), eval_windows(str(raw), tok, seqlen=40))


# ---------------------------------------------------------------------------------------------
# C4


def test_c4_eval_is_gptq_sampling_of_256_windows_from_long_docs(c4_dir, tok):
    seqlen = 32
    docs = c4_docs(1, 60, seqlen)
    windows = eval_windows(str(c4_dir), tok, seqlen=seqlen)
    assert windows.shape == (256, seqlen)
    assert torch.equal(windows, gptq_c4(docs, tok, 256, seqlen, seed=0))
    long_docs = [ids(tok, d) for d in docs if len(ids(tok, d)) > seqlen]
    assert any(len(ids(tok, d)) < seqlen for d in docs)  # the sampler had short docs to skip
    for w in windows.tolist():
        assert any(any(d[i : i + seqlen] == w for i in range(len(d) - seqlen)) for d in long_docs)
    assert torch.equal(eval_windows(str(c4_dir), tok, seqlen=seqlen, max_windows=10), windows[:10])


def test_c4_new_and_calib_and_env_var(c4_dir, tok, monkeypatch):
    seqlen = 32
    monkeypatch.setenv("HAQ_C4", str(c4_dir))
    assert torch.equal(eval_windows("c4", tok, seqlen=seqlen), eval_windows(str(c4_dir), tok, seqlen=seqlen))
    # c4-new: the first 1100 validation docs joined by " ", first 256 * seqlen tokens.
    enc = ids(tok, " ".join(c4_docs(1, 60, seqlen)[:1100]))[: 256 * seqlen]
    assert torch.equal(eval_windows("c4-new", tok, seqlen=seqlen), gptq_stream_eval(enc, seqlen))
    calib = calib_windows("c4", tok, nsamples=16, seqlen=seqlen, seed=5)
    assert torch.equal(calib, gptq_c4(c4_docs(2, 80, seqlen), tok, 16, seqlen, seed=5))
    assert torch.equal(calib_windows("c4-new", tok, 16, seqlen, seed=5), calib)
    assert not torch.equal(calib_windows("c4", tok, 16, seqlen, seed=6), calib)


# ---------------------------------------------------------------------------------------------
# Identity and caching


def test_dataset_identity_hashes_the_files(tmp_path, c4_dir):
    path = tmp_path / "corpus.txt"
    path.write_text("some text\n", encoding="utf-8")
    ident = dataset_identity(str(path))
    assert ident["sha256"] == hashlib.sha256(b"some text\n").hexdigest()
    assert ident["bytes"] == 10 and ident["kind"] == "text" and ident["path"] == str(path.resolve())
    path.write_text("other text\n", encoding="utf-8")
    assert dataset_identity(str(path))["sha256"] == hashlib.sha256(b"other text\n").hexdigest()

    c4 = dataset_identity(str(c4_dir))
    file_hashes = {n: hashlib.sha256((c4_dir / n).read_bytes()).hexdigest() for n in (C4_TRAIN, C4_VAL)}
    assert c4["files"] == file_hashes
    listing = "".join(f"{h}  {n}\n" for n, h in sorted(file_hashes.items()))
    assert c4["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert c4["bytes"] == sum((c4_dir / n).stat().st_size for n in file_hashes)

    wiki = dataset_identity("wiki-offline")
    assert wiki["path"] == str(wiki_offline.corpus_path().resolve())
    assert wiki["sha256"] == hashlib.sha256(wiki_offline.corpus_path().read_bytes()).hexdigest()


def test_streams_are_tokenized_once_and_reread_when_the_file_changes(tmp_path, tok, monkeypatch):
    calls = []
    encode = windows_module._encode
    monkeypatch.setattr(windows_module, "_encode", lambda t, text: calls.append(len(text)) or encode(t, text))
    path = tmp_path / "c.txt"
    path.write_text("a" * 100, encoding="utf-8")
    first = eval_windows(str(path), tok, seqlen=10)
    first[:] = 0  # callers get copies: the cache stays intact
    assert torch.equal(eval_windows(str(path), tok, seqlen=10, max_windows=2), torch.full((2, 10), ids(tok, "a")[0]))
    calib_windows(str(path), tok, 3, 10)  # a text file is one stream for eval and calib
    assert calls == [100]
    path.write_text("b" * 120, encoding="utf-8")
    assert eval_windows(str(path), tok, seqlen=10).shape == (12, 10) and calls[-1] == 120


def test_unnamed_tokenizers_with_equal_vocab_size_do_not_share_cache(tmp_path, tok):
    path = tmp_path / "c.txt"
    path.write_text("abc" * 10, encoding="utf-8")
    other = char_tokenizer(reverse=True)
    assert len(other) == len(tok) and other.name_or_path == tok.name_or_path == ""
    assert eval_windows(str(path), other, seqlen=10).tolist() != eval_windows(str(path), tok, seqlen=10).tolist()


# ---------------------------------------------------------------------------------------------
# Bad input: a HaqError that names the path and what was expected


def bad_text(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


BAD_FILES = {
    "missing": (None, "no such file or folder"),
    "data.csv": (b"text\nhello\n", "unsupported file type"),
    "empty.txt": (b"", "no text"),
    "blank.txt": (b" \n\n\t\n", "no text"),
    "latin1.txt": ("caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
    "broken.jsonl": (b'{"text": "fine"}\n{"text": \n', "broken.jsonl:2: not valid JSON"),
    "notext.jsonl": (b'{"body": "no text field"}\n', 'notext.jsonl:1: expected a JSON object with a "text"'),
    "short.txt": (b"abc", "fewer than one window"),
    "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_haq_error_naming_the_path(tmp_path, tok, name):
    content, message = BAD_FILES[name]
    path = tmp_path / name if content is None else bad_text(tmp_path, name, content)
    with pytest.raises(HaqError, match=message) as err:
        eval_windows(str(path), tok, seqlen=8)
    assert str(path) in str(err.value)


def test_too_few_tokens_for_calibration(tmp_path, tok):
    path = bad_text(tmp_path, "exact.txt", b"abcdefgh")  # 8 tokens: one eval window, no GPTQ calib offset
    assert eval_windows(str(path), tok, seqlen=8).shape == (1, 8)
    with pytest.raises(HaqError, match="need more than 8") as err:
        calib_windows(str(path), tok, nsamples=2, seqlen=8)
    assert str(path) in str(err.value)


def test_folder_of_neither_kind(tmp_path, tok):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(HaqError, match="neither Wikitext2") as err:
        calib_windows(str(tmp_path), tok, nsamples=1, seqlen=8)
    assert str(tmp_path) in str(err.value)


def test_wikitext2_missing_train_split(tmp_path, tok):
    (tmp_path / "wiki.test.raw").write_text(WT2_TEST * 5, encoding="utf-8")
    assert eval_windows(str(tmp_path), tok, seqlen=16).shape[1] == 16
    with pytest.raises(HaqError, match="train split not found; expected wiki.train.raw") as err:
        calib_windows(str(tmp_path), tok, nsamples=1, seqlen=16)
    assert str(tmp_path) in str(err.value)


def test_c4_without_long_docs_or_train_shard(tmp_path, tok):
    write_jsonl_gz(tmp_path / C4_VAL, ["short doc"] * 5)
    with pytest.raises(HaqError, match="no document has more than seqlen=32") as err:
        eval_windows(str(tmp_path), tok, seqlen=32)
    assert str(tmp_path / C4_VAL) in str(err.value)
    with pytest.raises(HaqError, match=f"train shard not found; expected {C4_TRAIN}") as err:
        calib_windows(str(tmp_path), tok, nsamples=1, seqlen=4)
    assert str(tmp_path) in str(err.value)


def test_c4_shard_with_a_bad_line(tmp_path, tok):
    with gzip.open(tmp_path / C4_VAL, "wt") as f:
        f.write('{"text": "ok"}\nnot json\n')
    with pytest.raises(HaqError, match=f"{C4_VAL}:2: not valid JSON"):
        eval_windows(str(tmp_path), tok, seqlen=4)


def test_c4_shard_that_is_not_gzip(tmp_path, tok):
    (tmp_path / C4_VAL).write_text('{"text": "plain json, gz name"}\n')
    with pytest.raises(HaqError, match="not a gzip file") as err:
        eval_windows(str(tmp_path), tok, seqlen=4)
    assert str(tmp_path / C4_VAL) in str(err.value)


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed: parquet reading is optional")
def test_corrupt_parquet(tmp_path, tok):
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(HaqError, match="not a readable parquet file") as err:
        eval_windows(str(tmp_path), tok, seqlen=8)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("name, env", [("wikitext2", "HAQ_WIKITEXT2"), ("c4", "HAQ_C4"), ("c4-new", "HAQ_C4")])
def test_named_datasets_need_their_env_var(tmp_path, tok, monkeypatch, name, env):
    with pytest.raises(HaqError, match=f"set {env} or pass a path"):
        eval_windows(name, tok)
    monkeypatch.setenv(env, str(tmp_path))
    with pytest.raises(HaqError, match="expected a folder with") as err:
        eval_windows(name, tok)
    assert f"{env}={tmp_path}" in str(err.value)


@pytest.mark.parametrize("kwargs", [{"seqlen": 0}, {"max_windows": 0}])
def test_bad_eval_arguments(tmp_path, tok, kwargs):
    path = bad_text(tmp_path, "ok.txt", b"abcdefgh" * 4)
    with pytest.raises(HaqError, match=f"{next(iter(kwargs))}=0: expected a positive integer"):
        eval_windows(str(path), tok, **kwargs)


def test_bad_calib_arguments(tmp_path, tok):
    path = bad_text(tmp_path, "ok.txt", b"abcdefgh" * 4)
    with pytest.raises(HaqError, match="nsamples=0: expected a positive integer"):
        calib_windows(str(path), tok, nsamples=0, seqlen=8)
