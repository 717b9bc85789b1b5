"""The Memorizing Transformer (Wu et al., ICLR 2022, arXiv 2203.08913).

A decoder-only transformer whose memorizing layers attend, in one softmax, over the local context
and over the top-k key/values retrieved from a kNN memory of everything the layer saw earlier in
the document. Parameter names and shapes match ``memorizing_transformers_pytorch`` 0.4.1, so its
checkpoints load (``load_state_dict``).

Memory traffic is overlapped with compute: a kNN layer sends its search as soon as its queries
exist, computes local attention while the memory works, and only then waits. Retrieved memories
arrive in compact form (distinct key/values plus positions, see ``memory_server.store.Retrieval``)
and are read with gathers that never build the dense ``(b, h, n, k, 2, d)`` tensor.

On CUDA the layers never make the host wait for the GPU: no ``.item()``, ``.tolist()``,
``.cpu()`` or ``bool(tensor)`` on device values, copies to and from the memory through pinned
buffers and events (``memtrans.transfer``), and host bookkeeping (``xl_valid``, micro-batch
rows) kept in numpy and Python on the host.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import einsum, nn

from .memory import (DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY, KNNMemoryList, RemoteKNNMemory,
                     servers_from_env)
from .transfer import pin_for, to_device


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1)


def _unique(items) -> tuple:
    return tuple(dict.fromkeys(items))


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else tuple(value) if isinstance(value, list) else (value,)


class PreNormResidual(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, **kwargs):
        out = self.fn(self.norm(x), **kwargs)
        if isinstance(out, tuple):
            return (out[0] + x, *out[1:])
        return out + x


class T5RelativePositionBias(nn.Module):
    """Learned bias per head for bucketed (log-spaced beyond ``num_buckets/2``) causal distances."""

    def __init__(self, scale: float, num_buckets: int = 32, max_distance: int = 128, heads: int = 8):
        super().__init__()
        self.scale = scale
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        # Zero, not N(0, 1): times ``scale`` (sqrt(dim_head), the seed's) a unit-normal start
        # adds position noise of std ~6 to every attention logit, which drowns the content
        # scores that copying needs; zero starts every bucket equal and lets training move them.
        nn.init.zeros_(self.relative_attention_bias.weight)

    @staticmethod
    def _bucket(relative_position, num_buckets: int, max_distance: int):
        n = (-relative_position).clamp(min=0)
        max_exact = num_buckets // 2
        is_small = n < max_exact
        large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                             * (num_buckets - max_exact)).long()
        large = large.clamp(max=num_buckets - 1)
        return torch.where(is_small, n, large)

    def forward(self, i: int, j: int, *, device):
        q_pos = torch.arange(j - i, j, dtype=torch.long, device=device)
        k_pos = torch.arange(j, dtype=torch.long, device=device)
        buckets = self._bucket(k_pos[None, :] - q_pos[:, None], self.num_buckets, self.max_distance)
        return rearrange(self.relative_attention_bias(buckets), "i j h -> 1 h i j") * self.scale


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


def _causal_mask(i: int, j: int, device) -> torch.Tensor:
    return torch.ones((i, j), dtype=torch.bool, device=device).triu(j - i + 1)


def _host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting (pinned, non-blocking on CUDA)."""
    return to_device(pin_for(tensor, device), device)


def _stale_xl(xl_valid: np.ndarray | None, xl_len: int) -> np.ndarray | None:
    """Per row, how many of the oldest XL entries are from a previous document (None: none).

    ``xl_valid`` (host bookkeeping, numpy) per row is a bool (the whole XL memory is, or is not,
    of this document) or the number of its most recent entries that are (carried by the caller
    while a document's own history fills an XL window longer than a segment).
    """
    if xl_valid is None or xl_len == 0:
        return None
    if xl_valid.dtype == np.bool_:
        valid = np.where(xl_valid, xl_len, 0)
    else:
        valid = np.clip(xl_valid, 0, xl_len)
    stale = xl_len - valid
    return stale if stale.any() else None


