"""Models: the ASCL objective, encoders and the trainable ``ASCLModel``.

Knows nothing about files, configuration or Beam.
"""

from models.ascl_model import ASCLModel
from models.backbones import BACKBONES, build_backbone, resnet, small_cnn
from models.heads import projection_head
from models.normalization import NORMALIZATIONS, SplitBatchNormalization, normalization_layer
from models.objective import (MODES, ascl_loss, ascl_targets, contrastive_logits,
                              soft_cross_entropy, validate_objective_args)

__all__ = [
    "ASCLModel", "BACKBONES", "MODES", "NORMALIZATIONS", "SplitBatchNormalization",
    "ascl_loss", "ascl_targets", "build_backbone", "contrastive_logits", "normalization_layer",
    "projection_head", "resnet", "small_cnn", "soft_cross_entropy", "validate_objective_args",
]
