"""Tokenize text files into Parameter Golf challenge shards.

Usable as a module (``tokenize_corpus(...)``, ``write_shard``, ``read_shard``) and as a CLI::

    python data/tokenize_corpus.py --inputs '/work/shared/corpus/*.train.jsonl.xz' \\
        --val-file /work/shared/corpus/fineweb.val.jsonl \\
        --tokenizer /work/shared/tokenizers/fineweb_8192_bpe.model --out data/datasets/local_sp8192

Input formats, chosen by file name:

* ``*.jsonl`` and ``*.jsonl.xz``: one JSON object per line, the document is its ``"text"`` field
  (other fields are ignored, blank lines are skipped).
* anything else (``.txt``, ``.md``, ``.py``, ...; ``*.xz`` is decompressed first): UTF-8 plain text.
  The whole file is one document, or with ``split_paragraphs`` every blank-line-separated paragraph is one.

Documents that are empty or only whitespace are skipped everywhere.

Shard format (the challenge's ``fineweb_{train,val}_NNNNNN.bin``): a header of 256 little-endian int32
(``[0]`` = 20240520 magic, ``[1]`` = 1 version, ``[2]`` = token count, the rest zero) followed by the
tokens as little-endian uint16. Every document is ``[BOS] + sp.encode(text)`` (BOS = ``sp.bos_id()``,
no EOS), and a split is the concatenation of its documents cut into shards of ``shard_tokens`` tokens
(documents run across shard boundaries).

Splits: validation documents come from ``val_file`` or are the first ``val_docs`` documents of the
(unshuffled) input stream, which are then left out of train. Train documents are shuffled at document
level with ``numpy.random.default_rng(seed)``. ``max_docs`` / ``max_tokens`` cap the train split for
smoke runs: reading stops once the cap is reached, so only that prefix of the inputs is shuffled, and
the shuffled stream is cut to exactly ``max_tokens`` tokens.

Everything is held in memory (2 bytes per token), which is fine for corpora up to a few billion tokens.
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import lzma
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB_SIZE = 65536  # token ids must fit in uint16

BATCH_MAX_DOCS = 512
BATCH_MAX_CHARS = 1_000_000
PARAGRAPH_SEPARATOR = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")  # one or more blank lines
GLOB_CHARACTERS = set("*?[")


class DataError(Exception):
    """A problem with the input files or settings; the message names the file involved."""


# ----------------------------------------------------------------------------------------------
# Shards


def shard_name(split: str, index: int) -> str:
    """Official shard file name, e.g. ``fineweb_train_000003.bin``."""
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write ``tokens`` as one challenge shard (int32 header + uint16 tokens), atomically.

    Refuses tokens that do not fit uint16 (< 0 or >= 65536) and non-integer arrays.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB_SIZE):
        raise ValueError(
            f"{path}: token ids must be in [0, {MAX_VOCAB_SIZE}), got min {int(tokens.min())} max {int(tokens.max())}"
        )
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = tokens.size
    path = Path(path)
    temporary_path = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary_path, "wb") as handle:
            handle.write(header.tobytes())
            handle.write(tokens.astype("<u2", copy=False).tobytes())
        os.replace(temporary_path, path)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def read_shard_header(path: str | os.PathLike) -> int:
    """Check a shard's header (magic, version, file size) and return its token count."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            header = np.frombuffer(handle.read(HEADER_BYTES), dtype="<i4")
        file_size = path.stat().st_size
    except OSError as error:
        raise DataError(f"cannot read shard {path}: {error}") from error
    if header.size != HEADER_INTS:
        raise DataError(f"{path}: file too short for a {HEADER_BYTES}-byte shard header")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(
            f"{path}: bad shard header (magic {header[0]}, version {header[1]}; "
            f"expected {SHARD_MAGIC}, {SHARD_VERSION})"
        )
    token_count = int(header[2])
    expected_size = HEADER_BYTES + 2 * token_count
    if file_size != expected_size:
        raise DataError(f"{path}: header says {token_count} tokens ({expected_size} bytes) but file has {file_size} bytes")
    return token_count


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Return a shard's tokens as a uint16 array (header checked)."""
    token_count = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=token_count, offset=HEADER_BYTES)


# ----------------------------------------------------------------------------------------------
# Reading documents


