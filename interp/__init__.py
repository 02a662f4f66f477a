"""interp: capture, edit and explain the residual stream of Hugging Face transformers."""

from interp.capture import Activations, capture
from interp.controls import random_control, random_like, random_subspace
from interp.edits import (
                          Compose,
                          Edit,
                          EditContext,
                          Lambda,
                          MeanAblate,
                          Patch,
                          ProjectOut,
                          Replace,
                          Rotate,
                          SaeEdit,
                          SetCoords,
                          Steer,
                          ZeroAblate,
)
from interp.errors import CacheError, DataError, InputError, InterpError, ModelLoadError, SiteError
from interp.intervene import Intervention, PaddingWarning, intervene
from interp.layout_check import LayoutCheck, check_layout
from interp.models import EMBEDDED, load_model
from interp.positions import Positions
from interp.sites import Site, resolve, site_names
from interp.subspace import CircleMap, LinearMap, Subspace, TableMap

__all__ = [
    "Activations", "capture", "load_model", "EMBEDDED", "Site", "resolve", "site_names", "check_layout", "LayoutCheck",
    "intervene", "Intervention", "PaddingWarning", "Positions", "Edit", "EditContext", "Compose", "Lambda",
    "ZeroAblate", "ProjectOut", "MeanAblate", "Steer", "Replace", "Patch", "SetCoords", "Rotate", "SaeEdit",
    "Subspace", "CircleMap", "LinearMap", "TableMap", "random_control", "random_like", "random_subspace",
    "InterpError", "SiteError", "InputError", "DataError", "CacheError", "ModelLoadError",
]
