"""Text in, fixed-length token windows out.

``load_texts`` reads a corpus: the default offline corpus, a local text/jsonl/json/csv/parquet file,
a Hugging Face dataset name (where the Hub is reachable), a ``datasets`` object, or a list of strings.
``pack`` tokenizes documents and packs them into windows of ``context_size`` tokens.

The default corpus (``"pydocs"``) is English prose that exists on any fresh install: the Python
language reference topics shipped with CPython (``pydoc_data``), and the docstrings of the standard
library and of this project's own dependencies (torch, transformers, datasets, numpy, pandas,
matplotlib, huggingface_hub, accelerate, and torch's dependencies networkx and sympy), split into
paragraphs and filtered to prose (no code examples, no tables). It is built once (about a minute) and
cached as JSON lines under ``$INTERP_CACHE/corpus``; its size is printed by ``interp corpus``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from interp.errors import DataError
from interp.models import cache_dir

DEFAULT = "pydocs"
DEFAULT_CONTEXT_SIZE = 128
"""Tokens per window wherever a context size is not given."""
_CORPUS_PACKAGES = ("torch", "transformers", "datasets", "numpy", "pandas", "matplotlib", "huggingface_hub",
                    "accelerate", "networkx", "sympy")
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'()\-]")


def _is_prose(par: str) -> bool:
    if ">>>" in par or "::" in par or "|" in par or "==" in par or "{" in par:
        return False
    lines = par.splitlines()
    if any(line.startswith(("    ", "\t", "---", "===", "..", "Args", "Returns", "Parameters", "Example"))
           for line in lines):
        return False
    words = par.split()
    if len(words) < 12:
        return False
    return len(_PROSE_CHARS.findall(par)) / len(par) > 0.9


def _docstrings(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "site-packages", "_vendor", "idlelib"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def _prose_document(doc: str) -> str:
    pars = [p.strip() for p in re.split(r"\n\s*\n", doc)]
    return "\n\n".join(" ".join(p.split()) for p in pars if _is_prose(p))


def _corpus_key() -> str:
    parts = [sys.version.split()[0]]
    for name in _CORPUS_PACKAGES:
        try:
            parts.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name}=-")
    return hashlib.sha1(";".join(parts).encode()).hexdigest()[:12]


def default_corpus_path(progress: bool = True) -> Path:
    """Build (once) and return the JSON-lines file of the default corpus."""
    path = cache_dir() / "corpus" / f"{DEFAULT}-{_corpus_key()}.jsonl"
    if path.is_file():
        return path
    roots = [("python", Path(sysconfig.get_paths()["stdlib"]))]
    for name in _CORPUS_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.append((name, Path(spec.origin).parent))
    seen: set[str] = set()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            import pydoc_data.topics as topics

            def emit(text: str, source: str) -> None:
                digest = hashlib.sha1(text.encode()).hexdigest()
                if len(text) >= 200 and digest not in seen:
                    seen.add(digest)
                    f.write(json.dumps({"text": text, "source": source}) + "\n")

            for name in sorted(topics.topics):
                emit(_prose_document(topics.topics[name]), f"pydoc:{name}")
            for source, root in tqdm(roots, desc="building the default corpus", disable=not progress):
                for doc in _docstrings(root):
                    emit(_prose_document(doc), source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_texts(dataset=None, *, split: str = "train", text_column: str = "text",
               shuffle_seed: int | None = 0) -> Iterable[str]:
    """An iterable of documents (strings).

    Args:
        dataset: None or ``"pydocs"`` (default offline corpus); a path to a .txt/.jsonl/.json/.csv/
            .parquet file or a folder of them; a Hugging Face dataset name (streamed); a ``datasets``
            Dataset/IterableDataset; or a list of strings.
        text_column: the column holding text in tabular files and datasets.
        shuffle_seed: shuffle the document order of in-memory corpora (None keeps the file order).
    """
    if dataset is None or dataset == DEFAULT:
        docs = [json.loads(line)["text"] for line in default_corpus_path().read_text(encoding="utf-8").splitlines()]
        return _shuffled(docs, shuffle_seed)
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(t, str) for t in dataset):
            raise DataError("a list dataset must hold strings (documents)")
        return _shuffled(list(dataset), shuffle_seed)
    import datasets as hfds

    if isinstance(dataset, (str, os.PathLike)):
        p = Path(dataset)
        if p.exists():
            files = sorted(str(f) for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
            if not files:
                raise DataError(f"{p} holds no files")
            ext = Path(files[0]).suffix.lower().lstrip(".")
            kind = {"txt": "text", "jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
            if kind is None:
                raise DataError(f"cannot read {files[0]}: expected .txt, .jsonl, .json, .csv or .parquet")
            try:
                dataset = hfds.load_dataset(kind, data_files=files, split="train")
            except Exception as e:  # datasets raises many types for unreadable files
                raise DataError(f"could not read {p} as {kind}: {e}") from e
        else:
            try:
                dataset = hfds.load_dataset(str(dataset), split=split, streaming=True)
            except Exception as e:
                raise DataError(
                    f"{dataset!r} is neither a local file nor a reachable Hugging Face dataset ({e}). "
                    f"Pass a local .txt/.jsonl/.parquet file, a list of strings, or None for the offline "
                    f"default corpus {DEFAULT!r}."
                ) from e
    if isinstance(dataset, (hfds.Dataset, hfds.IterableDataset)):
        cols = dataset.column_names or []
        if cols and text_column not in cols:
            raise DataError(f"dataset has no column {text_column!r}; columns: {cols}. Pass text_column=...")
        if isinstance(dataset, hfds.Dataset) and shuffle_seed is not None:
            dataset = dataset.shuffle(seed=shuffle_seed)
        return (row[text_column] for row in dataset if isinstance(row[text_column], str))
    raise DataError(f"unsupported dataset {type(dataset).__name__}: pass a path, a dataset name, a datasets "
                    "object or a list of strings")


def _shuffled(docs: list[str], seed: int | None) -> list[str]:
    if seed is not None:
        random.Random(seed).shuffle(docs)
    return docs


def pack(texts: Iterable[str], tokenizer, context_size: int, *, prepend_bos: bool = False,
         separator: int | None = -1) -> Iterator[torch.Tensor]:
    """Tokenize documents and pack them into ``[context_size]`` windows.

    Documents are joined by `separator` (default: the tokenizer's EOS id; None joins them directly).
    With `prepend_bos`, each window starts with the BOS token followed by ``context_size - 1`` tokens.
    A final partial window is dropped.
    """
    if context_size < 2:
        raise DataError(f"context_size must be >= 2, got {context_size}")
    if separator == -1:
        separator = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if prepend_bos else None
    if prepend_bos and bos is None:
        raise DataError(f"prepend_bos=True but {type(tokenizer).__name__} has no BOS token")
    body = context_size - (1 if bos is not None else 0)
    buf: list[int] = []
    any_text = False
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        any_text = True
        buf.extend(ids)
        if separator is not None:
            buf.append(separator)
        while len(buf) >= body:
            window, buf = buf[:body], buf[body:]
            yield torch.tensor(([bos] if bos is not None else []) + window, dtype=torch.long)
    if not any_text:
        raise DataError("the dataset holds no text: every document was empty or unreadable")


def token_mask(windows: torch.Tensor, tokenizer, *, exclude_first: bool = True,
               exclude_special: bool = True, special_ids: Sequence[int] | None = None) -> torch.Tensor:
    """Which positions of ``[batch, seq]`` windows feed the store (padding-free windows)."""
    keep = torch.ones_like(windows, dtype=torch.bool)
    if exclude_first:
        keep[:, 0] = False
    if exclude_special:
        ids = torch.tensor(sorted(set(special_ids if special_ids is not None else tokenizer.all_special_ids)),
                           dtype=windows.dtype)
        keep &= ~torch.isin(windows, ids)
    return keep


def sample_windows(tokenizer, n: int, context_size: int = DEFAULT_CONTEXT_SIZE, dataset=None, *,
                   seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` packed token windows ``[n, context_size]`` of `dataset` (documents shuffled with `seed`)
    and the :func:`token_mask` of the positions an activation store feeds (not position 0, not special
    tokens): the splice mask of downstream SAE metrics."""
    import itertools

    wins = list(itertools.islice(pack(load_texts(dataset, shuffle_seed=seed), tokenizer, context_size), n))
    if not wins:
        raise DataError(f"the evaluation text produced no full window of {context_size} tokens; give a longer "
                        "dataset or a smaller context size")
    ids = torch.stack(wins)
    return ids, token_mask(ids, tokenizer)
