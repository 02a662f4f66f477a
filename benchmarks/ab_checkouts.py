"""An A/B of two checkouts of this project on the SAE training step: ``benchmarks/sae_step_phases.py`` run from each
checkout in turn, ``--pairs`` times, alternating which of the two goes first, with every pair's rounds in one JSON.

    python benchmarks/ab_checkouts.py --before ../old-checkout --pairs 7 -- --cache CACHE --batch 1024 --rounds 3

``--after`` is this checkout unless given. Each run is a fresh process of that checkout's own
``sae_step_phases.py`` with the checkout first on ``PYTHONPATH``, so that it imports its own ``saes``; the arguments
after ``--`` go to both. The machine's speed drifts between runs by more than most changes to the step, so the
summary is of pairs: per pair the ratio of the two steps and the gain in the fraction of the encoder-matmul
ceiling (which ``sae_step_phases.py`` measures beside each of its rounds, so it moves with the machine), and the
medians over pairs of the step, the time outside the matmul, each phase and that fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from interp.provenance import recorded_command  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ab_checkouts.json"
SIDES = ("before", "after")
SCRIPT = Path("benchmarks") / "sae_step_phases.py"
KERNEL_FLAGS = ("--encoder-kernels", "--step-kernels", "--decode-kernels", "--grad-kernels")
"""``sae_step_phases.py``'s own A/Bs of kernels inside one checkout: not what this script compares."""


def run_side(checkout: Path, args: list[str], out: Path) -> dict:
    """``sae_step_phases.py ARGS --out OUT`` from ``checkout``, in a fresh process that imports that checkout's code;
    its result."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(checkout) + (os.pathsep + path if path else "")}
    run = subprocess.run([sys.executable, str(checkout / SCRIPT), *args, "--out", str(out)], cwd=checkout, env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or run.stdout.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{SCRIPT} in {checkout} exited with {run.returncode}: {last}")
    return json.loads(out.read_text())


def summarise(pairs: list[dict]) -> dict:
    """Medians over pairs of each side's step, time outside the matmul, phases and fraction of the ceiling; per pair
    the ratio of the steps (before over after) and the gain in that fraction (after less before)."""
    def med(f) -> dict:
        return {s: statistics.median(f(p[s]) for p in pairs) for s in SIDES}

    phases = list(pairs[0]["before"]["summary_ms"])
    ratios = [p["before"]["summary_ms"]["step"] / p["after"]["summary_ms"]["step"] for p in pairs]
    gains = [p["after"]["fraction_of_ceiling"] - p["before"]["fraction_of_ceiling"] for p in pairs]
    return {"step_ms_median": med(lambda s: s["summary_ms"]["step"]),
            "non_matmul_ms_median": med(lambda s: s["summary_ms"]["step"] - s["summary_ms"]["encoder_matmul"]),
            "phase_ms_median": {s: {ph: statistics.median(p[s]["summary_ms"][ph] for p in pairs) for ph in phases}
                                for s in SIDES},
            "fraction_of_ceiling_median": med(lambda s: s["fraction_of_ceiling"]),
            "fraction_of_ceiling_per_pair": {s: [p[s]["fraction_of_ceiling"] for p in pairs] for s in SIDES},
            "step_ratio_before_over_after_per_pair": ratios,
            "step_ratio_before_over_after_median": statistics.median(ratios),
            "fraction_gain_per_pair": gains,
            "pairs_where_after_has_the_higher_fraction": sum(g > 0 for g in gains)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s --before CHECKOUT [--after CHECKOUT] [--pairs N] [--out OUT] "
                                      "-- SAE_STEP_PHASES_ARGS")
    p.add_argument("--before", required=True, help="the checkout of the code to compare against (the baseline)")
    p.add_argument("--after", default=str(ROOT), help="the checkout of the changed code (default: this one)")
    p.add_argument("--pairs", type=int, default=7, help="runs of each checkout, alternating which goes first")
    p.add_argument("--what", default="", help="a line on what changed between the two, kept in the result")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(ours)
    checkouts = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    for side, path in checkouts.items():
        if not (path / SCRIPT).is_file():
            p.error(f"--{side} {path} holds no {SCRIPT}; expected a checkout of this project")
    if args.pairs < 1:
        p.error(f"--pairs is {args.pairs}; expected at least 1")
    if any(a.split("=")[0] in (*KERNEL_FLAGS, "--out") for a in theirs):
        p.error(f"the arguments for {SCRIPT.name} ({' '.join(theirs)}) name --out or one of its own kernel A/Bs "
                f"({', '.join(KERNEL_FLAGS)}): this script compares two checkouts on the trainer's own kernels and "
                "writes their results itself; run the kernel A/Bs with sae_step_phases.py alone")
    load_before = os.getloadavg()[0]
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
            pair: dict = {"pair": i + 1, "order": order}
            for side in order:
                res = run_side(checkouts[side], theirs, Path(tmp) / f"{side}-{i}.json")
                pair[side] = {"summary_ms": res["summary"]["ms"],
                              "fraction_of_ceiling": res["summary"]["step_fraction_of_ceiling"],
                              "rounds": res["rounds"], "machine": res["machine"],
                              "load_average_before_after": res["load_average_before_after"]}
                print(json.dumps({"pair": i + 1, "side": side, "step_ms": round(res["summary"]["ms"]["step"], 2),
                                  "fraction_of_ceiling": round(res["summary"]["step_fraction_of_ceiling"], 4)}),
                      flush=True)
            pairs.append(pair)
    summary = summarise(pairs)
    result = {"benchmark": "sae_step_phases A/B of two checkouts", "what": args.what,
              "command": recorded_command("benchmarks/ab_checkouts.py", argv, placeholder_flags=("cache",)),
              "machine": pairs[0]["after"]["machine"], "pairs": pairs, "summary": summary,
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "note": f"{os.cpu_count()} CPUs; each run's own load averages are in its pair; pairs and their medians, "
                      "since the machine's speed drifts between runs"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    m = summary
    print(f"\nstep (median of {args.pairs} pairs): before {m['step_ms_median']['before']:.2f} ms, after "
          f"{m['step_ms_median']['after']:.2f} ms; before / after {m['step_ratio_before_over_after_median']:.3f}x")
    print(f"fraction of the matmul ceiling: {m['fraction_of_ceiling_median']['before']:.1%} -> "
          f"{m['fraction_of_ceiling_median']['after']:.1%} (higher after in "
          f"{m['pairs_where_after_has_the_higher_fraction']} of {args.pairs} pairs)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
