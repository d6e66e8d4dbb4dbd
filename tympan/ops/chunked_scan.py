"""Fast pure-PyTorch selective scan: time-blocked, chunk-parallel, stable, with a hand-written backward.

Blocks. The sequence is processed in time blocks sized to keep a block's state ([steps, b, d, n]) near the
CPU cache. For each block, everything is done in reused block buffers: bias + softplus, the decays
``a_t = exp(dt_t * A)`` and drives ``x_t = dt_t * u_t * B_t`` (built time-major, so each step is one
contiguous slice; the [b, d, K] -> [K, b, d] moves are plain 2-D transposes), the scan, the contraction
with C, the D skip and the SiLU(z) gate. No [b, d, n, L] tensor is ever formed: memory is linear in L and
stays at the size of the inputs plus a few block buffers.

Scan inside a block (:func:`linear_scan`): the recurrence ``h_t = a_t * h_{t-1} + x_t`` is split into
``chunks`` chunks of ``chunk`` steps that run side by side (one vectorised op per step over all chunks), with
a sequential carry across chunks only: pass 1 gets each chunk's end state from a zero start, the carries
``c_k = (prod of a over chunk k-1) * c_{k-1} + end_{k-1}`` follow in ``chunks`` small steps, and pass 2 reruns
the chunks from their true start states. Only products of the decays appear (never exp of a cumulative sum
of log-decays, nor a division by one), so the result is as stable as the sequential loop for any length. A
block costs ``2 * chunk + chunks`` Python steps instead of ``K``; with a large state (b*d*n >= 16k) one chunk
per block is best and the scan is the plain loop over contiguous slices.

Backward (:class:`_SelectiveScanFn`) walks the blocks in reverse, recomputes each block's states from the
block-start state saved in forward, runs the adjoint recurrence ``G_t = C_t dy_t + a_{t+1} G_{t+1}`` with the
same chunked scan (``reverse=True``) and forms every gradient in the block, so training memory is linear in
L too.

Inference with float32 CPU inputs and state size 1 (DASS) goes to :mod:`tympan.ops.fused_scan` (one compiled C
loop per channel, fusing softplus, exp, the scan and the gate) when a C compiler is there; otherwise, and for
float64, N > 1, training and explicit plans, the blocked algorithm above runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tympan.ops import fused_scan, native
from tympan.ops.selective_scan import _check_inputs, compute_dtype, grouped_state_matrix

# Elements of state ([steps, b, d, n]) handled per block and per vectorised scan step (tuned on a 2-core Zen 4).
BLOCK_ELEMENTS = 1 << 20
STEP_ELEMENTS = 1 << 15  # at most torch's grain size: step ops never fork threads
SOFTPLUS_THRESHOLD = 20.0  # torch and the CUDA kernels: softplus(x) = x above 20


def plan_blocks(length: int, state_elements: int, chunk_size: int | None = None,
                block_size: int | None = None) -> tuple[int, int]:
    """(block length, chunk length) for ``length`` steps over ``state_elements`` = b*d*n states per step."""
    block = block_size or max(1, BLOCK_ELEMENTS // max(state_elements, 1))
    block = max(1, min(block, length))
    if chunk_size is None:
        chunks = max(1, min(block, STEP_ELEMENTS // max(state_elements, 1)))
        chunk_size = math.ceil(block / chunks)
        if chunks > 1:  # balance the 2 * chunk in-chunk steps against the `chunks` carry steps
            chunk_size = max(chunk_size, math.isqrt(2 * block))
    chunk_size = max(1, min(chunk_size, block))
    return max(chunk_size, block - block % chunk_size), chunk_size


def linear_scan(a: Tensor, x: Tensor, h0: Tensor, out: Tensor, chunk: int, reverse: bool = False) -> None:
    """out[t] = a[t] * out[t-1] + x[t] (out[-1] := h0); with ``reverse``, out[t] = a[t] * out[t+1] + x[t].

    a, x, out: [K, M] with K a multiple of ``chunk``; h0: [M]. Stable: only products of ``a`` appear.
    """
    chunks = a.shape[0] // chunk
    av, xv, hv = (t.view(chunks, chunk, -1) for t in (a, x, out))
    steps = list(zip(av.unbind(1), xv.unbind(1), hv.unbind(1)))  # per-step [chunks, M] views
    if reverse:
        steps.reverse()
    (a_first, x_first, h_first), rest = steps[0], steps[1:]
    if chunks == 1:
        starts = h0[None]
    else:
        end = x_first.clone()  # pass 1: each chunk's end state from a zero start
        for a_t, x_t, _ in rest:
            torch.addcmul(x_t, a_t, end, out=end)
        decay = av.prod(dim=1)
        starts = torch.empty_like(end)  # sequential carry across chunks
        carry = h0
        order = zip(starts.unbind(0), end.unbind(0), decay.unbind(0))
        for start_k, end_k, decay_k in (reversed(list(order)) if reverse else order):
            start_k.copy_(carry)
            carry = torch.addcmul(end_k, decay_k, carry)
    torch.addcmul(x_first, a_first, starts, out=h_first)  # pass 2: rerun the chunks from their true starts
    previous = h_first
    for a_t, x_t, h_t in rest:
        torch.addcmul(x_t, a_t, previous, out=h_t)
        previous = h_t


def _time_major(src: Tensor, out: Tensor) -> Tensor:
    """Copy a contiguous [b, d, K] block into ``out`` [K, b, d] (a 2-D transpose: torch's fast blocked path)."""
    k = src.shape[-1]
    out.view(k, -1).copy_(src.reshape(-1, k).t())
    return out


def _channel_major(src: Tensor, out: Tensor) -> Tensor:
    """Copy a contiguous [K, b, d] block into ``out`` [b, d, K]."""
    k = src.shape[0]
    out.view(-1, k).copy_(src.reshape(k, -1).t())
    return out


@dataclass
class _Block:
    """One time block's recomputable quantities (views into the shared buffers)."""
    start: int
    stop: int
    padded: int
    pre: Tensor  # delta + bias, [b, d, k]
    dt: Tensor  # [b, d, k]
    dt_t: Tensor  # [k, b, d]
    dtu_t: Tensor  # [k, b, d]
    B_t: Tensor  # [k, b, g, n]
    C_t: Tensor  # [k, b, g, n]
    a: Tensor  # [padded, b, d, n]
    x: Tensor  # [padded, b, d, n]
    h: Tensor  # [padded, b, d, n]


class _Scan:
    """Inputs of one selective scan in mamba layout, block plan and reused block buffers."""

    def __init__(self, u, delta, A, B, C, delta_bias, softplus, chunk_size, block_size, extra_step=False):
        self.u, self.delta, self.A, self.B, self.C = u, delta, A, B, C
        self.delta_bias, self.softplus = delta_bias, softplus
        self.batch, self.channels, self.length = u.shape
        self.groups, self.state = B.shape[1], B.shape[2]
        self.per_group = self.channels // self.groups
        self.block, self.chunk = plan_blocks(self.length, self.batch * self.channels * self.state,
                                             chunk_size, block_size)
        b, d, g, n, K = self.batch, self.channels, self.groups, self.state, self.block
        new = u.new_empty
        self.buffers = dict(pre=new(b * d * K), dt=new(b * d * K), dtu=new(b * d * K), dt_t=new(K * b * d),
                            dtu_t=new(K * b * d), B_t=new(K * b * g * n), C_t=new(K * b * g * n),
                            a=new(K + extra_step, b, d, n), x=new(K, b, d, n), h=new(K, b, d, n))

    def ranges(self):
        for start in range(0, self.length, self.block):
            stop = min(start + self.block, self.length)
            yield start, stop, math.ceil((stop - start) / self.chunk) * self.chunk

    def grouped(self, t: Tensor) -> Tensor:
        """[K, b, d, ...] viewed as [K, b, g, d/g, ...]."""
        return t.view(t.shape[0], self.batch, self.groups, self.per_group, *t.shape[3:])

    def step_sizes(self, start: int, stop: int, pre: Tensor | None = None, dt: Tensor | None = None) -> Tensor:
        """dt = softplus(delta + bias) (or delta + bias) for steps [start, stop), as [b, d, k]."""
        delta = self.delta[:, :, start:stop]
        if self.delta_bias is not None:
            pre = torch.add(delta, self.delta_bias[:, None], out=pre)
        elif pre is not None:
            pre.copy_(delta)
        else:
            pre = delta
        if not self.softplus:
            return pre
        if dt is None:
            return F.softplus(pre)
        return torch.ops.aten.softplus.out(pre, 1.0, SOFTPLUS_THRESHOLD, out=dt)

    def prepare(self, start: int, stop: int, padded: int, state: Tensor) -> _Block:
        """Build decays, drives and the states h of one block, starting from ``state`` [b, d, n]."""
        b, d, g, n, k = self.batch, self.channels, self.groups, self.state, stop - start
        buf = self.buffers
        pre, dt = buf["pre"][: b * d * k].view(b, d, k), buf["dt"][: b * d * k].view(b, d, k)
        dt = self.step_sizes(start, stop, pre, dt)
        dt_t = _time_major(dt, buf["dt_t"][: k * b * d].view(k, b, d))
        dtu = torch.mul(dt, self.u[:, :, start:stop], out=buf["dtu"][: b * d * k].view(b, d, k))
        dtu_t = _time_major(dtu, buf["dtu_t"][: k * b * d].view(k, b, d))
        B_t = buf["B_t"][: k * b * g * n].view(k, b, g, n).copy_(self.B[..., start:stop].permute(3, 0, 1, 2))
        C_t = buf["C_t"][: k * b * g * n].view(k, b, g, n).copy_(self.C[..., start:stop].permute(3, 0, 1, 2))
        a, x, h = buf["a"][:padded], buf["x"][:padded], buf["h"][:padded]
        torch.mul(dt_t[:, :, :, None], self.A, out=a[:k]).exp_()
        a[k:].fill_(1.0)  # padding steps hold the state
        torch.mul(self.grouped(dtu_t)[..., None], B_t[:, :, :, None, :], out=self.grouped(x[:k]))
        x[k:].zero_()
        linear_scan(a.flatten(1), x.flatten(1), state.flatten(), h.flatten(1), self.chunk)
        return _Block(start, stop, padded, pre, dt, dt_t, dtu_t, B_t, C_t, a, x, h)

    def contract_C(self, blk: _Block, out: Tensor) -> Tensor:
        """out[b, c, t] = sum_n C[t, b, c // (d/g), n] * h[t, b, c, n] for the block, as [b, d, k]."""
        k = blk.stop - blk.start
        hg = self.grouped(blk.h[:k])
        y_t = torch.einsum("kbgcn,kbgn->kbgc", hg, blk.C_t) if self.state > 1 else hg[..., 0] * blk.C_t
        return _channel_major(y_t.reshape(k, self.batch, self.channels), out)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, chunk_size, block_size):
    """y [b, d, L], the last state [b, d, n] and the state entering each time block (kept for backward)."""
    scan = _Scan(u, delta, A, B, C, delta_bias, softplus, chunk_size, block_size)
    b, d, n = scan.batch, scan.channels, scan.state
    y = torch.empty_like(u)
    y_block = u.new_empty(b * d * scan.block)
    state = u.new_zeros(b, d, n)
    block_starts = []
    for start, stop, padded in scan.ranges():
        block_starts.append(state)
        blk = scan.prepare(start, stop, padded, state)
        out = scan.contract_C(blk, y_block[: b * d * (stop - start)].view(b, d, stop - start))
        if D is not None:
            out.addcmul_(u[:, :, start:stop], D[:, None])
        if z is not None:
            out.mul_(F.silu(z[:, :, start:stop]))
        y[:, :, start:stop] = out
        state = blk.h[stop - start - 1].clone()
    return y, state, block_starts


