"""The bad-input corpus: what a user can type or hand over wrongly, each with the one-line error it
must give. tests/test_bad_input.py runs every case.

A case is ``Case(name, build, expect)``: ``build(work, env)`` writes what the case needs under the
empty folder ``work`` (the current directory while the case runs) and returns either the argument
list of an ``interp`` command or a zero-argument callable that must raise the library's exception.
``expect`` is a regular expression the error line must match. ``during`` (optional) is a context
manager factory ``(work) -> context`` held while the command runs (a lock held by someone else, a
file-size limit). ``env`` holds ``model`` (a tiny Llama folder) and ``cache`` (a small activation
cache of it, to be copied, never written).

The 32 bad SAE checkpoints of tests/saes/sae_testdata.py join the corpus through ``saes.read``.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.saes.sae_testdata import BAD_CHECKPOINT_MESSAGES, BAD_CHECKPOINTS

SITE = "blocks.1.hook_resid_post"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Any], list[str] | Callable[[], Any]]
    expect: str
    during: Callable[[Path], Any] | None = None


# ------------------------------------------------------------------------------------------ helpers
def copy_cache(work: Path, env) -> Path:
    return Path(shutil.copytree(env.cache, work / "cache"))


def spec(work: Path, env, body: dict | str, name: str = "spec.yaml") -> list[str]:
    """An intervention spec on the tiny model (body: a dict merged into a valid spec, a None value
    dropping a key; or raw text)."""
    if isinstance(body, str):
        text = body
    else:
        base = {"model": str(env.model), "site": SITE, "prompts": ["the cat sat on the mat"],
                "edits": [{"name": "ablate", "type": "steer", "vector": [0.0] * 32}],
                "metric": {"type": "top_token"}, "out": str(work / "out")}
        text = json.dumps({k: v for k, v in {**base, **body}.items() if v is not None})  # None: drop the key
    (work / name).write_text(text)
    return ["intervene", str(work / name)]


def subspace(work: Path, rank: int = 2, d: int = 32) -> Path:
    from interp.subspace import Subspace

    return Subspace(torch.randn(rank, d, generator=torch.Generator().manual_seed(0))).save(work / "sub")


def held_lock(name: str, folder: str):
    """A lock on ``work/folder/name`` held, for the duration of the case, by another open file of this process."""
    from interp.folders import folder_lock

    def make(work: Path):
        (work / folder).mkdir(parents=True, exist_ok=True)
        return folder_lock(work / folder, name, "held by the test")

    return make


@contextlib.contextmanager
def file_size_limit(work: Path, limit: int = 2000):
    """Writes past `limit` bytes fail with "File too large", as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def edit_manifest(folder: Path, fn) -> None:
    path = folder / "manifest.rank0.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def nan_row_in_cache(work: Path, env) -> Path:
    """A copy of the cache whose first shard holds one NaN row (same size, so the manifest still agrees)."""
    c = copy_cache(work, env)
    shard = c / json.loads((c / "manifest.rank0.json").read_text())["shards"][0]["file"]
    t = load_file(str(shard))
    t[SITE][:] = float("nan")  # every row of the first shard: the first batch surely holds some
    save_file(t, str(shard), metadata={"format": "interp.activation-cache/1"})
    return c


def trained(work: Path, env, *extra: str) -> Path:
    """A finished tiny training run in work/sae (its resume checkpoints included)."""
    from interp.cli import main

    c = copy_cache(work, env)
    assert main(["sae", "train", "--cache", str(c), "--out", str(work / "sae"), "--d-sae", "64", "--k", "4",
                 "--batch-tokens", "64", "--tokens", "256", "--checkpoint-every", "2", *extra]) == 0
    return c


def train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["sae", "train", "--cache", str(cache), "--out", str(out), "--d-sae", "64", "--k", "4",
            "--batch-tokens", "64", "--tokens", "256", *extra]


def pickle_model(work: Path) -> Path:
    (work / "m").mkdir()
    (work / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (work / "m" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1.0]}))
    return work / "m"


def raises(fn: Callable, *args, **kwargs) -> Callable[[], Any]:
    return lambda: fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------ the CLI
