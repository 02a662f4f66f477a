"""saes: sparse autoencoders that read `interp` activations (one contract, one registry, one format)."""

from saes.base import REGISTRY, SAE, SAEConfig, SAEError, SaeOutput, build, get_architecture, register

__all__ = ["SAE", "SAEConfig", "SAEError", "SaeOutput", "REGISTRY", "register", "build", "get_architecture"]
