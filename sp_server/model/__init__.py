"""The model: reference cell, harmonic part, anharmonic terms; native file; engine-frame mapping."""
from .mapping import Frame, FrameMapper, MappingError
from .model import HarmonicPart, Model, Reference
from .native import ModelFileError, load_model, save_model
from .terms import AnharmonicPart, Coefficient, DisplacementDiff, StrainFactor, Term

__all__ = ["AnharmonicPart", "Coefficient", "DisplacementDiff", "Frame", "FrameMapper", "HarmonicPart",
           "MappingError", "Model", "ModelFileError", "Reference", "StrainFactor", "Term", "load_model",
           "save_model"]
