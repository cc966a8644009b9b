"""End-to-end DP-SGD step benchmark: non-private torch vs fastclip vs Opacus, in one process.

Run as ``python -m fastclip bench`` (or ``python bench/e2e.py``). Every workload is measured with
the same model initialisation and the same batches for every method; each private run gets its
own deep copy of the initial model and a fresh ``SGD(lr=0.1)``. A step is
``zero_grad, forward, loss, backward, optimizer.step``; we run ``--warmup`` steps per method, then
time ``--steps`` steps of every method round-robin (one step of each in turn, so load changes on
the machine hit all methods alike; ``--sequential`` times them in blocks) and report medians. Ratios are ``method ms / non-private ms`` from the same run.

Opacus is optional (``pip install ".[bench]"``); without it its columns read "not installed".

Workloads live in :data:`WORKLOADS` (name -> builder); add CNN / LSTM / transformer workloads by
registering a builder with :func:`register_workload`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One benchmark case: a model, the batches every method trains on, and its loss.

    ``loss_fn(output, targets)`` returns per-example losses, shape (B,), as in fastclip's contract.
    ``batches`` is a list of ``(inputs, targets)``; steps cycle through it.
    """

    model: nn.Module
    batches: List[Tuple[Tensor, Tensor]]
    loss_fn: nn.Module = field(default_factory=lambda: nn.CrossEntropyLoss(reduction="none"))
    description: str = ""
    # Mixed precision: every method's forward and loss run under torch.autocast(dtype) (the
    # backward outside it, as torch recommends); only the methods named in ``methods`` run.
    autocast: Optional[torch.dtype] = None
    methods: Optional[Sequence[str]] = None
    # The physical limit of fastclip / non-private for this workload (bench/README.md, "Budget"):
    # the non-private FLOPs plus what exact clipping cannot avoid (the norm pass beyond the
    # weight-gradient products, the noise, one finite check), at the machine's measured rates.
    # Shown beside the measured ratio; None: no budget written down yet.
    limit: Optional[float] = None


WorkloadBuilder = Callable[[int, torch.Generator], Workload]
WORKLOADS: Dict[str, Tuple[WorkloadBuilder, int]] = {}


def register_workload(name: str, default_batch_size: int):
    """Decorator: register ``builder(batch_size, generator) -> Workload`` under ``name``."""

    def deco(builder: WorkloadBuilder) -> WorkloadBuilder:
        if name in WORKLOADS:
            raise ValueError(f"workload {name!r} is already registered")
        WORKLOADS[name] = (builder, default_batch_size)
        return builder

    return deco


