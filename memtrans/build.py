"""A run's model, corpus and kNN memories, built from its ``TrainConfig``: the pieces the
trainer, ``memtrans-evaluate``, ``memtrans-generate`` and the benchmarks all build the same way."""

from __future__ import annotations

from .config import RECALL, TrainConfig
from .data import NUM_TOKENS, PAD_ID, DocumentStreams, load_corpus
from .memory import KNNMemoryList
from .model import MemorizingTransformer
from .recall import RecallCorpus, RecallTask


def build_model(config: TrainConfig) -> MemorizingTransformer:
    return MemorizingTransformer(
        num_tokens=NUM_TOKENS, dim=config.dim, depth=config.depth, heads=config.heads,
        dim_head=config.dim_head, memorizing_layers=config.memorizing_layers,
        max_knn_memories=config.max_memories, num_retrieved_memories=config.num_retrieved,
        xl_max_memories=config.xl_max_memories, pad_id=PAD_ID, knn_combine=config.knn_combine,
        smear_keys=config.smear_keys, qk_conv=config.qk_conv,
        qk_conv_layers=config.qk_conv_layers)


def open_corpus(config: TrainConfig) -> DocumentStreams:
    """The run's corpus: the recall task for ``--data recall``, else files (``load_corpus``)."""
    if config.data == RECALL:
        task = RecallTask(bindings=config.recall_bindings, distance=config.recall_distance,
                          in_context_fraction=config.recall_in_context_fraction)
        task.check_window(config.seq_len, config.xl_max_memories)
        return RecallCorpus.create(task)
    return load_corpus(config.data, val_fraction=config.val_fraction, documents=config.documents,
                       max_document_bytes=config.max_document_bytes)


def make_memories(model: MemorizingTransformer, config: TrainConfig, servers: list[str] | None,
                  namespace: str | None = None) -> KNNMemoryList:
    """The run's kNN memories: on ``servers``, or in this process when that is None."""
    if servers is not None:
        return model.create_knn_memories(batch_size=config.batch_size, servers=servers,
                                         namespace=namespace, index=config.index,
                                         key_dtype=config.key_dtype, timeout=config.memory_timeout)
    # In-process even when MEMTRANS_SERVERS is set (create_knn_memories would follow it).
    return KNNMemoryList.create_memories(batch_size=config.batch_size,
                                         num_memory_layers=model.num_memory_layers)(
        dim=config.dim_head, max_memories=config.max_memories, multiprocessing=False,
        index=config.index, key_dtype=config.key_dtype)
