"""Token dispatchers: move each token to the ranks that own its chosen experts, and the expert outputs back.

Every dispatcher follows DeepEP's contract, so the experts never know which one ran:

``dispatch(x [T, H], topk_idx [T, k] (global ids), topk_weights [T, k] fp32)`` returns ``(recv_x [R, H], recv_idx
[R, k], recv_weights [R, k], handle)``. A token is received once by each rank that owns at least one of its experts;
``recv_idx`` holds *local* expert ids (``id - ep_rank * E_local``) and ``-1`` where the expert lives elsewhere, and
``recv_weights`` is 0 there. The experts return, per received row, the weighted sum over its local experts
``[R, H]``; ``combine(y, handle)`` sends those partial sums home and adds them up per token ``[T, H]``.

Both directions are autograd-correct: the dispatch's backward is a combine of the gradients (for ``x`` and for the
routing weights), the combine's backward is a dispatch.

* ``local``: one rank owns every expert; dispatch and combine are the identity.
* ``all_to_all``: ``torch.distributed.all_to_all_single``, first the per-rank counts, then the rows (any backend:
  gloo on CPU, NCCL on CUDA).
* ``deepep``: DeepEP's ``Buffer`` (``get_dispatch_layout``, ``dispatch``, ``combine``), written against DeepEP commit
  567632d; CUDA, bf16 activations, NVLink/RDMA. Not run in CI (no CUDA there); run once intranode on 2 x H200
  (tests/test_runtime_gpu.py: bitwise equal to all_to_all in bf16, forward and expert gradients). Internode (RDMA)
  never run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .gather_sum import GatherSum

DISPATCHERS = ("auto", "local", "all_to_all", "deepep")


class Dispatcher(Protocol):
    name: str
    num_experts: int
    ep_size: int
    ep_rank: int

    @property
    def num_local_experts(self) -> int: ...

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor: ...


class _Base:
    name = "base"
    # every id a dispatch returns is a valid local id (no -1 slots): the experts may skip the validity mask and the
    # host sync that counts the valid slots
    all_slots_local = False

    def __init__(self, num_experts: int, ep_size: int = 1, ep_rank: int = 0) -> None:
        if num_experts % ep_size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over ep_size={ep_size}")
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_range(self) -> tuple[int, int]:
        n = self.num_local_experts
        return self.ep_rank * n, (self.ep_rank + 1) * n

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts={self.num_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank})"

    def __deepcopy__(self, memo: dict) -> "_Base":
        """Copying a model keeps talking to the same ranks: a process group is shared, never copied."""
        new = copy.copy(self)
        memo[id(self)] = new
        return new


class LocalDispatcher(_Base):
    """No expert parallelism: this rank holds all experts."""

    name = "local"
    all_slots_local = True  # the router's own ids, all in [0, num_experts)

    def __init__(self, num_experts: int) -> None:
        super().__init__(num_experts, 1, 0)

    def dispatch(self, x, topk_idx, topk_weights):
        return x, topk_idx, topk_weights, None

    def combine(self, y, handle):
        return y


# --- all_to_all ----------------------------------------------------------------------------------------------------


def _a2a(t: torch.Tensor, out_rows: list[int], in_rows: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    t = t.contiguous()
    out = t.new_empty((sum(out_rows),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t, output_split_sizes=out_rows, input_split_sizes=in_rows, group=group)
    return out


class _DispatchA2A(torch.autograd.Function):
    """Rows and their (weights, local ids) to the owning ranks; backward sends the gradients of both back."""

    @staticmethod
    def forward(ctx, x, w, idx, send: list[int], recv: list[int], group):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        recv_x = _a2a(x, recv, send, group)
        # weights and ids travel together; ids are small integers, exact in fp32 (< 2**24 experts)
        meta = _a2a(torch.cat([w.float(), idx.to(torch.float32)], dim=1), recv, send, group)
        k = w.shape[1]
        recv_idx = meta[:, k:].to(torch.int64)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, meta[:, :k].contiguous(), recv_idx

    @staticmethod
    def backward(ctx, g_x, g_w, _g_idx):  # type: ignore[override]
        gx = _a2a(g_x, ctx.send, ctx.recv, ctx.group)
        gw = _a2a(g_w.float(), ctx.send, ctx.recv, ctx.group)
        return gx, gw, None, None, None, None


class _CombineA2A(torch.autograd.Function):
    """Partial expert sums back to the ranks their tokens came from; backward is the forward's dispatch."""

    @staticmethod
    def forward(ctx, y, out_rows: list[int], in_rows: list[int], group):  # type: ignore[override]
        ctx.out_rows, ctx.in_rows, ctx.group = out_rows, in_rows, group
        return _a2a(y, out_rows, in_rows, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _a2a(g, ctx.in_rows, ctx.out_rows, ctx.group), None, None, None


@dataclass
class A2AHandle:
    token_ids: torch.Tensor  # [S] the source token of each row sent, grouped by destination rank
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank
    num_tokens: int
    row_of: torch.Tensor  # [T, W] where token t's row to rank w sits in the send order, -1 if not sent there


class AllToAllDispatcher(_Base):
    """Expert parallelism over ``torch.distributed.all_to_all_single`` (gloo or NCCL)."""

    name = "all_to_all"

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_experts, dist.get_world_size(group), dist.get_rank(group))
        self.group = group

    def dispatch(self, x, topk_idx, topk_weights):
        T, k = topk_idx.shape
        n_local = self.num_local_experts
        with torch.no_grad():
            dest = torch.div(topk_idx, n_local, rounding_mode="floor")  # [T, k] owning rank of each choice
            in_rank = torch.zeros(self.ep_size, T, dtype=torch.bool, device=x.device)
            in_rank.scatter_(0, dest.t(), True)  # [W, T]: does rank r own any of token t's experts
            pairs = in_rank.nonzero()  # (rank, token), rank-major, tokens ascending
            to_rank, token_ids = pairs[:, 0], pairs[:, 1]
            # the same order as a running count: the combine adds each token's returning rows by this index
            row_of = torch.where(in_rank, in_rank.view(-1).cumsum(0).view_as(in_rank) - 1, -1).t().contiguous()
            send_counts = in_rank.sum(dim=1)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            send, recv = send_counts.tolist(), recv_counts.tolist()
            mine = dest[token_ids] == to_rank.unsqueeze(1)  # [S, k]
            local_idx = torch.where(mine, topk_idx[token_ids] - (to_rank * n_local).unsqueeze(1), -1)
        w = torch.where(mine, topk_weights[token_ids].float(), 0.0)
        recv_x, recv_w, recv_idx = _DispatchA2A.apply(x[token_ids], w, local_idx, send, recv, self.group)
        return recv_x, recv_idx, recv_w, A2AHandle(token_ids, send, recv, T, row_of)

    def combine(self, y, handle: A2AHandle):
        back = _CombineA2A.apply(y, handle.send, handle.recv, self.group)  # rows go home: out = send, in = recv
        # each token's partial sums, added in fp32 in rank order (no atomics: one Triton kernel on CUDA)
        return GatherSum.apply(back, handle.row_of, handle.token_ids, y.dtype)