def make_batches(gen: torch.Generator, n_batches: int, shape: Sequence[int], classes: int,
            vocab: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
    """``n_batches`` labelled batches ``(x, y)``: ``x`` of ``shape`` (token ids below ``vocab``
    if given, else standard normal), then ``y`` of ``shape[0]`` labels below ``classes``, each
    drawn from ``gen`` in that order."""
    def inputs() -> Tensor:
        if vocab is None:
            return torch.randn(*shape, generator=gen)
        return torch.randint(0, vocab, tuple(shape), generator=gen)

    return [(inputs(), torch.randint(0, classes, (shape[0],), generator=gen))
            for _ in range(n_batches)]


def mlp(sizes: Sequence[int] = (784, 512, 512, 10)) -> nn.Sequential:
    """Linear-ReLU-...-Linear MLP with the given layer widths."""
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@register_workload("mlp", default_batch_size=256)
def _mlp_workload(batch_size: int, gen: torch.Generator, n_batches: int = 4) -> Workload:
    model = mlp((784, 512, 512, 10))
    return Workload(model, make_batches(gen, n_batches, (batch_size, 784), 10),
                    description="MLP 784-512-512-10", limit=1.15)


def cnn() -> nn.Sequential:
    """3 x (Conv2d 3x3 - GroupNorm(8) - ReLU - MaxPool2d(2)) with 32/64/128 channels, then
    Linear(2048, 10), for 3 x 32 x 32 inputs."""
    layers: List[nn.Module] = []
    c_in = 3
    for c in (32, 64, 128):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


@register_workload("cnn", default_batch_size=128)
def _cnn_workload(batch_size: int, gen: torch.Generator, n_batches: int = 4) -> Workload:
    model = cnn()
    data = make_batches(gen, n_batches, (batch_size, 3, 32, 32), 10)
    return Workload(model, data, description="CNN 3x(Conv3x3-GN-ReLU-MaxPool) 32/64/128, "
                                                 "Linear 2048-10, 3x32x32", limit=1.05)


class LSTMClassifier(nn.Module):
    """Embedding(V, E) -> torch.nn.LSTM(E, H, batch_first) -> Linear(H, classes) on the last step.
    The non-private baseline runs torch's LSTM; fastclip converts it to fastclip.nn.LSTM."""

    def __init__(self, vocab: int = 10000, embed: int = 128, hidden: int = 256, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


@register_workload("lstm", default_batch_size=64)
def _lstm_workload(batch_size: int, gen: torch.Generator, n_batches: int = 4, T: int = 64) -> Workload:
    model = LSTMClassifier()
    data = make_batches(gen, n_batches, (batch_size, T), 2, vocab=10000)
    return Workload(model, data, description=f"Embedding(10000,128)-LSTM(128,256)-Linear(256,2) "
                                                f"on the last step, T={T}", limit=1.07)


class TransformerClassifier(nn.Module):
    """Token + learned position embeddings -> pre-LayerNorm torch.nn.TransformerEncoderLayer
    blocks (GELU FFN) -> LayerNorm -> mean over positions -> Linear(d, classes). fastclip
    converts the blocks' torch.nn.MultiheadAttention to fastclip.nn.MultiheadAttention."""

    def __init__(self, vocab: int = 10000, d: int = 256, heads: int = 4, ffn: int = 1024,
                 layers: int = 2, T: int = 128, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        h = self.emb(x) + self.pos(pos)
        for blk in self.blocks:
            h = blk(h)
        return self.fc(self.norm(h).mean(1))


@register_workload("transformer", default_batch_size=32)
def _transformer_workload(batch_size: int, gen: torch.Generator, n_batches: int = 4,
                          T: int = 128) -> Workload:
    model = TransformerClassifier(T=T)
    data = make_batches(gen, n_batches, (batch_size, T), 2, vocab=10000)
    return Workload(model, data, description=f"Embedding(10000,256)+positions, 2 pre-LN blocks "
                                                f"(4 heads, FFN 1024 GELU), mean-pool, Linear(256,2), "
                                                f"T={T}", limit=1.09)


class TiedTokenMLP(nn.Module):
    """Embedding(V, d), ``L`` pre-LayerNorm MLP blocks (d -> h -> d, GELU) with residuals, output
    projection tied to the embedding, mean over positions: the distributed (FSDP2) benchmark's
    and tests' model."""

    def __init__(self, V: int, d: int, h: int, L: int = 2):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
            for _ in range(L))
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).mean(1)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm: conv3x3-GN-ReLU-conv3x3-GN, + shortcut (1x1 conv-GN
    when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.GroupNorm(groups, c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18-style for 3 x 32 x 32 inputs (the CIFAR stem: one conv3x3, no max-pool), basic
    blocks ``blocks`` per stage with ``widths`` channels (stride 2 from the second stage on),
    GroupNorm(8) instead of BatchNorm, global average pool, Linear(widths[-1], classes)."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (2, 2, 2, 2),
                 classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.GroupNorm(8, widths[0]), nn.ReLU())
        layers: List[nn.Module] = []
        c_in = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(c_in, w, stride=2 if i > 0 and j == 0 else 1))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


# ResNet-18's widths are 64/128/256/512 (11.2 M parameters, ~107 GFLOP per B32 step): on the 2-core
# development machine its non-private step takes 2.3-3.0 s of CPU time (1.2-1.5 s wall at best),
# and Opacus' hooks would hold 1.4 GB of per-example gradients; the benchmark keeps the structure
# and halves the widths (2.8 M parameters, 26.7 GFLOP per step). ResNet(widths=(64, 128, 256, 512))
# is the full model.
RESNET_WIDTHS = (32, 64, 128, 256)


@register_workload("resnet", default_batch_size=32)
def _resnet_workload(batch_size: int, gen: torch.Generator, n_batches: int = 4,
                     widths: Sequence[int] = RESNET_WIDTHS) -> Workload:
    model = ResNet(widths)
    data = make_batches(gen, n_batches, (batch_size, 3, 32, 32), 10)
    return Workload(model, data, description=f"ResNet-18-style (basic blocks 2/2/2/2, widths "
                                                f"{'/'.join(map(str, widths))}, GroupNorm(8)), 3x32x32, "
                                                f"10 classes", limit=1.03)


class ViT(nn.Module):
    """Vision transformer for 3 x 32 x 32 inputs: patch embedding (Conv2d, kernel = stride =
    ``patch``), class token, learned positions, pre-LayerNorm torch.nn.TransformerEncoderLayer
    blocks (GELU FFN 4d), LayerNorm, Linear(d, classes) on the class token. fastclip converts the
    blocks' torch.nn.MultiheadAttention to fastclip.nn.MultiheadAttention."""

    def __init__(self, patch: int = 4, d: int = 192, layers: int = 4, heads: int = 3,
                 image: int = 32, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)                  # (B, n, d)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 0]))


@register_workload("vit", default_batch_size=32)
def _vit_workload(batch_size: int, gen: torch.Generator, n_batches: int = 4) -> Workload:
    model = ViT()
    data = make_batches(gen, n_batches, (batch_size, 3, 32, 32), 10)
    return Workload(model, data, description="ViT-small: patch 4 (Conv2d), d192, 4 pre-LN blocks "
                                                "(3 heads, FFN 768 GELU), class token, 3x32x32, "
                                                "10 classes", limit=1.07)


def _bf16(builder: WorkloadBuilder) -> WorkloadBuilder:
    """``builder``'s workload trained under torch.autocast(bfloat16): non-private vs fastclip."""

    def build(batch_size: int, gen: torch.Generator) -> Workload:
        wl = builder(batch_size, gen)
        wl.autocast, wl.methods = torch.bfloat16, ("non-private", "fastclip")
        wl.limit = None   # the float32 budget does not apply
        wl.description += ", autocast bf16"
        return wl

    return build


register_workload("mlp-bf16", default_batch_size=256)(_bf16(_mlp_workload))
register_workload("transformer-bf16", default_batch_size=32)(_bf16(_transformer_workload))


class HFLogits(nn.Module):
    """A Hugging Face model called without ``labels=`` (its ``.loss`` is a batch mean, which
    fastclip refuses), returning the logits tensor that every method's loss takes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, ids: Tensor) -> Tensor:
        # Position (and BERT's token type) ids passed per example, (B, T), not the models' (1, T)
        # default: Opacus' Embedding hooks need the batch dimension (fastclip needs neither).
        pos = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        extra = {"token_type_ids": torch.zeros_like(ids)} if self.token_types else {}
        return self.model(input_ids=ids, position_ids=pos, **extra).logits


class LMLoss(nn.Module):
    """Per-example next-token loss, ``fastclip.lm_loss`` (each example over its own tokens)."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        from fastclip.losses import lm_loss

        return lm_loss(logits, labels)


def _hf_workload(kind: str, batch_size: int, gen: torch.Generator, n_batches: int = 4,
                 T: int = 128, vocab: int = 1024) -> Workload:
    # Imported here: transformers takes seconds to import and is only in the bench extra.
    import transformers

    # No dropout (as the transformer workload): every method then computes the same function.
    common = dict(vocab_size=vocab)   # attention: transformers' default implementation (sdpa)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=4, n_embd=256, n_head=4, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common))
        ids = [torch.randint(0, vocab, (batch_size, T), generator=gen) for _ in range(n_batches)]
        return Workload(HFLogits(model), [(x, x) for x in ids], loss_fn=LMLoss(), limit=1.08,
                        description=f"transformers GPT2LMHeadModel, 4 layers, d256, 4 heads, "
                                    f"vocab {vocab} (tied lm_head), T={T}, fastclip.lm_loss")
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=T, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **common))
    return Workload(HFLogits(model), make_batches(gen, n_batches, (batch_size, T), 2, vocab=vocab),
                    limit=1.09,
                    description=f"transformers BertForSequenceClassification, 4 layers, d256, "
                                f"4 heads, FFN 1024, vocab {vocab}, T={T}, 2 classes")


