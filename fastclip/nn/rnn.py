"""Drop-in RNN, GRU and LSTM whose backward the engine can see into.

Each layer and direction runs as one autograd Function (``_RecurrentFn``) whose forward and
backward are native loops over time (``ops.rnn_forward`` / ``ops.rnn_backward``). The backward
returns the input and initial-state gradients and, while the module is captured by the engine,
records per layer and direction the stacked per-time-step factors of the weights:

* ``weight_ih``: A = the layer inputs x_t (B, T, d), G = gate pre-activation gradients (B, T, gh)
* ``weight_hh``: A = the previous states h_{t-1} (B, T, h), G = the gradients at W_hh h + b_hh
  (the same as for weight_ih except GRU's n gate, which sees r * (W_hn h + b_hn))
* ``bias_ih`` / ``bias_hh``: sum over t of their G

so each weight's per-example norm is exact with the time steps stacked as the uses of one weight
(docs/design.md). The parameters get no autograd gradient then; the engine writes clipped sums.

Parameters, their names and shapes, constructor arguments, inputs and outputs are torch.nn's, so
state dicts load both ways; ``convert_recurrent`` swaps torch's modules for these in place, moving
the same Parameter objects.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .. import ops
from ..passes import TWICE
from .capture import current_capture


class RecurrentInputError(ValueError, RuntimeError):
    """Wrong input or state for a recurrent module (a ValueError, and a RuntimeError as
    torch.nn's recurrent modules raise for the same mistakes)."""


class RecurrentPart:
    """One layer and direction's factors from one call, for the engine (see module docstring)."""

    __slots__ = ("x", "h_prev", "g_ih", "g_hh", "g_sum", "g_hh_sum")

    def __init__(self, x: Tensor, h_prev: Tensor, g_ih: Tensor, g_hh: Tensor, g_sum: Tensor,
                 g_hh_sum: Tensor):
        self.x, self.h_prev, self.g_ih, self.g_hh = x, h_prev, g_ih, g_hh
        self.g_sum, self.g_hh_sum = g_sum, g_hh_sum  # (B, gates h): sums over t (bias gradients)

    @property
    def shared_g(self) -> bool:
        """weight_hh's G is weight_ih's (LSTM, RNN; not GRU)."""
        return self.g_hh is self.g_ih


class _RecurrentFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, reverse, lengths, capture, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        out, h_n, c_n, saved, h_prev, c_prev, tanh_c = ops.rnn_forward(
            cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse)
        ctx.cell, ctx.reverse, ctx.lengths, ctx.capture = cell, reverse, lengths, capture
        if capture is not None:
            capture[0].expect(capture[1])  # one piece of the call's use: recorded in backward
        ctx.has = (h0 is not None, c0 is not None, b_ih is not None)
        # x and the weights through autograd: an in-place change before backward is an error.
        ctx.save_for_backward(x, w_ih, w_hh)
        ctx.inner = (saved, h_prev, c_prev, tanh_c)
        if c_n is None:
            return out, h_n
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn=None):
        x, w_ih, w_hh = ctx.saved_tensors
        if ctx.inner is None:   # freed by the backward that used it
            raise RuntimeError(TWICE if ctx.capture is not None else
                               "Trying to backward through a fastclip.nn recurrent layer a second "
                               "time; its saved states were freed by the first backward")
        saved, h_prev, c_prev, tanh_c = ctx.inner
        need = ctx.needs_input_grad
        g_ih, g_hh, d_x, d_h0, d_c0, g_sum, g_hh_sum = ops.rnn_backward(
            ctx.cell, d_out, d_hn, d_cn, w_ih, w_hh, saved, h_prev, c_prev, tanh_c, ctx.lengths,
            ctx.reverse, need_input_grad=need[4])
        if g_hh is None:
            g_hh, g_hh_sum = g_ih, g_sum
        gw_ih = gw_hh = gb_ih = gb_hh = None
        if ctx.capture is not None:
            engine, use, key = ctx.capture
            use.extra[key] = RecurrentPart(x.detach(), h_prev, g_ih, g_hh, g_sum, g_hh_sum)
            if use.grads is None:
                use.grads = (g_ih,)
            # every piece: the use is complete when all have come. A backward the engine left
            # alone (torch.autograd.grad(loss, x)) may be followed by the training one: keep.
            if engine.record(use):
                ctx.inner = None
        else:
            ctx.inner = None
            B, T = g_ih.shape[:2]
            G, Gh = g_ih.reshape(B * T, -1), g_hh.reshape(B * T, -1)
            if need[7]:
                gw_ih = G.t().mm(x.reshape(B * T, -1))
            if need[8]:
                gw_hh = Gh.t().mm(h_prev.reshape(B * T, -1))
            if need[9]:
                gb_ih = g_sum.sum(0)
            if need[10]:
                gb_hh = g_hh_sum.sum(0)
        return (None, None, None, None, d_x if need[4] else None,
                d_h0 if need[5] else None, d_c0 if need[6] else None, gw_ih, gw_hh, gb_ih, gb_hh)


