"""Run every benchmark in benchmarks/ on one device and gather their ratios to the peers in one file.

    python benchmarks/run_all.py --device cuda                     # full sizes on one GPU, under 10 minutes
    python benchmarks/run_all.py --device cpu --quick --out DIR    # tiny sizes: the code path only

Full mode first captures the activation cache that ``sae_train.py`` and ``sae_step_phases.py`` read (``interp
capture`` of the embedded model at ``blocks.12.hook_resid_post``) into a temporary folder, runs ``sae_train.py
--quick`` once for every library and throws it away (the machine's first use of each library is not timed), then
runs each benchmark in its own process with the sizes in :func:`plan`, under one deadline (``--budget-s``, 590 s
by default): each benchmark gets at most its own cap and what is left of the budget, and one that runs out of
time is stopped and recorded as such, so the whole run ends in time whatever the machine. Quick mode builds a
tiny random Llama, a byte-level tokenizer and a small text file in a temporary folder, hands them to the
benchmarks that read a model or text, and runs every benchmark in this process (their shared imports are paid
once); ``tests/test_run_all.py`` runs it on the CPU so that no benchmark rots.

Writes ``<out>/<benchmark>.json`` (each benchmark's own result file), ``<out>/<benchmark>.log`` (its
output) and ``<out>/summary.json``: the device, every benchmark's status (``ok``, ``failed``,
``timed out``), seconds, command and headline ratios read from its JSON (:data:`HEADLINES`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "gpu"
BENCHMARKS = ("sae_train", "sae_step_phases", "mp_sae", "capture", "intervene", "patching", "dashboard",
              "probe_sweep", "sae_end_to_end")
"""In the order they run: ``sae_end_to_end`` (text in, trained SAE out, against the peers' own trainers) comes
last, in what the budget leaves of its cap (alone: ``--only sae_end_to_end``)."""
LIBRARIES = ("interp", "sparsify", "saelens")
"""The libraries ``sae_train.py`` compares in full mode."""
CACHE_READERS = ("sae_train", "sae_step_phases")
"""The benchmarks that read the activation cache full mode captures first."""
CACHE_SITE = "blocks.12.hook_resid_post"
CACHE_TOKENS = 300_000
CAPS_S = {"cache": 120, "warmup": 40, "sae_train": 240, "sae_step_phases": 60, "mp_sae": 90, "capture": 90,
          "intervene": 90, "patching": 120, "dashboard": 150, "probe_sweep": 90, "sae_end_to_end": 240}
"""Most seconds each step may take in full mode (the overall budget still applies)."""


def shown(path: Path) -> str:
    """``path`` as a benchmark's argument: relative to the checkout when inside it (the processes run there), so
    that the commands recorded in the results name no folder of the machine that ran them."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def recorded(cmd: list[str], cache: Path | None) -> str:
    """A command line as the summary records it: the temporary cache folder written as ``CACHE``."""
    return " ".join("CACHE" if cache is not None and a == str(cache) else a for a in cmd)


def plan(name: str, *, device: str, quick: bool, out: Path, work: Path, cache: Path | None) -> list[str]:
    """Arguments of one benchmark. Full sizes are chosen to fit one GPU's share of the 10 minutes."""
    args = ["--device", device, "--out", shown(out / f"{name}.json")]
    model = ["--model", str(work / "tiny-llama")] if quick else []
    if quick:
        sizes = {"sae_train": ["--quick", "--bf16"],
                 "sae_step_phases": ["--quick", "--profile-steps", "2", "--decode-kernels", "embedding_bag", "bag_sum"],
                 "mp_sae": ["--quick"], "capture": ["--quick", "--bf16"],
                 "intervene": ["--quick"], "patching": ["--quick", "--rounds", "1"],
                 "dashboard": ["--quick", "--dataset", str(work / "docs.jsonl")], "probe_sweep": ["--quick"],
                 "sae_end_to_end": ["--quick", "--rounds", "1", "--text", str(work / "docs.jsonl")]}
    else:
        sizes = {"sae_train": ["--cache", str(cache), "--steps", "200", "--batch", "4096", "--repeats", "2", "--bf16",
                               "--libraries", *LIBRARIES],
                 "sae_step_phases": ["--cache", str(cache), "--batch", "4096", "--rounds", "3",
                                     "--profile-steps", "20", "--decode-kernels", "embedding_bag", "bag_sum"],
                 "mp_sae": ["--overcomplete-bypass", "--rounds", "5"],
                 "capture": ["--bf16", "--repeats", "7"],
                 "intervene": [],
                 "patching": ["--rounds", "3", "--nnsight-layers", "4"],
                 "dashboard": ["--tokens", "100000", "--rounds", "3"],
                 "probe_sweep": [],
                 "sae_end_to_end": ["--rounds", "1", "--model-batch", "32"]}
    takes_model = name in ("capture", "intervene", "patching")
    return sizes[name] + (model if takes_model else []) + args


HEADLINES = {
    "sae_train": ("summary",),
    "sae_step_phases": ("summary.ms", "summary.step_fraction_of_ceiling", "summary.step_bag_sum_over_embedding_bag",
                        "summary.by_kernel", "profile.step_ms_median", "profile.kernel_launches_per_step",
                        "profile.device_ms_per_step", "profile.host_reads_per_step.total"),
    "mp_sae": ("speedup", "rounds.encode_vs_faster_peer_warm_median"),
    "capture": ("per_round_ratio_median", "speedup_vs_bridge_all30", "speedup_vs_nnsight_all30",
                "speedup_vs_bridge_all30_kept_on_device", "speedup_vs_nnsight_all30_kept_on_device",
                "bf16_quality.max_over_sites", "targets_met"),
    "intervene": ("shapes",),
    "patching": ("ratio_nnsight_over_exact_per_cell.median", "ratio_exact_over_attribution.median",
                 "spearman_attribution_vs_exact_effect_cells", "spearman_attribution_vs_exact"),
    "dashboard": ("ratio", "memory_peak_ratio"),
    "probe_sweep": ("speedup_wall", "speedup_cpu", "f1_abs_diff"),
    "sae_end_to_end": ("summary.tokens_per_s_ratio",),
}
"""The keys (dotted paths) of each benchmark's JSON that summary.json repeats."""


def headlines(name: str, result: dict) -> dict:
    out = {}
    for path in HEADLINES[name]:
        value = result
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if name == "intervene" and path == "shapes" and value:  # per shape: each peer's time over interp's
            value = {f"{s['batch']}x{s['seq']}": {r["method"]: r.get("median_ratio_to_interp")
                                                   for r in s["results"] if "median_ratio_to_interp" in r}
                     for s in value}
        out[path] = value
    return out


def tiny_model(folder: Path) -> None:
    """A 2-layer random Llama and a byte-level tokenizer saved to ``folder`` (offline)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def text_file(path: Path) -> None:
    """About 30k characters of plain sentences as JSON lines (the quick dashboard's corpus)."""
    import random

    rng = random.Random(0)
    words = ("the cat sat on the mat while we met on Monday and Friday to see a dog run in the park; models read "
             "text and write numbers, then people read the numbers again").split()
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))})
                              for _ in range(150)))