def _mask_stale_xl(sim: torch.Tensor, stale: np.ndarray | None) -> torch.Tensor:
    """Hide the XL columns that belong to a previous document."""
    if stale is None:
        return sim
    stale = _host(torch.from_numpy(stale), sim.device).view(-1, 1, 1, 1)
    hidden = torch.arange(sim.shape[-1], device=sim.device) < stale
    return sim.masked_fill(hidden, -torch.finfo(sim.dtype).max)


def _split_xl(kv: torch.Tensor, xl_max_memories: int):
    """(what falls out of the XL window, the new XL memory) of stacked key/values."""
    if xl_max_memories > 0:
        return kv[:, :-xl_max_memories], kv[:, -xl_max_memories:]
    return kv, None


def _add_current(knn_memory, discarded: torch.Tensor, stale) -> None:
    """Add what left the XL window to the kNN memory, except the XL entries of a row that belong
    to its previous document (a row's memory holds only the document it reads)."""
    if stale is None:
        knn_memory.add(discarded)
        return
    skip = np.minimum(stale, discarded.shape[1]).tolist()
    for count in sorted(set(skip)):
        rows = [r for r, s in enumerate(skip) if s == count]
        if count < discarded.shape[1]:
            index = _host(torch.tensor(rows), discarded.device)
            knn_memory.row_group(rows).add(discarded.index_select(0, index)[:, count:])


class KeySmear(nn.Module):
    """Mixes each key with the previous token's: ``a * k_i + (1 - a) * k_(i-1)``, with a learned
    ``a = sigmoid(w)`` per key dimension (initially 0.5).

    Olsson et al.'s "smeared keys" (In-context learning and induction heads, 2022): a key that
    carries its previous token lets one attention layer find "the position after the earlier
    occurrence of my token", which otherwise takes a previous-token head in a lower layer first.
    Measured here it is what makes copying learnable in a few hundred steps (a random-rotation copy
    task: 35% accuracy after 250 steps, against chance after 1,000 without). The first position of
    a segment has no previous key in this segment and gets zero in its place; the kNN memory
    stores smeared keys, so a retrieved entry carries its previous token too.
    """

    def __init__(self, dim_head: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim_head))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        a = self.weight.sigmoid()
        return a * k + (1 - a) * F.pad(k, (0, 0, 1, 0))[:, :-1]


class ShortConv(nn.Module):
    """A causal depthwise convolution over positions: ``sum_s w_s * t_(i-s)`` for s < width,
    with a learned weight per offset and channel, initialised to ``init`` (the rest zero).

    On a layer's queries and keys (``qk_conv``, Primer's multi-dconv-head attention, So et
    al. 2021) it lets one layer match the last few tokens: a query over tokens i-w+1..i meets the
    key of the position after an earlier occurrence of them. Positions before the segment start
    count as zero (the previous segment's tokens are not carried).
    """

    def __init__(self, channels: int, width: int, init: tuple[float, ...]):
        super().__init__()
        weight = torch.zeros(width, channels)
        weight[:len(init)] = torch.tensor(init).view(-1, 1)
        self.weight = nn.Parameter(weight)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        out = self.weight[0] * t
        for s in range(1, min(self.weight.shape[0], t.shape[1] + 1)):
            out = out + self.weight[s] * F.pad(t, (0, 0, s, 0))[:, :-s]
        return out


