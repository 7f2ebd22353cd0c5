"""DATA TOOLS: data/tokenize_corpus.py writes challenge shards exactly as specified; the downloader fails clearly offline."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TOKENIZER = None  # the own-text tokenizer of conftest (set by the `processor` fixture): no test here needs ../shared
sys.path.insert(0, str(REPOSITORY / "data"))

import tokenize_corpus  # noqa: E402
from tokenize_corpus import DataError, tokenize_corpus as run_tokenizer  # noqa: E402

BOS = 1
EOS = 2


@pytest.fixture(scope="module", autouse=True)
def processor(own_tokenizer):
    global TOKENIZER
    TOKENIZER = own_tokenizer
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def slice_texts(processor):
    """40 documents: the first paragraphs of 40+ characters of the project's README and docs."""
    paragraphs = [p.strip() for name in ("README.md", "docs/results.md", "data/README.md")
                  for p in (REPOSITORY / name).read_text().split("\n\n") if len(p.strip()) >= 40]
    assert len(paragraphs) >= 40
    return paragraphs[:40]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def read_split(directory, split):
    """Concatenate a split's shards, reading the format independently of the module under test."""
    paths = sorted(Path(directory).glob(f"fineweb_{split}_*.bin"))
    streams = []
    for path in paths:
        header = np.fromfile(path, dtype="<i4", count=256)
        streams.append(np.fromfile(path, dtype="<u2", offset=1024))
        assert header[2] == streams[-1].size
    return np.concatenate(streams)


def split_documents(stream):
    """Cut a token stream at BOS tokens into tuples of document tokens (BOS included)."""
    starts = np.flatnonzero(stream == BOS)
    assert starts.size and starts[0] == 0, "the stream must start with BOS"
    return [tuple(part) for part in np.split(stream, starts[1:])]


def encoded(processor, text):
    return tuple([BOS] + processor.encode(text))


def quiet(*_):
    pass


def tokenize(inputs, out_dir, **options):
    options.setdefault("workers", 1)
    return run_tokenizer(inputs, TOKENIZER, out_dir, log=quiet, **options)


# ---------------------------------------------------------------------------------------------- shard format


def test_shard_header_and_tokens_are_exactly_the_challenge_format(tmp_path):
    """write_shard: 256 LE int32 header [20240520, 1, count, 0...] then LE uint16 tokens, nothing else."""
    tokens = np.array([0, 1, 2, 8191, 65535, 300], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    tokenize_corpus.write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * tokens.size
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, tokens.size]
    assert not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert tokenize_corpus.read_shard(path).tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file left behind"


@pytest.mark.parametrize("bad_token", [65536, -1])
def test_write_shard_refuses_ids_outside_uint16(tmp_path, bad_token):
    """Token ids >= 65536 or < 0 are refused and no file is written."""
    with pytest.raises(ValueError, match="token ids"):
        tokenize_corpus.write_shard(tmp_path / "x.bin", np.array([5, bad_token]))
    assert not list(tmp_path.iterdir())


def test_bos_before_every_document_and_no_eos(tmp_path, processor, slice_texts):
    """Every document is [BOS] + sp.encode(text); no EOS appears anywhere."""
    inputs = write_jsonl(tmp_path / "docs.jsonl", slice_texts[:10])
    tokenize([inputs], tmp_path / "out", val_docs=3)
    validation = read_split(tmp_path / "out", "val")
    train = read_split(tmp_path / "out", "train")
    assert split_documents(validation) == [encoded(processor, text) for text in slice_texts[:3]]
    assert sorted(split_documents(train)) == sorted(encoded(processor, text) for text in slice_texts[3:10])
    assert not (train == EOS).any() and not (validation == EOS).any()


def test_empty_documents_are_skipped(tmp_path, processor):
    """Empty and whitespace-only documents produce no tokens (not even a BOS)."""
    inputs = write_jsonl(tmp_path / "docs.jsonl", ["first doc", "", "   \n", "second doc"])
    meta = tokenize([inputs], tmp_path / "out", val_docs=1)
    assert split_documents(read_split(tmp_path / "out", "train")) == [encoded(processor, "second doc")]
    assert meta["train_docs"] == 1 and meta["val_docs"] == 1