def _cli_cases() -> list[Case]:
    def cap(e, *more: str, tokens: str = "200") -> list[str]:
        return ["capture", "--sites", SITE, "--tokens", tokens, "--context-size", "32", "--dataset", str(e.text), *more]

    return [
        Case("capture-model-missing-local", lambda w, e: cap(e, "--model", "./no-such-model", "--out", "c"),
             r"no-such-model does not exist \(a local path: the Hugging Face Hub is not asked\)"),
        Case("capture-model-relative-runs-x",
             lambda w, e: ((w / "runs").mkdir(), cap(e, "--model", "runs/x", "--out", "c"))[1],
             r"runs/x does not exist \(a local path"),
        Case("capture-model-pickle-folder", lambda w, e: cap(e, "--model", str(pickle_model(w)), "--out", "c"),
             r"holds only pickle-based weights \(\['pytorch_model.bin'\]\), which are never loaded"),
        Case("capture-model-pickle-file", lambda w, e: ((w / "model.bin").write_bytes(pickle.dumps([1])),
                                                        cap(e, "--model", "model.bin", "--out", "c"))[1],
             r"model.bin is a pickle-based checkpoint, which is never loaded"),
        Case("capture-bad-site", lambda w, e: ["capture", "--model", str(e.model), "--sites",
                                               "blocks.99.hook_resid_post", "--tokens", "10", "--out", "c"],
             r"99"),
        Case("capture-zero-tokens", lambda w, e: cap(e, "--model", str(e.model), "--out", "c", tokens="0"),
             r"need n_tokens, shard_tokens and model_batch_size >= 1; got 0"),
        Case("capture-other-settings", lambda w, e: (copy_cache(w, e), cap(e, "--model", str(e.model), "--dtype",
                                                                        "bfloat16", "--out", "cache", tokens="900"))[1],
             r"cache already holds a cache made with other settings \{.*'dtype': \('float32', 'bfloat16'\)"),
        Case("capture-locked", lambda w, e: cap(e, "--model", str(e.model), "--out", "c"),
             r"the activation cache at c \(rank 0\) is being written by process \d+ \(lock c/.interp-lock.rank0\)",
             during=held_lock(".interp-lock.rank0", "c")),
        Case("capture-disk-full", lambda w, e: cap(e, "--model", str(e.model), "--out", "c", "--shard-tokens", "2500",
                                                   tokens="2500"),
             r"error: File too large \(c/shard-r0-000000\.safetensors\)",
             during=lambda w: file_size_limit(w, 300_000)),  # room for the datasets library's cache, not a shard
        Case("capture-read-only-folder", lambda w, e: cap(e, "--model", str(e.model), "--out", "/sys/interp-bad"),
             r"error: (Operation not permitted|Permission denied|Read-only file system) \(/sys/interp-bad\)"),
        Case("sae-train-no-sites", lambda w, e: ["sae", "train", "--out", "o", "--tokens", "100"],
             r"no --sites: live activations \(no --cache\) need --sites"),
        Case("sae-train-cache-missing", lambda w, e: train_args(w / "nothing", w / "o"),
             r"nothing is not an activation cache \(no manifest.json\)"),
        Case("sae-train-foreign-flag", lambda w, e: train_args(copy_cache(w, e), w / "o", "--arch", "relu"),
             r"--k does not apply to architecture 'relu'"),
        Case("sae-train-bad-config-value", lambda w, e: [*train_args(copy_cache(w, e), w / "o"), "--warmup-frac", "2"],
             r"TrainConfig.warmup_frac must be in \[0, 1\], got 2"),
        Case("sae-train-config-not-json", lambda w, e: ((w / "cfg.json").write_text("{'lr': 1,"),
                                                        ["sae", "train", "--config", "cfg.json"])[1],
             r"--config cfg.json: not valid JSON"),
        Case("sae-train-earlier-run", lambda w, e: (trained(w, e), train_args(w / "cache", w / "sae"))[1],
             r"sae/checkpoints holds resume checkpoints of an earlier run \(steps \[2, 4\]\); continue it with "
             r"resume=True \(--resume\), discard them with overwrite=True \(--overwrite\)"),
        Case("sae-train-resume-changed", lambda w, e: (trained(w, e), [*train_args(w / "cache", w / "sae", "--resume"),
                                                                       "--lr", "0.5", "--seed", "3"])[1],
             r"the resume checkpoint \(step 4\) was made with other settings: config.lr null -> 0.5, "
             r"config.seed 0 -> 3, data.seed 0 -> 3; resume with the same settings, accept them"),
        Case("sae-train-resume-other-cache", lambda w, e: (trained(w, e), shutil.copytree(w / "cache", w / "cache2"),
                                                           train_args(w / "cache2", w / "sae", "--resume"))[2],
             r"was made with other settings: data.cache '.*/cache' -> '.*/cache2', data.path"),
        Case("sae-train-nan-rows", lambda w, e: [*train_args(nan_row_in_cache(w, e), w / "o"), "--tokens", "512"],
             r"training stopped at step 1 of 8: site 'blocks.1.hook_resid_post': the loss is nan; rows \[[\d, ]+\] "
             r"\(and \d+ more\) of this batch of 64 \(batch 1 of the data\) hold NaN or inf inputs"),
        Case("sae-train-locked", lambda w, e: train_args(copy_cache(w, e), w / "o"),
             r"the training output folder .*o is being written by process \d+", during=held_lock(".interp-lock", "o")),
        Case("sae-eval-missing", lambda w, e: ["sae", "eval", "no-such-sae", "--windows", "0"],
             r"no-such-sae: no such folder, and not a Hub repo id"),
        Case("sae-eval-runs-x", lambda w, e: ((w / "runs").mkdir(), ["sae", "eval", "runs/x", "--windows", "0"])[1],
             r"runs/x: no such folder, and not a Hub repo id \('owner/name'\); a path that can only be local is never"),
        Case("sites-missing-model", lambda w, e: ["sites", "./nothing"], r"nothing does not exist \(a local path"),
        Case("probe-missing-file", lambda w, e: ["probe", "none.csv"], r"dataset file none.csv does not exist"),
        Case("probe-one-class", lambda w, e: ((w / "d.csv").write_text("text,label\na b,1\nc d,1\n"),
                                              ["probe", "d.csv", "--model", str(e.model), "--layers", "0"])[1],
             r"a binary probe needs exactly 2 classes; got 1"),
        Case("intervene-missing-spec", lambda w, e: ["intervene", "nothing.yaml"],
             r"spec file nothing.yaml could not be read"),
    ]