class _SelectiveScanFn(torch.autograd.Function):
    """Fused selective scan over mamba-layout inputs (B, C grouped [b, g, n, L]); returns y [b, d, L], last state."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk_size, block_size):
        y, state, block_starts = _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, chunk_size,
                                               block_size)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *block_starts)
        ctx.options = (softplus, chunk_size, block_size)
        return y, state

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, D, z, delta_bias, *block_starts = ctx.saved_tensors
        softplus, chunk_size, block_size = ctx.options
        scan = _Scan(u, delta, A, B, C, delta_bias, softplus, chunk_size, block_size, extra_step=True)
        b, d, n, length = scan.batch, scan.channels, scan.state, scan.length
        grad_y = grad_y if grad_y is not None else torch.zeros_like(u)
        carry = grad_last.contiguous() if grad_last is not None else u.new_zeros(b, d, n)
        grads = dict(u=torch.empty_like(u), delta=torch.empty_like(delta), A=torch.zeros_like(A),
                     B=B.new_empty(B.shape), C=C.new_empty(C.shape),
                     D=None if D is None else torch.zeros_like(D), z=None if z is None else torch.empty_like(z),
                     delta_bias=None if delta_bias is None else torch.zeros_like(delta_bias))
        adjoint = torch.empty_like(scan.buffers["h"])
        drive = torch.empty_like(scan.buffers["x"])
        for (start, stop, padded), state in reversed(list(zip(scan.ranges(), block_starts))):
            k = stop - start
            blk = scan.prepare(start, stop, padded, state)
            # decay of the step after the block (1 after the sequence end, so G_{L-1} picks up dlast as is)
            a_next = scan.buffers["a"][1: padded + 1]
            if stop < length:
                dt_next = scan.step_sizes(stop, stop + 1)[:, :, 0]
                torch.mul(dt_next[:, :, None], A, out=a_next[k - 1]).exp_()
            else:
                a_next[k - 1:].fill_(1.0)
            # through the gate and the skip term
            gy = grad_y[:, :, start:stop]
            u_blk = u[:, :, start:stop]
            if z is not None:
                z_blk = z[:, :, start:stop]
                y_pre = scan.contract_C(blk, u.new_empty(b, d, k))
                if D is not None:
                    y_pre.addcmul_(u_blk, D[:, None])
                sig = torch.sigmoid(z_blk)
                grads["z"][:, :, start:stop] = gy * y_pre * sig * (1 + z_blk * (1 - sig))
                gy = gy * z_blk * sig
            grad_u = grads["u"][:, :, start:stop]
            if D is not None:
                grads["D"] += (gy * u_blk).sum(dim=(0, 2))
                torch.mul(gy, D[:, None], out=grad_u)
            else:
                grad_u.zero_()
            gy_t = _time_major(gy.contiguous(), u.new_empty(k, b, d))
            # adjoint G_t = C_t dy_t + a_{t+1} G_{t+1}, entering the block with G_stop (dlast at the end)
            torch.mul(scan.grouped(gy_t)[..., None], blk.C_t[:, :, :, None, :], out=scan.grouped(drive[:k]))
            drive[k:padded].zero_()
            G = adjoint[:padded]
            linear_scan(a_next.flatten(1), drive[:padded].flatten(1), carry.flatten(), G.flatten(1), scan.chunk,
                        reverse=True)
            G, h, x = G[:k], blk.h[:k], blk.x[:k]
            carry = G[0].clone()
            Gg, hg = scan.grouped(G), scan.grouped(h)
            # y = <C, h>: dC;  x = dt u B: dB and d(dt u);  d(dt A) = G a h_{t-1} = G (h - x): dA and d dt
            grad_C_t = torch.matmul(scan.grouped(gy_t)[:, :, :, None, :], hg)[:, :, :, 0]
            grad_B_t = torch.matmul(scan.grouped(blk.dtu_t)[:, :, :, None, :], Gg)[:, :, :, 0]
            grads["C"][..., start:stop] = grad_C_t.permute(1, 2, 3, 0)
            grads["B"][..., start:stop] = grad_B_t.permute(1, 2, 3, 0)
            grad_dtu_t = torch.einsum("kbgcn,kbgn->kbgc", Gg, blk.B_t) if n > 1 else Gg[..., 0] * blk.B_t
            dlog = h.sub_(x).mul_(G)
            grad_dt_t = torch.mul(dlog, A, out=drive[:k]).sum(dim=-1)  # the drive buffer is free again
            grads["A"] += dlog.mul_(blk.dt_t[..., None]).sum(dim=(0, 1))
            grad_dtu = _channel_major(grad_dtu_t.reshape(k, b, d).contiguous(), u.new_empty(b, d, k))
            grad_dt = _channel_major(grad_dt_t.contiguous(), u.new_empty(b, d, k))
            grad_dt.addcmul_(grad_dtu, u_blk)
            grad_u.addcmul_(grad_dtu, blk.dt)
            if softplus:
                grad_dt = torch.ops.aten.softplus_backward(grad_dt, blk.pre, 1.0, SOFTPLUS_THRESHOLD)
            grads["delta"][:, :, start:stop] = grad_dt
            if delta_bias is not None:
                grads["delta_bias"] += grad_dt.sum(dim=(0, 2))
        return (grads["u"], grads["delta"], grads["A"], grads["B"], grads["C"], grads["D"], grads["z"],
                grads["delta_bias"], None, None, None)


def _use_fused(args: tuple, chunk_size: int | None, block_size: int | None) -> bool:
    """The fused kernel serves float32 CPU inference with state size 1 (DASS) and the automatic plan."""
    u, A = args[0], args[2]
    return (chunk_size is None and block_size is None and u.dtype == torch.float32 and u.device.type == "cpu"
            and A.shape[1] == 1 and u.numel() > 0 and not native.tracing()
            and not isinstance(u, torch._subclasses.FakeTensor) and fused_scan.available())


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                           z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, *, chunk_size: int | None = None,
                           block_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan by the blocked, chunked algorithm (module doc); same contract as ``selective_scan``.

    ``chunk_size`` / ``block_size`` override the automatic plan (steps per chunk / per block; tests use them).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    b, d, length = u.shape

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    Bg = grouped_state_matrix(cast(B), b, d, length)
    Cg = grouped_state_matrix(cast(C), b, d, length)
    args = (cast(u), cast(delta), cast(A), Bg, Cg, cast(D), cast(z), cast(delta_bias), delta_softplus, chunk_size,
            block_size)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:8]):
        y, last = _SelectiveScanFn.apply(*args)
    elif _use_fused(args, chunk_size, block_size):  # inference on the CPU: the fused C loop
        y, last = fused_scan.fused_scan_forward(*args[:9], return_last_state)
    else:  # inference (and tracing for export): the plain forward, no autograd.Function
        y, last, _ = _scan_forward(*args)
    y = y.to(out_dtype)
    return (y, last) if return_last_state else y
