"""Sparse probing of SmolLM2-135M's MLP neurons (after Gurnee et al. 2023), on text built offline.

Three token-level features, each probed in every layer's MLP neurons (``blocks.{L}.mlp.hook_post``,
1536 per layer, standardised on the training split) with k-sparse probes for k = 1 ... 256:

- ``day``: the token is a day-of-week name. Documents are short sentences about plans; negatives
  include month names and other time words. Split by *entity*: the day named in a document (or the
  month, for documents without a day) goes wholly to train or test, so test days are unseen names.
- ``python``: the token is inside Python code. Code comes from chunks of this Python's stdlib
  source files; prose from the English paragraphs of ``pydoc_data.topics``. Split by source file / topic.
- ``french``: the token is in a French sentence. 40 French sentences written for this script and
  their English translations; a sentence and its translation share a group (split by pair), so the
  test topics are unseen in both languages.

Position 0 of every document is left out (no BOS: it is the attention sink). For each feature the
script writes F1 against k per layer, the best layer per k, the best single neurons, and the
held-out activations of the best k = 1 neuron (histogram and top-activating held-out tokens).

    python experiments/sparse_probing_smollm2.py --out experiments/results/sparse_probing
    python experiments/sparse_probing_smollm2.py --quick --out /tmp/sp     # 3 layers, small data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import interp
import probes
from probes.split import train_test_split

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "March", "April", "June", "August", "October", "December"]
PLAN = ["I will see you on {}.", "The meeting was moved to {} morning.", "We usually go hiking on {}.",
        "Her flight leaves on {} at noon.", "The shop is closed every {}.", "Let us talk again on {}.",
        "My sister visits us each {}.", "The report is due on {} evening.", "They played football last {}.",
        "Is the museum open on {}?"]
OTHER = ["I will see you in {}.", "The meeting was moved to early {}.", "We usually go hiking in {}.",
         "Her flight leaves in late {}.", "The shop is closed all of {}.", "Let us talk again in {}.",
         "My sister visits us each {}.", "The report is due at the end of {}.", "They played football last {}.",
         "Is the museum open in {}?"]
FILLER = ["The weather was mild.", "Bring a warm coat.", "Nobody answered the phone.", "The train was late again.",
          "We bought fresh bread.", "The garden needs water.", "It was a long day at work.", "Call me tomorrow."]

FRENCH_ENGLISH = [
    ("Le chat dort sur le canapé depuis ce matin.", "The cat has been sleeping on the sofa since this morning."),
    ("Nous allons au marché pour acheter des légumes.", "We are going to the market to buy vegetables."),
    ("La réunion commence à neuf heures précises.", "The meeting starts at nine o'clock sharp."),
    ("Il pleut beaucoup en automne dans cette région.", "It rains a lot in autumn in this region."),
    ("Mon frère travaille dans un hôpital à Lyon.", "My brother works in a hospital in Lyon."),
    ("Elle lit un roman policier chaque soir.", "She reads a detective novel every evening."),
    ("Les enfants jouent dans le jardin après l'école.", "The children play in the garden after school."),
    ("Je voudrais un café et un croissant, s'il vous plaît.", "I would like a coffee and a croissant, please."),
    ("Le train pour Marseille part dans dix minutes.", "The train to Marseille leaves in ten minutes."),
    ("Nous avons visité le musée pendant les vacances.", "We visited the museum during the holidays."),
    ("Cette boulangerie vend le meilleur pain du quartier.", "This bakery sells the best bread in the neighbourhood."),
    ("Il faut arroser les plantes deux fois par semaine.", "The plants must be watered twice a week."),
    ("Le professeur explique la leçon avec patience.", "The teacher explains the lesson patiently."),
    ("Ma grand-mère prépare une soupe aux légumes.", "My grandmother is making a vegetable soup."),
    ("Les oiseaux chantent dès le lever du soleil.", "The birds sing as soon as the sun rises."),
    ("Nous devons finir ce projet avant vendredi.", "We have to finish this project before Friday."),
    ("Le médecin conseille de boire beaucoup d'eau.", "The doctor advises drinking a lot of water."),
    ("Il a oublié ses clés dans la voiture.", "He forgot his keys in the car."),
    ("La bibliothèque ferme à dix-huit heures.", "The library closes at six in the evening."),
    ("Les touristes prennent des photos de la cathédrale.", "The tourists are taking photos of the cathedral."),
    ("Je cherche un appartement près de la gare.", "I am looking for a flat near the station."),
    ("Le vent souffle fort sur la côte bretonne.", "The wind blows hard on the coast of Brittany."),
    ("Elle a gagné la course malgré la pluie.", "She won the race despite the rain."),
    ("Nous dînons souvent chez nos voisins.", "We often have dinner at our neighbours' house."),
    ("Le film était trop long mais très beau.", "The film was too long but very beautiful."),
    ("Mon ordinateur ne démarre plus depuis hier.", "My computer has not started since yesterday."),
    ("Les pommes de ce verger sont délicieuses.", "The apples from this orchard are delicious."),
    ("Il apprend à jouer du piano depuis deux ans.", "He has been learning to play the piano for two years."),
    ("La mer était calme pendant toute la traversée.", "The sea was calm during the whole crossing."),
    ("Nous avons perdu le match au dernier moment.", "We lost the match at the last moment."),
    ("Le boulanger se lève très tôt chaque matin.", "The baker gets up very early every morning."),
    ("Cette rue est fermée à cause des travaux.", "This street is closed because of the roadworks."),
    ("Ils ont adopté un petit chien la semaine dernière.", "They adopted a small dog last week."),
    ("Je n'ai pas compris la question du client.", "I did not understand the customer's question."),
    ("La neige couvre les montagnes en hiver.", "Snow covers the mountains in winter."),
    ("Le directeur a signé le contrat ce matin.", "The director signed the contract this morning."),
    ("Nous partirons en Espagne au mois de juillet.", "We will leave for Spain in July."),
    ("Sa voix est douce et sa chanson est triste.", "Her voice is soft and her song is sad."),
    ("Le jardinier taille les rosiers au printemps.", "The gardener prunes the rose bushes in spring."),
    ("Les étudiants révisent pour leurs examens.", "The students are revising for their exams."),
]
CODE_FILES = ["json/encoder.py", "textwrap.py", "string.py", "fractions.py", "shlex.py", "calendar.py",
              "heapq.py", "bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "statistics.py", "base64.py",
              "difflib.py", "csv.py", "queue.py"]


def day_documents(n_docs: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(texts, entity): each text names one day (entity = the day) or one month (entity = the month)."""
    texts, entity = [], []
    for i in range(n_docs):
        if i % 2 == 0:
            name, template = DAYS[(i // 2) % 7], rng.choice(PLAN)
        else:
            name, template = MONTHS[(i // 2) % 7], rng.choice(OTHER)
        sents = [template.format(name)] + rng.sample(FILLER, 2)
        rng.shuffle(sents)
        texts.append(" ".join(sents))
        entity.append(name)
    return texts, entity


def code_and_prose(n_docs: int, rng: random.Random) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, source): chunks of stdlib code (1) and English pydoc prose (0)."""
    import pydoc_data.topics as topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = []
    for name in CODE_FILES:
        path = stdlib / name
        if path.is_file():
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            code += [("\n".join(lines[i:i + 8]), name) for i in range(40, len(lines) - 8, 24)]
    prose = []
    for key, text in topics.topics.items():
        for para in re.split(r"\n\s*\n", text):
            lines = para.splitlines()
            if len(para) > 200 and all(ln[:1].isalpha() for ln in lines) and "::=" not in para:
                prose.append((" ".join(ln.strip() for ln in lines), key))
    if not code or not prose:
        raise SystemExit("could not find stdlib sources or pydoc_data topics on this Python")
    half = n_docs // 2
    code, prose = rng.sample(code, min(half, len(code))), rng.sample(prose, min(half, len(prose)))
    return ([c for c, _ in code] + [p for p, _ in prose], [1] * len(code) + [0] * len(prose),
            ["code:" + s for _, s in code] + ["prose:" + s for _, s in prose])


def build_features(model, tok, sites, args, rng) -> dict[str, tuple[probes.ProbeDataset, list]]:
    """{feature: (dataset, entity per example)}: token-level datasets with the split groups."""
    out = {}
    texts, entity = day_documents(args.docs, rng)
    ds = probes.token_dataset(model, tok, texts, sites, label_fn=lambda t, i: int(t[i].strip() in DAYS),
                              max_length=args.max_length, dtype=torch.float16)
    out["day"] = (ds, [entity[g] for g in ds.groups.tolist()])
    texts, labels, source = code_and_prose(args.docs, rng)
    ds = probes.token_dataset(model, tok, texts, sites, doc_labels=labels, max_length=args.max_length,
                              max_per_doc=args.tokens_per_doc, dtype=torch.float16)
    out["python"] = (ds, [source[g] for g in ds.groups.tolist()])
    pairs = FRENCH_ENGLISH[: max(6, args.docs // 4)]
    texts = [p for pair in pairs for p in pair]
    ds = probes.token_dataset(model, tok, texts, sites, doc_labels=[1, 0] * len(pairs), max_length=args.max_length,
                              max_per_doc=args.tokens_per_doc, dtype=torch.float16)
    out["french"] = (ds, [g // 2 for g in ds.groups.tolist()])
    return out


def held_out_neuron(ds, feature_entities, result, seed: int, out: Path, name: str) -> dict:
    """The best single-neuron probe's neuron: its activations on held-out examples (histogram + top tokens)."""
    best = result.best(n_neurons=1)
    layer, neuron = best["site"], best["neurons"][0]
    _, test = train_test_split(len(ds), result.config.test_size, seed, groups=feature_entities)
    acts = ds.acts[layer][test, neuron].float()
    labels = torch.tensor([int(ds.labels[i]) for i in test.tolist()])
    probes.plot_neuron_activations(acts, labels, out / f"neuron_{name}.png",
                                   title=f"{name}: {layer} neuron {neuron}, held-out tokens",
                                   class_names=(f"not {name}", name), dpi=72)
    sign = 1.0 if float(acts[labels == 1].mean()) >= float(acts[labels == 0].mean()) else -1.0
    order = (sign * acts).argsort(descending=True)[:12].tolist()
    top = [{"token": ds.tokens[test[i]], "label": int(labels[i]), "activation": round(float(acts[i]), 3)}
           for i in order]
    return {"layer": layer, "neuron": neuron, "test_f1": best["f1"], "test_auc": best["auc"],
            "mean_activation": {"positive": float(acts[labels == 1].mean()),
                                "negative": float(acts[labels == 0].mean())},
            "n_test": {"positive": int(labels.sum()), "negative": int((labels == 0).sum())},
            "top_held_out_tokens": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json and the PNG figures")
    ap.add_argument("--quick", action="store_true", help="3 layers, few documents, k up to 16 (for tests)")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: all 30; --quick: 3,9,15)")
    ap.add_argument("--docs", type=int, default=None, help="documents per feature (default 160; --quick 28)")
    ap.add_argument("--method", default="f_stat", help="selection method (probes.METHODS)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.docs = args.docs or (28 if args.quick else 160)
    args.max_length = 32 if args.quick else 64
    args.tokens_per_doc = 6 if args.quick else 16
    ks = (1, 2, 4, 8, 16) if args.quick else probes.DEFAULT_N_NEURONS  # probe sizes (the paper's k)
    layers = ([int(v) for v in args.layers.split(",")] if args.layers
              else ([3, 9, 15] if args.quick else list(range(30))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = interp.load_model("smollm2-135m", device="cpu")
    sites = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    data = build_features(model, tok, sites, args, random.Random(args.seed))
    report = {"model": "smollm2-135m (embedded GGUF, dequantized, fp32)", "site": "blocks.{L}.mlp.hook_post",
              "method": args.method, "ks": list(ks), "layers": layers, "seed": args.seed,
              "command": "python experiments/sparse_probing_smollm2.py " + " ".join(
                  f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items()
                  if k in ("out", "quick", "layers", "docs", "method", "seed") and v not in (None, False)),
              "features": {}}
    for name, (ds, entities) in data.items():
        res = probes.sweep(ds.acts, ds.labels, n_neurons=ks, method=args.method, groups=entities, seed=args.seed,
                           layer_batch=10, top_n=8)
        res.plot_f1(out / f"f1_vs_k_{name}.png", title=f"{name}: test F1 against k (MLP neurons, {args.method})",
                    dpi=72)
        res.plot_top_neurons(out / f"top_neurons_{name}.png", title=f"{name}: best single neurons per layer", dpi=72)
        best_per_k = {k: {"layer": best["site"], "f1": best["f1"], "auc": best["auc"]}
                      for k, best in ((k, res.best(n_neurons=k)) for k in ks)}
        report["features"][name] = {
            "n_examples": len(ds), "n_positive": int(sum(int(v) for v in ds.labels)),
            "n_train": res.n_train, "n_test": res.n_test,
            "split_by": {"day": "day/month named", "python": "source file / pydoc topic",
                         "french": "sentence pair"}[name],
            "best_per_k": best_per_k,
            "f1": {site: {r["n_neurons"]: round(r["f1"], 4) for r in res.records if r["site"] == site}
                   for site in res.sites},
            "top_neurons": {site: res.top_neurons[site][:3] for site in res.sites},
            "best_single_neuron": held_out_neuron(ds, entities, res, args.seed, out, name),
        }
        plt.close("all")
        print(f"\n== {name}: {len(ds)} tokens ({report['features'][name]['n_positive']} positive), test F1 ==")
        print(res.table())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".results-")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'} and figures ({report['seconds']} s)")


if __name__ == "__main__":
    main()
