"""Crash and race scenarios for tests/test_faults.py, run in a subprocess of their own.

    python tests/fault_driver.py OUT_DIR train cache race     # prints one JSON report line

The process sets torch to one thread before any tensor work, builds the tiny model once, and then
forks a child for every run: a child that is to crash SIGKILLs itself at a chosen point, counted by
calls to the function that point wraps (the N-th checkpoint written, the N-th shard renamed ...), so
every kill lands at the same place on every machine. Forking after single-threaded setup is safe and
costs no second import of torch and transformers.

Scenarios (each writes under OUT_DIR/<scenario>/; the test compares the files):

* ``train``: an SAE training run killed at 10 points, each resumed by the next child, then finished;
  beside it the same run uninterrupted (``ref``).
* ``cache``: an activation cache killed at 10 points, resumed the same way; beside it ``ref``.
* ``race``: 20 rounds of two writers released together on one fresh cache folder (odd rounds with
  different dtypes); the first to lock the folder holds it until the other one has finished, so
  the other always meets the lock. ``ref-float32`` / ``ref-bfloat16`` are single-writer builds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "saes")]

import torch  # noqa: E402

torch.set_num_threads(1)

D, M, ROWS, STEPS = 16, 64, 64, 30
DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog on day {i}. " * (2 + i % 3) for i in range(60)]
CACHE_KW = dict(context_size=32, model_batch_size=4, shard_tokens=150, progress=False)
CACHE_ROWS = 2400
RACE_ROWS = 600


# ------------------------------------------------------------------------------------------ forking
def in_child(fn: Callable[[], object], kill: tuple[str, int] | None = None) -> dict:
    """Run `fn` in a forked child, SIGKILLed at `kill` = (point, n); returns how it ended."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            if kill is not None:
                install_kill(*kill)
            out = fn()
            os.write(w, json.dumps({"result": out}).encode())
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
            os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}).encode())
            code = 3
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    report = json.loads(data) if data else {}
    report["pid"] = pid
    report["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    report["exit"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    report["kill_at"] = list(kill) if kill else None
    return report


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, name: str, n: int, *, before: bool, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Replace ``owner.name`` by a wrapper that SIGKILLs this process at its n-th matching call,
    before or after the real call."""
    real = getattr(owner, name)
    seen = [0]

    def wrapper(*args, **kwargs):
        hit = when(*args, **kwargs)
        if hit:
            seen[0] += 1
        if hit and before and seen[0] == n:
            _die()
        out = real(*args, **kwargs)
        if hit and not before and seen[0] == n:
            _die()
        return out

    setattr(owner, name, wrapper)


def install_kill(point: str, n: int) -> None:
    import interp.cache
    import saes.checkpoint
    import saes.resume
    import saes.run_folder
    import saes.trainer

    if point == "step":  # after the n-th optimizer step, before that step's checkpoint
        _wrap(saes.trainer.Trainer, "_step", n, before=False)
    elif point == "checkpoint_files":  # a resume checkpoint half written in its temporary folder
        _wrap(saes.resume, "save_file", n, before=False)
    elif point == "checkpoint_renamed":  # a checkpoint folder in place, latest.json not yet pointing at it
        _wrap(saes.resume, "write_json", n, before=True)
    elif point == "export":  # the trained SAE half written in its temporary folder
        _wrap(saes.checkpoint, "save_file", n, before=False)
    elif point == "history":  # the SAE saved, train_history.json not yet
        _wrap(saes.run_folder, "write_json", n, before=True)
    elif point == "shard_written":  # a shard in its temporary file
        _wrap(interp.cache, "save_file", n, before=False)
    elif point == "shard_unlisted":  # a shard renamed into place, not yet in the rank manifest
        _wrap(interp.cache, "_write_json", n, before=True, when=lambda path, *a, **k: "rank" in Path(path).name)
    elif point == "manifest_half":  # the rank manifest written to its temporary file, not renamed
        _wrap(os, "replace", n, before=True, when=lambda src, dst, *a, **k: Path(dst).name == "manifest.rank0.json")
    elif point == "shard_listed":  # between two shards, everything consistent
        _wrap(interp.cache, "_write_json", n, before=False, when=lambda path, *a, **k: "rank" in Path(path).name)
    else:
        raise ValueError(point)


# ------------------------------------------------------------------------------------------ training
TRAIN_KILLS = [("step", 3), ("checkpoint_files", 1), ("checkpoint_renamed", 2), ("step", 7), ("checkpoint_files", 2),
               ("checkpoint_renamed", 1), ("step", 9), ("checkpoint_files", 1), ("export", 1), ("history", 1)]
"""Each child resumes where the previous one left off; counts are per child."""


def train_once(out: Path) -> dict:
    import warnings

    from sae_testdata import SyntheticSource

    import saes
    from saes.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    cfg = TrainConfig(total_tokens=ROWS * STEPS, batch_tokens=ROWS, lr=3e-3, progress=False, log_every=3,
                      checkpoint_every=4, keep_checkpoints=2, dead_tokens=ROWS * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no resume checkpoint: starting from step 0"
        tr = Trainer(sae, cfg, out_dir=out).fit(SyntheticSource(D, rows=ROWS), resume=True)
    return {"steps": tr.steps_, "tokens": tr.tokens_}


def left(folder: Path) -> list[str]:
    """Every file and folder under `folder` (relative names), as a killed run left it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def chain(fn: Callable[[], object], kills: list, folder: Path) -> list[dict]:
    """Kill a run at each point in turn (each child resuming the last), then let one finish."""
    runs = []
    for kill in [*kills, None]:
        runs.append({**in_child(fn, kill), "left": left(folder)})
    return runs


def scenario_train(root: Path) -> dict:
    runs = chain(lambda: train_once(root / "run"), TRAIN_KILLS, root / "run")
    ref = in_child(lambda: train_once(root / "ref"))
    return {"runs": runs, "ref": ref}


# ------------------------------------------------------------------------------------------ caching
CACHE_KILLS = [("shard_written", 2), ("shard_unlisted", 1), ("manifest_half", 3), ("shard_listed", 2),
               ("shard_written", 1), ("shard_unlisted", 2), ("shard_listed", 1), ("manifest_half", 1),
               ("shard_written", 3), ("shard_unlisted", 1)]


def cache_once(out: Path, n_tokens: int = CACHE_ROWS, dtype: torch.dtype = torch.float32) -> dict:
    from conftest import byte_tokenizer, tiny_model

    from interp.cache import cache_activations

    info = cache_activations(tiny_model("llama"), byte_tokenizer(), ["blocks.1.hook_resid_post"], out, n_tokens,
                             dataset=DOCS, dtype=dtype, **CACHE_KW)
    return {"rows": info.rows, "rows_added": info.rows_added, "complete": info.complete}


def scenario_cache(root: Path) -> dict:
    runs = chain(lambda: cache_once(root / "run"), CACHE_KILLS, root / "run")
    ref = in_child(lambda: cache_once(root / "ref"))
    return {"runs": runs, "ref": ref}


# ------------------------------------------------------------------------------------------ racing
def racer(folder: Path, dtype: torch.dtype, go: int, hold: int) -> dict:
    """Wait for the release, then cache into `folder`; a writer that gets the lock waits in its data
    loading until the parent lets it go (after the other writer has ended)."""
    import interp.cache
    from interp.errors import CacheError

    real = interp.cache.load_texts

    def held(*a, **k):
        os.read(hold, 1)
        return real(*a, **k)

    interp.cache.load_texts = held
    os.read(go, 1)
    try:
        got = cache_once(folder, RACE_ROWS, dtype)
    except CacheError as e:
        return {"outcome": "refused", "message": str(e)}
    return {"outcome": "wrote", **got}


def race_round(folder: Path, dtypes: tuple[torch.dtype, torch.dtype]) -> list[dict]:
    go_r, go_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pids = {}
    for dt in dtypes:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = {"dtype": str(dt).removeprefix("torch."), **racer(folder, dt, go_r, hold_r)}
            except BaseException as e:  # noqa: BLE001
                out = {"outcome": "error", "message": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        pids[pid] = r
    os.write(go_w, b"xx")  # release both at once
    first, _ = os.wait()  # the writer that did not get the lock (the other waits for `hold`)
    os.write(hold_w, b"x")
    second, _ = os.wait()
    results = []
    for pid in (first, second):
        data = b""
        while chunk := os.read(pids[pid], 65536):
            data += chunk
        results.append({"pid": pid, **json.loads(data)})
    for fd in (go_r, go_w, hold_r, hold_w, *pids.values()):
        os.close(fd)
    return results


def scenario_race(root: Path, rounds: int = 20) -> dict:
    refs = {name: in_child(lambda dt=dt, name=name: cache_once(root / f"ref-{name}", RACE_ROWS, dt))
            for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    out = []
    for i in range(rounds):
        dtypes = (torch.float32, torch.float32) if i % 2 == 0 else (torch.float32, torch.bfloat16)
        if i % 4 == 3:
            dtypes = dtypes[::-1]
        out.append({"folder": f"round-{i:02d}", "ended": race_round(root / f"round-{i:02d}", dtypes)})
    return {"refs": refs, "rounds": out}


SCENARIOS = {"train": scenario_train, "cache": scenario_cache, "race": scenario_race}

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    from conftest import byte_tokenizer, tiny_model
    from jaxtyping import config

    # Importing conftest installs the runtime type checker, and beartype samples container items with
    # Python's global random generator: a resumed run makes other checked calls than a straight one,
    # so the generator state saved in each checkpoint would differ although training does not. The
    # files are compared byte for byte, so these runs go unchecked (the rest of the suite is checked).
    config.update("jaxtyping_disable", True)
    tiny_model("llama"), byte_tokenizer()  # built once, before any fork
    report = {}
    for name in sys.argv[2:]:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        report[name] = SCENARIOS[name](out_dir / name)
    print(json.dumps(report))
