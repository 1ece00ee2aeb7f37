"""The one tokenizer every artifact carries (tiktoken format), its builders, where it comes
from, and its re-serialization for ExecuTorch's runner."""

from edgellm.tokenizer.core import META_FILE, RANKS_FILE, Tokenizer
from edgellm.tokenizer.sources import load_tokenizer, tokenizer_from_source

__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_from_source", "RANKS_FILE", "META_FILE"]