class _QKMixing:
    """What an attention layer mixes into its queries and keys from earlier positions: smeared
    keys, or the causal convolutions of ``qk_conv`` (which replace the smear)."""

    def _init_qk_mixing(self, *, heads: int, dim_head: int, smear_keys: bool, qk_conv: int):
        self.key_smear = KeySmear(dim_head) if smear_keys and not qk_conv else None
        # Keys reach one token further back than queries: the key of the position after the
        # query's tokens carries them.
        self.query_conv = ShortConv(heads * dim_head, qk_conv, (1.0,)) if qk_conv else None
        self.key_conv = ShortConv(dim_head, qk_conv + 1, (0.5, 0.5)) if qk_conv else None

    def _mixed_q(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.query_conv is None else self.query_conv(q)

    def _mixed_k(self, k: torch.Tensor) -> torch.Tensor:
        if self.key_smear is not None:
            k = self.key_smear(k)
        return k if self.key_conv is None else self.key_conv(k)


class Attention(_QKMixing, nn.Module):
    """Causal multi-query attention (one key/value head) with optional Transformer-XL memory."""

    def __init__(self, *, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 xl_max_memories: int = 0, smear_keys: bool = False, qk_conv: int = 0):
        super().__init__()
        self.heads = heads
        self._init_qk_mixing(heads=heads, dim_head=dim_head, smear_keys=smear_keys, qk_conv=qk_conv)
        self.scale = dim_head ** -0.5
        self.xl_max_memories = xl_max_memories
        self.dropout = nn.Dropout(dropout)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x, *, xl_memory=None, rel_pos_bias=None, xl_valid=None):
        q = rearrange(self._mixed_q(self.to_q(x)), "b n (h d) -> b h n d", h=self.heads) * self.scale
        k, v = self.to_kv(x).chunk(2, dim=-1)
        k = self._mixed_k(k)
        xl_len = xl_memory.shape[-3] if xl_memory is not None else 0
        if xl_memory is not None:
            k = torch.cat((xl_memory[..., 0, :], k), dim=-2)
            v = torch.cat((xl_memory[..., 1, :], v), dim=-2)
        sim = einsum("b h i d, b j d -> b h i j", q, k)
        i, j = sim.shape[-2:]
        if rel_pos_bias is not None:
            sim = sim + rel_pos_bias[..., -i:, -j:]
        sim = sim.masked_fill(_causal_mask(i, j, x.device), -torch.finfo(sim.dtype).max)
        sim = _mask_stale_xl(sim, _stale_xl(xl_valid, xl_len))
        attn = self.dropout(sim.softmax(dim=-1))
        out = rearrange(einsum("b h i j, b j d -> b h i d", attn, v), "b h n d -> b n (h d)")
        _, new_xl = _split_xl(torch.stack((k, v), dim=-2).detach(), self.xl_max_memories)
        return self.to_out(out), new_xl