# Registered only where transformers is installed (the bench extra brings it).
if importlib.util.find_spec("transformers") is not None:
    register_workload("gpt2", default_batch_size=16)(
        lambda batch_size, gen: _hf_workload("gpt2", batch_size, gen))
    register_workload("bert", default_batch_size=16)(
        lambda batch_size, gen: _hf_workload("bert", batch_size, gen))


# --------------------------------------------------------------------------------------------
# methods: each prepares (a copy of) the model and returns a step(x, y) closure
# --------------------------------------------------------------------------------------------

StepFn = Callable[[Tensor, Tensor], None]


class NotInstalled(Exception):
    """The method's optional dependency is missing."""


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                amp: Optional[torch.dtype] = None) -> StepFn:
    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = loss_fn(model(x), y).mean()
        loss.backward()
        optimizer.step()

    return step


def setup_nonprivate(wl: Workload, model: nn.Module, batch_size: int) -> StepFn:
    return _plain_loop(model, _sgd(model), wl.loss_fn, wl.autocast)


def make_fastclip(model: nn.Module):
    """``(model, optimizer)`` made private as the fastclip column runs them; after a step,
    ``optimizer.engine.covered()`` names each parameter's rule."""
    import fastclip

    if not hasattr(fastclip, "make_private"):
        raise RuntimeError("fastclip.make_private is not available in this build")
    model, optimizer, _ = fastclip.make_private(
        model, _sgd(model), None,
        noise_multiplier=1.0, max_grad_norm=1.0,
        mode="auto", loss_reduction="mean", poisson_sampling=False,
    )
    return model, optimizer


