"""``interp capture`` (a disk cache of activations), ``interp corpus`` (the offline default corpus) and
``interp sites MODEL`` (every site a model has, with its width).

    interp capture --model smollm2-135m --sites blocks.12.hook_resid_post --tokens 1000000 --out cache/
    interp sites smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import time

from interp.cache import cache_activations
from interp.cli.options import add_options, signature_options
from interp.models import EMBEDDED

DTYPES = ("float32", "bfloat16", "float16")

CAPTURE_ARGS = {
    "dataset": "text to read: a local .txt/.jsonl/.json/.csv/.parquet file or folder, or a Hugging Face dataset name "
               "(omit: the offline default corpus)",
    "text_column": "column holding the text in a table dataset",
    "context_size": "tokens per window",
    "model_batch_size": "windows per forward pass",
    "shard_tokens": "rows per shard file",
    "seed": "seed of the document order",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="cache activations of a model to disk (resumable, can be grown, "
                       "torchrun-aware)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED,
                   help=f"embedded model name, HF name or local path (default: {EMBEDDED})")
    p.add_argument("--sites", nargs="+", required=True, help="sites to capture, e.g. blocks.12.hook_resid_post "
                   "(see 'interp sites MODEL')")
    p.add_argument("--tokens", type=int, required=True, help="rows to cache over all ranks; a larger number than "
                   "a finished cache holds grows it (required)")
    p.add_argument("--out", required=True, help="cache folder (run the same command again to resume) (required)")
    add_options(p, signature_options(cache_activations, CAPTURE_ARGS))
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the cached activations (default: float32)")
    p.add_argument("--model-dtype", choices=DTYPES, default=None, help="dtype the model runs in (default: float32); "
                   "bfloat16 halves its memory and runs faster where the CPU/GPU has bf16 units, with activations "
                   "that differ from fp32's (benchmarks/capture.py --bf16 measures both); recorded in the manifest")
    p.add_argument("--keep-first", action="store_true", help="keep position 0 of each window (default: left out, "
                   "an attention sink on models without BOS)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=run_capture)

    c = sub.add_parser("corpus", help="build (once) and describe the offline default corpus")
    c.add_argument("--count-tokens", action="store_true", help="tokenize it with the embedded model's tokenizer")
    c.set_defaults(func=run_corpus)

    s = sub.add_parser("sites", help="list every site of a model with its width")
    s.add_argument("model", nargs="?", default=EMBEDDED, help=f"model name or local path (default: {EMBEDDED})")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=run_sites)


def run_capture(args: argparse.Namespace) -> int:
    import torch

    from interp.models import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.model_dtype)
    kwargs = {k: getattr(args, k) for k in CAPTURE_ARGS if getattr(args, k) is not None}
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    info = cache_activations(model, tok, args.sites, args.out, args.tokens, model_name=args.model,
                             exclude_first=not args.keep_first, **kwargs)
    print(f"{info.summary()} ({time.perf_counter() - t0:.0f} s)")
    return 0


def run_corpus(args: argparse.Namespace) -> int:
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


def run_sites(args: argparse.Namespace) -> int:
    from interp.capture import site_widths
    from interp.errors import SiteError
    from interp.layouts import KINDS, find_blocks
    from interp.models import load_model
    from interp.sites import resolve

    model, _ = load_model(args.model, device="cpu")
    widths = site_widths(model)
    refused = {}
    for layer in range(len(find_blocks(model))):
        for kind in KINDS:
            name = f"blocks.{layer}.{kind}"
            if name not in widths:
                try:
                    resolve(model, name)
                except SiteError as e:
                    refused[name] = str(e)
    if args.json:
        print(json.dumps({"sites": widths, "refused": refused}, indent=1))
        return 0
    print(f"{'site':36s} width")
    for name, width in widths.items():
        print(f"{name:36s} {width}")
    for name, why in refused.items():
        print(f"{name:36s} refused: {why}")
    print(f"{len(widths)} sites ({len(refused)} refused); raw module paths (e.g. model.layers.0.mlp) are accepted too")
    return 0
