"""The SCALE model: SCALEConfig, SCALEModel, JointCoTransformer and their parts."""
from .config import FEATURE_MODALITIES, MODALITIES, TOKEN_MODALITIES, SCALEConfig
from .jct import JCTOutput, JointCoTransformer
from .scale_model import MaskedHead, SCALEModel, SCALEOutput
from .transformer import TransformerStack, xformers_available

__all__ = ["SCALEConfig", "SCALEModel", "SCALEOutput", "JointCoTransformer", "JCTOutput", "TransformerStack",
           "MaskedHead", "MODALITIES", "TOKEN_MODALITIES", "FEATURE_MODALITIES", "xformers_available"]