def expand_inputs(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand glob patterns (sorted matches) and plain paths into a list of files, without duplicates."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if GLOB_CHARACTERS & set(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"no files match input pattern {pattern!r}")
            files.extend(Path(match) for match in matches)
        else:
            files.append(Path(pattern))
    unique_files: list[Path] = []
    seen: set[Path] = set()
    for file in files:
        if file.resolve() not in seen:
            seen.add(file.resolve())
            unique_files.append(file)
    return unique_files


def is_jsonl(path: Path) -> bool:
    """True for ``*.jsonl`` and ``*.jsonl.xz`` files."""
    name = path.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.xz")


def open_text(path: Path):
    """Open a (possibly ``.xz``-compressed) UTF-8 text file for reading."""
    if path.name.lower().endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def read_jsonl_texts(path: Path, handle) -> Iterator[str]:
    """Yield the ``"text"`` field of every JSON line of an open file."""
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {line_number}: bad JSON ({error.msg})") from error
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{path}: line {line_number}: document has no "text" field')
        text = record["text"]
        if not isinstance(text, str):
            raise DataError(f'{path}: line {line_number}: "text" is {type(text).__name__}, not a string')
        yield text


def read_plain_texts(handle, split_paragraphs: bool) -> Iterator[str]:
    """Yield a whole plain-text file as one document, or its blank-line-separated paragraphs."""
    text = handle.read()
    if split_paragraphs:
        yield from PARAGRAPH_SEPARATOR.split(text)
    else:
        yield text


def read_documents(path: str | os.PathLike, split_paragraphs: bool = False) -> Iterator[str]:
    """Yield the non-empty documents of one input file; errors name the file."""
    path = Path(path)
    try:
        with open_text(path) as handle:
            if is_jsonl(path):
                texts = read_jsonl_texts(path, handle)
            else:
                texts = read_plain_texts(handle, split_paragraphs)
            for text in texts:
                if text.strip():
                    yield text
    except DataError:
        raise
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"cannot read {path}: not UTF-8 text ({error})") from error


def iterate_documents(paths: Iterable[Path], split_paragraphs: bool, log: Callable = print) -> Iterator[str]:
    """Yield the documents of all files in order."""
    for path in paths:
        log(f"tokenize: reading {path}")
        yield from read_documents(path, split_paragraphs)


# ----------------------------------------------------------------------------------------------
# Encoding


def load_tokenizer(tokenizer_path: str | os.PathLike):
    """Load a SentencePiece model; refuses vocabularies whose ids do not fit uint16."""
    import sentencepiece

    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise DataError(f"tokenizer {tokenizer_path} does not exist")
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    except (OSError, RuntimeError) as error:
        raise DataError(f"cannot load tokenizer {tokenizer_path}: {error}") from error
    if processor.vocab_size() > MAX_VOCAB_SIZE:
        raise DataError(
            f"tokenizer {tokenizer_path} has vocab size {processor.vocab_size()} > {MAX_VOCAB_SIZE}: "
            "ids would not fit the uint16 shard format"
        )
    if processor.bos_id() < 0:
        raise DataError(f"tokenizer {tokenizer_path} has no BOS piece")
    return processor


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_worker_processor = None


def _initialize_encoder(tokenizer_path: str) -> None:
    """Load the tokenizer once per process (pool initializer)."""
    global _worker_processor
    _worker_processor = load_tokenizer(tokenizer_path)


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of documents; returns (all ``[BOS] + ids`` concatenated as uint16, per-doc lengths)."""
    bos = _worker_processor.bos_id()
    encoded = _worker_processor.encode(texts)
    lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=np.uint16)
    position = 0
    for ids in encoded:
        flat[position] = bos
        flat[position + 1 : position + 1 + len(ids)] = ids
        position += len(ids) + 1
    return flat, lengths


def make_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """Group documents into batches of at most BATCH_MAX_DOCS docs / about BATCH_MAX_CHARS characters."""
    batch: list[str] = []
    batch_chars = 0
    for text in documents:
        batch.append(text)
        batch_chars += len(text)
        if len(batch) >= BATCH_MAX_DOCS or batch_chars >= BATCH_MAX_CHARS:
            yield batch
            batch, batch_chars = [], 0
    if batch:
        yield batch


def split_batch(result: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Turn an ``encode_batch`` result into one array per document."""
    flat, lengths = result
    return np.split(flat, np.cumsum(lengths)[:-1])


def encode_documents(documents: Iterable[str], pool, max_in_flight: int) -> Iterator[np.ndarray]:
    """Yield ``[BOS] + ids`` (uint16) for every document, in input order.

    With a pool, up to ``max_in_flight`` batches are encoded in the workers while this process keeps
    reading; without one (``pool=None``) encoding happens here.
    """
    if pool is None:
        for batch in make_batches(documents):
            yield from split_batch(encode_batch(batch))
        return
    pending: collections.deque = collections.deque()
    for batch in make_batches(documents):
        pending.append(pool.apply_async(encode_batch, (batch,)))
        if len(pending) >= max_in_flight:
            yield from split_batch(pending.popleft().get())
    while pending:
        yield from split_batch(pending.popleft().get())


