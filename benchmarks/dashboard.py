"""The dashboard data pass against capturing the same tokens alone, and its peak memory at two N.

    python benchmarks/dashboard.py [--tokens 100000 --rounds 3 --d-sae 9216 --k 32]
    python benchmarks/dashboard.py --quick --out dashboard_quick.json     # tiny sizes: checks the code path only

Full mode: the embedded model, a TopK SAE with ``--d-sae`` latents at ``--site`` (random weights,
or ``--sae FOLDER`` read with ``saes.read``; a TopK encoder costs the same whatever its weights),
``--tokens`` positions of the default corpus. Each round times both, in alternating order:

* **capture**: the windows of the default corpus packed as the pass packs them, one
  ``interp.capture`` of the site per batch (the same forward passes, stopped after the site);
* **dashboard**: ``interp.dashboard.collect`` for every latent into a fresh folder: capture, SAE
  encode, the top-k / histogram / sample bookkeeping, the periodic resume states, and at the end the
  logit effect, the neighbours and the data files.

The target is a median ratio dashboard / capture <= 1.3. With ``--profile`` (the default; the
clock reads cost nothing measurable on the CPU, and synchronize a GPU) each round also records where
the time went: the capture's ``read`` (windows, kept positions) and ``capture`` (forward passes), and
the pass's phases from ``collect(timings=...)``: ``read``, ``capture``, ``encode``, ``track``,
``save``, ``logits``, ``neighbors``, ``write`` and ``other`` (the rest); ``phases`` holds their medians
over the rounds and ``overhead`` splits the median extra time of the pass over the capture into them.
The SAE encodes to sparse codes (``encode_sparse``), as ``interp dashboard sae`` does.

Peak memory: ``collect`` runs in a child process at ``--tokens / 4`` and at ``--tokens``; each child
first runs a one-batch pass (libraries imported, corpus read), resets the kernel's high-water mark of
its resident memory (``/proc/self/clear_refs``; without it the lifetime peak ``ru_maxrss`` could be the
warm-up pass's), then reports the peak resident memory of the measured pass (``VmHWM``) minus its
resident memory just before it (``peak_delta_mb``); the target is the two peaks (``peak_rss_mb``) within
10 %, with the growth beside them (it moves by tens of MB with the allocator's state after the warm-up).
``--memory-only`` reruns just the two children and replaces the memory fields of an existing ``--out``
of the same settings.
Writes ``benchmarks/results/dashboard.json`` (every round kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SITE = "blocks.12.hook_resid_post"


QUICK_SITE = "blocks.1.hook_resid_post"


def _setup(args):
    """(model, tokenizer, site, units, config)."""
    import saes
    from interp.dashboard import DashboardConfig, sae_units

    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        from interp.models import byte_tokenizer

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=256,
                                             eos_token_id=257, pad_token_id=258)).eval().to(args.device)
        tok, site = byte_tokenizer(), QUICK_SITE
    else:
        from interp import load_model

        model, tok = load_model("smollm2-135m", device=args.device)
        site = args.site
    if args.sae:
        ckpt = saes.read(args.sae)
        encode, decoder = ckpt.encoder(sparse=True), ckpt.decoder()
    else:
        torch.manual_seed(0)
        sae = saes.build("topk", d_model=model.config.hidden_size, d_sae=args.d_sae, k=args.k).to(args.device)

        def encode(x):
            with torch.no_grad():
                return sae.encode_sparse(x)

        decoder = sae.W_dec.detach()
    cfg = DashboardConfig(tokens=args.tokens, context_size=args.context_size, batch_windows=args.batch_windows,
                          dataset=args.dataset)
    return model, tok, site, sae_units(encode, decoder), cfg


def _capture_only(model, tok, site, cfg, device, timings: dict | None = None) -> int:
    """Capture the site over the windows the pass reads; returns the positions kept. With `timings`,
    adds the seconds of ``read`` and ``capture`` to it (as ``collect(timings=...)`` counts them)."""
    import itertools

    from interp import capture
    from interp.data import load_texts, pack, token_mask

    cuda = torch.device(device).type == "cuda"

    def clock(name, t0):
        if timings is not None:
            if cuda:
                torch.cuda.synchronize()
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return time.perf_counter()

    t = time.perf_counter()
    windows = pack(load_texts(cfg.dataset, shuffle_seed=cfg.seed), tok, cfg.context_size)
    n = 0
    while n < cfg.tokens:
        chunk = list(itertools.islice(windows, cfg.batch_windows))
        if not chunk:
            break
        ids = torch.stack(chunk)
        keep = token_mask(ids, tok)
        t = clock("read", t)
        acts = capture(model, ids, [site], dtype=torch.float32, device=device)[site]
        acts[keep.to(acts.device)]  # the rows the pass encodes
        n += int(keep.sum())
        t = clock("capture", t)
    return n


PHASES = ("read", "capture", "encode", "track", "save", "logits", "neighbors", "write", "other")


def _overhead(rounds: list[dict]) -> dict:
    """Median seconds of each phase, and the median extra time of the pass split into its phases."""
    med = {f"capture_{k}": statistics.median(r["capture_phases"].get(k, 0.0) for r in rounds)
           for k in ("read", "capture", "other")}
    med |= {k: statistics.median(r["dashboard_phases"].get(k, 0.0) for r in rounds) for k in PHASES}
    extra = {k: med[k] - med.get(f"capture_{k}", 0.0) for k in PHASES}
    return {"phases": med, "overhead": extra, "overhead_s": sum(extra.values())}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(args) -> None:
    from interp.dashboard import collect

    model, tok, site, units, cfg = _setup(args)
    folder = Path(tempfile.mkdtemp(prefix="dash-bench-"))
    try:  # a one-batch pass first: libraries imported and the corpus read are not counted as the pass's memory
        collect(model, tok, site, units, folder / "warm", dataclasses.replace(cfg, tokens=1), progress=False,
                device=args.device)
        warm_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        reset = _reset_peak_rss()
        before = _rss_bytes()
        collect(model, tok, site, units, folder / "d", cfg, progress=False, device=args.device)
        peak = _peak_rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"tokens": cfg.tokens, "rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20,
                      "peak_delta_mb": (peak - before) / 2**20, "warm_pass_peak_rss_mb": warm_peak / 2**20,
                      "peak_reset": reset}))


def _reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny random model and SAE: checks the code path only")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--d-sae", type=int, default=9216)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--sae", help="an SAE folder instead of a random TopK SAE")
    ap.add_argument("--site", default=SITE)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-windows", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="record the seconds of each phase of both runs (default: on)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true",
                    help="rerun only the two memory children and update the memory fields of --out")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dashboard.json"))
    args = ap.parse_args(argv)
    if args.quick and args.tokens == ap.get_default("tokens"):
        args.tokens, args.d_sae, args.k, args.rounds, args.context_size = 1500, 64, 4, 2, 32
    if args.memory_child:
        return _memory_child(args)
    if args.memory_only:
        return _memory_only(args, argv)

    from interp.dashboard import collect

    model, tok, site, units, cfg = _setup(args)
    _capture_only(model, tok, site, cfg, args.device)  # warm-up: the corpus is built and cached, caches filled
    rounds = []
    for r in range(args.rounds):
        order = ["capture", "dashboard"] if r % 2 == 0 else ["dashboard", "capture"]
        row: dict = {"round": r, "order": order}
        for name in order:
            folder = Path(tempfile.mkdtemp(prefix="dash-bench-"))
            phases: dict | None = {} if args.profile else None
            t0 = time.perf_counter()
            if name == "capture":
                row["tokens"] = _capture_only(model, tok, site, cfg, args.device, phases)
            else:
                collect(model, tok, site, units, folder / "d", cfg, progress=False, device=args.device, timings=phases)
            row[f"{name}_s"] = time.perf_counter() - t0
            if phases is not None:
                phases["other"] = row[f"{name}_s"] - sum(phases.values())
                row[f"{name}_phases"] = phases
            shutil.rmtree(folder, ignore_errors=True)
        row["ratio"] = row["dashboard_s"] / row["capture_s"]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    memory = _memory(args)
    med_c = statistics.median(r["capture_s"] for r in rounds)
    med_d = statistics.median(r["dashboard_s"] for r in rounds)
    result = {
        "command": "python benchmarks/dashboard.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
        "model": "tiny random Llama" if args.quick else "smollm2-135m", "site": site, "d_sae": args.d_sae,
        "k": args.k, "sae": args.sae, "tokens": args.tokens, "context_size": args.context_size,
        "batch_windows": args.batch_windows, "rounds": rounds, "median_capture_s": med_c,
        "median_dashboard_s": med_d, "ratio": med_d / med_c,
        "ratio_rounds_median": statistics.median(r["ratio"] for r in rounds), "ratio_target": 1.3,
        **_memory_fields(memory), "load_average": os.getloadavg(),
        **(_overhead(rounds) if args.profile else {}),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"dashboard / capture = {result['ratio']:.3f} (median of {len(rounds)} rounds; target <= 1.3); "
          f"peak memory {memory[0]['peak_delta_mb']:.1f} MB at {memory[0]['tokens']} tokens, "
          f"{memory[1]['peak_delta_mb']:.1f} MB at {memory[1]['tokens']}; wrote {out}")
    if args.profile:
        parts = ", ".join(f"{k} {v:+.2f}" for k, v in result["overhead"].items())
        print(f"extra seconds of the pass over the capture (medians): {result['overhead_s']:.2f} = {parts}")
    return result


def _memory_fields(memory: list[dict]) -> dict:
    return {"memory": memory,
            "memory_peak_rss_ratio": memory[1]["peak_rss_mb"] / max(memory[0]["peak_rss_mb"], 1e-9),
            "memory_peak_ratio": memory[1]["peak_delta_mb"] / max(memory[0]["peak_delta_mb"], 1e-9),
            "memory_target": "peak resident memory of the pass (peak_rss_mb) at the two token counts within 10 %; "
                             "peak_delta_mb (its growth over the memory just before the pass) is beside it"}



def _memory_only(args, argv) -> dict:
    out = Path(args.out)
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--memory-only updates an existing result; could not read {out}: {e}") from None
    mine = {"d_sae": args.d_sae, "k": args.k, "site": QUICK_SITE if args.quick else args.site,
            "context_size": args.context_size, "batch_windows": args.batch_windows,
            "device": args.device, "tokens": args.tokens, "quick": args.quick, "sae": args.sae}
    differ = {k: (result.get(k), v) for k, v in mine.items() if result.get(k) != v}
    if differ:
        raise SystemExit(f"--memory-only: {out} was measured with other settings {differ} (saved, given); "
                         "pass the same settings or rerun the whole benchmark")
    memory = _memory(args)
    result |= _memory_fields(memory)
    result["memory_command"] = "python benchmarks/dashboard.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.write_text(json.dumps(result, indent=1))
    print(f"peak memory {memory[0]['peak_delta_mb']:.1f} MB at {memory[0]['tokens']} tokens, "
          f"{memory[1]['peak_delta_mb']:.1f} MB at {memory[1]['tokens']}; updated {out}")
    return result


def _memory(args) -> list[dict]:
    memory = []
    child = ["--d-sae", str(args.d_sae), "--k", str(args.k), "--site", args.site, "--context-size",
             str(args.context_size), "--batch-windows", str(args.batch_windows), "--device", args.device]
    child += ["--quick"] * args.quick + ["--dataset", args.dataset] * bool(args.dataset)
    child += ["--sae", args.sae] * bool(args.sae)
    for n in (args.tokens // 4, args.tokens):
        cmd = [sys.executable, __file__, *child, "--tokens", str(n), "--memory-child"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(memory[-1]), flush=True)
    return memory


if __name__ == "__main__":
    main()