# ---------------------------------------------------------------------------------------------- splits


def test_val_file_and_first_n_val_docs(tmp_path, processor, slice_texts):
    """val_file: val is that file, train is all inputs; val_docs=N: val is the first N docs, removed from train."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:8])
    validation_file = write_jsonl(tmp_path / "val.jsonl", slice_texts[30:33])
    tokenize([inputs], tmp_path / "from_file", val_file=validation_file)
    assert split_documents(read_split(tmp_path / "from_file", "val")) == [encoded(processor, t) for t in slice_texts[30:33]]
    assert len(split_documents(read_split(tmp_path / "from_file", "train"))) == 8

    tokenize([inputs], tmp_path / "first_n", val_docs=2)
    validation = split_documents(read_split(tmp_path / "first_n", "val"))
    train = split_documents(read_split(tmp_path / "first_n", "train"))
    assert validation == [encoded(processor, t) for t in slice_texts[:2]]
    assert sorted(train) == sorted(encoded(processor, t) for t in slice_texts[2:8])


def test_missing_validation_split_is_an_error(tmp_path, slice_texts):
    """Neither val_file nor val_docs: a clear error; a val file that is also an input: refused."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:3])
    with pytest.raises(DataError, match="val_file.*val_docs"):
        tokenize([inputs], tmp_path / "out")
    with pytest.raises(DataError, match="leak"):
        tokenize([inputs], tmp_path / "out", val_file=inputs)


