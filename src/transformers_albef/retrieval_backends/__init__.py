"""Storage and vector search for the retrieval index (`transformers_albef.retrieval_index`): sharded safetensors +
Arrow storage written by one or many processes (`storage`), exact torch search and faiss indexes (`search`)."""

from .search import ANN_KINDS, FaissSearch, TorchExactSearch, faiss_available
from .storage import DEFAULT_SHARD_SIZE, INDEX_FORMAT, INDEX_VERSION, IndexFormatError

__all__ = [
    "ANN_KINDS",
    "DEFAULT_SHARD_SIZE",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "FaissSearch",
    "IndexFormatError",
    "TorchExactSearch",
    "faiss_available",
]