# --- DeepEP --------------------------------------------------------------------------------------------------------


def deepep_available() -> bool:
    try:
        import deep_ep  # noqa: F401, PLC0415
    except Exception:  # ImportError, or an extension built against another torch/CUDA
        return False
    return True


_DEEPEP_BUFFERS: dict[Any, Any] = {}
_NVL_PEERS = 8  # DeepEP's NUM_MAX_NVL_PEERS: up to 8 ranks talk over NVLink only (no RDMA buffer)


def _deepep_buffer(group: dist.ProcessGroup, hidden_bytes: int):
    """One ``deep_ep.Buffer`` per group, grown when a wider hidden size needs more room (DeepEP README's recipe)."""
    from deep_ep import Buffer  # noqa: PLC0415

    size = group.size()
    nvl = rdma = 0
    for config in (Buffer.get_dispatch_config(size), Buffer.get_combine_config(size)):
        nvl = max(config.get_nvl_buffer_size_hint(hidden_bytes, size), nvl)
        if size > _NVL_PEERS:  # DeepEP's hint is 0 within one NVLink domain, and asserts in builds without NVSHMEM
            rdma = max(config.get_rdma_buffer_size_hint(hidden_bytes, size), rdma)
    buf = _DEEPEP_BUFFERS.get(group)
    if buf is None or buf.num_nvl_bytes < nvl or buf.num_rdma_bytes < rdma:
        buf = Buffer(group, nvl, rdma)
        _DEEPEP_BUFFERS[group] = buf
    return buf