def test_shuffle_is_deterministic_per_seed_and_differs_across_seeds(tmp_path, slice_texts):
    """Same seed: identical train bytes; another seed: another document order of the same documents."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:20])
    streams = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        tokenize([inputs], tmp_path / name, val_docs=1, seed=seed)
        streams[name] = read_split(tmp_path / name, "train")
    assert streams["a"].tobytes() == streams["b"].tobytes()
    assert streams["a"].tobytes() != streams["c"].tobytes()
    assert sorted(split_documents(streams["a"])) == sorted(split_documents(streams["c"]))


def test_sharding_splits_at_shard_tokens_and_concatenates_to_the_whole_stream(tmp_path, slice_texts):
    """Shards hold exactly shard_tokens tokens (last one the rest); their concatenation is the unsharded stream."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:20])
    whole = tokenize([inputs], tmp_path / "whole", val_docs=2)
    sharded = tokenize([inputs], tmp_path / "sharded", val_docs=2, shard_tokens=1000)
    sizes = [np.fromfile(p, dtype="<i4", count=3)[2] for p in sorted((tmp_path / "sharded").glob("fineweb_train_*.bin"))]
    assert len(sizes) == sharded["train_shards"] == -(-whole["train_tokens"] // 1000) > 1
    assert all(size == 1000 for size in sizes[:-1]) and 0 < sizes[-1] <= 1000
    assert read_split(tmp_path / "sharded", "train").tobytes() == read_split(tmp_path / "whole", "train").tobytes()
    assert read_split(tmp_path / "sharded", "val").tobytes() == read_split(tmp_path / "whole", "val").tobytes()


def test_stale_shards_from_a_bigger_earlier_run_are_removed(tmp_path, slice_texts):
    """Rewriting a folder with fewer shards deletes the old higher-numbered shards."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:10])
    tokenize([inputs], tmp_path / "out", val_docs=1, shard_tokens=500)
    tokenize([inputs], tmp_path / "out", val_docs=1)
    assert [p.name for p in sorted((tmp_path / "out").glob("fineweb_train_*.bin"))] == ["fineweb_train_000000.bin"]


def test_max_docs_and_max_tokens_cap_the_train_split(tmp_path, slice_texts):
    """max_docs keeps that many train docs; max_tokens cuts the train stream to exactly that many tokens."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:20])
    meta = tokenize([inputs], tmp_path / "docs", val_docs=2, max_docs=5)
    assert meta["train_docs"] == 5 and len(split_documents(read_split(tmp_path / "docs", "train"))) == 5
    meta = tokenize([inputs], tmp_path / "tokens", val_docs=2, max_tokens=3000)
    assert meta["train_tokens"] == 3000 == read_split(tmp_path / "tokens", "train").size


def test_one_and_two_workers_give_byte_identical_output(tmp_path, slice_texts):
    """workers=1 and workers=2 write the same shards and meta.json, byte for byte."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts)
    tokenize([inputs], tmp_path / "one", val_docs=3, shard_tokens=5000, workers=1)
    tokenize([inputs], tmp_path / "two", val_docs=3, shard_tokens=5000, workers=2)
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(one) > 3
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- inputs and errors


def test_bad_json_line_error_names_file_and_line(tmp_path, processor):
    """A bad JSON line, a record without "text" and a missing file each raise DataError naming the file."""
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: bad JSON"):
        tokenize([bad_json], tmp_path / "out", val_docs=1)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r'no_text\.jsonl: line 2: document has no "text"'):
        tokenize([no_text], tmp_path / "out", val_docs=1)
    with pytest.raises(DataError, match="missing.jsonl"):
        tokenize([tmp_path / "missing.jsonl"], tmp_path / "out", val_docs=1)
    with pytest.raises(DataError, match="no files match"):
        tokenize([str(tmp_path / "nothing*.jsonl")], tmp_path / "out", val_docs=1)
    corrupt_xz = tmp_path / "corrupt.jsonl.xz"
    corrupt_xz.write_bytes(b"not xz data at all")
    with pytest.raises(DataError, match=r"cannot read .*corrupt\.jsonl\.xz"):
        tokenize([corrupt_xz], tmp_path / "out", val_docs=1)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt.*UTF-8"):
        tokenize([latin1], tmp_path / "out", val_docs=1)


def test_tokenizer_with_vocab_over_65536_is_refused(tmp_path, processor, monkeypatch):
    """A tokenizer whose ids would not fit uint16 is refused with an error naming the model file."""
    import sentencepiece

    monkeypatch.setattr(sentencepiece.SentencePieceProcessor, "vocab_size", lambda self: 70000)
    inputs = write_jsonl(tmp_path / "train.jsonl", ["a doc", "another doc"])
    with pytest.raises(DataError, match=r"own_bpe\.model has vocab size 70000"):
        tokenize([inputs], tmp_path / "out", val_docs=1)


def test_plain_text_inputs(tmp_path, processor):
    """A .txt/.md/.py file is one document; with split_paragraphs every blank-line-separated paragraph is one."""
    (tmp_path / "a.txt").write_text("Para one.\n\nPara two.\n")
    (tmp_path / "b.md").write_text("# Title\n\n\n  \nBody text.\n")
    (tmp_path / "c.py").write_text("def f():\n    return 1\n")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "*.md"), str(tmp_path / "c.py")]
    tokenize(files, tmp_path / "whole", val_docs=1)
    assert split_documents(read_split(tmp_path / "whole", "val")) == [encoded(processor, "Para one.\n\nPara two.\n")]
    assert sorted(split_documents(read_split(tmp_path / "whole", "train"))) == sorted(
        [encoded(processor, "# Title\n\n\n  \nBody text.\n"), encoded(processor, "def f():\n    return 1\n")]
    )
    meta = tokenize(files, tmp_path / "paragraphs", val_docs=1, split_paragraphs=True)
    assert split_documents(read_split(tmp_path / "paragraphs", "val")) == [encoded(processor, "Para one.")]
    assert meta["train_docs"] == 4  # "Para two.\n", "# Title", "Body text.\n", the .py file


def test_meta_json_describes_the_output(tmp_path, slice_texts):
    """meta.json has vocab size, tokenizer path + sha256, token/doc counts matching the shards, sources, seed, shard size."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:12])
    validation_file = write_jsonl(tmp_path / "val.jsonl", slice_texts[20:22])
    returned = tokenize([inputs], tmp_path / "out", val_file=validation_file, seed=7, shard_tokens=4000)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta == returned
    assert meta["vocab_size"] == 1024
    assert meta["tokenizer_path"] == str(TOKENIZER.resolve())
    assert meta["tokenizer_sha256"] == hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()
    assert meta["train_tokens"] == read_split(tmp_path / "out", "train").size
    assert meta["val_tokens"] == read_split(tmp_path / "out", "val").size
    assert (meta["train_docs"], meta["val_docs"]) == (12, 2)
    assert meta["sources"] == [str(inputs.resolve())]
    assert (meta["shuffle_seed"], meta["shard_tokens"]) == (7, 4000)


def test_command_line_prints_the_summary_line(tmp_path, slice_texts):
    """The CLI writes the shards and prints 'tokenize: train_tokens:N val_tokens:N train_shards:N seconds:S'."""
    inputs = write_jsonl(tmp_path / "train.jsonl", slice_texts[:6])
    command = [sys.executable, str(REPOSITORY / "data" / "tokenize_corpus.py"), "--inputs", str(inputs),
               "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "out"), "--val-docs", "2", "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("tokenize: train_tokens:")]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert summary and f"train_tokens:{meta['train_tokens']} val_tokens:{meta['val_tokens']} train_shards:1 " in summary[0]
    bad = subprocess.run(command[:-4] + ["--val-docs", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "val" in bad.stderr


# ---------------------------------------------------------------------------------------------- downloader


def run_downloader(tmp_path, **environment):
    command = [sys.executable, str(REPOSITORY / "data" / "cached_challenge_fineweb.py"),
               "--out", str(tmp_path / "download"), "--timeout", "3"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=dict(os.environ, **environment))


@pytest.mark.parametrize("environment", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable-endpoint"])
def test_downloader_offline_fails_with_exit_2_and_names_the_alternative(tmp_path, environment):
    """Offline the downloader exits 2 within seconds with one paragraph pointing to tokenize_corpus.py."""
    pytest.importorskip("huggingface_hub")
    environment = dict(environment, HTTPS_PROXY="", HTTP_PROXY="", ALL_PROXY="", https_proxy="", http_proxy="", all_proxy="")
    result = run_downloader(tmp_path, **environment)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "python data/tokenize_corpus.py --inputs" in result.stderr and "--tokenizer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_downloader_layout_validation_and_meta_with_a_fake_hub(tmp_path, monkeypatch):
    """With a fake hub: files land in datasets/fineweb10B_sp8192/ and tokenizers/, headers are checked, meta.json written."""
    import cached_challenge_fineweb as downloader

    remote = tmp_path / "remote"
    shards = {"datasets/fineweb10B_sp8192/fineweb_train_000000.bin": [1, 5, 6, 1, 7],
              "datasets/fineweb10B_sp8192/fineweb_train_000001.bin": [8, 1, 9],
              "datasets/fineweb10B_sp8192/fineweb_val_000000.bin": [1, 10, 11, 12]}
    for name, tokens in shards.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        tokenize_corpus.write_shard(remote / name, np.array(tokens))
    (remote / "tokenizers").mkdir()
    (remote / "tokenizers" / "fineweb_8192_bpe.model").write_bytes(TOKENIZER.read_bytes())

    class FakeHub:
        class HfApi:
            def list_repo_files(self, repo_id, repo_type):
                return sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())

        @staticmethod
        def hf_hub_download(repo_id, filename, repo_type, local_dir, etag_timeout):
            target = Path(local_dir) / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((remote / filename).read_bytes())
            return str(target)

    monkeypatch.setattr(downloader, "import_hub", lambda timeout: FakeHub)
    monkeypatch.setattr(downloader, "check_hub_reachable", lambda hub, timeout: None)
    out = tmp_path / "data"
    assert downloader.main(["--out", str(out), "--train-shards", "2"]) == 0
    dataset = out / "datasets" / "fineweb10B_sp8192"
    assert sorted(p.name for p in dataset.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "meta.json"]
    assert (out / "tokenizers" / "fineweb_8192_bpe.model").read_bytes() == TOKENIZER.read_bytes()
    meta = json.loads((dataset / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"], meta["train_docs"], meta["val_docs"]) == (8, 4, 3, 1)
    assert meta["vocab_size"] == 1024 and meta["shard_tokens"] == 5
    assert meta["tokenizer_sha256"] == hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()
    assert downloader.main(["--out", str(out), "--train-shards", "3"]) == 1  # the repo only has 2
    (dataset / "fineweb_val_000000.bin").write_bytes(b"\0" * 2000)  # corrupt header
    assert downloader.main(["--out", str(out), "--train-shards", "2"]) == 1