# ------------------------------------------------------------------------------------------ spec files
def _spec_cases() -> list[Case]:
    return [
        Case("spec-bad-yaml", lambda w, e: spec(w, e, "model: [unclosed\nsite: x\n"), r"is not valid YAML"),
        Case("spec-python-tag", lambda w, e: spec(w, e, "model: !!python/object/apply:os.system ['echo pwned']\n"),
             r"is not valid YAML \(only plain YAML is read, no !!python tags\)"),
        Case("spec-bad-json", lambda w, e: spec(w, e, "{model: 1,", name="spec.json"), r"spec.json is not valid JSON"),
        Case("spec-not-a-mapping", lambda w, e: spec(w, e, "- a\n- b\n"), r"expected a mapping at the top level"),
        Case("spec-edits-strings", lambda w, e: spec(w, e, {"edits": ["rotate"]}),
             r"spec.edits\[0\] is 'rotate'; each edit is a mapping"),
        Case("spec-unknown-edit-type", lambda w, e: spec(w, e, {"edits": [{"type": "twist"}]}),
             r"type must be one of .*got 'twist'"),
        Case("spec-vector-length",
             lambda w, e: spec(w, e, {"edits": [{"name": "s", "type": "steer", "vector": [1, 2]}]}),
             r"Steer: the steering vector has 2 values, but the site's activations have width 32"),
        Case("spec-replace-length", lambda w, e: spec(w, e, {"edits": [{"name": "r", "type": "replace",
                                                                       "vector": [1.0] * 5}]}),
             r"Replace: the value has 5 values, but the site's activations have width 32"),
        Case("spec-alpha-not-a-number", lambda w, e: spec(w, e, {"edits": [{"name": "s", "type": "steer", "alpha": "x",
                                                                            "vector": [0.0] * 32}]}),
             r"edit 's' \(type steer\): a value is not what this edit takes"),
        Case("spec-empty-prompt", lambda w, e: spec(w, e, {"prompts": ["ok", ""]}),
             r"spec.prompts \[1\] are empty or not text"),
        Case("spec-prompts-not-a-list", lambda w, e: spec(w, e, {"prompts": "the cat"}),
             r"spec.prompts must be a list of strings"),
        Case("spec-pickle-subspace", lambda w, e: (subspace(w), (w / "sub" / "subspace.safetensors").write_bytes(
            pickle.dumps({"basis": [1.0]})), spec(w, e, {"subspace": "sub", "edits": [{"type": "project_out"}]}))[2],
             r"sub is not a readable subspace folder .*pickles are never read"),
        Case("spec-subspace-link-outside", lambda w, e: (
            subspace(w), shutil.move(str(w / "sub" / "subspace.safetensors"), str(w / "elsewhere.safetensors")),
            (w / "sub" / "subspace.safetensors").symlink_to(w / "elsewhere.safetensors"),
            spec(w, e, {"subspace": "sub", "edits": [{"type": "project_out"}]}))[3],
             r"error: \S+/sub: \S+/sub/subspace.safetensors is a link to \S+/elsewhere.safetensors, outside"),
        Case("spec-subspace-wrong-width", lambda w, e: (subspace(w, d=20), spec(w, e, {
            "subspace": "sub", "edits": [{"type": "project_out"}]}))[1],
             r"activations must end in d_model=20; got shape"),
        Case("spec-positions-out-of-range", lambda w, e: spec(w, e, {"positions": [500]}),
             r"edit 'ablate': positions \[500\] are out of range for sequences of length 22"),
        Case("spec-positions-slice-misses-a-row", lambda w, e: spec(w, e, {"prompts": ["the cat sat on the mat", "a"],
                                                                          "positions": {"slice": [5, 8]}}),
             r"edit 'ablate': positions=\{'slice': \[5, 8\]\} pick no real token of rows \[1\] "
             r"\(prompts of \[1\] tokens\)"),
        Case("spec-positions-bad-form", lambda w, e: spec(w, e, {"positions": {"foo": 1}}),
             r"spec.positions: positions=\{'foo': 1\}: a dict form has one key"),
        Case("spec-metric-missing", lambda w, e: spec(w, e, "model: x\nsite: y\nprompts: [a]\nedit: {type: steer}\n"),
             r"spec: missing required key 'metric'"),
        Case("spec-metric-multi-token", lambda w, e: spec(w, e, {"metric": {"type": "prob", "token": " cat"}}),
             r"metric token ' cat' is 4 tokens; metrics need single tokens"),
        Case("spec-field-missing", lambda w, e: spec(w, e, {"metric": {"type": "prob", "token": "{day}"}}),
             r"spec: '\{day\}' names field 'day' that the dataset rows lack"),
        Case("spec-field-template-bad", lambda w, e: spec(w, e, {"metric": {"type": "prob", "token": "{0}"}}),
             r"spec: '\{0\}' is not a valid \{field\} template"),
        Case("spec-dataset-missing", lambda w, e: spec(w, e, {"prompts": None, "dataset": {"path": "rows.jsonl"}}),
             r"dataset .*rows.jsonl could not be read"),
        Case("spec-dataset-not-utf8", lambda w, e: ((w / "rows.csv").write_bytes(b"prompt\n\xff\xfe\x00bad\n"),
                                                    spec(w, e, {"prompts": None, "dataset": {"path": "rows.csv"}}))[1],
             r"dataset .*rows.csv could not be read"),
        Case("spec-model-runs-x", lambda w, e: ((w / "runs").mkdir(), spec(w, e, {"model": "runs/x"}))[1],
             r"runs/x does not exist \(a local path: the Hugging Face Hub is not asked\)"),
        Case("spec-model-pickle", lambda w, e: spec(w, e, {"model": str(pickle_model(w))}),
             r"holds only pickle-based weights"),
        Case("spec-batch-size", lambda w, e: spec(w, e, {"batch_size": 0}),
             r"spec.batch_size must be a positive integer; got 0"),
        Case("spec-unknown-key", lambda w, e: spec(w, e, {"promts": ["a"]}),
             r"spec: unknown key 'promts'; it takes .*did you mean 'prompts'"),
        Case("spec-output-disk-full", lambda w, e: spec(w, e, {"prompts": ["the cat sat on the mat"] * 20}),
             r"error: File too large \(.*/out/results\.csv\)", during=lambda w: file_size_limit(w, 1000)),
        Case("spec-output-read-only", lambda w, e: spec(w, e, {"out": "/sys/interp-bad"}),
             r"error: (Operation not permitted|Permission denied|Read-only file system) \(/sys/interp-bad\)"),
    ]


