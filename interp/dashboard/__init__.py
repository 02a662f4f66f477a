"""Feature dashboards: what each SAE latent, neuron or subspace coordinate does, as a static site.

>>> units = sae_units(ckpt.encoder(), ckpt.decoder())            # or neuron_units / subspace_units
>>> collect(model, tok, "blocks.12.hook_resid_post", units, "dash/", DashboardConfig(tokens=100_000))
>>> render("dash/")                                              # dash/index.html, dash/units/<n>.html

:func:`collect` is one streaming, resumable pass over a corpus (:mod:`interp.dashboard.collect`);
:func:`render` writes the pages (:mod:`interp.dashboard.render`); :func:`load` reads the data back
as one record per unit (:mod:`interp.dashboard.results`); :func:`neuronpedia_batch` writes it in the
layout Neuronpedia imports (:mod:`interp.dashboard.neuronpedia`). ``interp`` never imports ``saes``: a unit
set is an encoder callable plus, optionally, the direction each unit writes.
"""

from interp.dashboard.collect import DashboardConfig, collect
from interp.dashboard.neuronpedia import neuronpedia_batch
from interp.dashboard.render import render
from interp.dashboard.results import DashboardData, load
from interp.dashboard.stats import Tracker
from interp.dashboard.units import (
    Units,
    final_norm,
    logit_effect,
    nearest_units,
    neuron_units,
    sae_units,
    subspace_units,
)

__all__ = ["DashboardConfig", "DashboardData", "Tracker", "Units", "collect", "final_norm", "load", "logit_effect",
           "nearest_units", "neuron_units", "neuronpedia_batch", "render", "sae_units", "subspace_units"]