def setup_fastclip(wl: Workload, model: nn.Module, batch_size: int) -> StepFn:
    model, optimizer = make_fastclip(model)
    return _plain_loop(model, optimizer, wl.loss_fn, wl.autocast)


def _opacus_replace_lstm(model: nn.Module) -> None:
    """Opacus refuses torch.nn.LSTM and asks for its DPLSTM (same state dict): swap it in place,
    with the same weights, so the Opacus columns run the same function."""
    from opacus.layers import DPLSTM

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LSTM:
                new = DPLSTM(child.input_size, child.hidden_size, num_layers=child.num_layers,
                             bias=child.bias, batch_first=child.batch_first,
                             dropout=child.dropout, bidirectional=child.bidirectional)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)


def _opacus_setup(wl: Workload, model: nn.Module, batch_size: int, grad_sample_mode: str):
    try:
        from opacus import PrivacyEngine
    except ImportError as e:  # optional dependency: the "bench" extra
        raise NotInstalled(str(e)) from e
    from torch.utils.data import DataLoader, TensorDataset

    _opacus_replace_lstm(model)
    x0, y0 = wl.batches[0]
    # Opacus derives the sample rate / expected batch size from the loader; with
    # poisson_sampling=False it leaves the loader alone and we feed our own batches.
    loader = DataLoader(TensorDataset(x0, y0), batch_size=batch_size)
    criterion = nn.CrossEntropyLoss(reduction="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = PrivacyEngine().make_private(
            module=model, optimizer=_sgd(model), data_loader=loader, criterion=criterion,
            noise_multiplier=1.0, max_grad_norm=1.0, loss_reduction="mean",
            poisson_sampling=False, grad_sample_mode=grad_sample_mode,
        )
    return out


def setup_opacus_hooks(wl: Workload, model: nn.Module, batch_size: int) -> StepFn:
    dp_model, optimizer, _ = _opacus_setup(wl, model, batch_size, "hooks")
    return _plain_loop(dp_model, optimizer, wl.loss_fn)


def setup_opacus_ghost(wl: Workload, model: nn.Module, batch_size: int) -> StepFn:
    # Ghost clipping returns a criterion wrapper: criterion(out, y) is a DPTensorFastGradientClipping
    # whose .backward() runs Opacus' two backward passes (norms, then the re-weighted loss).
    dp_model, optimizer, criterion, _ = _opacus_setup(wl, model, batch_size, "ghost")

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        criterion(dp_model(x), y).backward()
        optimizer.step()

    return step


