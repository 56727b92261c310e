"""The chunked parallel forms of the v5/v6 and v7 state recurrences over a sequence (GPUs; on
the CPU kernels/wkv/serial.py runs the recurrences token by token).

The per-token references are :func:`rwkvpy.models.v5.wkv_heads` (v5/v6) and
:func:`rwkvpy.models.v7.wkv7`. On GPUs the token-by-token order leaves the device idle, and the
chunked forms here take over.

Both recurrences are linear in the state, so a prompt of T tokens is cut into chunks of L
tokens: inside a chunk every token-to-token interaction is a (masked) matrix product, computed
for all chunks at once, and only the state at the chunk boundaries is carried sequentially:
T / L small steps instead of T.

Decays
------
Per key channel, g_t = w_1 ... w_t is the decay from the chunk start through token t (inclusive)
and g^-_t = g_{t-1} the exclusive one. A token pair (t, i), i < t, is weighted by g^-_t / g_i
(v5 outputs and v7 removals: the decays strictly between the two) or g_t / g_i (v7 outputs).

* Fast path: ``(x_t g_t) . (y_i / g_i)``, one matmul over the key channels. Every factor is
  finite while 1 / g_i is, so a (chunk, head) takes this path only if every channel's decay over
  the whole chunk, g_L, is at least :data:`SAFE_DECAY` = e^-60; the masked (i > t) entries, at
  most e^60 |x||y|, are then finite too and are zeroed. This covers v7 always (log w >= -e^-0.5:
  a chunk of 64 decays by at most e^-38.8) and v5/v6 with ordinary decays.
* Exact path for the other (chunk, head) pairs (extreme decays such as w = exp(-e^5), which is 0
  in float32): a hierarchical split of the pair matrix (:func:`_lower_scores`) in which each
  block of pairs is one matmul of two factors that are plain products of decays in [0, 1]
  (cumulative products from the split point forwards and backwards): no division, nothing can
  overflow, and a factor that underflows belongs to a product that underflows. The other
  per-token factors, g^-_t and g_L / g_i, are likewise computed as direct products there.

v7 (generalised delta rule, state S (N_v, N_k))::

    S_t = S_{t-1} (diag(w_t) + alpha_t beta_t^T) + v_t k_t^T,   out_t = S_t r_t,
    alpha = -kk,  beta = kk * a

Inside a chunk, write u_t = S_{t-1} alpha_t (what the rank-one update removes). With
S~_t = S_t diag(g_t)^-1 the recurrence unrolls to
S~_t = S_0 + sum_{i<=t} (u_i beta_i^T + v_i k_i^T) diag(g_i)^-1, hence for all t of a chunk

    (I - M_ab) U = A~ S_0^T + M_ak V          (WY / UT form: one unit-lower-triangular inverse)
    Out = R~ S_0^T + M_rb U + M_rk V
    S_L^T = diag(g_L) S_0^T + B~^T U + K~^T V

with A~ = alpha g^-, R~ = r g, B~ = beta g_L / g, K~ = k g_L / g and the decay-weighted pair
matrices M_xy[t, i] = sum_c x_tc y_ic (g_tc or g^-_tc) / g_ic (strict for alpha rows, inclusive
for r rows). The triangular inverse is a blockwise recursion (:func:`_unit_lower_inverse`).
Per chunk the sequential part is three small batched matmul-adds.

Chunk boundaries
----------------
The state at each chunk start follows an affine recurrence, S_{c+1} = A_c S_c + B_c (A_c diagonal
for v5/v6, a (K, K) matrix for v7). On the CPU it runs as the plain loop (nc steps of three small
matmul-adds). On a GPU the loop's nc x 3 launches dominate (docs/kernels.md), so there the
(A, B) pairs are composed by a parallel
prefix scan (:func:`_affine_scan`, log2(nc) rounds of batched products) and all chunk starts are
then one batched product with S_0. ``scan=None`` picks the scan on any device but the CPU.

Memory
------
Scratch tensors come from a per-thread buffer that is kept between calls (at most
:data:`SCRATCH_BYTES`; long sequences are processed in groups of chunks that fit it): fresh
multi-megabyte allocations are returned to the OS by malloc and page-faulted back on every call,
which costs more than the arithmetic here. :func:`release_scratch` frees the buffer.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

__all__ = [
    "SAFE_DECAY",
    "SCRATCH_BYTES",
    "V5_CHUNK",
    "V7_CHUNK",
    "release_scratch",
    "wkv5_chunked",
    "wkv7_chunked",
]

# Default chunk lengths on the CPU (powers of two; docs/kernels.md). The CPU runs the serial
# forms of serial.py; these apply where numba is missing, or where the chunked forms are
# called directly.
V5_CHUNK = 32
V7_CHUNK = 32
# On GPUs longer chunks run faster (docs/kernels.md): 64, the longest chunk over which v7's
# fastest decay, e^-0.6065 per token, stays on the fast path (e^-38.8 > SAFE_DECAY); 128 would
# send strongly decaying heads to the exact path.
GPU_CHUNK = 64

# A (chunk, head) takes the fast path when every channel decays by no more than this over the
# chunk: 1 / g stays <= e^60, far inside float32 range.
SAFE_DECAY = math.exp(-60.0)

# Upper bound of the per-thread scratch buffer kept between calls.
SCRATCH_BYTES = 64 << 20
# On a GPU (torch's caching allocator keeps the memory): scratch per group of chunks.
GPU_SCRATCH_BYTES = 1 << 30

F32 = torch.float32
_tls = threading.local()


def release_scratch():
    """Free this thread's scratch buffer (it is reallocated by the next call)."""
    _tls.buf = None


