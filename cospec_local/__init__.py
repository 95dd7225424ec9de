"""cospec-local: speculative and collaborative decoding of GGUF model pairs on llama.cpp."""

from .api import ChatSession, GenerationResult, Pair, load_pair
from .config import GenerationConfig
from .default_pair import default_pair
from .engine import DoneEvent, GenerationStats, TokenEvent
from .errors import (
    ContextOverflowError,
    CospecError,
    EngineBusyError,
    IncompatiblePairError,
    ModelLoadError,
    RollbackError,
)
from .grammar import Grammar, GrammarError
from .sampling import SamplingParams

__all__ = [
    "ChatSession", "ContextOverflowError", "CospecError", "DoneEvent", "EngineBusyError", "GenerationConfig",
    "GenerationResult", "GenerationStats", "Grammar", "GrammarError", "IncompatiblePairError", "ModelLoadError", "Pair",
    "RollbackError", "SamplingParams", "TokenEvent", "default_pair", "load_pair",
]