# Exceptions by which an optional method says it cannot run a model (Opacus' UnsupportedModuleError
# for nn.MultiheadAttention, NotImplementedError for tied parameters under ghost clipping).
_REFUSALS = ("UnsupportedModuleError", "NotImplementedError")


@dataclass
class Method:
    name: str
    setup: Callable[[Workload, nn.Module, int], StepFn]
    optional: bool = False


METHODS: List[Method] = [
    Method("non-private", setup_nonprivate),
    Method("fastclip", setup_fastclip),
    Method("opacus hooks", setup_opacus_hooks, optional=True),
    Method("opacus ghost", setup_opacus_ghost, optional=True),
]


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one(step: StepFn, x: Tensor, y: Tensor, device: torch.device) -> float:
    """Wall time of one step in ms (synchronising the device, so queued GPU work is counted)."""
    t0 = time.perf_counter()
    step(x, y)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the C++ profiler logs start/stop lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _native_core():
    """fastclip._C where it is built with scratch accounting (src/scratch.h), else None."""
    try:
        from fastclip import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "scratch_peak_bytes") else None


def step_memory_mib(step: StepFn, batch, device: torch.device) -> Tuple[Optional[float], float]:
    """``(torch_mib, native_mib)`` of one step: the peak memory torch allocated during the step
    above what was allocated when it began, and the peak of the native core's scratch during it
    (its per-thread buffers, which torch does not see; ``fastclip._C.scratch_peak_bytes``).

    CUDA: the allocator's peak counter. CPU: replays the profiler's allocation events in time order
    (one extra, untimed step; it does not affect the timings).
    """
    x, y = batch
    core = _native_core()
    if core is not None:
        core.scratch_reset_peak()
        base_native = core.scratch_bytes()
    native = lambda: (core.scratch_peak_bytes() - base_native) / 2**20 if core is not None else 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(x, y)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, native()
    if device.type != "cpu":
        return None, 0.0
    from torch.profiler import ProfilerActivity, profile

    # A step allocates something; a profile that recorded no allocation at all missed them (seen
    # once in a long run: the column read the native scratch alone), so it is taken again once
    # and otherwise reported as unknown rather than as zero.
    events = []
    for _ in range(2):
        try:
            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                          profile_memory=True) as prof:
                step(x, y)
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        except Exception:  # profiler internals differ across torch builds: the column is optional
            return None, native()
        if events:
            break
    if not events:
        return None, native()
    events.sort(key=lambda e: e.start_ns())
    # The running total never goes below the step's start: a free of memory allocated before the
    # step (zero_grad dropping the last step's gradients) is reported only when the profiler
    # saw that block allocated, in an earlier profiled step, so the column depended on what had
    # been profiled before (mlp-bf16's non-private step read 3.3 or 0.8 MiB, one process, same
    # step). Freed memory of an earlier step is no credit: the column is the most the step holds
    # above its start.
    cur = peak = 0
    for e in events:
        cur = max(0, cur + e.nbytes())
        peak = max(peak, cur)
    return peak / 2**20, native()


def peak_step_memory_mib(step: StepFn, batch, device: torch.device) -> Optional[float]:
    """Peak memory of one step above what was allocated when it began, in MiB: torch's peak plus
    the native core's scratch peak (:func:`step_memory_mib`; their sum bounds the step's peak from
    above, as the two peaks need not coincide)."""
    torch_mib, native_mib = step_memory_mib(step, batch, device)
    return None if torch_mib is None else torch_mib + native_mib


@dataclass
class Result:
    workload: str
    method: str
    batch_size: int
    median_ms: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)
    ratio: Optional[float] = None
    peak_mib: Optional[float] = None     # torch's peak + native scratch peak (step_memory_mib)
    native_mib: Optional[float] = None   # of which the native core's scratch
    mem_ratio: Optional[float] = None    # peak_mib / non-private peak_mib
    limit: Optional[float] = None   # the workload's budgeted fastclip ratio (Workload.limit)
    status: str = "ok"  # ok | not installed | unsupported (shown "-") | error
    error: str = ""


