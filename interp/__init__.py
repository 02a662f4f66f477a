"""interp: capture, edit and explain the residual stream of Hugging Face transformers."""

from interp.capture import Activations, capture
from interp.errors import CacheError, DataError, InputError, InterpError, ModelLoadError, SiteError
from interp.models import EMBEDDED, load_model
from interp.sites import Site, resolve, site_names

__all__ = [
    "Activations", "capture", "load_model", "EMBEDDED", "Site", "resolve", "site_names",
    "InterpError", "SiteError", "InputError", "DataError", "CacheError", "ModelLoadError",
]