def _packed_index(batch_sizes: Tensor, sorted_indices: Optional[Tensor], T: int) -> Tensor:
    """Rows of a (B, T, .) padded tensor, flattened to (B T, .), in a PackedSequence's data order."""
    idx = []
    for t, n in enumerate(batch_sizes.tolist()):
        ex = torch.arange(n) if sorted_indices is None else sorted_indices[:n].cpu()
        idx.append(ex * T + t)
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)


class _RecurrentMixin:
    """The forward shared by RNN, GRU and LSTM (the classes add torch.nn's constructors)."""

    _cell_name: str

    def _check_options(self):
        if getattr(self, "proj_size", 0):
            raise ValueError(f"fastclip.nn.{type(self).__name__} does not support proj_size > 0 "
                             f"(got {self.proj_size}); use torch.nn.LSTM without fastclip, or a "
                             "Linear after the LSTM")

    def _cell(self) -> str:
        if self._cell_name == "rnn":
            return "rnn_tanh" if self.nonlinearity == "tanh" else "rnn_relu"
        return self._cell_name

    def _forward_impl(self, input, hx, lstm: bool):
        name = type(self).__name__
        D = 2 if self.bidirectional else 1
        L, h = self.num_layers, self.hidden_size
        capture = current_capture(self)
        packed = isinstance(input, PackedSequence)
        if packed:
            batch_sizes, sorted_indices = input.batch_sizes, input.sorted_indices
            x, lengths = pad_packed_sequence(input, batch_first=True)
            lengths = lengths.to(torch.int64)
            batched = True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got "
                                f"{type(input).__name__}")
            if input.dim() not in (2, 3):
                raise RecurrentInputError(f"{name}: Expected input to be 2D or 3D, got "
                                          f"{input.dim()}D instead")
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            x = input if self.batch_first else input.transpose(0, 1)
            lengths = None
        if x.shape[-1] != self.input_size:
            raise RecurrentInputError(f"{name}: input.size(-1) must be equal to input_size. "
                                      f"Expected {self.input_size}, got {x.shape[-1]}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: input must be floating point, got {x.dtype}")
        # Under torch.autocast the recurrence runs in the parameters' dtype, like an op on
        # autocast's float32 list: a bf16 input (an autocast Linear's or Embedding's output) is
        # widened exactly, the native float32 loops keep the state over time in float32 (torch's
        # own CPU LSTM fails under fp16 autocast), and the recorded factors are those it computed
        # with. The output is float32; the next autocast op casts it as it does any input.
        amp = torch.is_autocast_enabled(x.device.type)
        wdtype = self.weight_ih_l0.dtype
        if amp and x.dtype != wdtype:
            x = x.to(wdtype)
        B = x.shape[0]
        h0 = c0 = None
        if hx is not None:
            states = hx if lstm else (hx,)
            if lstm and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
                raise RecurrentInputError(f"{name}: hx must be a tuple (h_0, c_0), got "
                                          f"{type(hx).__name__}")
            fixed = []
            for sname, s in zip(("h_0", "c_0"), states):
                if not isinstance(s, Tensor):
                    raise TypeError(f"{name}: {sname} must be a Tensor, got {type(s).__name__}")
                if amp and s.is_floating_point() and s.dtype != x.dtype:
                    s = s.to(x.dtype)   # the states too, under autocast (above)
                want = (L * D, B, h) if batched else (L * D, h)
                if tuple(s.shape) != want:
                    raise RecurrentInputError(f"{name}: Expected hidden size {want} for {sname}, "
                                              f"got {tuple(s.shape)}")
                if s.dtype != x.dtype:
                    raise TypeError(f"{name}: {sname} dtype {s.dtype} differs from the input's "
                                    f"{x.dtype}")
                fixed.append(s if batched else s.unsqueeze(1))
            h0 = fixed[0]
            c0 = fixed[1] if lstm else None
        cell = self._cell()
        training_dropout = self.dropout > 0 and self.training
        layer_in = x
        hs, cs = [], []
        for layer in range(L):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx)
                b_ih = getattr(self, "bias_ih" + sfx) if self.bias else None
                b_hh = getattr(self, "bias_hh" + sfx) if self.bias else None
                cap = None if capture is None else (capture[0], capture[1], (layer, direction))
                res = _RecurrentFn.apply(cell, bool(direction), lengths, cap, layer_in,
                                         None if h0 is None else h0[k],
                                         None if c0 is None else c0[k], w_ih, w_hh, b_ih, b_hh)
                outs.append(res[0])
                hs.append(res[1])
                if lstm:
                    cs.append(res[2])
            layer_in = outs[0] if D == 1 else torch.cat(outs, -1)
            if training_dropout and layer < L - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        out = layer_in
        h_n = torch.stack(hs, 0)
        c_n = torch.stack(cs, 0) if lstm else None
        if packed:
            idx = _packed_index(batch_sizes, sorted_indices, out.shape[1]).to(out.device)
            data = out.reshape(-1, out.shape[-1]).index_select(0, idx)
            output = PackedSequence(data, batch_sizes, sorted_indices, input.unsorted_indices)
        else:
            output = out if self.batch_first else out.transpose(0, 1).contiguous()
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if lstm else None
        return output, ((h_n, c_n) if lstm else h_n)