def run_workload(name: str, batch_size: Optional[int], warmup: int, steps: int,
                 device: torch.device, seed: int = 0, memory: bool = True,
                 interleave: bool = True, methods: Optional[Sequence[str]] = None) -> List[Result]:
    """Every method's steps on workload ``name`` (``methods``: only those, e.g. in tests)."""
    builder, default_bs = WORKLOADS[name]
    bs = default_bs if batch_size is None else batch_size
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    wl = builder(bs, gen)
    init = wl.model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in wl.batches]
    wl.batches = batches
    wl.loss_fn = wl.loss_fn.to(device)

    results: List[Result] = []
    steppers: Dict[str, StepFn] = {}
    for m in METHODS:
        if (wl.methods is not None and m.name not in wl.methods) or \
                (methods is not None and m.name not in methods):
            continue
        r = Result(name, m.name, bs, limit=wl.limit)
        results.append(r)
        try:
            model = copy.deepcopy(init)  # same initial weights for every method
            torch.manual_seed(seed)  # same noise stream start for every private method
            step = m.setup(wl, model, bs)
            for i in range(warmup):
                step(*batches[i % len(batches)])
            _sync(device)
            steppers[m.name] = step
        except NotInstalled as e:
            r.status, r.error = "not installed", str(e)
        except Exception as e:  # report and go on: one broken method must not hide the others
            r.status, r.error = "error", f"{type(e).__name__}: {e}"
            # An optional method that refuses the model (Opacus: nn.MultiheadAttention, tied
            # parameters under ghost clipping) cannot run it: shown as "-", not as a failure.
            if m.optional and type(e).__name__ in _REFUSALS:
                r.status = "unsupported"

    by_name = {r.method: r for r in results}
    if interleave:
        # Round-robin, one step of each method in turn, so that a change in machine load
        # (other processes, thermal state) hits every method alike and the ratios stay honest.
        for i in range(steps):
            x, y = batches[(warmup + i) % len(batches)]
            for name_, step in list(steppers.items()):
                try:
                    by_name[name_].times_ms.append(_time_one(step, x, y, device))
                except Exception as e:
                    by_name[name_].status, by_name[name_].error = "error", f"{type(e).__name__}: {e}"
                    del steppers[name_]
    else:
        for name_, step in list(steppers.items()):
            try:
                for i in range(steps):
                    x, y = batches[(warmup + i) % len(batches)]
                    by_name[name_].times_ms.append(_time_one(step, x, y, device))
            except Exception as e:
                by_name[name_].status, by_name[name_].error = "error", f"{type(e).__name__}: {e}"
                del steppers[name_]
    for name_, step in steppers.items():
        r = by_name[name_]
        r.median_ms = statistics.median(r.times_ms)
        if memory:
            torch_mib, r.native_mib = step_memory_mib(step, batches[0], device)
            r.peak_mib = None if torch_mib is None else torch_mib + r.native_mib
    base, base_mib = results[0].median_ms, results[0].peak_mib
    for r in results:
        if r.median_ms is not None and base:
            r.ratio = r.median_ms / base
        if r.peak_mib is not None and base_mib:
            r.mem_ratio = r.peak_mib / base_mib
    return results


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def _cell(r: Result) -> str:
    if r.status == "unsupported":
        return "-"
    if r.status != "ok":
        return r.status
    s = f"{r.median_ms:.2f}"
    if r.method != "non-private":
        s += f" ({r.ratio:.2f}x)"
    return s


def _mem(r: Result) -> str:
    return f"{r.peak_mib:.1f}" if r.status == "ok" and r.peak_mib is not None else "-"


