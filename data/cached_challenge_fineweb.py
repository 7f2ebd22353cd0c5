"""Download the official Parameter Golf FineWeb shards and tokenizer from the Hugging Face hub.

    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 10

Remote layout (dataset repo ``willdepueoai/parameter-golf``; ``--remote-root`` is prepended to both):

    datasets/fineweb10B_sp{V}/fineweb_train_{i:06d}.bin    (100M tokens each)
    datasets/fineweb10B_sp{V}/fineweb_val_{i:06d}.bin      (all of them are always fetched)
    tokenizers/fineweb_{V}_bpe.model

If the files are not at those paths but the repo has exactly one ``.../fineweb10B_sp{V}/`` folder (or
``.../tokenizers/fineweb_{V}_bpe.model``) under another prefix, that one is used. Local layout, under
``--out`` (default: this script's folder, i.e. ``data/``):

    {out}/datasets/fineweb10B_sp{V}/fineweb_{train,val}_NNNNNN.bin + meta.json
    {out}/tokenizers/fineweb_{V}_bpe.model

Files already present are not fetched again. Every shard header is checked (magic, version, size) and
``meta.json`` is written with the same keys as ``tokenize_corpus.py`` writes.

Exit codes: 0 done, 1 bad files / missing package / file not in the repo, 2 the hub cannot be reached
(offline, ``HF_HUB_OFFLINE=1``, connection or HTTP error).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenize_corpus import DataError, file_sha256, load_tokenizer, read_shard_header, shard_name, write_meta  # noqa: E402

DEFAULT_REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
VARIANTS = ("sp1024", "sp8192")
EXIT_ERROR = 1
EXIT_OFFLINE = 2


class HubUnavailable(Exception):
    """The hub cannot be reached (offline mode, no connection, HTTP error)."""


class DownloadError(Exception):
    """Anything else that stops the download (missing package, file not in repo, bad shard)."""


def offline_message(arguments: argparse.Namespace, reason: str) -> str:
    """The one-paragraph message printed when the hub cannot be reached."""
    vocab_size = arguments.variant[2:]
    return (
        f"cached_challenge_fineweb: cannot download the {arguments.variant} challenge shards from the Hugging Face "
        f"hub (repo {arguments.repo_id}): {reason}. This machine looks offline (or HF_HUB_OFFLINE=1 is set, or a "
        f"proxy is needed: set HTTPS_PROXY; a slow link may need a longer --timeout). Without the hub, build "
        f"shards from local text instead: python data/tokenize_corpus.py --inputs 'CORPUS/*.jsonl.xz' "
        f"--val-file VAL.jsonl --tokenizer fineweb_{vocab_size}_bpe.model --out data/datasets/local_{arguments.variant} "
        f"(see data/README.md)."
    )


# ----------------------------------------------------------------------------------------------
# Hub access


def import_hub(timeout: int):
    """Import huggingface_hub lazily, with download / metadata timeouts set to ``timeout`` seconds."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(timeout))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(timeout))
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401  (not loaded by the lazy package __init__)
    except ImportError as error:
        raise DownloadError("huggingface_hub is not installed: pip install huggingface_hub") from error
    return huggingface_hub