# ------------------------------------------------------------------------------------------ caches
def _cache_cases() -> list[Case]:
    from interp.cache import CachedActivations, cache_activations

    def read(c: Path, **kw) -> Callable[[], Any]:
        return lambda: list(CachedActivations(c, batch_tokens=kw.pop("batch_tokens", 50), **kw))

    def outside(w: Path, e) -> Path:
        c = copy_cache(w, e)
        shard = c / "shard-r0-000000.safetensors"
        shutil.copy(shard, w / "copy.safetensors")
        shard.unlink()
        shard.symlink_to(w / "copy.safetensors")
        return c

    return [
        Case("cache-manifest-absolute-path", lambda w, e: read(_edited(w, e, lambda m: m["shards"][0].update(
            file=str(w / "elsewhere.safetensors"))))
             , r"manifest.rank0.json: file entry '.*elsewhere.safetensors' points outside"),
        Case("cache-manifest-dot-dot", lambda w, e: read(_edited(w, e, lambda m: m["shards"][0].update(
            file="../cache2/shard-r0-000000.safetensors"))), r"file entry '../cache2/shard-r0-000000.safetensors' "
                                                             r"points outside"),
        Case("cache-shard-link-outside", lambda w, e: read(outside(w, e)),
             r"shard-r0-000000.safetensors is a link to .*copy.safetensors, outside"),
        Case("cache-shard-truncated", lambda w, e: read(_truncated_shard(w, e)),
             r"shard .*shard-r0-000000.safetensors has \d+ bytes but the manifest recorded \d+"),
        Case("cache-manifest-not-json", lambda w, e: read(_write(copy_cache(w, e) / "manifest.json", "{oops")),
             r"manifest.json is unreadable or not JSON"),
        Case("cache-no-manifest", lambda w, e: read(w), r"is not an activation cache \(no manifest.json\)"),
        Case("cache-shards-not-a-list", lambda w, e: read(_edited(w, e, lambda m: m.update(shards=5))),
             r"manifest.rank0.json lists no 'shards'"),
        Case("cache-batch-too-big", lambda w, e: read(copy_cache(w, e), batch_tokens=10**6),
             r"batch_tokens=1000000 is larger than the whole cache"),
        Case("cache-unknown-site", lambda w, e: read(copy_cache(w, e), sites=["blocks.0.hook_resid_pre"]),
             r"sites \['blocks.0.hook_resid_pre'\] are not in this cache"),
        Case("cache-writer-locked", lambda w, e: (lambda: cache_activations(
            _tiny(), _tok(), [SITE], w / "c", 100, dataset=["a b c d e f g h " * 20], context_size=32,
            progress=False)), r"the activation cache at .*c \(rank 0\) is being written by process \d+",
             during=held_lock(".interp-lock.rank0", "c")),
    ]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent


