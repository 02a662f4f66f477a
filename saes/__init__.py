"""saes: sparse autoencoders that read `interp` activations (one contract, one registry, one format).

Importing the package registers every architecture: ``relu``, ``topk``, ``batchtopk``, ``jumprelu``,
``mpsae``.
"""

from saes.base import (
    REGISTRY,
    SAE,
    SAEConfig,
    SAEError,
    SaeOutput,
    UntiedSAEConfig,
    build,
    get_architecture,
    register,
)
from saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saes.checkpoint import Checkpoint, annotate, load, read, save
from saes.evaluate import downstream_metrics, evaluate, explained_variance, reconstruction_metrics
from saes.jumprelu import JumpReluConfig, JumpReluSAE
from saes.locate import list_sites
from saes.losses import TrainState, TrainStep
from saes.mp import MPSAE, MPSAEConfig
from saes.publish import PublishError, publish
from saes.relu import ReluConfig, ReluSAE
from saes.topk import TopKConfig, TopKSAE
from saes.train_config import TrainConfig
from saes.trainer import DenseCodesWarning, Trainer

__all__ = [
    "SAE", "SAEConfig", "UntiedSAEConfig", "SAEError", "SaeOutput", "REGISTRY", "register", "build", "get_architecture",
    "ReluSAE", "ReluConfig", "TopKSAE", "TopKConfig", "BatchTopKSAE", "BatchTopKConfig",
    "JumpReluSAE", "JumpReluConfig", "MPSAE", "MPSAEConfig", "TrainState", "TrainStep",
    "Trainer", "TrainConfig", "DenseCodesWarning",
    "evaluate", "reconstruction_metrics", "downstream_metrics", "explained_variance",
    "save", "load", "read", "annotate", "list_sites", "Checkpoint", "publish", "PublishError",
]
