"""Errors cospec-local raises for bad input, each with a message a user can act on."""


class CospecError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelLoadError(CospecError):
    """A model file is missing, is not a GGUF, or llama.cpp refused to load it."""


class IncompatiblePairError(CospecError):
    """Draft and target cannot be paired (tokenizer, special tokens or vocabulary differ)."""


class ContextOverflowError(CospecError):
    """The prompt plus the requested tokens do not fit in the context window."""


class RollbackError(CospecError):
    """The model's memory cannot remove a suffix (recurrent or hybrid architectures)."""


class EngineBusyError(CospecError):
    """A second generation was started on models that are still generating (one at a time)."""


class RpcError(CospecError):
    """An RPC server (llama.cpp's distributed backend) cannot be used: unreachable, refused, or
    this build of llama.cpp has no RPC backend."""
