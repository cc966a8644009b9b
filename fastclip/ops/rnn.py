"""Recurrent layers (RNN / GRU / LSTM), one layer and one direction: forward and backward
through time with the per-step factors the engine needs, and the ghost norms of weight_ih and
weight_hh from them.

Mirrors csrc/rnn.h and src/bind_rnn.cpp (each thread runs the whole time loop for its slice of
the batch); the ``*_torch`` twins are a Python loop over time. Used by fastclip/nn/rnn.py and
fastclip/layers/rnn.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import _C, _native, _numpy_view


RNN_CELLS = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _check_rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths):
    if cell not in RNN_CELLS:
        raise ValueError(f"cell must be one of {tuple(RNN_CELLS)}, got {cell!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"input must be 3-D (B, T, d), got {x.dim()}-D with shape {tuple(x.shape)}")
    B, T, d = x.shape
    if w_hh.dim() != 2:
        raise ValueError(f"w_hh must be 2-D, got shape {tuple(w_hh.shape)}")
    h = w_hh.shape[1]
    Gh = RNN_CELLS[cell] * h
    for name, t, shape in (("w_ih", w_ih, (Gh, d)), ("w_hh", w_hh, (Gh, h)), ("b_ih", b_ih, (Gh,)),
                           ("b_hh", b_hh, (Gh,)), ("h0", h0, (B, h)), ("c0", c0, (B, h))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from the input's {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, the input on {x.device}")
    if c0 is not None and cell != "lstm":
        raise ValueError(f"c0 is for LSTM only, got one for {cell}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must lie in [1, {T}], got min {int(lengths.min())}, "
                             f"max {int(lengths.max())}")
    return B, T, d, h, lengths


def _rnn_steps(B, T, lengths, reverse, device):
    """[(rows active at step s, their time indices)] for a left-aligned padded batch."""
    L = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths
    out = []
    for s in range(int(L.max()) if B else 0):
        rows = torch.nonzero(L > s).flatten()
        t = (L[rows] - 1 - s) if reverse else torch.full_like(rows, s)
        out.append((rows.to(device), t.to(device)))
    return out


def rnn_forward_torch(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, lengths=None,
                      reverse=False):
    """Plain-torch :func:`rnn_forward` (the same algorithm as the core, a Python loop over time)."""
    B, T, d, h, lengths = _check_rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
    x, w_ih, w_hh = x.detach(), w_ih.detach(), w_hh.detach()
    W = h if cell.startswith("rnn") else 4 * h
    kw = dict(dtype=x.dtype, device=x.device)
    out, saved = torch.zeros(B, T, h, **kw), torch.zeros(B, T, W, **kw)
    h_prev = torch.zeros(B, T, h, **kw)
    H = h0.detach().clone() if h0 is not None else torch.zeros(B, h, **kw)
    lstm = cell == "lstm"
    C = (c0.detach().clone() if c0 is not None else torch.zeros(B, h, **kw)) if lstm else None
    c_prev = torch.zeros(B, T, h, **kw) if lstm else None
    tanh_c = torch.zeros(B, T, h, **kw) if lstm else None
    xw = x @ w_ih.t()
    if b_ih is not None:
        xw = xw + b_ih.detach()
    for rows, t in _rnn_steps(B, T, lengths, reverse, x.device):
        hp = H[rows]
        hw = hp @ w_hh.t()
        if b_hh is not None:
            hw = hw + b_hh.detach()
        xs = xw[rows, t]
        h_prev[rows, t] = hp
        if lstm:
            i, f, g, o = (xs + hw).chunk(4, 1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            cp = C[rows]
            c = f * cp + i * g
            tc = c.tanh()
            hn = o * tc
            saved[rows, t] = torch.cat([i, f, g, o], 1)
            c_prev[rows, t], tanh_c[rows, t] = cp, tc
            C[rows] = c
        elif cell == "gru":
            xr, xz, xn = xs.chunk(3, 1)
            hr, hz, hnn = hw.chunk(3, 1)
            r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
            n = (xn + r * hnn).tanh()
            hn = (1 - z) * n + z * hp
            saved[rows, t] = torch.cat([r, z, n, hnn], 1)
        else:
            pre = xs + hw
            hn = pre.tanh() if cell == "rnn_tanh" else pre.clamp_min(0)
            saved[rows, t] = hn
        out[rows, t] = hn
        H[rows] = hn
    return out, H, C, saved, h_prev, c_prev, tanh_c


def rnn_forward(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih=None, b_hh=None, h0=None,
                c0=None, lengths=None, reverse: bool = False):
    """One recurrent layer and direction, forward through time (no autograd).

    CPU float32/float64 tensors run in the C++ core: each of ``torch.get_num_threads()`` threads
    runs the whole time loop for its slice of the batch (one GEMM with W_hh per step).

    Args:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu" (torch's gate order and equations).
        x: input (B, T, d), batch first (a strided view is fine: a contiguous last dim is enough).
        w_ih, w_hh: (gates * h, d), (gates * h, h); b_ih, b_hh: (gates * h,) or None.
        h0, c0: initial states (B, h) or None (zeros); c0 for LSTM only.
        lengths: (B,) int64 valid steps per example (left-aligned padding) or None (all T).
        reverse: run each example from its last valid step back to its first.

    Returns:
        (out (B, T, h), h_n (B, h), c_n (B, h) or None, saved, h_prev (B, T, h), c_prev, tanh_c):
        ``saved`` (B, T, 4h or h) holds the step's activations and ``h_prev`` the state each step
        started from (the A factor of W_hh); padded steps are zero everywhere.
    """
    B, T, d, h, lengths = _check_rnn_forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
    if not _native(x):
        return rnn_forward_torch(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse)
    nv = lambda t: None if t is None else t.detach().contiguous().numpy()
    res = _C.rnn_forward(cell, _numpy_view(x), nv(w_ih), nv(w_hh), nv(b_ih), nv(b_hh), nv(h0),
                         nv(c0), None if lengths is None else lengths.numpy(), bool(reverse),
                         torch.get_num_threads())
    return tuple(None if r is None else torch.from_numpy(r) for r in res)


def rnn_backward_torch(cell, d_out, d_hn, d_cn, w_ih, w_hh, saved, h_prev, c_prev=None,
                       tanh_c=None, lengths=None, reverse=False, need_input_grad=True):
    """Plain-torch :func:`rnn_backward` (the same algorithm as the core)."""
    B, T, h = d_out.shape
    Gh = RNN_CELLS[cell] * h
    kw = dict(dtype=d_out.dtype, device=d_out.device)
    g_ih = torch.zeros(B, T, Gh, **kw)
    g_hh = torch.zeros(B, T, Gh, **kw) if cell == "gru" else None
    dH = d_hn.clone() if d_hn is not None else torch.zeros(B, h, **kw)
    lstm = cell == "lstm"
    dC = (d_cn.clone() if d_cn is not None else torch.zeros(B, h, **kw)) if lstm else None
    for rows, t in reversed(_rnn_steps(B, T, lengths, reverse, d_out.device)):
        sv = saved[rows, t]
        dh = dH[rows] + d_out[rows, t]
        if lstm:
            i, f, g, o = sv.chunk(4, 1)
            tc = tanh_c[rows, t]
            dc = dC[rows] + dh * o * (1 - tc * tc)
            G = torch.cat([dc * g * i * (1 - i), dc * c_prev[rows, t] * f * (1 - f),
                           dc * i * (1 - g * g), dh * tc * o * (1 - o)], 1)
            dC[rows] = dc * f
            g_ih[rows, t] = G
            dH[rows] = G @ w_hh
        elif cell == "gru":
            r, z, n, hn = sv.chunk(4, 1)
            dnp = dh * (1 - z) * (1 - n * n)
            drp = dnp * hn * r * (1 - r)
            dzp = dh * (h_prev[rows, t] - n) * z * (1 - z)
            g_ih[rows, t] = torch.cat([drp, dzp, dnp], 1)
            gh = torch.cat([drp, dzp, dnp * r], 1)
            g_hh[rows, t] = gh
            dH[rows] = dh * z + gh @ w_hh
        else:
            G = dh * (1 - sv * sv) if cell == "rnn_tanh" else dh * (sv > 0).to(dh.dtype)
            g_ih[rows, t] = G
            dH[rows] = G @ w_hh
    d_x = g_ih @ w_ih if need_input_grad else None
    return g_ih, g_hh, d_x, dH, dC, g_ih.sum(1), (g_hh.sum(1) if g_hh is not None else None)


def rnn_backward(cell: str, d_out: Tensor, d_hn, d_cn, w_ih: Tensor, w_hh: Tensor, saved: Tensor,
                 h_prev: Tensor, c_prev=None, tanh_c=None, lengths=None, reverse: bool = False,
                 need_input_grad: bool = True):
    """Backward through time of :func:`rnn_forward`.

    Args:
        d_out: gradient at the outputs (B, T, h) (a strided view is fine); d_hn, d_cn: (B, h) or None.
        the rest: as given to / returned by :func:`rnn_forward`.

    Returns:
        (g_ih (B, T, gates h), g_hh (B, T, gates h) for GRU else None, d_x (B, T, d) or None,
        d_h0 (B, h), d_c0 (B, h) or None, g_sum (B, gates h), g_hh_sum (B, gates h) for GRU else
        None): the sums over t are the per-example bias gradients. ``g_ih`` is the gradient at
        ``x W_ih^T + b_ih`` and
        ``g_hh`` at ``h W_hh^T + b_hh`` (the same for LSTM and RNN), so the weight gradients are
        ``g_ih^T x`` and ``g_hh^T h_prev`` summed over time: the engine's (A, G) factors.
    """
    if cell not in RNN_CELLS:
        raise ValueError(f"cell must be one of {tuple(RNN_CELLS)}, got {cell!r}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    if not _native(d_out):
        return rnn_backward_torch(cell, d_out, d_hn, d_cn, w_ih.detach(), w_hh.detach(), saved,
                                  h_prev, c_prev, tanh_c, lengths, reverse, need_input_grad)
    nv = lambda t: None if t is None else t.detach().contiguous().numpy()
    res = _C.rnn_backward(cell, _numpy_view(d_out), nv(d_hn), nv(d_cn), nv(w_ih), nv(w_hh),
                          nv(saved), nv(h_prev), nv(c_prev), nv(tanh_c),
                          None if lengths is None else lengths.numpy(), bool(reverse),
                          bool(need_input_grad), torch.get_num_threads())
    return tuple(None if r is None else torch.from_numpy(r) for r in res)


def rnn_ghost_sq_norms_torch(x: Tensor, h_prev: Tensor, g_ih: Tensor, g_hh=None):
    """Plain-torch :func:`rnn_ghost_sq_norms`."""
    g_hh = g_ih if g_hh is None else g_hh
    gram = lambda t: torch.bmm(t, t.transpose(1, 2))
    gi = gram(g_ih)
    gh = gi if g_hh is g_ih else gram(g_hh)
    return (gram(x) * gi).sum((1, 2)), (gram(h_prev) * gh).sum((1, 2))


def rnn_ghost_sq_norms(x: Tensor, h_prev: Tensor, g_ih: Tensor, g_hh=None):
    """Per-example squared norms of one recurrent layer's weight_ih and weight_hh gradients,
    ``||g_ih_i^T x_i||^2`` and ``||g_hh_i^T h_prev_i||^2``, by the ghost identity with the (T x T)
    Gram of G formed once for both (``g_hh=None``: the same G, as in LSTM and RNN).

    Args:
        x: layer inputs (B, T, d); h_prev: previous states (B, T, h); g_ih, g_hh: (B, T, gates h).
            Strided views with a contiguous last dim are used in place.

    Returns:
        (w_ih_sq (B,), w_hh_sq (B,)) in the inputs' dtype.
    """
    ts = [x, h_prev, g_ih] + ([g_hh] if g_hh is not None else [])
    for name, t in zip(("x", "h_prev", "g_ih", "g_hh"), ts):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D floating-point tensor (B, T, n)")
        if t.shape[:2] != x.shape[:2]:
            raise ValueError(f"{name} {tuple(t.shape)} does not match x {tuple(x.shape)} in (B, T)")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x's {x.dtype}")
    if not _native(x):
        return rnn_ghost_sq_norms_torch(x, h_prev, g_ih, g_hh)
    w_ih, w_hh = _C.rnn_ghost_sq_norms(_numpy_view(x), _numpy_view(h_prev), _numpy_view(g_ih),
                                       None if g_hh is None else _numpy_view(g_hh),
                                       torch.get_num_threads())
    return torch.from_numpy(w_ih), torch.from_numpy(w_hh)