class _Arena:
    """Bump allocator over the thread's scratch buffer; falls back to fresh tensors when full.
    On other devices than the CPU every take is a fresh tensor (torch caches GPU memory)."""

    def __init__(self, device):
        self.device = device
        self.cpu = device.type == "cpu"
        self.buf = getattr(_tls, "buf", None) if self.cpu else None
        self.limit = SCRATCH_BYTES if self.cpu else GPU_SCRATCH_BYTES
        self.off = self.peak = 0

    def take(self, *shape):
        n = math.prod(shape)
        end = self.off + n
        if self.buf is not None and end <= self.buf.numel():
            t = self.buf[self.off : end].view(shape)
        else:
            t = torch.empty(shape, dtype=F32, device=self.device)
        self.off = (end + 15) & ~15  # 64-byte aligned views
        self.peak = max(self.peak, self.off)
        return t

    def reset(self):
        self.off = 0

    def close(self):
        if (
            self.cpu
            and self.peak * 4 <= SCRATCH_BYTES
            and (self.buf is None or self.peak > self.buf.numel())
        ):
            _tls.buf = torch.empty(self.peak, dtype=F32)


def _chunk_len(chunk, default, T, device):
    if chunk is None:
        default = default if device.type == "cpu" else GPU_CHUNK
    L = default if chunk is None else int(chunk)
    if L < 1 or L & (L - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk!r}")
    return min(L, 1 << max(0, (T - 1).bit_length()))  # no longer than T rounded up to 2^n