class _GatherDot(torch.autograd.Function):
    """``q[..., :] . table[positions[..., j], :]`` without keeping the gathered rows for backward.

    Forward gathers in chunks; backward is one ``embedding_bag`` (a weighted sum of table rows),
    so memory stays O(queries * k) instead of O(queries * k * d).
    """

    CHUNK_ELEMENTS = 1 << 23

    @staticmethod
    def forward(ctx, q, table, positions):
        d, k = q.shape[-1], positions.shape[-1]
        flat_q, flat_p = q.reshape(-1, d), positions.reshape(-1, k)
        out = torch.empty(flat_p.shape, dtype=q.dtype, device=q.device)
        step = max(1, _GatherDot.CHUNK_ELEMENTS // (k * d))
        for s in range(0, flat_p.shape[0], step):
            gathered = table[flat_p[s : s + step]]
            out[s : s + step] = torch.einsum("nd,nkd->nk", flat_q[s : s + step], gathered)
        ctx.save_for_backward(table, flat_p)
        ctx.q_shape = q.shape
        return out.view(positions.shape)

    @staticmethod
    def backward(ctx, grad_out):
        table, flat_p = ctx.saved_tensors
        grad_q = F.embedding_bag(flat_p, table, per_sample_weights=grad_out.reshape(flat_p.shape),
                                 mode="sum")
        return grad_q.view(ctx.q_shape), None, None


KNN_COMBINES = ("joint", "gate")


class KNNAttention(_QKMixing, nn.Module):
    """Attention over the local context (and XL memory) plus the top-k of a kNN memory.

    Cosine-similarity attention (l2-normalised queries and keys) with a learned per-head
    temperature. ``combine="joint"`` (the seed's): retrieved memories and local keys share one
    softmax. ``combine="gate"`` (the paper's and meliad's): a softmax over the k retrieved
    entries, another over the local keys, mixed per head by ``g = sigmoid(combine_gate)``
    (initialised to 0, so g = 0.5): ``g * memory_out + (1 - g) * local_out``. Only key/values
    that leave the XL window are added to the kNN memory.

    ``probe``, when set (evaluation diagnostics), is called by ``finish`` with this segment's
    local keys, the retrieval and the attention weights on the retrieved entries.
    """

    def __init__(self, *, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 num_retrieved_memories: int = 32, xl_max_memories: int = 0,
                 attn_scale_init: float = 20, gate_output: bool = False, combine: str = "joint",
                 smear_keys: bool = False, qk_conv: int = 0):
        super().__init__()
        if combine not in KNN_COMBINES:
            raise ValueError(f"knn_combine must be one of {KNN_COMBINES}, got {combine!r}")
        self.heads = heads
        self.scale = nn.Parameter(torch.ones(heads, 1, 1) * math.log(attn_scale_init))
        self.xl_max_memories = xl_max_memories
        self.num_retrieved_memories = num_retrieved_memories
        self.dropout = nn.Dropout(dropout)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.output_gate = nn.Parameter(torch.zeros(1)) if gate_output else None
        self.combine_gate = nn.Parameter(torch.zeros(heads)) if combine == "gate" else None
        self._init_qk_mixing(heads=heads, dim_head=dim_head, smear_keys=smear_keys, qk_conv=qk_conv)
        self.probe = None

    def forward(self, x, *, knn_memory, xl_memory=None, add_knn_memory=True, rel_pos_bias=None,
                xl_valid=None, read_memory=None):
        return self.finish(self.begin(x, knn_memory=knn_memory, xl_memory=xl_memory,
                                      add_knn_memory=add_knn_memory, rel_pos_bias=rel_pos_bias,
                                      xl_valid=xl_valid, read_memory=read_memory))

    def begin(self, x, *, knn_memory, xl_memory=None, add_knn_memory=True, rel_pos_bias=None,
              xl_valid=None, read_memory=None):
        """Send the kNN search, compute local attention scores, send the add; nothing waits.

        The search goes to ``read_memory`` (default ``knn_memory``), the add to ``knn_memory``.
        """
        read_memory = knn_memory if read_memory is None else read_memory
        q = l2norm(rearrange(self._mixed_q(self.to_q(x)), "b n (h d) -> b h n d", h=self.heads))
        k, v = self.to_kv(x).chunk(2, dim=-1)
        k = l2norm(self._mixed_k(k))
        search = read_memory.search_async(q, self.num_retrieved_memories)
        local_keys = k.detach() if self.probe is not None else None

        xl_len = xl_memory.shape[-3] if xl_memory is not None else 0
        if xl_memory is not None:
            k = torch.cat((xl_memory[..., 0, :], k), dim=-2)
            v = torch.cat((xl_memory[..., 1, :], v), dim=-2)
        scale = self.scale.exp()
        sim = einsum("b h i d, b j d -> b h i j", q, k) * scale
        i, j = sim.shape[-2:]
        if rel_pos_bias is not None:
            sim = sim + rel_pos_bias[..., -i:, -j:]
        sim = sim.masked_fill(_causal_mask(i, j, x.device), -torch.finfo(sim.dtype).max)
        stale = _stale_xl(xl_valid, xl_len)
        sim = _mask_stale_xl(sim, stale)

        discarded, new_xl = _split_xl(torch.stack((k, v), dim=-2).detach(), self.xl_max_memories)
        if add_knn_memory and discarded.shape[1] > 0:
            _add_current(knn_memory, discarded, stale)
        return dict(q=q, v=v, sim=sim, scale=scale, search=search, read_memory=read_memory,
                    new_xl=new_xl, local_keys=local_keys)

    def finish(self, state):
        """Wait for the retrieved memories and combine them with the local attention."""
        q, v, sim, scale = state["q"], state["v"], state["sim"], state["scale"]
        retrieval = state["read_memory"].retrieved(state["search"])
        b, h, n, d = q.shape
        k = self.num_retrieved_memories
        positions = retrieval.positions.long().view(b, h, n, k)
        mem_keys = retrieval.keys.to(q.dtype)
        mem_values = retrieval.values.to(q.dtype)

        mask_value = -torch.finfo(sim.dtype).max
        sim_mem = _GatherDot.apply(q, mem_keys, positions) * scale
        sim_mem = sim_mem.masked_fill(positions == 0, mask_value)

        if self.combine_gate is None:
            attn = self.dropout(torch.cat((sim_mem, sim), dim=-1).softmax(dim=-1))
            mem_attn, local_attn = attn[..., :k], attn[..., k:]
        else:
            mem_attn = self.dropout(sim_mem.softmax(dim=-1))
            local_attn = self.dropout(sim.softmax(dim=-1))
        local_out = einsum("b h i j, b j d -> b h i d", local_attn, v)
        mem_out = F.embedding_bag(positions.reshape(-1, k), mem_values,
                                  per_sample_weights=mem_attn.reshape(-1, k),
                                  mode="sum").view(b, h, n, d)
        if self.combine_gate is None:
            out = local_out + mem_out
        else:
            g = self.combine_gate.sigmoid().view(1, h, 1, 1)
            out = g * mem_out + (1 - g) * local_out
        if self.probe is not None:
            self.probe(local_keys=state["local_keys"], positions=positions, mem_keys=mem_keys,
                       mem_attn=mem_attn.detach())
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        if self.output_gate is not None:
            out = out * self.output_gate.tanh()
        return out, state["new_xl"]


class MemorizingTransformer(nn.Module):
    """Decoder-only transformer with kNN-memory layers; arguments as in the seed package.

    ``memorizing_layers`` and ``xl_memory_layers`` are 1-based layer numbers. With ``labels`` the
    forward returns the loss (``pad_id`` ignored), else logits; plus the new XL memories when XL
    memory is on. ``gate_knn_output`` adds a flamingo-style tanh gate (initialised closed) to the
    kNN layers' output, for grafting memory onto a trained model. ``knn_combine`` is how a kNN
    layer mixes memory and local attention (``KNNAttention``): ``joint`` (default, the seed's, so
    its checkpoints load) or ``gate`` (the paper's). ``smear_keys`` gives every attention layer
    Olsson et al.'s smeared keys (``KeySmear``; off by default, so seed checkpoints load).
    ``qk_conv = w`` gives the layers ``qk_conv_layers`` (default: the memorizing layers) causal
    convolutions (``ShortConv``) over w queries and w + 1 keys instead, so one layer alone can
    match the last w tokens (off by default).

    ``shift_knn_memories_down = s``: the i-th memorizing layer searches the memory that the
    min(i + s, last)-th writes, and still writes its own, so a lower layer reads what a higher one
    stored in earlier segments (Ernie-Doc's idea; the seed rotated which memory each layer both
    read and wrote, which changes nothing). Never a lower layer's: that one has already added
    this segment's entries when XL memory is off, and reading them would see the future.
    ``shift_xl_memories_down = s``: the i-th XL layer attends over the XL memory the
    (i + s)-th (mod their number) produced in the previous segment.
    """

    def __init__(self, *, num_tokens: int, dim: int, depth: int, dim_head: int = 64, heads: int = 8,
                 knn_attn_heads: int | None = None, attn_dropout: float = 0.0, ff_mult: int = 4,
                 ff_dropout: float = 0.0, memorizing_layers=None, max_knn_memories: int = 250000,
                 num_retrieved_memories: int = 32, clear_memories_on_sos_token_id: int | None = None,
                 clear_memories_on_eos_token_id: int | None = None,
                 knn_memories_directory: str = DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY,
                 shift_knn_memories_down: int = 0, pad_id: int = 0, xl_max_memories: int = 0,
                 xl_memory_layers=None, shift_xl_memories_down: int = 0,
                 knn_memory_multiprocessing: bool = False, gate_knn_output: bool = False,
                 knn_combine: str = "joint", smear_keys: bool = False, qk_conv: int = 0,
                 qk_conv_layers=None):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pad_id = pad_id
        self.dim_head = dim_head
        valid_layers = set(range(1, depth + 1))

        memorizing_layers = _as_tuple((depth // 2,) if memorizing_layers is None else memorizing_layers)
        self.memorizing_layers = _unique(l for l in memorizing_layers if l in valid_layers)
        self.num_memory_layers = len(self.memorizing_layers)

        if xl_max_memories > 0:
            xl_layers = _as_tuple(tuple(range(1, depth + 1)) if xl_memory_layers is None
                                  else xl_memory_layers)
            self.xl_memory_layers = _unique(l for l in xl_layers if l in valid_layers)
        else:
            self.xl_memory_layers = ()
        self.num_xl_memory_layers = len(self.xl_memory_layers)

        self.max_knn_memories = max_knn_memories
        self.knn_memories_directory = knn_memories_directory
        self.clear_memories_on_sos_token_id = clear_memories_on_sos_token_id
        self.clear_memories_on_eos_token_id = clear_memories_on_eos_token_id
        self.shift_knn_memories_down = shift_knn_memories_down
        self.shift_xl_memories_down = shift_xl_memories_down

        knn_attn_heads = heads if knn_attn_heads is None else knn_attn_heads
        self.rel_pos_bias = T5RelativePositionBias(scale=dim_head ** 0.5, heads=heads)
        self.knn_rel_pos_bias = T5RelativePositionBias(scale=dim_head ** 0.5, heads=knn_attn_heads)

        conv_layers = set(self.memorizing_layers if qk_conv_layers is None
                          else _as_tuple(qk_conv_layers))
        block = partial(PreNormResidual, dim)
        self.layers = nn.ModuleList([])
        for layer_num in range(1, depth + 1):
            xl = xl_max_memories if layer_num in self.xl_memory_layers else 0
            conv = qk_conv if layer_num in conv_layers else 0
            if layer_num in self.memorizing_layers:
                attn = KNNAttention(dim=dim, dim_head=dim_head, heads=knn_attn_heads,
                                    dropout=attn_dropout, num_retrieved_memories=num_retrieved_memories,
                                    xl_max_memories=xl, gate_output=gate_knn_output,
                                    combine=knn_combine, smear_keys=smear_keys,
                                    qk_conv=conv)
            else:
                attn = Attention(dim=dim, dim_head=dim_head, heads=heads, dropout=attn_dropout,
                                 xl_max_memories=xl, smear_keys=smear_keys, qk_conv=conv)
            self.layers.append(nn.ModuleList([
                block(attn), block(FeedForward(dim=dim, mult=ff_mult, dropout=ff_dropout))]))

        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens))
        self.knn_mem_kwargs = dict(dim=dim_head, max_memories=max_knn_memories,
                                   multiprocessing=knn_memory_multiprocessing)

    # memories

    def create_knn_memories(self, *, batch_size: int, servers=None, namespace: str | None = None,
                            index: str = "flat", value_dtype: str = "float32",
                            key_dtype: str = "float32", ef_search: int = 128, nlist: int = 0,
                            nprobe: int = 0,
                            timeout: float = 60.0,
                            server_public_key=None, secret_key=None) -> KNNMemoryList:
        """kNN memories for ``batch_size`` rows of every memorizing layer.

        On memory servers when ``servers`` (endpoints) are given or ``MEMTRANS_SERVERS`` is set,
        else in this process. Under torch.distributed, rows are global (``rank * batch_size +
        local_row``) and rank 0 picks the namespace and broadcasts it: call this on every rank.
        ``server_public_key`` / ``secret_key`` turn on CURVE (see ``RemoteKNNMemory.create``).
        """
        servers = servers if servers is not None else servers_from_env()
        options = dict(index=index, value_dtype=value_dtype, key_dtype=key_dtype,
                       ef_search=ef_search, nlist=nlist, nprobe=nprobe)
        if servers is None:
            return KNNMemoryList.create_memories(
                batch_size=batch_size, num_memory_layers=self.num_memory_layers,
                memories_directory=self.knn_memories_directory)(**self.knn_mem_kwargs, **options)
        rank, world_size = _distributed_rank()
        return RemoteKNNMemory.create(
            servers, dim=self.dim_head, max_memories=self.max_knn_memories, batch_size=batch_size,
            num_layers=self.num_memory_layers, namespace=_shared_namespace(namespace), rank=rank,
            world_size=world_size, timeout=timeout, server_public_key=server_public_key,
            secret_key=secret_key, **options)

    @contextmanager
    def knn_memories_context(self, **kwargs):
        """``create_knn_memories(**kwargs)`` that frees the memories on exit."""
        memories = self.create_knn_memories(**kwargs)
        try:
            yield memories
        finally:
            memories.cleanup()

    @staticmethod
    def clear_memory(knn_memories, token_ids: torch.Tensor, token_id: int) -> None:
        """Clear the memories of the batch rows whose ``token_ids`` contain ``token_id``.

        It reads the token ids on the host, which on CUDA waits for the GPU (the seed's API; a
        trainer that knows where documents start clears those rows from its data instead)."""
        rows = (token_ids == token_id).any(dim=-1).nonzero(as_tuple=True)[0].tolist()
        if rows and len(knn_memories) > 0:
            scoped = knn_memories[0].scoped_indices
            knn_memories.clear_memory([scoped[r] for r in rows])

    # forward

    def forward(self, x, knn_memories, xl_memories=None, labels=None, add_knn_memory=True,
                micro_batches: int = 1, xl_valid=None):
        """Logits (or loss with ``labels``), plus the new XL memories when XL memory is on.

        ``micro_batches > 1`` splits the batch into that many row groups run in turn: while one
        group waits for its kNN search, the others compute. The numbers are those of one batch.
        ``xl_valid`` (one per row) says how much of a row's ``xl_memories`` belongs to the document
        it reads: a bool (False: a row that starts a new document here, all of its XL memory is
        from the previous one), or the number of most recent XL entries that are its document's
        (its tokens read so far, capped at the XL length; needed when ``xl_max_memories`` is
        longer than a segment, where the previous document stays in XL for several segments).
        The rest is masked out of attention and not added to the kNN memory (default: all valid).
        """
        batch_size, seq_len = x.shape
        device = x.device
        self._check_memories(knn_memories, batch_size)
        if not isinstance(micro_batches, int) or not 1 <= micro_batches <= batch_size:
            raise ValueError(f"micro_batches must be an integer in [1, batch size {batch_size}], "
                             f"got {micro_batches!r}")
        if xl_valid is not None:
            xl_valid = _host_xl_valid(xl_valid, batch_size)

        if self.clear_memories_on_sos_token_id is not None:
            self.clear_memory(knn_memories, x, self.clear_memories_on_sos_token_id)

        xl_memories = list(xl_memories) if xl_memories is not None else [None] * self.num_xl_memory_layers
        if len(xl_memories) != self.num_xl_memory_layers:
            raise ValueError(f"expected {self.num_xl_memory_layers} XL memories (one per XL layer), "
                             f"got {len(xl_memories)}")
        knn_memories_seq = list(knn_memories)
        last = len(knn_memories_seq) - 1
        read_memories = [knn_memories_seq[min(i + self.shift_knn_memories_down, last)]
                         for i in range(len(knn_memories_seq))]
        if xl_memories and self.shift_xl_memories_down > 0:
            s = self.shift_xl_memories_down % len(xl_memories)
            xl_memories = xl_memories[s:] + xl_memories[:s]

        max_context = max([seq_len, *((m.shape[-3] if m is not None else 0) + seq_len
                                      for m in xl_memories)])
        biases = (self.rel_pos_bias(seq_len, max_context, device=device),
                  self.knn_rel_pos_bias(seq_len, max_context, device=device))

        runs = [self._run_rows(x[rows], rows, knn_memories_seq, read_memories, xl_memories, biases,
                               add_knn_memory,
                               None if xl_valid is None else xl_valid[rows],
                               whole_batch=micro_batches == 1)
                for rows in _row_groups(batch_size, micro_batches)]
        results = _round_robin(runs)
        h = torch.cat([r[0] for r in results])
        new_xl_memories = [torch.cat(parts) for parts in zip(*(r[1] for r in results))]
        logits = self.to_logits(h)

        # After the memories were used: a row that ends its document here starts the next clean.
        if self.clear_memories_on_eos_token_id is not None:
            self.clear_memory(knn_memories, x, self.clear_memories_on_eos_token_id)

        has_xl = self.num_xl_memory_layers > 0
        if labels is None:
            return (logits, new_xl_memories) if has_xl else logits
        loss = F.cross_entropy(rearrange(logits, "b n c -> b c n"), labels, ignore_index=self.pad_id)
        return (loss, new_xl_memories) if has_xl else loss

    def _run_rows(self, x, rows, knn_memories, read_memories, xl_memories, biases, add_knn_memory,
                  xl_valid, whole_batch):
        """The layers for one row group, as a generator that yields while its kNN search runs."""
        rel_pos_bias, knn_rel_pos_bias = biases
        if not whole_batch:
            batch_rows = range(rows.start, rows.stop)
            knn_memories = [m.row_group(batch_rows) for m in knn_memories]
            read_memories = [m.row_group(batch_rows) for m in read_memories]
            xl_memories = [m[rows] if m is not None else None for m in xl_memories]
        knn_iter, read_iter, xl_iter = iter(knn_memories), iter(read_memories), iter(xl_memories)
        new_xl_memories = []
        h = self.token_emb(x)
        for layer_num, (attn, ff) in enumerate(self.layers, start=1):
            xl_memory = next(xl_iter) if layer_num in self.xl_memory_layers else None
            if layer_num in self.memorizing_layers:
                state = attn.fn.begin(attn.norm(h), knn_memory=next(knn_iter), xl_memory=xl_memory,
                                      add_knn_memory=add_knn_memory, rel_pos_bias=knn_rel_pos_bias,
                                      xl_valid=xl_valid, read_memory=next(read_iter))
                yield
                out, xl_mem = attn.fn.finish(state)
                h = out + h
            else:
                h, xl_mem = attn(h, xl_memory=xl_memory, rel_pos_bias=rel_pos_bias,
                                 xl_valid=xl_valid)
            if xl_mem is not None:
                new_xl_memories.append(xl_mem)
            h = ff(h)
        return h, new_xl_memories

    def _check_memories(self, knn_memories, batch_size: int) -> None:
        if len(knn_memories) != self.num_memory_layers:
            raise ValueError(f"expected {self.num_memory_layers} kNN memories (one per memorizing "
                             f"layer {self.memorizing_layers}), got {len(knn_memories)}; create them "
                             f"with model.create_knn_memories(batch_size=...)")
        for memory in knn_memories:
            if len(memory.scoped_indices) != batch_size:
                raise ValueError(f"input has batch size {batch_size} but the kNN memories hold "
                                 f"{len(memory.scoped_indices)} rows; create them with "
                                 f"create_knn_memories(batch_size={batch_size}) or scope them with "
                                 f"at_batch_indices")
            if memory.dim != self.dim_head:
                raise ValueError(f"kNN memory dim {memory.dim} does not match the model's dim_head "
                                 f"{self.dim_head}")


def _host_xl_valid(xl_valid, batch_size: int) -> np.ndarray:
    """``xl_valid`` as host numpy (bool, or int64 counts), checked: it is bookkeeping the caller
    has on the host, and reading it from a device would wait for the GPU."""
    if isinstance(xl_valid, torch.Tensor) and xl_valid.device.type != "cpu":
        raise ValueError(f"xl_valid is host bookkeeping (per row, how much of its XL memory is its "
                         f"document's): pass a list, numpy array or CPU tensor, not a tensor on "
                         f"{xl_valid.device} (reading it would wait for the device)")
    xl_valid = np.asarray(xl_valid)
    if xl_valid.dtype != np.bool_:
        xl_valid = xl_valid.astype(np.int64)
    if xl_valid.shape != (batch_size,):
        raise ValueError(f"xl_valid must hold one bool or count per batch row, shape "
                         f"({batch_size},), got {tuple(xl_valid.shape)}")
    return xl_valid


def _row_groups(batch_size: int, groups: int) -> list[slice]:
    """``groups`` contiguous row ranges, the first ``batch_size % groups`` one row longer (as
    ``tensor_split``); slices, so selecting them takes no index tensor to the device."""
    size, extra = divmod(batch_size, groups)
    starts = [i * size + min(i, extra) for i in range(groups + 1)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def _round_robin(runs: list) -> list:
    """Step generators in turn until all return; their return values, in order."""
    results = [None] * len(runs)
    active = list(range(len(runs)))
    while active:
        for i in list(active):
            try:
                next(runs[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    return results


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shared_namespace(namespace: str | None) -> str | None:
    """The caller's namespace, or under torch.distributed the one rank 0 picked."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return namespace
    import uuid

    chosen = [namespace or f"memtrans-{uuid.uuid4().hex[:12]}"]
    torch.distributed.broadcast_object_list(chosen, src=0)
    return chosen[0]