def check_hub_reachable(huggingface_hub, timeout: int) -> None:
    """Fail fast (no retries) when offline mode is on or the hub's host does not accept a connection."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubUnavailable("HF_HUB_OFFLINE is set")
    endpoint = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if proxies.get(endpoint.scheme) or proxies.get("all"):
        return  # the connection goes through a proxy; let huggingface_hub handle it
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise HubUnavailable(f"cannot connect to {endpoint.hostname}:{port} ({error})") from error


def list_remote_files(huggingface_hub, repo_id: str) -> list[str]:
    """All file paths in the dataset repo."""
    try:
        return huggingface_hub.HfApi().list_repo_files(repo_id, repo_type="dataset")
    except Exception as error:  # connection, HTTP and hub errors all mean: cannot use the hub
        raise HubUnavailable(f"listing the repo failed ({type(error).__name__}: {error})") from error


def download_file(huggingface_hub, arguments, remote_path: str, destination: Path) -> None:
    """Fetch one repo file into ``destination`` (via ``{out}/datasets/.hf_download``, then an atomic move)."""
    staging_dir = Path(arguments.out) / "datasets" / ".hf_download"  # inside the git-ignored datasets/
    try:
        downloaded = huggingface_hub.hf_hub_download(
            arguments.repo_id,
            remote_path,
            repo_type="dataset",
            local_dir=staging_dir,
            etag_timeout=arguments.timeout,
        )
    except Exception as error:
        raise HubUnavailable(f"downloading {remote_path} failed ({type(error).__name__}: {error})") from error
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, destination)


# ----------------------------------------------------------------------------------------------
# Planning which files to fetch


def remote_paths(remote_root: str, variant: str) -> tuple[str, str]:
    """(remote dataset folder, remote tokenizer path) for a variant under ``remote_root``."""
    prefix = remote_root.strip("/") + "/" if remote_root.strip("/") else ""
    return f"{prefix}datasets/fineweb10B_{variant}", f"{prefix}tokenizers/fineweb_{variant[2:]}_bpe.model"


def find_in_listing(listing: list[str], expected: str, suffix: str, what: str) -> str:
    """Return ``expected`` if listed, else the single listed path ending in ``suffix``."""
    if expected in listing:
        return expected
    candidates = [path for path in listing if path == suffix or path.endswith("/" + suffix)]
    if len(candidates) == 1:
        print(f"cached_challenge_fineweb: {what} not at {expected}, using {candidates[0]}")
        return candidates[0]
    folders = sorted({path.rsplit("/", 1)[0] for path in listing if "/fineweb10B_" in path})
    raise DownloadError(
        f"{what} {expected} is not in the repo ({len(candidates)} matches for {suffix}); "
        f"dataset folders there: {folders or 'none'}. Check --repo-id / --remote-root / --variant."
    )


def count_remote_shards(listing: list[str], dataset_dir: str, split: str) -> int:
    """Number of consecutive ``fineweb_{split}_NNNNNN.bin`` files from index 0 in the listing."""
    count = 0
    while f"{dataset_dir}/{shard_name(split, count)}" in listing:
        count += 1
    return count


def local_val_shards(local_dataset_dir: Path) -> int:
    """Number of consecutive local val shards from index 0."""
    count = 0
    while (local_dataset_dir / shard_name("val", count)).exists():
        count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Checking and describing what was fetched


def describe_shards(paths: list[Path], bos_id: int, vocab_size: int) -> tuple[int, int]:
    """Check every shard's header and token range; return (total tokens, total BOS = documents)."""
    total_tokens = 0
    total_docs = 0
    for path in paths:
        token_count = read_shard_header(path)
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=1024, shape=(token_count,))
        if token_count and int(tokens.max()) >= vocab_size:
            raise DownloadError(f"{path}: token id {int(tokens.max())} >= tokenizer vocab size {vocab_size}")
        total_tokens += token_count
        total_docs += int(np.count_nonzero(tokens == bos_id))
    return total_tokens, total_docs


def build_meta(arguments, tokenizer_file: Path, train_paths: list[Path], val_paths: list[Path], sources: list[str]) -> dict:
    """``meta.json`` contents, same keys as ``tokenize_corpus.py``."""
    processor = load_tokenizer(tokenizer_file)
    train_tokens, train_docs = describe_shards(train_paths, processor.bos_id(), processor.vocab_size())
    val_tokens, val_docs = describe_shards(val_paths, processor.bos_id(), processor.vocab_size())
    return {
        "vocab_size": processor.vocab_size(),
        "tokenizer_path": str(tokenizer_file.resolve()),
        "tokenizer_sha256": file_sha256(tokenizer_file),
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_docs": train_docs,
        "val_docs": val_docs,
        "sources": sources,
        "shuffle_seed": None,
        "shard_tokens": read_shard_header(train_paths[0]) if train_paths else None,
        "train_shards": len(train_paths),
        "val_shards": len(val_paths),
        "repo_id": arguments.repo_id,
        "bos_id": processor.bos_id(),
    }