def format_table(results: List[Result], memory: bool) -> str:
    ran = {r.method for r in results}   # columns for the methods run (bench --methods)
    methods = [m.name for m in METHODS if m.name in ran]
    header = ["workload", "batch"] + [f"{m} ms" + (" (ratio)" if m != "non-private" else "") for m in methods]
    # The budgeted limit of the fastclip ratio (bench/README.md, "Budget"), beside the measured one.
    at = header.index("fastclip ms (ratio)") + 1 if "fastclip" in methods else len(header)
    header.insert(at, "limit")
    if memory:
        header.append("peak MiB " + "/".join(methods))
        header.append("fastclip mem ratio (native MiB)")
    rows = []
    by_wl: Dict[str, Dict[str, Result]] = {}
    for r in results:
        by_wl.setdefault(r.workload, {})[r.method] = r
    for wl, rs in by_wl.items():
        any_r = next(iter(rs.values()))
        # "-": a method the workload does not run (the bf16 rows: non-private and fastclip)
        row = [wl, str(any_r.batch_size)] + [_cell(rs[m]) if m in rs else "-" for m in methods]
        row.insert(at, f"{any_r.limit:.2f}x" if any_r.limit is not None else "-")
        if memory:
            row.append(" / ".join(_mem(rs[m]) if m in rs else "-" for m in methods))
            fc = rs.get("fastclip")
            row.append(f"{fc.mem_ratio:.2f}x ({fc.native_mib:.1f})"
                       if fc is not None and fc.mem_ratio is not None and fc.native_mib is not None
                       else "-")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def _import_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib, which is optional: "
                          "pip install torch==2.13.0 \".[plot]\" (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_slowdown(results: List[Result], path: str, title: Optional[str] = None) -> None:
    """Bar chart of each private method's slowdown (step time / non-private step time) per
    workload, on a log axis with the non-private baseline at 1x; written to ``path`` (PNG, SVG,
    PDF: by extension). Methods that did not run are labelled instead of drawn."""
    plt = _import_pyplot()
    methods = [m.name for m in METHODS if m.name != "non-private"]
    by_wl: Dict[str, Dict[str, Result]] = {}
    for r in results:
        by_wl.setdefault(r.workload, {})[r.method] = r
    workloads = list(by_wl)
    colors = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(workloads) * max(len(methods), 1) / 2 + 2), 4.5))
    ratios = [r.ratio for rs in by_wl.values() for r in rs.values() if r.ratio]
    top = max(ratios + [2.0]) * 2.5
    for j, m in enumerate(methods):
        for i, wl in enumerate(workloads):
            r = by_wl[wl].get(m)
            x = i + (j - (len(methods) - 1) / 2) * width
            if r is not None and r.status == "ok" and r.ratio:
                ax.bar(x, r.ratio, width * 0.92, color=colors[j % len(colors)],
                       label=m if i == 0 or not ax.get_legend_handles_labels()[1].count(m) else None)
                ax.text(x, r.ratio * 1.08, f"{r.ratio:.1f}x" if r.ratio < 10 else f"{r.ratio:.0f}x",
                        ha="center", va="bottom", fontsize=8)
            else:
                ax.bar(x, 0, width * 0.92, color=colors[j % len(colors)],
                       label=m if not ax.get_legend_handles_labels()[1].count(m) else None)
                ax.text(x, 1.05, "n/a" if r is None else r.status, ha="center", va="bottom",
                        fontsize=7, rotation=90, color="0.4")
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="non-private (1x)")
    ax.set_yscale("log")
    ax.set_ylim(0.8, top)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= top]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{wl}\n(batch {next(iter(by_wl[wl].values())).batch_size})" for wl in workloads])
    ax.set_ylabel("step time / non-private step time (log scale)")
    ax.set_title(title or "DP-SGD step slowdown vs non-private training (lower is better)", fontsize=10)
    ax.legend(loc="upper left", fontsize=9, frameon=False, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _OtherLoad:
    """CPU time used by *other* processes while we run (Linux: /proc/stat minus our own times)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
            mine = os.times()
            return busy / os.sysconf("SC_CLK_TCK"), mine.user + mine.system, time.monotonic()
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def others_cores(self) -> Optional[float]:
        end = self._read()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(other, 0.0) / (end[2] - self.start[2])


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def environment() -> Dict[str, object]:
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None
    try:
        from importlib.metadata import version

        fastclip_version = version("fastclip")
    except Exception:
        fastclip_version = None
    try:
        from fastclip import ops

        if getattr(ops, "HAS_NATIVE", False):
            from fastclip import _C

            from fastclip.heap import keep_heap   # in force from the first engine anyway

            native = (f"{ops.blas_info()}; parallel loops on {_C.parallel_backend()} threads; "
                      f"{_C.isa()} kernels (GEMM kernels "
                      f"{'on' if _C.gemm_kernels_enabled() else 'off'}); "
                      f"heap kept between steps: {keep_heap()}")
        else:
            native = "native core not built"
    except Exception as e:
        native = f"unavailable ({type(e).__name__})"
    return {
        "fastclip_native": native,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus_version,
        "fastclip": fastclip_version,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_at_start": _loadavg(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--workloads", default="all",
                   help=f"comma-separated workload names (available: {', '.join(WORKLOADS)}) or 'all'")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated methods (available: {', '.join(m.name for m in METHODS)}) or "
                        "'all'; non-private always runs: every ratio is against it")
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per method")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override every workload's batch size (None: each workload's own)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; None: torch's default, usually the core count")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed of the models and batches")
    p.add_argument("--sequential", action="store_true",
                   help="time each method's steps in one block instead of round-robin across methods")
    p.add_argument("--no-memory", action="store_true", help="skip the per-step peak memory measurement")
    p.add_argument("--json", metavar="OUT.json", default=None, help="also write all results as JSON")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="also draw each method's slowdown vs non-private per workload as a bar chart "
                        "(needs matplotlib: the 'plot' extra)")
    return p


def run(args: argparse.Namespace) -> int:
    names = list(WORKLOADS) if args.workloads == "all" else [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s) {unknown}; available: {list(WORKLOADS)}", file=sys.stderr)
        return 2
    methods = None
    if getattr(args, "methods", "all") != "all":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = [m.name for m in METHODS]
        unknown = [m for m in methods if m not in known]
        if unknown or not methods:
            print(f"unknown method(s) {unknown or methods}; available: {known}", file=sys.stderr)
            return 2
        methods = [METHODS[0].name] + [m for m in methods if m != METHODS[0].name]
    if args.batch_size is not None and args.batch_size < 1:
        print(f"--batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if getattr(args, "plot", None):
        try:  # before the run, not after minutes of measuring
            _import_pyplot()
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    memory = not args.no_memory
    env = environment()
    print(f"fastclip e2e benchmark: torch {env['torch']}, opacus {env['opacus'] or 'not installed'}, "
          f"device {device}, threads {env['threads']}, warm-up {args.warmup}, median of {args.steps} steps"
          f" ({'sequential' if args.sequential else 'round-robin across methods'})\n"
          f"fastclip core: {env['fastclip_native']}")
    meter = _OtherLoad()
    results: List[Result] = []
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks, input x
    for n in names:
        results += run_workload(n, args.batch_size, args.warmup, args.steps, device, args.seed, memory,
                                interleave=not args.sequential, methods=methods)
    print(format_table(results, memory))
    print("ratio = method step time / non-private step time, same process, same init, same batches."
          + (" MiB = peak memory allocated during one step above its start, torch's allocations plus the "
             "native core's scratch (native MiB, fastclip._C.scratch_peak_bytes)." if memory else ""))
    others = meter.others_cores()
    env["other_processes_cores"] = others
    if others is not None and others > 0.25:
        print(f"warning: other processes used {others:.2f} CPU cores on average during this run "
              f"({os.cpu_count()} cores in all); timings are noisy, run again on a quiet machine",
              file=sys.stderr)
    errors = [r for r in results if r.status == "error"]
    for r in errors:
        print(f"error: {r.workload} / {r.method}: {r.error}", file=sys.stderr)
    for r in results:
        if r.status == "unsupported":
            print(f"-: {r.method} cannot run {r.workload}: {r.error[:160]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            args_json = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
            json.dump({"environment": env, "args": args_json,
                       "results": [r.__dict__ for r in results]}, f, indent=2)
        print(f"wrote {args.json}")
    if getattr(args, "plot", None):
        plot_slowdown(results, args.plot,
                      title=f"DP-SGD step slowdown vs non-private, lower is better\n(torch {env['torch']}, "
                            f"{env['threads']} threads{'; machine was loaded, timings noisy' if others is not None and others > 0.25 else ''})")
        print(f"wrote {args.plot}")
    # fastclip or the baseline failing is a failure; a broken optional Opacus column is not
    return 1 if any(r.method in ("non-private", "fastclip") for r in errors) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclip bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(p).parse_args(argv))
