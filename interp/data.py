"""Text in, fixed-length token windows out.

``load_texts`` reads a corpus: the default offline corpus, a local text/jsonl/json/csv/parquet file
or folder of them (a folder's splits named by file, as ``datasets.load_dataset`` names them; one kind
of file per folder), a Hugging Face dataset name (where the Hub is reachable), a ``datasets`` object,
or a list of strings. A ``.txt`` file is one document per line, shuffled like every in-memory corpus.
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
import itertools
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from interp.errors import DataError
from interp.models import cache_dir, looks_local

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
        split: the split of a folder or a Hub dataset. A folder's splits are named by its files or
            sub-folders as ``datasets.load_dataset(folder)`` names them (``train.jsonl``,
            ``test-0001.csv``, ``data/validation/...``); a folder with no split names is all
            ``"train"``, and so is a single file. A split that is not there is refused.
        text_column: the column holding text in tabular files and datasets.
        shuffle_seed: shuffle the document order of in-memory corpora (None keeps the file order).

    A ``.txt`` file gives one document per line (blank lines are empty documents, which ``pack``
    skips); its lines are shuffled like any other in-memory corpus (``shuffle_seed=None`` keeps them in
    order). A folder must hold one kind of file (``.jsonl`` and ``.json`` count as one); mixing kinds
    (e.g. ``.txt`` beside ``.jsonl``) is refused, since each kind needs its own reader. A path that looks
    local (a file suffix, ``./``, absolute, ...; see :func:`interp.models.looks_local`) and does not exist
    fails at once, without asking the Hub. Rows whose text is not a string (None, numbers) are
    skipped with one warning: with their count for files and ``Dataset`` objects, at the first one for a
    streamed dataset (whose length is not known); a column that holds no strings at all is refused.
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
        p = Path(dataset).expanduser()
        if p.exists():
            dataset = _load_local(p, split)
        elif isinstance(dataset, os.PathLike) or looks_local(str(dataset)):
            raise DataError(f"{str(dataset)!r} does not exist (it looks like a local path, so the Hugging Face Hub "
                            "is not asked); give an existing .txt/.jsonl/.json/.csv/.parquet file or folder, a Hub "
                            f"dataset name ('name' or 'owner/name'), or None for the offline corpus {DEFAULT!r}")
        else:
            try:
                dataset = hfds.load_dataset(str(dataset), split=split, streaming=True)
            except Exception as e:
                raise DataError(
                    f"{dataset!r} is neither a local file nor a reachable Hugging Face dataset ({e}). "
                    f"Pass a local .txt/.jsonl/.parquet file, a list of strings, or None for the offline "
                    f"default corpus {DEFAULT!r}."
                ) from e
    if isinstance(dataset, hfds.Dataset):
        _check_column(dataset.column_names, text_column)
        _check_text_type(dataset.features.get(text_column), text_column)
        skipped = _non_strings(dataset, text_column)
        if skipped:
            warnings.warn(f"{skipped} of {len(dataset)} rows have a {text_column!r} that is not a string (None, a "
                          "number, ...); they are skipped", DataWarning, stacklevel=2)
        if shuffle_seed is not None:
            dataset = dataset.shuffle(seed=shuffle_seed)
        return (row[text_column] for row in dataset if isinstance(row[text_column], str))
    if isinstance(dataset, hfds.IterableDataset):
        rows = iter(dataset)
        first = next(rows, None)
        if first is not None:
            _check_column(dataset.column_names or list(first), text_column)
            _check_text_type((dataset.features or {}).get(text_column), text_column)
            rows = itertools.chain([first], rows)
        return _streamed_texts(rows, text_column)
    raise DataError(f"unsupported dataset {type(dataset).__name__}: pass a path, a dataset name, a datasets "
                    "object or a list of strings")


class DataWarning(UserWarning):
    """Rows of a corpus that were skipped (text that is not a string), or files of a folder left unread."""


_READERS = {"txt": "text", "jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def _load_local(p: Path, split: str):
    """The `split` of a local file or folder as a ``datasets.Dataset`` (see :func:`load_texts`)."""
    import datasets as hfds

    if p.is_dir():
        from datasets.data_files import DataFilesDict, get_data_patterns

        try:
            found = {str(k): sorted(v) for k, v in
                     DataFilesDict.from_patterns(get_data_patterns(str(p)), base_path=str(p)).items()}
        except FileNotFoundError:
            found = {}
        if not found:
            raise DataError(f"{p} holds no data files; expected .txt, .jsonl, .json, .csv or .parquet files")
        if split not in found:
            raise DataError(f"{p} holds the splits {sorted(found)} (named by its files, as datasets.load_dataset "
                            f"names them), not split={split!r}; pass one of them")
        files = found[split]
        listed = {f for fs in found.values() for f in fs} | {str(p / "README.md")}
        unread = sorted(str(f) for f in p.rglob("*") if f.is_file() and str(f) not in listed
                        and not any(part.startswith((".", "__")) for part in f.relative_to(p).parts))
        if unread:
            warnings.warn(f"{len(unread)} files of {p} belong to no split and are not read (e.g. {unread[0]}); "
                          "name them by a split (train*, test*, validation*) or move them", DataWarning, stacklevel=3)
    else:
        if split != "train":
            raise DataError(f"{p} is one file, which is the split 'train'; got split={split!r}. Pass a folder with "
                            "files named by split (train.jsonl, test.jsonl) to choose a split")
        files = [str(p)]
    kinds = {}
    for f in files:
        kind = _READERS.get(Path(f).suffix.lower().lstrip("."))
        if kind is None:
            raise DataError(f"cannot read {f}: expected .txt, .jsonl, .json, .csv or .parquet")
        kinds.setdefault(kind, f)
    if len(kinds) > 1:
        raise DataError(f"{p} mixes file kinds ({', '.join(Path(f).name for f in kinds.values())}), which need "
                        "different readers; keep one kind per folder (.jsonl and .json count as one)")
    kind = next(iter(kinds))
    try:
        return hfds.load_dataset(kind, data_files=files, split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"could not read {p} as {kind}: {e}") from e


def _check_column(cols, text_column: str) -> None:
    if text_column not in (cols or []):
        raise DataError(f"dataset has no column {text_column!r}; columns: {list(cols or [])}. Pass text_column=...")


def _check_text_type(feature, text_column: str) -> None:
    """Refuse a column whose declared type holds no strings (numbers, lists); untyped or mixed columns pass."""
    import datasets as hfds

    dtype = getattr(feature, "dtype", None)
    if isinstance(feature, hfds.Value) and dtype in ("string", "large_string", "null"):
        return
    if isinstance(feature, (hfds.Value, dict, list)) or hasattr(feature, "feature"):  # a number, a struct, a list
        name = dtype if isinstance(feature, hfds.Value) else type(feature).__name__
        raise DataError(f"column {text_column!r} holds {name}, not text; pass text_column= naming a column of "
                        "strings")


def _non_strings(dataset, text_column: str) -> int:
    """How many rows of an in-memory dataset have no string in `text_column`: its nulls when it is typed as
    text, else counted row by row (a column of mixed JSON values)."""
    import datasets as hfds

    feature = dataset.features.get(text_column)
    if isinstance(feature, hfds.Value):
        return int(dataset.with_format("arrow")[text_column].null_count)
    return sum(not isinstance(v, str) for v in dataset.with_format(None)[text_column])


def _streamed_texts(rows: Iterator[dict], text_column: str) -> Iterator[str]:
    warned = False
    for i, row in enumerate(rows):
        text = row.get(text_column)
        if isinstance(text, str):
            yield text
        elif not warned:
            warned = True
            warnings.warn(f"row {i} of the streamed dataset has a {text_column!r} that is not a string "
                          f"({type(text).__name__}); such rows are skipped (this warning is given once)",
                          DataWarning, stacklevel=2)


def _shuffled(docs: list[str], seed: int | None) -> list[str]:
    if seed is not None:
        random.Random(seed).shuffle(docs)
    return docs


def pack(texts: Iterable[str], tokenizer, context_size: int, *, prepend_bos: bool = False,
         separator: int | None = -1) -> Iterator[torch.Tensor]:
    """Tokenize documents and pack them into ``[context_size]`` windows.

    Documents are joined by `separator` (default: the tokenizer's EOS id, with a :class:`DataWarning` when it
    has none; None joins them directly).
    With `prepend_bos`, each window starts with the BOS token followed by ``context_size - 1`` tokens.
    A final partial window is dropped.
    """
    if context_size < 2:
        raise DataError(f"context_size must be >= 2, got {context_size}")
    if separator == -1:
        separator = tokenizer.eos_token_id
        if separator is None:
            warnings.warn(f"{type(tokenizer).__name__} has no EOS token, so documents are packed with nothing "
                          "between them (the last token of one then predicts the first of the next); pass "
                          "separator=<a token id> to mark the joins, or separator=None to silence this",
                          DataWarning, stacklevel=2)
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
                   seed: int = 1234, prepend_bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` packed token windows ``[n, context_size]`` of `dataset` (documents shuffled with `seed`; each window
    starting with BOS with `prepend_bos`, as the SAE's training windows did) and the :func:`token_mask` of the
    positions an activation store feeds (not position 0, not special tokens): the splice mask of downstream SAE
    metrics."""
    texts = load_texts(dataset, shuffle_seed=seed)
    wins = list(itertools.islice(pack(texts, tokenizer, context_size, prepend_bos=prepend_bos), n))
    if not wins:
        raise DataError(f"the evaluation text produced no full window of {context_size} tokens; give a longer "
                        "dataset or a smaller context size")
    ids = torch.stack(wins)
    return ids, token_mask(ids, tokenizer)