def _group_len(L, T, floats_per_token, limit):
    """Tokens per group: a multiple of L whose scratch fits ``limit`` bytes (at least one chunk)."""
    fit = limit // (4 * floats_per_token)
    return min(max(L, fit // L * L), -(-T // L) * L)


def _chunk_into(dst, x, fill=0.0):
    """x (n, H, N) -> dst (nc, H, L, N), padded with ``fill`` after the n tokens."""
    n, L = x.shape[0], dst.shape[2]
    full = n // L
    if full:
        dst[:full].copy_(x[: full * L].reshape(full, L, *x.shape[1:]).transpose(1, 2))
    rem = n - full * L
    if rem:
        dst[full, :, :rem].copy_(x[full * L :].transpose(0, 1))
        dst[full, :, rem:].fill_(fill)
    return dst


def _unchunk_into(dst, y):
    """y (nc, H, L, N) -> dst (n, H, N), the first n tokens."""
    n, L = dst.shape[0], y.shape[2]
    full = n // L
    if full:
        dst[: full * L].view(full, L, *dst.shape[1:]).copy_(y[:full].transpose(1, 2))
    rem = n - full * L
    if rem:
        dst[full * L :].copy_(y[full, :, :rem].transpose(0, 1))


def _chunk_view(x, nc, L, ar, fill=0.0):
    """x (n, H, N) as a (nc, H, L, N) view; copied into scratch, padded with ``fill``, only when
    n is not a whole number of chunks (or x is not float32)."""
    n = x.shape[0]
    if n != nc * L or x.dtype != F32:
        buf = ar.take(nc * L, *x.shape[1:])
        buf[:n].copy_(x)
        buf[n:].fill_(fill)
        x = buf
    return x.unflatten(0, (nc, L)).transpose(1, 2)


def _unsafe(gL):
    """(nc, H) mask of the (chunk, head) pairs that need the exact path; None if there are none."""
    bad = ~(gL.squeeze(-2).amin(-1) >= SAFE_DECAY)  # NaN counts as unsafe
    return bad if bool(bad.any()) else None


def _excl_cumprod(x):
    """Exclusive cumulative product along dim -2: 1, x_0, x_0 x_1, ..."""
    c = x.cumprod(-2)
    return torch.cat([torch.ones_like(c[..., :1, :]), c[..., :-1, :]], -2)


def _excl_rev_cumprod(x):
    """Exclusive reverse cumulative product along dim -2: out_i = x_{i+1} ... x_{n-1}."""
    return _excl_cumprod(x.flip(-2)).flip(-2)


def _lower_scores(X, Y, w, inclusive):
    """M[..., t, i] = sum_c X[t, c] Y[i, c] prod_{i<s<t} w[s, c] (times w[t, c] where
    ``inclusive[j]`` for the rows of X[..., j, :, :, :]) for i < t; 0 for i >= t.

    X (..., J, 1, L, K), Y (..., 1, J', L, K), w (..., 1, 1, L, K), float32, L a power of two;
    ``inclusive`` a sequence of J bools. The exact path for any decay: at each level, the pairs
    between the second half (queries) and the first half (keys) of every block of length b are
    one matmul, split at the boundary between the halves into a query factor (product of the
    decays from the boundary on) and a key factor (product of the decays up to the boundary),
    both direct products of numbers in [0, 1]: no division, no overflow, and a factor that
    underflows belongs to a product that underflows.
    """
    L, K = X.shape[-2:]
    batch = torch.broadcast_shapes(X.shape[:-2], Y.shape[:-2])
    M = X.new_zeros(*batch, L, L)
    b = L
    while b > 1:
        h, n = b // 2, L // b
        Xs, Ys, ws = (Z.reshape(*Z.shape[:-2], n, b, K) for Z in (X, Y, w))
        wq = ws[..., h:, :]
        excl = _excl_cumprod(wq)
        qf = torch.cat([excl * wq if inc else excl.expand_as(wq) for inc in inclusive], -5)
        xq = Xs[..., h:, :] * qf
        yk = Ys[..., :h, :] * _excl_rev_cumprod(ws[..., :h, :])
        blk = xq @ yk.transpose(-1, -2)  # (..., n, h, h)
        # the n diagonal (b x b) blocks of M as a view (..., b, b, n): fill their lower-left part
        diag = torch.diagonal(M.view(*batch, n, b, n, b), dim1=-4, dim2=-2)
        diag[..., h:, :h, :] = blk.movedim(-3, -1)
        b = h
    return M


def _unit_lower_inverse(N, ar):
    """(I - N)^-1 for strictly lower triangular N (..., L, L), L a power of two; contiguous.

    The 4 x 4 diagonal blocks in closed form (forward substitution), then a block recursion,
    inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], merging the diagonal blocks
    pairwise, all the blocks of a level in one batched matmul.
    """
    *batch, L, _ = N.shape
    out = ar.take(*batch, L, L)
    out.zero_().diagonal(dim1=-2, dim2=-1).fill_(1.0)
    if L == 1:
        return out
    s = min(L, 4)
    Nb = N.unflatten(-2, (L // s, s)).unflatten(-1, (L // s, s)).diagonal(dim1=-4, dim2=-2)
    Ob = out.view(*batch, L // s, s, L // s, s).diagonal(dim1=-4, dim2=-2)  # (..., s, s, L/s)
    Ob[..., 1, 0, :] = Nb[..., 1, 0, :]
    if s == 4:
        n10, n21, n31, n32 = Nb[..., 1, 0, :], Nb[..., 2, 1, :], Nb[..., 3, 1, :], Nb[..., 3, 2, :]
        Ob[..., 2, 1, :] = n21
        Ob[..., 3, 2, :] = n32
        t20 = torch.addcmul(Nb[..., 2, 0, :], n21, n10)
        Ob[..., 2, 0, :] = t20
        Ob[..., 3, 1, :] = torch.addcmul(n31, n32, n21)
        Ob[..., 3, 0, :] = torch.addcmul(Nb[..., 3, 0, :], n31, n10).addcmul_(n32, t20)
    b = s
    while b < L:
        n = L // (2 * b)
        Td = out.view(*batch, n, 2 * b, n, 2 * b).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        Nd = N.unflatten(-2, (n, 2 * b)).unflatten(-1, (n, 2 * b))
        Nd = Nd.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        Td[..., b:, :b] = Td[..., b:, b:] @ (Nd[..., b:, :b] @ Td[..., :b, :b])
        b *= 2
    return out


@functools.cache
def _v7_mask(L, device):
    """Causal mask of the (2L, 2L) v7 pair matrix, signed: strictly lower and -1 in the alpha rows
    (a removal sees the state before its token; the rows hold -alpha), lower with the diagonal
    and +1 in the r rows."""
    strict = torch.ones(L, L, dtype=F32, device=device).tril_(-1)
    incl = torch.ones(L, L, dtype=F32, device=device).tril_()
    return torch.cat([-strict.repeat(1, 2), incl.repeat(1, 2)])


def _flat(x):
    return x.reshape(-1, *x.shape[-2:])


def _affine_scan(A, B, mul):
    """Inclusive prefix composition of the maps S -> A[c] S + B[c] along dim 0 (Hillis-Steele:
    log2(n) rounds). Returns (A', B') with A'[c] S_0 + B'[c] = the state after maps 0..c.
    ``mul``: torch.mul for diagonal A (broadcast), torch.matmul for matrices."""
    n, d = A.shape[0], 1
    while d < n:
        B = torch.cat([B[:d], torch.add(mul(A[d:], B[:-d]), B[d:])])
        A = torch.cat([A[:d], mul(A[d:], A[:-d])])
        d *= 2
    return A, B


def _use_scan(scan, device) -> bool:
    return device.type != "cpu" if scan is None else bool(scan)


def wkv5_chunked(r, k, v, w, u, S, chunk=None, scan=None):
    """The v5/v6 recurrence of :func:`rwkvpy.models.v5.wkv_heads` over a whole sequence.

    r, k (T, H, N_k); v (T, H, N_v); w decay in [0, 1], (H, N_k) or per token (T, H, N_k);
    u bonus (H, N_k); S (H, N_k, N_v). Per token:
    out_t = r_t (u * k_t^T v_t + S);  S = k_t^T v_t + w_t * S.
    Returns out (T, H, N_v) and the final S, float32 (new tensors).
    ``chunk``: chunk length, a power of two (default :data:`V5_CHUNK`, :data:`GPU_CHUNK` on GPUs);
    ``scan``: chunk starts by a parallel scan instead of a loop (default: on GPUs).
    """
    T, H, K = k.shape
    V = v.shape[-1]
    S = S.to(F32).clone()
    out = torch.empty(T, H, V, dtype=F32, device=k.device)
    if T == 0:
        return out, S
    L = _chunk_len(chunk, V5_CHUNK, T, k.device)
    scan = _use_scan(scan, k.device)
    if w.dim() == 2:
        w = w.expand(T, H, K)
    u = u.to(F32).unsqueeze(-2)  # (H, 1, K)
    ar = _Arena(k.device)
    G = _group_len(L, T, H * (5 * K + 2 * V + L + 2 * K * V // L), ar.limit)
    for t0 in range(0, T, G):
        t1 = min(T, t0 + G)
        ar.reset()
        S = _wkv5_group(ar, r[t0:t1], k[t0:t1], v[t0:t1], w[t0:t1], u, S, out[t0:t1], L, scan)
    ar.close()
    return out, S


def _wkv5_group(ar, r, k, v, w, u, S, out, L, scan):
    n, H, K = k.shape
    V = v.shape[-1]
    nc = -(-n // L)
    rv, kv = _chunk_view(r, nc, L, ar), _chunk_view(k, nc, L, ar)  # (nc, H, L, K) views
    wv = _chunk_view(w, nc, L, ar, 1.0)
    g = torch.cumprod(wv, -2, out=ar.take(nc, H, L, K))  # decay through t
    gL = g[..., -1:, :].clone()  # over the whole chunk
    bad = _unsafe(gL)
    rd = torch.mul(rv, kv, out=ar.take(nc, H, L, K))
    bonus = rd.mul_(u).sum(-1)  # r_t . (u * k_t)
    rd[..., :1, :].copy_(rv[..., :1, :])
    torch.mul(rv[..., 1:, :], g[..., :-1, :], out=rd[..., 1:, :])  # r_t g^-_t
    kd = torch.div(kv, g, out=ar.take(nc, H, L, K))  # k_i / g_i
    A = torch.matmul(rd, kd.transpose(-1, -2), out=ar.take(nc, H, L, L)).tril_(-1)
    kd.mul_(gL)  # k_i g_L / g_i
    if bad is not None:  # 1 / g overflows: exact path (r g^- and g_L are safe as they are)
        rb, kb, wb = rv[bad], kv[bad], wv[bad]
        Ab = _lower_scores(rb[:, None, None], kb[:, None, None], wb[:, None, None], (False,))
        A[bad] = Ab[:, 0, 0]
        kd[bad] = kb * _excl_rev_cumprod(wb)
    A.diagonal(dim1=-2, dim2=-1).copy_(bonus)

    vc = _chunk_into(ar.take(nc, H, L, V), v)
    U = torch.matmul(kd.transpose(-1, -2), vc, out=ar.take(nc, H, K, V))
    starts = ar.take(nc + 1, H, K, V)  # state at each chunk start
    starts[0].copy_(S)
    Gt = gL.transpose(-1, -2)  # (nc, H, K, 1)
    if scan:  # S_{c+1} = Gt_c * S_c + U_c
        decay, add = _affine_scan(Gt, U, torch.mul)
        torch.addcmul(add, decay, S, out=starts[1:])
    else:
        for c in range(nc):
            torch.addcmul(U[c], Gt[c], starts[c], out=starts[c + 1])
    o = torch.matmul(A, vc, out=ar.take(nc, H, L, V))
    _flat(o).baddbmm_(_flat(rd), _flat(starts[:nc]))
    _unchunk_into(out, o)
    return starts[nc].clone()


def wkv7_chunked(r, w, k, v, kk, a, S, chunk=None, scan=None):
    """The v7 recurrence (the loop in :meth:`rwkvpy.models.v7.RWKV7.time_mix`) over a sequence.

    r, w, k, kk, a (T, H, N_k); v (T, H, N_v); w decay in [0, 1]; S (H, N_v, N_k). Per token:
    S = S diag(w) + (S (-kk)) (kk * a)^T + v k^T;  out = S r.
    Returns out (T, H, N_v) and the final S (H, N_v, N_k), float32 (new tensors).
    ``chunk``: chunk length, a power of two (default :data:`V7_CHUNK`, :data:`GPU_CHUNK` on GPUs);
    ``scan``: chunk starts by a parallel scan instead of a loop (default: on GPUs).
    """
    T, H, K = k.shape
    V = v.shape[-1]
    Z = S.to(F32).transpose(-1, -2).clone()  # S^T (H, K, V)
    out = torch.empty(T, H, V, dtype=F32, device=k.device)
    if T == 0:
        return out, Z.transpose(-1, -2).contiguous()
    L = _chunk_len(chunk, V7_CHUNK, T, k.device)
    scan = _use_scan(scan, k.device)
    per_token = H * (9 * K + 5 * V + 7 * L + 2 * K * V // L)
    ar = _Arena(k.device)
    G = _group_len(L, T, per_token, ar.limit)
    for t0 in range(0, T, G):
        t1 = min(T, t0 + G)
        ar.reset()
        Z = _wkv7_group(ar, *(x[t0:t1] for x in (r, w, k, v, kk, a)), Z, out[t0:t1], L, scan)
    ar.close()
    return out, Z.transpose(-1, -2).contiguous()


def _wkv7_group(ar, r, w, k, v, kk, a, Z, out, L, scan):
    n, H, K = k.shape
    V = v.shape[-1]
    nc = -(-n // L)
    rv, kv, kkv, av = (_chunk_view(x, nc, L, ar) for x in (r, k, kk, a))
    wv = _chunk_view(w, nc, L, ar, 1.0)
    g = torch.cumprod(wv, -2, out=ar.take(nc, H, L, K))
    gL = g[..., -1:, :].clone()
    bad = _unsafe(gL)

    # rows: -alpha_t g^-_t = kk_t g^-_t (strict), r_t g_t (inclusive); columns: beta_i / g_i,
    # k_i / g_i. The sign of alpha goes into the mask (M) and into the loop (P = -Tinv Xa).
    X, Y = ar.take(nc, H, 2 * L, K), ar.take(nc, H, 2 * L, K)
    Xa, Xr, Yb, Yk = X[..., :L, :], X[..., L:, :], Y[..., :L, :], Y[..., L:, :]
    Xa[..., :1, :].copy_(kkv[..., :1, :])
    torch.mul(kkv[..., 1:, :], g[..., :-1, :], out=Xa[..., 1:, :])
    torch.mul(rv, g, out=Xr)
    torch.mul(kkv, av, out=Yb).div_(g)
    torch.div(kv, g, out=Yk)
    M = torch.matmul(X, Y.transpose(-1, -2), out=ar.take(nc, H, 2 * L, 2 * L))
    M.mul_(_v7_mask(L, M.device))  # masked entries are finite here (bad ones are redone)
    Y.mul_(gL)  # [beta; k] g_L / g
    if bad is not None:  # 1 / g overflows: exact path (X and g_L are safe as they are)
        kkb, wb = kkv[bad], wv[bad]
        Xb = torch.stack([kkb.neg(), rv[bad]], 1)  # (nb, 2, L, K)
        Ybk = torch.stack([kkb * av[bad], kv[bad]], 1)
        Mb = _lower_scores(Xb.unsqueeze(2), Ybk.unsqueeze(1), wb[:, None, None], (False, True))
        Mb[:, 1].diagonal(dim1=-2, dim2=-1).copy_((Xb[:, 1:] * Ybk).sum(-1))
        M[bad] = Mb.transpose(2, 3).reshape(-1, 2 * L, 2 * L)
        Y[bad] = (Ybk * _excl_rev_cumprod(wb).unsqueeze(1)).reshape(-1, 2 * L, K)

    UV = ar.take(nc, H, 2 * L, V)  # [U; V] per chunk
    vc = _chunk_into(UV[..., L:, :], v)
    # (I - M_ab) U = alpha g^- S_0^T + M_ak V  =>  U = Q - P S_0^T
    Tinv = _unit_lower_inverse(M[..., :L, :L], ar)
    P = torch.matmul(Tinv, Xa, out=ar.take(nc, H, L, K))
    TM = torch.matmul(Tinv, M[..., :L, L:], out=ar.take(nc, H, L, L))
    Q = torch.matmul(TM, vc, out=ar.take(nc, H, L, V))
    KV = torch.matmul(Yk.transpose(-1, -2), vc, out=ar.take(nc, H, K, V))
    starts = ar.take(nc + 1, H, K, V)  # S^T at each chunk start
    starts[0].copy_(Z)
    Bt, Gt = Yb.transpose(-1, -2), gL.transpose(-1, -2)
    if scan:  # S_{c+1} = (diag(Gt_c) - Bt_c P_c) S_c + (KV_c + Bt_c Q_c)
        A = torch.matmul(Bt, P).neg_()
        A.diagonal(dim1=-2, dim2=-1).add_(Gt.squeeze(-1))
        A, B = _affine_scan(A, torch.matmul(Bt, Q).add_(KV), torch.matmul)
        torch.add(torch.matmul(A, Z), B, out=starts[1:])
        torch.sub(Q, torch.matmul(P, starts[:nc]), out=UV[:, :, :L])
    else:
        for c in range(nc):
            U = torch.baddbmm(Q[c], P[c], starts[c], alpha=-1.0, out=UV[c, :, :L])
            torch.addcmul(KV[c], Gt[c], starts[c], out=starts[c + 1])
            starts[c + 1].baddbmm_(Bt[c], U)
    o = torch.matmul(Xr, starts[:nc], out=ar.take(nc, H, L, V))
    _flat(o).baddbmm_(_flat(M[..., L:, :]), _flat(UV))
    _unchunk_into(out, o)
    return starts[nc].clone()
