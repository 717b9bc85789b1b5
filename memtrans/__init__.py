"""memtrans: a Memorizing Transformer whose kNN memory can live in standalone memory servers."""

from .memory import KNNMemory, KNNMemoryList, RemoteKNNMemory
from .model import KNNAttention, MemorizingTransformer

__all__ = ["KNNAttention", "KNNMemory", "KNNMemoryList", "MemorizingTransformer", "RemoteKNNMemory"]
