"""Text in, trained SAE out: this project vs SAELens' training runner vs sparsify's trainer, one run.

Each row starts from the same local text file (JSON lines, ``{"text": ...}`` per document: the offline
default corpus unless ``--text`` names another), loads the same model from the same folder (the
embedded SmolLM2-135M, converted once to a safetensors folder by :func:`interp.load_model`), runs it
over windows of the same context size, and trains a TopK SAE (same ``d_sae``, ``k``, fp32) on the
output of the same block (``blocks.12.hook_resid_post`` = the output of ``model.layers.12``) for the
same number of steps, with the same batch (rows per step), the same Adam learning rate and seed 0.
Each row runs in its own subprocess; rounds alternate the order (A B C, C B A, ...) and every round
is kept in the JSON.

What each row runs (each library's own end-to-end path):

* ``interp``: what ``interp sae train --model M --sites S --tokens N`` builds: :func:`interp.load_model`,
  :class:`interp.store.ActivationStore` (documents shuffled, packed into windows joined by EOS, the
  forward pass stopped after the deepest site, position 0 and special tokens left out, a shuffle
  buffer of ``min(32 * batch, max(4 * batch, N))`` rows filled, permuted and served whole before the
  next fill), :func:`saes.build` and :class:`saes.Trainer` (inputs scaled to ``E||x||^2 = d_model``,
  geometric-median ``b_dec``, AuxK, warm-up 1 %, linear decay over the last 20 %), saved to a folder.
* ``saelens``: ``LanguageModelSAETrainingRunner(LanguageModelSAERunnerConfig(...)).run()`` with
  ``model_class_name="AutoModelForCausalLM"`` and ``model_name`` = the model folder (its
  ``HookedProxyLM``, which also stops the forward after the hooked layer), ``dataset_path`` = the
  folder of the text file (tokenized on the fly, windows joined by EOS, no BOS), ``seqpos_slice=(1,
  None)`` and ``exclude_special_tokens=True`` (the same positions as this project), its mixing buffer
  of the same number of rows (it keeps half of the buffer back for mixing with the next fill),
  ``TopKTrainingSAEConfig`` (its own init, AuxK with coefficient 1, decoder-norm rescaling, no input
  normalisation, gradient clipping at 1), the same warm-up and decay steps (its ``constant`` schedule
  with ``lr_end=0``), a dead-latent window of 10M rows; no wandb, no checkpoints, the final SAE saved.
* ``sparsify``: what ``python -m sparsify`` does for ``loss_fn="fvu"``, without its CUDA-only device
  map: ``AutoModel`` from the folder (no LM head; its trainer runs the **whole** model, it does not
  stop after the hooked layer), ``chunk_and_tokenize`` (windows starting with EOS, documents joined by
  EOS), ``Dataset.shuffle`` of the windows, then ``sparsify.Trainer(TrainConfig(...)).fit()``; its batch
  is ``batch / context_size`` windows, fed straight to the SAE (no shuffle buffer: every batch holds
  whole windows); ``exclude_tokens`` = the tokenizer's special ids, but it cannot leave position 0 out,
  so it trains on position 0 too (an outlier-norm attention sink on SmolLM2); ``optimizer="adam"``
  (its default is signum), ``lr_warmup_steps`` = 1 % of the steps, then its linear decay over the
  whole run, ``auxk_alpha=1/32``, a dead-latent threshold of 10M tokens, mean ``b_dec``, unit-norm
  decoder with parallel-gradient removal, FVU loss (scale-free, no input normalisation).

With runs shorter than 10M rows no latent counts as dead for anyone, so AuxK adds no work or loss.
The rows' data order differs by design: each shuffles documents, windows or rows its own way.

Figures per row and round: ``imports_s`` (torch, transformers, datasets, the model's class, then the
library), ``setup_s`` (model load, dataset preparation and SAE construction: everything before the
training call), ``train_s`` (the training call: buffer fills, model forwards, SAE steps, and saving
what the library saves at the end: this project its SAE and a resume checkpoint, sparsify its SAE
and optimizer state, SAELens its SAE); ``tokens_trained`` (rows that reached the SAE) and
``model_tokens`` (token positions the model ran on during the training call, counted by a hook on its
input embedding: more than ``tokens_trained`` where a buffer is filled past the last step or positions
are left out); ``tokens_per_s = tokens_trained / train_s`` (the headline), ``tokens_per_s_with_setup``
and ``model_tokens_per_s``. ``final_fvu`` is measured by one function (1 - explained variance, sums
over the whole set; ``final_fvu_typical`` the same without the held-out rows that are massive activations,
``held_out_massive_rows`` of them) in the parent process, on the reconstructions each row writes of the same
held-out rows: activations of documents that no row trains on, captured once by the parent with
:func:`interp.source.capture_rows` (position 0 and special tokens left out). ``summary`` holds the
medians over the rounds that ran and, per peer, ``interp`` tokens/s over the peer's, paired within a
round. A row that cannot run records its error in one line (``status: "failed"``, ``reason``) and
the run goes on with the other rows.

    python benchmarks/sae_end_to_end.py                  # full size: writes benchmarks/results/sae_end_to_end.json
    python benchmarks/sae_end_to_end.py --quick          # a tiny random Llama, a few hundred tokens: the code path
    python benchmarks/sae_end_to_end.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sae_end_to_end.json"
ROWS = ("interp", "saelens", "sparsify")
DEAD_TOKENS = 10_000_000
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------ preparation
def tiny_llama(folder: Path) -> Path:
    """A random 4-layer Llama (d_model 64) and the byte tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def module_names(model, site: str) -> tuple[str, str]:
    """The HF module whose output is `site`: its name in the causal LM (SAELens' hook name) and in its
    base model (sparsify's hookpoint). Peers hook module outputs, so the site must be one."""
    from interp.sites import resolve

    s = resolve(model, site)
    if s.io != "output" or s.scale is not None or s.flat:
        raise SystemExit(f"site {site!r} is not the plain output of a module, which is what SAELens and sparsify "
                         "hook; choose a blocks.L.hook_resid_post site")
    full = {m: n for n, m in model.named_modules()}[s.module]
    base = {m: n for n, m in model.base_model.named_modules()}[s.module]
    return full, base