# ----------------------------------------------------------------------------------------------
# Splits, shards and metadata


def collect_splits(
    encoded: Iterator[np.ndarray], val_docs: int, max_docs: int | None, max_tokens: int | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split the encoded stream into (first ``val_docs`` docs, train docs up to the caps)."""
    val_documents: list[np.ndarray] = []
    train_documents: list[np.ndarray] = []
    train_tokens = 0
    for document in encoded:
        if len(val_documents) < val_docs:
            val_documents.append(document)
            continue
        if max_docs is not None and len(train_documents) >= max_docs:
            break
        if max_tokens is not None and train_tokens >= max_tokens:
            break
        train_documents.append(document)
        train_tokens += len(document)
    return val_documents, train_documents


def shuffle_documents(documents: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Deterministic document-level shuffle."""
    order = np.random.default_rng(seed).permutation(len(documents))
    return [documents[index] for index in order]


def cap_tokens(documents: list[np.ndarray], max_tokens: int | None) -> list[np.ndarray]:
    """Keep documents until ``max_tokens`` tokens; the last one kept may be cut."""
    if max_tokens is None:
        return documents
    kept: list[np.ndarray] = []
    total = 0
    for document in documents:
        if total >= max_tokens:
            break
        kept.append(document[: max_tokens - total])
        total += len(kept[-1])
    return kept


def write_split(out_dir: Path, split: str, documents: list[np.ndarray], shard_tokens: int) -> int:
    """Concatenate documents, write them as shards of ``shard_tokens`` tokens, return the shard count.

    Shards of this split left over from an earlier run with more shards are deleted.
    """
    stream = np.concatenate(documents) if documents else np.zeros(0, dtype=np.uint16)
    shard_count = max(1, -(-stream.size // shard_tokens))
    for index in range(shard_count):
        write_shard(out_dir / shard_name(split, index), stream[index * shard_tokens : (index + 1) * shard_tokens])
    for stale in out_dir.glob(f"fineweb_{split}_*.bin"):
        match = re.fullmatch(rf"fineweb_{split}_(\d{{6}})\.bin", stale.name)
        if match and int(match.group(1)) >= shard_count:
            stale.unlink()
    return shard_count


def write_meta(out_dir: str | os.PathLike, meta: dict) -> None:
    """Write ``meta.json`` atomically."""
    path = Path(out_dir) / "meta.json"
    temporary_path = path.with_name(f".meta.json.tmp{os.getpid()}")
    temporary_path.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temporary_path, path)


def check_settings(inputs, val_file, val_docs, shard_tokens, workers, max_docs, max_tokens) -> list[Path]:
    """Validate the options; returns the expanded input files."""
    if val_file is None and not val_docs:
        raise DataError("no validation split: give val_file (--val-file) or val_docs > 0 (--val-docs)")
    if val_file is not None and val_docs:
        raise DataError("give either val_file (--val-file) or val_docs (--val-docs), not both")
    if val_docs < 0:
        raise DataError(f"val_docs must be >= 0, got {val_docs}")
    if shard_tokens < 1 or shard_tokens >= 2**31:
        raise DataError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    for name, value in (("max_docs", max_docs), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
    input_files = expand_inputs(inputs)
    if not input_files:
        raise DataError("no input files given")
    if val_file is not None and Path(val_file).resolve() in {path.resolve() for path in input_files}:
        raise DataError(f"val file {val_file} is also a train input: validation would leak into train")
    return input_files


def caseops_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import caseops
    return caseops


def check_caseops(processor, tokenizer_path, caseops: bool) -> None:
    """A CaseOps tokenizer (its operators are pieces) goes with --caseops, and only it."""
    operators = caseops_module().OPERATORS
    has_operators = all(processor.piece_to_id(op) != processor.unk_id() for op in operators)
    if caseops and not has_operators:
        raise DataError(f"--caseops needs a tokenizer trained on transformed text (python data/caseops.py train-tokenizer); "
                        f"{tokenizer_path} has no case-operator pieces")
    if has_operators and not caseops:
        raise DataError(f"{tokenizer_path} is a CaseOps tokenizer (its pieces hold the case operators): add --caseops")


def transformed(documents, transform):
    return documents if transform is None else (transform(document) for document in documents)


def tokenize_corpus(
    inputs,
    tokenizer,
    out_dir,
    *,
    val_file=None,
    val_docs: int = 0,
    shard_tokens: int = 100_000_000,
    seed: int = 1337,
    workers: int | None = os.cpu_count(),
    max_docs: int | None = None,
    max_tokens: int | None = None,
    split_paragraphs: bool = False,
    caseops: bool = False,
    log: Callable = print,
) -> dict:
    """Tokenize ``inputs`` into ``out_dir/fineweb_{train,val}_NNNNNN.bin`` + ``meta.json``; returns the meta dict.

    See the module docstring for formats, the split rules and the caps.
    """
    start_time = time.perf_counter()
    workers = workers or 1
    input_files = check_settings(inputs, val_file, val_docs, shard_tokens, workers, max_docs, max_tokens)
    tokenizer_path = Path(tokenizer).resolve()
    processor = load_tokenizer(tokenizer_path)
    check_caseops(processor, tokenizer_path, caseops)
    transform = caseops_module().encode if caseops else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    pool = None
    if workers > 1:
        # spawn: workers start clean, without threads or locks inherited from the caller (e.g. torch)
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(workers, initializer=_initialize_encoder, initargs=(str(tokenizer_path),))
    else:
        _initialize_encoder(str(tokenizer_path))
    try:
        max_in_flight = 2 * workers + 1
        if val_file is not None:
            val_documents = list(
                encode_documents(transformed(iterate_documents([Path(val_file)], split_paragraphs, log), transform), pool, max_in_flight)
            )
        train_stream = encode_documents(transformed(iterate_documents(input_files, split_paragraphs, log), transform), pool, max_in_flight)
        first_documents, train_documents = collect_splits(train_stream, val_docs, max_docs, max_tokens)
        train_stream.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if val_file is None:
        val_documents = first_documents
        if len(val_documents) < val_docs:
            raise DataError(f"val_docs={val_docs} but the inputs only have {len(val_documents)} documents")
    if not val_documents:
        raise DataError(f"val file {val_file} has no documents")
    if not train_documents:
        raise DataError("no train documents left (all inputs went to validation, or the inputs are empty)")

    train_documents = cap_tokens(shuffle_documents(train_documents, seed), max_tokens)
    train_shards = write_split(out_dir, "train", train_documents, shard_tokens)
    val_shards = write_split(out_dir, "val", val_documents, shard_tokens)
    meta = {
        "vocab_size": processor.vocab_size(),
        "tokenizer_path": str(tokenizer_path),
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "train_tokens": int(sum(len(document) for document in train_documents)),
        "val_tokens": int(sum(len(document) for document in val_documents)),
        "train_docs": len(train_documents),
        "val_docs": len(val_documents),
        "sources": [str(path.resolve()) for path in input_files],
        "val_source": str(Path(val_file).resolve()) if val_file is not None else f"first {val_docs} documents of sources",
        "shuffle_seed": seed,
        "shard_tokens": shard_tokens,
        "train_shards": train_shards,
        "val_shards": val_shards,
        "max_docs": max_docs,
        "max_tokens": max_tokens,
        "split_paragraphs": split_paragraphs,
        "caseops": caseops,
        "bos_id": processor.bos_id(),
        "format": "256 x int32 header [20240520, 1, n_tokens, 0...] + n_tokens x uint16; [BOS]+ids per doc, no EOS",
    }
    write_meta(out_dir, meta)
    seconds = time.perf_counter() - start_time
    log(
        f"tokenize: train_tokens:{meta['train_tokens']} val_tokens:{meta['val_tokens']} "
        f"train_shards:{train_shards} seconds:{seconds:.1f}"
    )
    return meta


# ----------------------------------------------------------------------------------------------
# Command line


def parse_arguments(argv=None) -> argparse.Namespace:
    """CLI flags; they map one-to-one onto ``tokenize_corpus`` keyword arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="files or glob patterns (quote globs)")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    parser.add_argument("--out", required=True, help="output directory for shards and meta.json")
    validation = parser.add_mutually_exclusive_group(required=True)
    validation.add_argument("--val-file", help="file whose documents form the val split")
    validation.add_argument("--val-docs", type=int, default=None, help="use the first N input documents as val")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--seed", type=int, default=1337, help="train document shuffle seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--max-docs", type=int, default=None, help="cap on train documents")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on train tokens")
    parser.add_argument("--split-paragraphs", action="store_true", help="plain text: one document per paragraph")
    parser.add_argument("--caseops", action="store_true", help="apply the CaseOps transform (data/caseops.py) before tokenizing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    try:
        tokenize_corpus(
            arguments.inputs,
            arguments.tokenizer,
            arguments.out,
            val_file=arguments.val_file,
            val_docs=arguments.val_docs or 0,
            shard_tokens=arguments.shard_tokens,
            seed=arguments.seed,
            workers=arguments.workers,
            max_docs=arguments.max_docs,
            max_tokens=arguments.max_tokens,
            split_paragraphs=arguments.split_paragraphs,
            caseops=arguments.caseops,
        )
    except DataError as error:
        print(f"tokenize_corpus: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