def run_process(cmd: list[str], log: Path, timeout: float) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timed out", f"stopped after {timeout:.0f} s"
    if done.returncode != 0:
        return "failed", log.read_text()[-3000:]
    return "ok", ""


def before_benchmarks(cmd: list[str], log: Path, timeout: float, command: str) -> dict:
    """A step of full mode before the benchmarks (the cache, the warm-up), in its own process: its summary row,
    ``command`` being the command line as recorded."""
    t0 = time.perf_counter()
    status, err = run_process(cmd, log, timeout)
    return {"status": status, "seconds": time.perf_counter() - t0, "command": command,
            **({"error": err} if err else {})}


def run_in_process(name: str, argv: list[str], log: Path) -> tuple[str, str]:
    """``benchmarks/<name>.py``'s ``main(argv)`` in this process (a process it starts finds this checkout)."""
    sys.path.insert(0, str(HERE))
    saved_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), saved_path or ""])
    buf = io.StringIO()
    status = "ok"
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            importlib.import_module(name).main(argv)
    except (Exception, SystemExit):  # noqa: BLE001 - one benchmark's failure is recorded, the others still run
        buf.write(traceback.format_exc())
        status = "failed"
    finally:
        sys.path.remove(str(HERE))
        for module in (name, "patching_weekday"):  # benchmark modules are not left behind under short names
            sys.modules.pop(module, None)
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path
    log.write_text(buf.getvalue())
    return status, (buf.getvalue()[-3000:] if status != "ok" else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="device every benchmark runs on (default: cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a tiny model, in this process: the code path")
    ap.add_argument("--out", default=str(OUT), help=f"folder for the results (default: {shown(OUT)})")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    ap.add_argument("--budget-s", type=float, default=590.0, help="deadline of the whole full-mode run, in seconds")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the benchmark processes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    start = time.perf_counter()
    command = " ".join(["python", "benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    summary: dict = {"device": args.device, "quick": args.quick, "python": platform.python_version(),
                     "machine": platform.machine(), "cpus": os.cpu_count(), "budget_s": args.budget_s,
                     "command": command, "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="interp-bench-") as tmp:
        work = Path(tmp)
        cache = None
        if args.quick:
            tiny_model(work / "tiny-llama")
            text_file(work / "docs.jsonl")
        elif set(CACHE_READERS) & set(names):
            cache = work / "cache_l12"
            cmd = [args.python, "-m", "interp.cli", "capture", "--sites", CACHE_SITE, "--tokens", str(CACHE_TOKENS),
                   "--device", args.device, "--out", str(cache)]
            summary["cache"] = before_benchmarks(cmd, out / "cache.log", min(CAPS_S["cache"], args.budget_s),
                                                 recorded(cmd[1:], cache))
            if summary["cache"]["status"] != "ok":
                for name in CACHE_READERS:
                    if name in names:
                        names.remove(name)
                        summary["benchmarks"][name] = {"status": "skipped", "error": "the activation cache failed"}
        if not args.quick and "sae_train" in names:
            # The first process to train on a fresh machine pays its first use of the libraries (loading them from
            # disk, compiling kernels): about a second on the first GPU run, all of it in round 0's first row, which
            # is always this project's. A throwaway quick run of every library takes it before the timed rounds.
            warm = ["--quick", "--libraries", *LIBRARIES, "--device", args.device]
            summary["warmup"] = before_benchmarks(
                [args.python, str(HERE / "sae_train.py"), *warm, "--out", str(work / "warmup.json")],
                out / "warmup.log", min(CAPS_S["warmup"], args.budget_s),
                " ".join(["python", "benchmarks/sae_train.py", *warm]))
        for name in names:
            argv_b = plan(name, device=args.device, quick=args.quick, out=out, work=work, cache=cache)
            left = args.budget_s - (time.perf_counter() - start)
            t0 = time.perf_counter()
            if args.quick:
                status, err = run_in_process(name, argv_b, out / f"{name}.log")
            elif left < 10:
                status, err = "skipped", f"the {args.budget_s:.0f} s budget was spent"
            else:
                status, err = run_process([args.python, str(HERE / f"{name}.py"), *argv_b], out / f"{name}.log",
                                          min(CAPS_S[name], left))
            row = {"status": status, "seconds": time.perf_counter() - t0,
                   "command": recorded(["python", f"benchmarks/{name}.py", *argv_b], cache)}
            result_file = out / f"{name}.json"
            if status == "ok":
                row["headlines"] = headlines(name, json.loads(result_file.read_text()))
            else:
                row["error"] = err
            summary["benchmarks"][name] = row
            print(f"{name:12s} {status:9s} {row['seconds']:7.1f} s", flush=True)
    summary["total_seconds"] = time.perf_counter() - start
    with contextlib.suppress(ImportError):
        import torch

        summary["torch"] = torch.__version__
        if args.device.startswith("cuda") and torch.cuda.is_available():
            summary["gpu"] = torch.cuda.get_device_name()
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    bad = [n for n, r in summary["benchmarks"].items() if r["status"] != "ok"]
    print(f"{len(summary['benchmarks']) - len(bad)} of {len(summary['benchmarks'])} benchmarks ran "
          f"({summary['total_seconds']:.0f} s); wrote {out / 'summary.json'}" + (f"; not ok: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