# ----------------------------------------------------------------------------------------------
# Main


def download(arguments: argparse.Namespace) -> dict:
    """Fetch the missing files, check them, write meta.json; returns the meta dict."""
    out = Path(arguments.out)
    local_dataset_dir = out / "datasets" / f"fineweb10B_{arguments.variant}"
    tokenizer_file = out / "tokenizers" / f"fineweb_{arguments.variant[2:]}_bpe.model"
    train_paths = [local_dataset_dir / shard_name("train", index) for index in range(arguments.train_shards)]
    dataset_dir, tokenizer_remote = remote_paths(arguments.remote_root, arguments.variant)
    have_everything = (
        tokenizer_file.exists() and local_val_shards(local_dataset_dir) > 0 and all(p.exists() for p in train_paths)
    )
    if have_everything:
        print(f"cached_challenge_fineweb: all files already in {out}, nothing to download")
        val_paths = [local_dataset_dir / shard_name("val", index) for index in range(local_val_shards(local_dataset_dir))]
    else:
        huggingface_hub = import_hub(arguments.timeout)
        check_hub_reachable(huggingface_hub, arguments.timeout)
        listing = list_remote_files(huggingface_hub, arguments.repo_id)
        val_remote = find_in_listing(listing, f"{dataset_dir}/{shard_name('val', 0)}",
                                     f"fineweb10B_{arguments.variant}/{shard_name('val', 0)}", "val shard")
        dataset_dir = val_remote.rsplit("/", 1)[0]
        tokenizer_remote = find_in_listing(listing, tokenizer_remote, f"tokenizers/{tokenizer_file.name}", "tokenizer")
        available_train = count_remote_shards(listing, dataset_dir, "train")
        if arguments.train_shards > available_train:
            raise DownloadError(f"--train-shards {arguments.train_shards} but {dataset_dir} has {available_train}")
        val_paths = [local_dataset_dir / shard_name("val", i) for i in range(count_remote_shards(listing, dataset_dir, "val"))]
        for destination in [tokenizer_file, *val_paths, *train_paths]:
            if destination.exists():
                continue
            remote = tokenizer_remote if destination == tokenizer_file else f"{dataset_dir}/{destination.name}"
            print(f"cached_challenge_fineweb: downloading {remote}")
            download_file(huggingface_hub, arguments, remote, destination)
        shutil.rmtree(out / "datasets" / ".hf_download", ignore_errors=True)
    sources = [f"hf://datasets/{arguments.repo_id}/{dataset_dir}/{path.name}" for path in [*train_paths, *val_paths]]
    meta = build_meta(arguments, tokenizer_file, train_paths, val_paths, sources)
    write_meta(local_dataset_dir, meta)
    print(
        f"cached_challenge_fineweb: train_tokens:{meta['train_tokens']} val_tokens:{meta['val_tokens']} "
        f"train_shards:{meta['train_shards']} dir:{local_dataset_dir} tokenizer:{tokenizer_file}"
    )
    return meta


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="sp8192")
    parser.add_argument("--train-shards", type=int, default=10, help="train shards to fetch (val shards always)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="local root (default: data/)")
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="HF dataset repo (env MATCHED_FINEWEB_REPO_ID)")
    parser.add_argument("--remote-root", default="", help="prefix in the repo before datasets/ and tokenizers/")
    parser.add_argument("--timeout", type=int, default=10, help="seconds for connecting / metadata requests")
    arguments = parser.parse_args(argv)
    if arguments.train_shards < 0:
        parser.error("--train-shards must be >= 0")
    return arguments


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    try:
        download(arguments)
    except HubUnavailable as error:
        print(offline_message(arguments, str(error)), file=sys.stderr)
        return EXIT_OFFLINE
    except (DownloadError, DataError) as error:
        print(f"cached_challenge_fineweb: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
