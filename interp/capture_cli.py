"""``interp capture``: write a disk cache of activations; ``interp corpus``: describe the default corpus."""

from __future__ import annotations

import argparse
import json
import time

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="cache activations of a model to disk (resumable, torchrun-aware)")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, HF name or local path")
    p.add_argument("--sites", nargs="+", required=True, help="e.g. blocks.12.hook_resid_post")
    p.add_argument("--dataset", default=None, help="local .txt/.jsonl/.parquet file or folder, HF dataset "
                   "name, or omit for the offline default corpus")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokens", type=int, required=True, help="rows to cache (over all ranks)")
    p.add_argument("--out", required=True, help="cache folder (re-run the same command to resume)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--shard-tokens", type=int, default=65536)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the cached activations")
    p.add_argument("--device", default=None)
    p.add_argument("--keep-first", action="store_true", help="keep position 0 of each window")
    p.set_defaults(func=run_capture)
    c = sub.add_parser("corpus", help="build (once) and describe the offline default corpus")
    c.add_argument("--count-tokens", action="store_true", help="tokenize it with the embedded model's tokenizer")
    c.set_defaults(func=run_corpus)


def run_capture(args) -> int:
    from interp.cache import cache_activations
    from interp.models import load_model

    model, tok = load_model(args.model, device=args.device)
    t0 = time.perf_counter()
    out = cache_activations(model, tok, args.sites, args.out, args.tokens, dataset=args.dataset,
                            context_size=args.context_size, model_batch_size=args.batch_size,
                            shard_tokens=args.shard_tokens, dtype=getattr(torch, args.dtype),
                            model_name=args.model, exclude_first=not args.keep_first,
                            text_column=args.text_column)
    print(f"cache written to {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def run_corpus(args) -> int:
    from interp.data import default_corpus_path, load_texts

    path = default_corpus_path()
    docs = list(load_texts(shuffle_seed=None))
    info = {"path": str(path), "documents": len(docs), "characters": sum(map(len, docs))}
    if args.count_tokens:
        from interp.models import load_model

        _, tok = load_model(device="cpu")
        info["tokens_smollm2"] = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    print(json.dumps(info, indent=1))
    return 0
