"""Writes experiments/quickstart.ipynb from the cells below (edit here, then run this file).

    python experiments/make_quickstart.py

The notebook reads QUICKSTART_TOKENS (SAE training rows, default 300k) and QUICKSTART_OUT from the
environment so the test suite can execute it top to bottom at a reduced size.
"""

from pathlib import Path

import nbformat as nbf

CELLS = [
    ("md", "# interp quickstart\n\nLoad a model, capture activations, train a small sparse autoencoder, "
           "inspect its latents, find the weekday circle, rotate it inside the running model, and plot.\n"
           "Runs on a laptop CPU with the embedded SmolLM2-135M model."),
    ("code", "import os\nimport torch\nimport matplotlib.pyplot as plt\n"
             "from interp import load_model, capture\n\n"
             "N_TOKENS = int(os.environ.get('QUICKSTART_TOKENS', 300_000))   # SAE training rows\n"
             "OUT = os.environ.get('QUICKSTART_OUT', 'quickstart-out')\n"
             "model, tok = load_model('smollm2-135m')    # any HF name or local folder works too\n"
             "model.config.num_hidden_layers, model.config.hidden_size"),
    ("md", "## 1. Capture\nSeveral sites in one forward pass; the pass stops after the deepest one."),
    ("code", "acts = capture(model, ['Today is Monday.', 'See you on Friday!'],\n"
             "               ['blocks.6.hook_resid_post', 'blocks.10.mlp.hook_post'], tokenizer=tok)\n"
             "{k: tuple(v.shape) for k, v in acts.items()}, acts.attention_mask"),
    ("md", "## 2. Train a small TopK SAE on layer 6\nA live activation store over the offline default corpus "
           "feeds the trainer (use `interp capture` + `CachedActivations` for long runs)."),
    ("code", "import saes\nfrom saes.trainer import Trainer, TrainConfig\nfrom interp.store import ActivationStore\n\n"
             "SITE = 'blocks.6.hook_resid_post'\n"
             "store = ActivationStore(model, tok, SITE, batch_tokens=1024, buffer_tokens=16384, context_size=128, "
             "epochs=None)\n"
             "sae = saes.build('topk', d_model=576, d_sae=2304, k=16)\n"
             "trainer = Trainer(sae, TrainConfig(total_tokens=N_TOKENS, batch_tokens=1024, log_every=10)).fit(store)\n"
             "sae"),
    ("code", "from saes.evaluate import evaluate\n"
             "held_out = ActivationStore(model, tok, SITE, batch_tokens=1024, buffer_tokens=4096, seed=1, "
             "max_windows=64)\n"
             "report = evaluate(sae, (b[SITE] for b in held_out), progress=False)\n"
             "{k: report[k] for k in ('l0_mean', 'explained_variance', 'dead_fraction') if k in report}"),
    ("md", "## 3. Inspect latents\nWhich tokens make a latent fire most?"),
    ("code", "texts = ['I will see you on Monday.', 'The meeting is on Friday afternoon.', 'def main(): return 0',\n"
             "         'The cat sat on the mat.', 'In 1999 the price was 20 dollars.', 'Sunday mornings are quiet.']\n"
             "a = capture(model, texts, SITE, tokenizer=tok)\n"
             "mask = a.attention_mask.bool().clone(); mask[:, 0] = False          # skip the attention sink\n"
             "codes = sae.encode(a[SITE][mask])\n"
             "toks = [tok.decode(int(t)) for t in a.input_ids[mask]]\n"
             "for latent in codes.sum(0).topk(5).indices.tolist():\n"
             "    top = codes[:, latent].topk(3).indices.tolist()\n"
             "    print(latent, [toks[i] for i in top])"),
    ("md", "## 4. Find the weekday circle\nClass-mean PCA of the day-token activations, with a fitted circle."),
    ("code", "from interp.features import class_mean_subspace, item_activations, ITEM_SETS, TEMPLATES\n"
             "from interp.features.plot import plot_projection\n"
             "DAYS = ITEM_SETS['days']\nLAYER = 10\nsite = f'blocks.{LAYER}.hook_resid_post'\n"
             "day_acts, labels, _ = item_activations(model, tok, DAYS, TEMPLATES['days'], [site])\n"
             "circle = class_mean_subspace(day_acts[site], labels, order=DAYS)\n"
             "print(circle, circle.meta['cyclic_order'], round(circle.meta['loco_angle_error'], 3))\n"
             "plot_projection(circle, day_acts[site], labels, order=DAYS, title='days at layer 10');"),
    ("md", "## 5. Intervene: rotate Monday to Thursday\nThe edit acts on the day token (by default it puts the "
           "point on Thursday's angle at 4x the circle's radius); the model repeats the day later."),
    ("code", "from interp.intervene import intervene\nfrom interp.edits import Rotate\n"
             "prompt = 'I will see you on Monday. To repeat, I will see you on'\n"
             "batch = tok([prompt], return_tensors='pt')\n"
             "day_pos = int((batch['input_ids'][0] == tok(' Monday', add_special_tokens=False)['input_ids'][0])"
             ".nonzero()[0])\n"
             "day_ids = [tok(' ' + d, add_special_tokens=False)['input_ids'][0] for d in DAYS]\n"
             "def top_day():\n"
             "    with torch.no_grad():\n"
             "        return DAYS[int(model(**batch).logits[0, -1, day_ids].argmax())]\n"
             "before = top_day()\n"
             "with intervene(model, {site: Rotate(circle, to='Thursday')}, positions=[day_pos]):\n"
             "    after = top_day()\n"
             "print('before:', before, '| after rotating to Thursday:', after)"),
    ("md", "## 6. Plot: the rotation for every target day"),
    ("code", "hits = []\nfor target in DAYS:\n"
             "    with intervene(model, {site: Rotate(circle, to=target)}, positions=[day_pos]):\n"
             "        hits.append(top_day())\n"
             "fig, ax = plt.subplots(figsize=(6, 2.5))\n"
             "ax.bar(range(7), [h == t for h, t in zip(hits, DAYS)])\n"
             "ax.set_xticks(range(7), [d[:3] for d in DAYS]); ax.set_ylabel('model says the target')\n"
             "os.makedirs(OUT, exist_ok=True); fig.savefig(os.path.join(OUT, 'rotation.png'))\n"
             "list(zip(DAYS, hits))"),
]


def build() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in CELLS]
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("quickstart.ipynb")
    nbf.write(build(), path)
    print(f"wrote {path}")