class _Box:
    """Carries DeepEP's handle (a tuple of tensors) from dispatch to combine outside autograd's outputs."""

    handle: Any = None


class _DeepEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_w, buffer, num_experts: int, box: _Box):  # type: ignore[override]
        n_rank, n_rdma, n_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, _counts, handle, _ = buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_w,
            num_tokens_per_rank=n_rank,
            num_tokens_per_rdma_rank=n_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=n_expert,
        )
        box.handle = handle
        ctx.buffer, ctx.box = buffer, box
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, g_x, _g_idx, g_w):  # type: ignore[override]
        # DeepEP: the backward of a dispatch is a combine (README, `dispatch_backward`)
        gx, gw, _ = ctx.buffer.combine(g_x.contiguous(), ctx.box.handle, topk_weights=g_w.float().contiguous())
        return gx, None, gw, None, None, None


class _DeepEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, buffer, box: _Box):  # type: ignore[override]
        ctx.buffer, ctx.box = buffer, box
        combined, _, _ = buffer.combine(y.contiguous(), box.handle)
        return combined

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        # DeepEP: the backward of a combine is a cached-layout dispatch (README, `combine_backward`)
        gy, _, _, _, _, _ = ctx.buffer.dispatch(g.contiguous(), handle=ctx.box.handle)
        return gy, None, None


class DeepEPDispatcher(_Base):
    """DeepEP's high-throughput (normal) kernels, intranode over NVLink or internode over RDMA.

    DeepEP moves bf16 activations only (or an fp8 tuple, not used here) and wants ``topk_idx`` as
    ``deep_ep.topk_idx_t``; the returned ``recv_idx`` is already local with -1 elsewhere, which is our contract.
    """

    name = "deepep"

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        group = group if group is not None else dist.group.WORLD
        super().__init__(num_experts, dist.get_world_size(group), dist.get_rank(group))
        self.group = group

    def dispatch(self, x, topk_idx, topk_weights):
        import deep_ep  # noqa: PLC0415

        if x.dtype != torch.bfloat16:
            raise TypeError(f"DeepEP dispatches bf16 activations; got {x.dtype} (use dispatcher='all_to_all')")
        buffer = _deepep_buffer(self.group, x.shape[-1] * max(x.element_size(), 2))
        idx = topk_idx.to(getattr(deep_ep, "topk_idx_t", torch.int64))
        box = _Box()
        recv_x, recv_idx, recv_w = _DeepEPDispatch.apply(
            x.contiguous(), idx, topk_weights.float().contiguous(), buffer, self.num_experts, box
        )
        return recv_x, recv_idx.to(torch.int64), recv_w, (buffer, box)

    def combine(self, y, handle):
        buffer, box = handle
        return _DeepEPCombine.apply(y.to(torch.bfloat16), buffer, box)


# --- choosing ------------------------------------------------------------------------------------------------------


def make_dispatcher(
    name: str, num_experts: int, group: dist.ProcessGroup | None = None, device: torch.device | None = None
) -> _Base:
    """``auto``: DeepEP on CUDA when it imports and EP > 1, else all_to_all when EP > 1, else local.

    EP size is the size of `group` (the default group when None) when torch.distributed is initialised, else 1.
    """
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r}; one of {', '.join(DISPATCHERS)}")
    ep = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if name == "auto":
        if ep == 1:
            name = "local"
        elif device is not None and torch.device(device).type == "cuda" and deepep_available():
            name = "deepep"
        else:
            name = "all_to_all"
    if name == "local":
        if ep != 1:
            raise ValueError(f"dispatcher 'local' holds every expert, but the EP group has {ep} ranks")
        return LocalDispatcher(num_experts)
    if ep == 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"dispatcher {name!r} needs torch.distributed initialised")
    if name == "all_to_all":
        return AllToAllDispatcher(num_experts, group)
    return DeepEPDispatcher(num_experts, group)