def write_texts(docs: list[str], tok, need: int, folder: Path) -> dict:
    """Write documents until they hold `need` tokens to ``folder/train.jsonl``; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    n_tok = n_doc = 0
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            if n_tok >= need:
                break
            f.write(json.dumps({"text": d}) + "\n")
            n_tok += len(tok(d, add_special_tokens=False)["input_ids"]) + 1
            n_doc += 1
    if n_tok < need:
        raise SystemExit(f"the text holds {n_tok} tokens after the held-out documents; need {need} for the training "
                         "rows and the buffers: give a longer --text or fewer --steps")
    return {"documents": n_doc, "tokens_with_separators": n_tok}


def prepare(args, work: Path) -> dict:
    """Model folder, training text, held-out activations; returns the spec every worker reads."""
    import random

    import torch
    from safetensors.torch import save_file

    from interp import load_model
    from interp.data import load_texts, pack
    from interp.source import capture_rows
    from saes.train_config import default_lr

    model_dir = tiny_llama(work / "model") if args.quick and not args.model else None
    model, tok = load_model(str(model_dir) if model_dir else (args.model or "smollm2-135m"), device=args.device)
    folder = Path(model.name_or_path)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"the model loaded from {args.model!r} has no local folder ({folder}); the peers load the "
                         "model from a folder: give --model FOLDER")
    hook_name, hookpoint = module_names(model, args.site)
    d_model = model.config.hidden_size
    docs = [d for d in load_texts(args.text) if d.strip()]
    random.Random(0).shuffle(docs)
    # held-out activations first, from documents no row trains on
    n_held = tokens = 0
    while tokens < 1.5 * args.heldout_tokens + 2 * args.context_size and n_held < len(docs):
        tokens += len(tok(docs[n_held], add_special_tokens=False)["input_ids"]) + 1
        n_held += 1
    wins = pack(iter(docs[:n_held]), tok, args.context_size)
    rows = [r[args.site] for r, _ in capture_rows(model, tok, [args.site], wins, model_batch_size=8,
                                                   dtype=torch.float32)]
    held = torch.cat(rows)[: args.heldout_tokens].float().cpu().contiguous() if rows else torch.zeros(0)
    if held.shape[0] < args.heldout_tokens:
        raise SystemExit(f"the text gave {held.shape[0]} held-out rows; need {args.heldout_tokens}")
    save_file({"x": held}, str(work / "heldout.safetensors"))
    buffer = min(32 * args.batch, max(4 * args.batch, args.steps * args.batch))
    need = int(1.25 * (args.steps * args.batch + buffer)) + 2 * args.context_size * args.model_batch
    text = write_texts(docs[n_held:], tok, need, work / "text")
    return {"model_dir": str(folder), "site": args.site, "hook_name": hook_name, "hookpoint": hookpoint,
            "d_model": d_model, "d_sae": args.d_sae, "k": args.k, "batch": args.batch, "steps": args.steps,
            "context_size": args.context_size, "model_batch": args.model_batch, "buffer_tokens": buffer,
            "lr": args.lr or default_lr(args.d_sae), "device": args.device,
            "text_dir": str(work / "text"), "text_file": str(work / "text" / "train.jsonl"),
            "heldout": str(work / "heldout.safetensors"), "heldout_rows": held.shape[0], "work": str(work),
            "text": text, "special_ids": sorted(set(tok.all_special_ids))}


# ------------------------------------------------------------------------------------------ workers
class Counter:
    """Counts token positions through the model (a hook on its input embedding) and rows into the SAE."""

    def __init__(self):
        self.model_tokens = self.forwards = self.sae_rows = 0

    def reset(self) -> None:
        """Count from here on (called as the training call starts)."""
        self.model_tokens = self.forwards = self.sae_rows = 0

    def on_embed(self, _module, args, _output=None):
        self.model_tokens += args[0].numel()
        self.forwards += 1

    def on_sae(self, _module, args, kwargs, _output=None):
        x = args[0] if args else kwargs["x"]
        self.sae_rows += x.shape[0]


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reconstruct(recon, spec: dict, path: Path) -> None:
    """Write `recon` of every held-out row to `path` (the parent measures the FVU of every row)."""
    import torch
    from safetensors.torch import load_file, save_file

    held = load_file(spec["heldout"])["x"]
    with torch.no_grad():
        x_hat = torch.cat([recon(x.to(spec["device"])).float().cpu() for x in held.split(1024)])
    save_file({"x_hat": x_hat.contiguous()}, str(path))


def heldout_fvus(heldout: Path, recon_file: Path) -> dict:
    """``final_fvu`` (1 - explained variance of the reconstructions over the held-out rows, sums over the
    whole set), ``final_fvu_typical`` (the same over the rows that are not massive activations) and
    ``held_out_massive_rows``."""
    import torch
    from safetensors.torch import load_file

    from saes.evaluate import ReconstructionStats

    x, x_hat = load_file(str(heldout))["x"], load_file(str(recon_file))["x_hat"]
    acc = ReconstructionStats(x.shape[-1], 1)
    acc.update(x, x_hat, torch.zeros(x.shape[0], 1))
    r = acc.result()
    return {"final_fvu": r["fvu"], "final_fvu_typical": r.get("fvu_typical"),
            "held_out_massive_rows": r["massive_rows"]}


def run_interp(spec: dict, out: Path, count: Counter):
    import torch

    import saes
    from interp import load_model
    from interp.store import ActivationStore

    t0 = time.perf_counter()
    n = spec["steps"] * spec["batch"]
    model, tok = load_model(spec["model_dir"], device=spec["device"])
    model.get_input_embeddings().register_forward_hook(count.on_embed)
    store = ActivationStore(model, tok, [spec["site"]], dataset=spec["text_file"], context_size=spec["context_size"],
                            batch_tokens=spec["batch"], buffer_tokens=spec["buffer_tokens"],
                            model_batch_size=spec["model_batch"], seed=0, device=spec["device"], epochs=None)
    cfg = saes.TrainConfig(total_tokens=n, batch_tokens=spec["batch"], lr=spec["lr"], progress=False)
    torch.manual_seed(cfg.seed)
    sae = saes.build("topk", d_model=spec["d_model"], d_sae=spec["d_sae"], k=spec["k"]).to(spec["device"])
    trainer = saes.Trainer({spec["site"]: sae}, cfg, out_dir=out,
                           metadata={"model_name": spec["model_dir"], "context_size": spec["context_size"]},
                           data_summary=store.describe())
    count.reset()
    t1 = time.perf_counter()
    trainer.fit(store)
    t2 = time.perf_counter()
    trained = trainer.saes_[spec["site"]]
    return t1 - t0, t2 - t1, trainer.tokens_, lambda x: trained(x).x_hat, {"path": "interp sae train (library calls)"}


def run_saelens(spec: dict, out: Path, count: Counter):
    import logging

    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )

    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    n, ctx = spec["steps"], spec["context_size"]
    train_ctx = ctx - 1  # seqpos_slice=(1, None)
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=spec["d_model"], d_sae=spec["d_sae"], k=spec["k"], dtype="float32",
                                  device=spec["device"]),
        model_name=spec["model_dir"], model_class_name="AutoModelForCausalLM", hook_name=spec["hook_name"],
        model_from_pretrained_kwargs={"dtype": "float32"},
        dataset_path=spec["text_dir"], streaming=True, is_dataset_tokenized=False, context_size=ctx,
        prepend_bos=False, sequence_separator_token="eos", seqpos_slice=(1, None), exclude_special_tokens=True,
        n_batches_in_buffer=math.ceil(spec["buffer_tokens"] / train_ctx), store_batch_size_prompts=spec["model_batch"],
        training_tokens=n * spec["batch"], train_batch_size_tokens=spec["batch"], lr=spec["lr"], lr_end=0.0,
        lr_scheduler_name="constant", lr_warm_up_steps=int(0.01 * n), lr_decay_steps=int(0.2 * n),
        dead_feature_window=math.ceil(DEAD_TOKENS / spec["batch"]), device=spec["device"], seed=0, dtype="float32",
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=str(out), verbose=False)
    runner = LanguageModelSAETrainingRunner(cfg)
    runner.model.model.get_input_embeddings().register_forward_hook(count.on_embed)
    count.reset()
    t1 = time.perf_counter()
    sae = runner.run()
    t2 = time.perf_counter()
    sae.eval()
    # its loop runs until the rows trained reach training_tokens: whole batches of train_batch_size_tokens
    trained = math.ceil(cfg.training_tokens / cfg.train_batch_size_tokens) * cfg.train_batch_size_tokens
    return t1 - t0, t2 - t1, trained, lambda x: sae(x), {"path": "LanguageModelSAETrainingRunner",
                                                         "n_batches_in_buffer": cfg.n_batches_in_buffer}


def run_sparsify(spec: dict, out: Path, count: Counter):
    import torch
    from datasets import load_dataset
    from sparsify import SaeConfig, TrainConfig, Trainer
    from sparsify.data import chunk_and_tokenize
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    n, ctx = spec["steps"], spec["context_size"]
    if spec["batch"] % ctx:
        raise ValueError(f"sparsify's batch is whole windows: batch {spec['batch']} is not a multiple of "
                         f"context_size {ctx}")
    per_step = spec["batch"] // ctx
    model = AutoModel.from_pretrained(spec["model_dir"], dtype=torch.float32).to(spec["device"])
    model.get_input_embeddings().register_forward_hook(count.on_embed)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    data = chunk_and_tokenize(load_dataset("json", data_files=spec["text_file"], split="train"), tok,
                              max_seq_len=ctx)
    data = data.shuffle(seed=0).with_format("torch")
    if len(data) < n * per_step:
        raise ValueError(f"sparsify's chunking gave {len(data)} windows; {n} steps need {n * per_step}")
    data = data.select(range(n * per_step))
    cfg = TrainConfig(SaeConfig(num_latents=spec["d_sae"], k=spec["k"]), batch_size=per_step, optimizer="adam",
                      lr=spec["lr"], lr_warmup_steps=int(0.01 * n), auxk_alpha=1 / 32,
                      dead_feature_threshold=DEAD_TOKENS, exclude_tokens=spec["special_ids"],
                      hookpoints=[spec["hookpoint"]], init_seeds=[0], save_every=10**9, log_to_wandb=False,
                      save_dir=str(out), run_name="run")
    trainer = Trainer(cfg, data, model)
    for sae in trainer.saes.values():
        sae.register_forward_hook(count.on_sae, with_kwargs=True)
    count.reset()
    t1 = time.perf_counter()
    trainer.fit()
    t2 = time.perf_counter()
    sae = trainer.saes[spec["hookpoint"]]
    # evaluated in fp32: its forward is decorated with bf16 autocast on CUDA (the undecorated one is __wrapped__)
    forward = getattr(type(sae).forward, "__wrapped__", type(sae).forward)
    return t1 - t0, t2 - t1, count.sae_rows, lambda x: forward(sae, x).sae_out, {"path": "sparsify.Trainer"}


RUNNERS = {"interp": run_interp, "saelens": run_saelens, "sparsify": run_sparsify}


def worker(row: str, spec_path: str) -> int:
    import contextlib
    import importlib
    import io

    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch  # noqa: F401  (counted in imports_s, as each library imports it)

    out = Path(spec["work"]) / f"out-{row}"
    shutil.rmtree(out, ignore_errors=True)
    count = Counter()
    res: dict = {"row": row}
    chatter = io.StringIO()  # the peers print progress bars and notices
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            # every row imports the same stack before its clock starts: transformers, datasets and the
            # model's class (which the peers' imports pull in by themselves), then the library
            import datasets  # noqa: F401
            import transformers

            arch = transformers.AutoConfig.from_pretrained(spec["model_dir"]).architectures[0]
            getattr(transformers, arch)
            importlib.import_module({"saelens": "sae_lens", "sparsify": "sparsify", "interp": "saes"}[row])
            res["imports_s"] = time.perf_counter() - t_start
            setup_s, train_s, trained, recon, info = RUNNERS[row](spec, out, count)
        res.update(info)
        res.update({"status": "ok", "setup_s": setup_s, "train_s": train_s, "tokens_trained": trained,
                    "model_tokens": count.model_tokens,
                    "model_forwards": count.forwards, "tokens_per_s": trained / train_s,
                    "model_tokens_per_s": count.model_tokens / train_s,
                    "tokens_per_s_with_setup": trained / (setup_s + train_s),
                    "model_tokens_per_trained_token": count.model_tokens / trained,
                    "peak_rss_mb": _peak_rss_mb()})
        reconstruct(recon, spec, Path(spec["work"]) / f"recon-{row}.safetensors")
    except Exception as e:  # the benchmark records why a row could not run, in one line
        res.update({"status": "failed", "reason": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"})
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------ driver
def run_round(row: str, spec_path: Path, work: Path, timeout: float, device: str) -> dict:
    # sparsify's Triton kernels need CUDA: on CPU it imports only with them switched off
    cpu = {"SPARSIFY_DISABLE_TRITON": "1"} if not device.startswith("cuda") else {}
    env = {**os.environ, **OFFLINE_ENV, **cpu, "HF_DATASETS_CACHE": str(work / f"hf-datasets-{row}"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    shutil.rmtree(work / f"hf-datasets-{row}", ignore_errors=True)  # no row reuses an earlier round's tokenization
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", row, "--spec", str(spec_path)], capture_output=True,
                           text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return {"row": row, "status": "failed", "reason": f"worker exited {p.returncode}: {err[-1] if err else ''}"}
    res = json.loads(lines[-1])
    res["process_s"] = time.perf_counter() - t0
    recon = work / f"recon-{row}.safetensors"
    if res["status"] == "ok":
        res.update(heldout_fvus(work / "heldout.safetensors", recon))
    recon.unlink(missing_ok=True)
    return res


def summarize(rounds: list[list[dict]], rows: list[str]) -> dict:
    per_row = {}
    for row in rows:
        runs = [r for rnd in rounds for r in rnd if r["row"] == row]
        ok = [r for r in runs if r["status"] == "ok"]
        entry = {"ok_rounds": len(ok), "rounds": len(runs)}
        if ok:
            for key in ("tokens_per_s", "tokens_per_s_with_setup", "model_tokens_per_s", "train_s", "setup_s",
                        "imports_s", "final_fvu",
                        "model_tokens_per_trained_token", "peak_rss_mb"):
                entry[key] = statistics.median(r[key] for r in ok)
            for key in ("final_fvu_typical", "held_out_massive_rows"):  # None: no typical row held out
                if all(r.get(key) is not None for r in ok):
                    entry[key] = statistics.median(r[key] for r in ok)
            entry["tokens_trained"] = ok[0]["tokens_trained"]
        else:
            entry["reasons"] = sorted({r["reason"] for r in runs})
        per_row[row] = entry
    ratios = {}
    if per_row.get("interp", {}).get("ok_rounds"):
        for peer in rows:
            if peer == "interp" or not per_row[peer]["ok_rounds"]:
                continue
            paired = [a["tokens_per_s"] / b["tokens_per_s"] for rnd in rounds
                      for a in rnd if a["row"] == "interp" and a["status"] == "ok"
                      for b in rnd if b["row"] == peer and b["status"] == "ok"]
            ratios[f"interp_over_{peer}"] = {"median": statistics.median(paired), "per_round": paired}
    return {"rows": per_row, "tokens_per_s_ratio": ratios}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny random Llama and a few hundred tokens (code path)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded smollm2-135m; "
                   "--quick: a tiny random Llama)")
    p.add_argument("--text", default=None, help="local text/jsonl file (default: the offline default corpus)")
    p.add_argument("--site", default=None, help="default blocks.12.hook_resid_post (--quick: blocks.2.hook_resid_post)")
    p.add_argument("--steps", type=int, default=None, help="SAE steps per row (default 50; --quick 6)")
    p.add_argument("--batch", type=int, default=None, help="rows per SAE step (default 4096; --quick 64)")
    p.add_argument("--d-sae", type=int, default=None, help="default 16 x 576 = 9216 (--quick 256)")
    p.add_argument("--k", type=int, default=None, help="default 32 (--quick 8)")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(d_sae / 16384) for every row "
                   "(saes.train_config.default_lr: sparsify's Adam rule)")
    p.add_argument("--context-size", type=int, default=None, help="tokens per window (default 128; --quick 32)")
    p.add_argument("--model-batch", type=int, default=8, help="windows per model forward (interp, SAELens)")
    p.add_argument("--heldout-tokens", type=int, default=None, help="held-out rows for the FVU (default 8192)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every row, alternating order (default 3; "
                   "--quick 2)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a row's process is stopped")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"site": "blocks.2.hook_resid_post" if q else "blocks.12.hook_resid_post", "steps": 6 if q else 50,
                "batch": 64 if q else 4096, "d_sae": 256 if q else 16 * 576, "k": 8 if q else 32,
                "context_size": 32 if q else 128, "heldout_tokens": 256 if q else 8192, "rounds": 2 if q else 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args.worker, args.spec)
    load_before = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="sae-e2e-"))
    try:
        t0 = time.perf_counter()
        spec = prepare(args, work)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        prep_s = time.perf_counter() - t0
        rounds = []
        for r in range(args.rounds):
            order = args.rows if r % 2 == 0 else args.rows[::-1]
            got = []
            for row in order:
                res = {**run_round(row, spec_path, work, args.timeout, args.device), "round": r}
                got.append(res)
                brief = {k: res.get(k) for k in ("status", "tokens_per_s", "final_fvu", "setup_s", "train_s", "reason")}
                print(f"round {r} {row}: {json.dumps({k: v for k, v in brief.items() if v is not None})}", flush=True)
            rounds.append(got)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rounds, args.rows)
    print(f"\n{'row':<10}{'ok':>4}{'tokens/s':>11}{'with setup':>12}{'setup s':>9}{'train s':>9}{'FVU':>8}"
          f"{'model tok/row':>15}")
    for row, e in summary["rows"].items():
        if e["ok_rounds"]:
            print(f"{row:<10}{e['ok_rounds']:>4}{e['tokens_per_s']:>11.0f}{e['tokens_per_s_with_setup']:>12.0f}"
                  f"{e['setup_s']:>9.1f}{e['train_s']:>9.1f}{e['final_fvu']:>8.4f}"
                  f"{e['model_tokens_per_trained_token']:>15.3f}")
        else:
            print(f"{row:<10}{0:>4}  failed: {e['reasons'][0]}")
    for name, r in summary["tokens_per_s_ratio"].items():
        print(f"{name}: {r['median']:.2f}x (per round {', '.join(f'{x:.2f}' for x in r['per_round'])})")
    import importlib.metadata

    import torch

    versions = {}
    for dist in ("torch", "transformers", "datasets", "sae-lens", "transformer-lens", "eai-sparsify"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    spec_out = {k: v for k, v in spec.items() if k not in ("work", "text_dir", "text_file", "heldout", "special_ids")}
    spec_out["model"] = args.model or ("tiny random Llama (4 layers, d_model 64, byte tokenizer)" if args.quick
                                       else "smollm2-135m (the embedded model's safetensors copy)")
    spec_out["text_source"] = args.text or "the offline default corpus (pydocs)"
    del spec_out["model_dir"]
    result = {"benchmark": "sae_end_to_end", "quick": args.quick, "settings": spec_out, "rows": args.rows,
              "rounds": rounds, "summary": summary, "prepare_s": prep_s,
              "command": " ".join(["python", "benchmarks/sae_end_to_end.py", *(argv if argv is not None
                                                                                else sys.argv[1:])]),
              "load_average_before_after": [load_before, list(os.getloadavg())],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "versions": versions,
                          "torch_threads": torch.get_num_threads(), "device": args.device},
              "note": "each row in its own process, one after another, alternating order per round; every round "
                      "is in 'rounds'; summary values are medians over the rounds that ran"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
