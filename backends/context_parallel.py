"""Context parallelism (CP) for packed rows: the ranks of the mesh's `cp` dimension share each
micro-batch by tokens, and attention all-gathers the keys and values (packed-document boundaries kept).

    local = split_tokens(micro_batch, cp_rank, cp_size)         # one row: the rank's tokens + 1
    bind = make_apply(config, frozen, attention_fn=context_parallel_attention(mesh))
    loss(bind(params), {**local, **totals})                      # this rank's part of the micro-batch loss

The split: a packed micro-batch's real tokens (segment id > 0), row after row, are one sequence of N
tokens, its documents made unique across rows; rank r owns the contiguous range [a_r, a_{r+1}),
a_r = floor(r N / cp). Its row is its owned tokens and one extra token, the first owned by rank r+1
(the last rank has none). The loss trains token t on the label of t+1 within a row and document
(`pure.losses.common.next_token_targets`), so the extra token gives the last owned token its target
(or, when the extra token starts another document, the boundary drops it, as in the whole batch),
and the extra token's own target falls off the row's end. Every target of the micro-batch is
then trained once, by the rank that owns the predicting token, and the per-token losses are those of
the whole batch: the ranks' losses and gradients sum to the micro-batch's.

The attention (`ContextParallelAttention`): each rank all-gathers the keys and values of its *owned*
tokens (the extra token's own come from rank r+1) with their segment ids, in rank order, which is
the global order; a local query at global index a_r + t attends to the keys of its document at
global indices <= its own. The gather is an autograd Function (with `setup_context`, as
`torch.func.grad` needs) whose backward sums the keys'/values' gradient over the ranks back onto each
rank's owned part (a reduce-scatter). Plain tensors and
torch.distributed collectives on the cp group: no DTensor inside `torch.func.grad` (see
`backends.distributed`).

All-gather rather than ring: one collective per layer, and the backward is one reduce-scatter; the
cost is every rank holding the keys/values of the whole micro-batch per layer (only the slice from
its first document's start to its last query is attended). A ring (keys passed rank to rank,
overlapped with compute) holds 1/cp of them; it is the next step for sequences whose keys do not
fit. Dropout: every cp rank draws its own masks (`backends.distributed.make_sharded_train_step`
folds the cp index into the key), so a run with dropout equals no CP in distribution only.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

from backends.distributed import PACKED_KEYS


def owned_bounds(num_tokens: int, world: int) -> list[int]:
    """[a_0 = 0, a_1, ..., a_world = num_tokens], a_r = floor(r N / world): rank r owns [a_r, a_{r+1}).

    Raises ValueError when there are fewer tokens than ranks (every rank must own one token)."""
    if num_tokens < world:
        raise ValueError(f"context parallelism: a micro-batch share of {num_tokens} real tokens cannot be split over "
                         f"context_parallel_size={world} ranks (each rank needs one token at least); use "
                         "longer micro-batches or a smaller context_parallel_size")
    return [r * num_tokens // world for r in range(world + 1)]


def split_tokens(mb: dict, rank: int, world: int) -> dict:
    """`rank`'s row of a packed micro-batch (`PACKED_KEYS`) split over `world` context-parallel ranks:
    [1, owned + 1] (the last rank [1, owned]) of input ids, labels, positions (kept, for rope) and
    segment ids made unique across the rows (row b's id s becomes s + b (max id + 1)).

    Raises ValueError naming the keys for a batch that is not packed (pair batches, rows with other
    keys: only packed rows are split by tokens) and when the batch has fewer real tokens than ranks."""
    if set(mb) != PACKED_KEYS:
        raise ValueError(f"context parallelism splits packed rows ({', '.join(sorted(PACKED_KEYS))}) by tokens; "
                         f"this batch has {', '.join(sorted(mb))} (pair batches, unpacked rows): set "
                         "context_parallel_size: 1, or sample_packing: true for SFT")
    segments = mb["segment_ids"]
    real = segments > 0
    offsets = torch.arange(segments.shape[0], device=segments.device)[:, None] * (int(segments.max()) + 1)
    bounds = owned_bounds(int(real.sum()), world)
    start, stop = bounds[rank], bounds[rank + 1] + (rank < world - 1)
    rows = {key: mb[key][real][start:stop][None] for key in ("input_ids", "labels", "positions")}
    return {**rows, "segment_ids": (segments + offsets)[real][start:stop][None]}


class _GatherOwned(torch.autograd.Function):
    """x [2, K, T, D] (keys and values) -> [2, K, N, D]: the ranks' first `counts[r]` tokens, in rank
    order. Backward: the gradient summed over the ranks, each rank's slice back on its owned tokens
    (zeros on the rest of its T, the extra token)."""

    @staticmethod
    def forward(x, owned, counts, group):
        longest = max(counts)
        mine = F.pad(x[:, :, :owned], (0, 0, 0, longest - owned)).contiguous()
        parts = [torch.empty_like(mine) for _ in counts]
        dist.all_gather(parts, mine, group=group)
        return torch.cat([part[:, :, :n] for part, n in zip(parts, counts)], dim=2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, owned, counts, group = inputs
        ctx.length, ctx.owned, ctx.counts, ctx.group = x.shape[2], owned, counts, group

    @staticmethod
    def backward(ctx, grad):
        longest = max(ctx.counts)
        parts = [F.pad(g, (0, 0, 0, longest - g.shape[2])).contiguous() for g in grad.split(ctx.counts, dim=2)]
        mine = torch.empty_like(parts[0])
        dist.reduce_scatter(mine, parts, group=ctx.group)  # gloo has it too (torch 2.13)
        return F.pad(mine[:, :, :ctx.owned], (0, 0, 0, ctx.length - ctx.owned)), None, None, None


class ContextParallelAttention:
    """`attention_fn(q [1, H, T, D], k, v [1, K, T, D], mask, causal, segment_ids [1, T])` of one rank's
    `split_tokens` row: attention over the keys/values of every cp rank's owned tokens with the mask
    "same document, key global index <= query global index". `varlen`: the model hands it the row's
    segment ids and builds no [T, T] mask (the row has no padding, so none is dropped).

    The layout of a forward (the ranks' owned counts, the global segment ids, this rank's mask) is
    gathered once per segment-id tensor (the model hands every layer the same one) and reused by the
    other layers."""

    varlen = True

    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._layout = {"ids": None, "version": None, "value": None}

    def _layout_of(self, segment_ids: torch.Tensor, owned: int):
        """(owned counts of the ranks, first key, end key, mask [1, 1, T, end - first]) of this row."""
        cached = self._layout
        version = None if segment_ids.is_inference() else segment_ids._version
        if version is not None and cached["ids"] is not None and cached["ids"]() is segment_ids \
                and cached["version"] == version:
            return cached["value"]
        ids = segment_ids[0]
        count = torch.tensor([owned], dtype=torch.int64, device=ids.device)
        counts = [torch.empty_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count, group=self.group)
        counts = [int(c) for c in counts]
        parts = [torch.empty(max(counts), dtype=ids.dtype, device=ids.device) for _ in counts]
        dist.all_gather(parts, F.pad(ids[:owned], (0, max(counts) - owned)), group=self.group)
        global_ids = torch.cat([part[:n] for part, n in zip(parts, counts)])
        start = sum(counts[:self.rank])
        # keys before the start of this row's first document or after its last query are never attended
        first = int((global_ids == ids[0]).nonzero()[0])
        end = start + ids.numel()
        q_index = torch.arange(start, end, device=ids.device)[:, None]
        k_index = torch.arange(first, end, device=ids.device)[None, :]
        mask = (ids[:, None] == global_ids[None, first:end]) & (k_index <= q_index)
        value = (counts, first, end, mask[None, None])
        if version is not None:
            cached.update(ids=weakref.ref(segment_ids), version=version, value=value)
        return value

    def __call__(self, q, k, v, mask, causal, segment_ids=None):
        if segment_ids is None or q.shape[0] != 1 or k.shape[2] != q.shape[2]:
            raise ValueError("context-parallel attention takes one split_tokens row with its segment ids and no "
                             f"KV cache; got q {list(q.shape)}, k {list(k.shape)}, segment ids "
                             f"{None if segment_ids is None else list(segment_ids.shape)}")
        owned = q.shape[2] - (self.rank < self.world - 1)
        counts, first, end, allowed = self._layout_of(segment_ids, owned)
        keys_values = _GatherOwned.apply(torch.cat((k, v)), owned, counts, self.group)[:, :, first:end]
        groups = q.shape[1] // k.shape[1]  # GQA: query head h reads key head h // groups
        keys_values = keys_values.repeat_interleave(groups, dim=1) if groups > 1 else keys_values
        return F.scaled_dot_product_attention(q, keys_values[:1], keys_values[1:], attn_mask=allowed)


def context_parallel_attention(mesh) -> ContextParallelAttention:
    """The attention of the cp ranks of `mesh` (a `backends.distributed.make_mesh` mesh with a `cp`
    dimension): collectives on that dimension's process group."""
    return ContextParallelAttention(mesh["cp"].get_group())