def _edited(w: Path, e, fn) -> Path:
    c = copy_cache(w, e)
    edit_manifest(c, fn)
    return c


def _truncated_shard(w: Path, e) -> Path:
    c = copy_cache(w, e)
    shard = c / "shard-r0-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return c


def _tiny():
    from conftest import tiny_model

    return tiny_model("llama")


def _tok():
    from conftest import byte_tokenizer

    return byte_tokenizer()


# ------------------------------------------------------------------------------------------ tensors
def _tensor_cases() -> list[Case]:
    import saes
    from interp.capture import capture
    from interp.features import class_mean_subspace, cluster_decoder, find_multidim_features, lda_subspace
    from interp.features.pls import pls_subspace
    from interp.subspace import Subspace
    from probes import SparseProbe
    from probes.sweep import sweep

    def x(nan_at=None, n=40, d=8):
        t = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
        if nan_at is not None:
            t[nan_at, 1] = float("nan")
        return t

    labels = ["a", "b"] * 20

    def nan_subspace(w: Path, e) -> Callable[[], Any]:
        folder = subspace(w)
        t = load_file(str(folder / "subspace.safetensors"))
        t["basis"][0, 0] = float("inf")
        save_file(t, str(folder / "subspace.safetensors"))
        return lambda: Subspace.load(folder)

    def another_run(w: Path, e) -> Callable[[], Any]:
        from tests.saes.sae_testdata import SyntheticSource

        cfg = saes.TrainConfig(total_tokens=64 * 4, batch_tokens=64, checkpoint_every=2, progress=False)
        saes.Trainer(saes.build("topk", d_model=16, d_sae=32, k=4), cfg, out_dir=w / "o").fit(SyntheticSource(rows=64))
        return lambda: saes.Trainer(saes.build("topk", d_model=16, d_sae=32, k=4), cfg, out_dir=w / "o").fit(
            SyntheticSource(rows=64))

    return [
        Case("tensor-class-means-nan", lambda w, e: raises(class_mean_subspace, x(5), labels),
             r"acts contain NaN or inf"),
        Case("tensor-lda-inf", lambda w, e: raises(lda_subspace, x(5) * float("inf"), labels),
             r"acts contain NaN or inf"),
        Case("tensor-pls-nan-values", lambda w, e: raises(pls_subspace, x(), torch.tensor([float("nan")] * 40)),
             r"acts or values contain NaN or inf"),
        Case("tensor-cluster-decoder-nan", lambda w, e: raises(cluster_decoder, x(3, n=32)), r"W_dec contains NaN"),
        Case("tensor-multidim-nan-acts", lambda w, e: raises(find_multidim_features, x(n=32), x(9, n=50),
                                                             encode=lambda a: a @ x(n=32).T, clusters=[[0, 1]]),
             r"batch 0 of acts holds NaN or inf in rows \[9\]"),
        Case("tensor-sparse-probe-nan", lambda w, e: raises(SparseProbe(n_neurons=2, method="l1").fit, x(7),
                                                            [0, 1] * 20),
             r"X holds 1 NaN or infinite values, in 1 rows \(first: \[7\]"),
        Case("tensor-sweep-sizes-too-big", lambda w, e: raises(sweep, {"a": x()}, [0, 1] * 20, n_neurons=(16,),
                                                               progress=False),
             r"n_neurons=\[16\]: every size exceeds the width of every site \(8 neurons at most\)"),
        Case("tensor-capture-position-out-of-range", lambda w, e: raises(capture, _tiny(), torch.ones(1, 6).long(),
                                                                         [SITE], positions=[9]),
             r"positions \[9\] are out of range for sequences of length 6"),
        Case("tensor-mp-encode-nan", lambda w, e: raises(saes.build("mpsae", d_model=8, d_sae=16, n_steps=2).encode,
                                                         x(2)), r"MPSAE input rows \[2\]"),
        Case("tensor-subspace-inf-basis", nan_subspace, r"tensors \['basis'\] hold NaN or inf"),
        Case("tensor-trainer-another-run", another_run,
             r"holds resume checkpoints of an earlier run \(steps \[2, 4\]\)"),
        Case("tensor-sae-load-runs-x", lambda w, e: ((w / "runs").mkdir(), raises(saes.load, "runs/x"))[1],
             r"runs/x: no such folder, and not a Hub repo id"),
    ]


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_cases() -> list[Case]:
    import saes

    def read_bad(build):
        return lambda w, e: raises(saes.read, build(w))

    return [Case(f"checkpoint-{name}", read_bad(build), BAD_CHECKPOINT_MESSAGES[name])
            for name, build in BAD_CHECKPOINTS]


def cases() -> list[Case]:
    return _cli_cases() + _spec_cases() + _cache_cases() + _tensor_cases() + _checkpoint_cases()
