"""Drop-in modules whose backward fastclip's engine can see into.

``RNN``, ``GRU``, ``LSTM`` and ``MultiheadAttention`` replace torch.nn's (same arguments, parameter names and shapes,
inputs and outputs, so state dicts load both ways); ``convert_recurrent(model)`` swaps them into
an existing model in place. ``make_private``, ``per_sample_grad_norms`` and ``clipped_grad`` do
this automatically.
"""
from .attention import MultiheadAttention
from .rnn import GRU, LSTM, RNN, RecurrentInputError, convert_recurrent, converted

convert_modules = convert_recurrent  # RNN/GRU/LSTM and MultiheadAttention alike

__all__ = ["GRU", "LSTM", "MultiheadAttention", "RNN", "RecurrentInputError", "convert_modules",
           "convert_recurrent", "converted"]