class RNN(_RecurrentMixin, nn.RNN):
    """Drop-in for :class:`torch.nn.RNN` (tanh or relu) with a native forward/backward through time
    and exact per-example gradient norms under fastclip. Same arguments, parameters and outputs.

    Input (T, B, d) or (B, T, d) with ``batch_first``, (T, d) unbatched, or a PackedSequence;
    returns (output, h_n (layers * directions, B, h)).
    """

    _cell_name = "rnn"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_options()

    def forward(self, input, hx=None):
        return self._forward_impl(input, hx, lstm=False)


class GRU(_RecurrentMixin, nn.GRU):
    """Drop-in for :class:`torch.nn.GRU` (see :class:`RNN`)."""

    _cell_name = "gru"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_options()

    def forward(self, input, hx=None):
        return self._forward_impl(input, hx, lstm=False)


class LSTM(_RecurrentMixin, nn.LSTM):
    """Drop-in for :class:`torch.nn.LSTM` (see :class:`RNN`); ``proj_size > 0`` is refused.
    Returns (output, (h_n, c_n))."""

    _cell_name = "lstm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_options()

    def forward(self, input, hx=None):
        return self._forward_impl(input, hx, lstm=True)


from .attention import MultiheadAttention  # noqa: E402

# Exact torch types -> drop-ins (a subclass may override forward: not converted).
_CONVERSIONS = {nn.RNN: RNN, nn.GRU: GRU, nn.LSTM: LSTM, nn.MultiheadAttention: MultiheadAttention}


def _converted_copy(m: nn.Module) -> nn.Module:
    """A fastclip module holding the SAME Parameter objects (and buffers, hooks, flags) as ``m``."""
    cls = _CONVERSIONS[type(m)]
    if getattr(m, "proj_size", 0):
        raise ValueError(f"fastclip cannot convert {type(m).__name__} with proj_size="
                         f"{m.proj_size}: projections are not supported")
    new = cls.__new__(cls)
    for k, v in m.__dict__.items():
        # Own containers (so hooks attached to one module do not appear on the other),
        # same contents (the same Parameter objects: optimizers keep working).
        new.__dict__[k] = v.copy() if isinstance(v, (dict, list)) else v
    return new


def _swaps(model: nn.Module):
    """(parent, name, old, new) for every torch.nn RNN/GRU/LSTM below ``model``."""
    out, made = [], {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None and type(child) in _CONVERSIONS:
                if id(child) not in made:
                    made[id(child)] = _converted_copy(child)
                out.append((parent, name, child, made[id(child)]))
    return out


def convert_recurrent(model: nn.Module) -> nn.Module:
    """Replace every torch.nn.RNN / GRU / LSTM / MultiheadAttention in ``model`` by its
    fastclip.nn drop-in, in place.

    The new modules hold the same Parameter objects (an optimizer over the model's parameters
    keeps working) and compute the same function. Only exact torch types are converted (a
    subclass may override ``forward``). A module shared by several parents stays shared.

    Args:
        model: any module; if it is itself an RNN/GRU/LSTM, the converted module is returned.

    Returns:
        the model (or its converted replacement when the model itself is recurrent).
    """
    if not isinstance(model, nn.Module):  # the engine raises the clear error
        return model
    if type(model) in _CONVERSIONS:
        return _converted_copy(model)
    for parent, name, _, new in _swaps(model):
        parent._modules[name] = new
    return model


@contextlib.contextmanager
def converted(model: nn.Module):
    """Context manager: ``convert_recurrent`` for the duration of the block, then the original
    modules are put back (the user's model is left as it was found). Yields the model to use."""
    if not isinstance(model, nn.Module):  # the engine raises the clear error
        yield model
        return
    if type(model) in _CONVERSIONS:
        yield _converted_copy(model)
        return
    swaps = _swaps(model)
    for parent, name, _, new in swaps:
        parent._modules[name] = new
    try:
        yield model
    finally:
        for parent, name, old, _ in swaps:
            parent._modules[name] = old
