"""Which backward passes of a user's loop may enter a private step.

A training loop makes backward passes that are not the training backward:
``torch.autograd.grad(loss, x)`` for FGSM/PGD adversarial examples or a saliency map, a backward
towards chosen tensors only (``loss.backward(inputs=[...])``), a second backward through a graph
kept with ``retain_graph=True``, a double backward (``create_graph=True``) for a gradient penalty,
two threads backpropagating at once. Each example may enter a released step once, through the
gradient of its own loss over every trainable parameter, so the engines ask at the first record
of every backward (:meth:`Gate.check`; one ``_will_engine_execute_node`` test per parameter, no
extra pass) what this backward computes:

* none of the parameters' gradients (``torch.autograd.grad(loss, x)``): the backward is left
  alone — nothing recorded, no norms, no examples counted, ``p.grad`` untouched;
* all of them (``loss.backward()``): the ordinary private backward;
* only some of them: refused, as clipping part of each example's gradient is another step;
  ``create_graph=True`` and ``torch.autograd.grad`` on parameters: refused.

The engines refuse a forward's graph backpropagated a second time (each :class:`Use` / nanobatch
call is spent by the first backward that records it) and a backward from a second thread while
one is in progress, with the messages below.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch import nn

ALL, NONE, SOME = "all", "none", "some"

TWICE = ("fastclip: this forward's graph was already backpropagated once into the private "
         "gradient (a backward with retain_graph=True, then another backward through the same "
         "forward); each example may enter a step once, so the second backward is refused. "
         "Combine the losses into one backward (e.g. (loss_a + loss_b).backward()), or run a new "
         "forward for the second backward")

THREADS = ("fastclip: two threads backpropagate through the same private model at once; their "
           "examples would be clipped into one step together, so the backward is refused. Run "
           "the training forward and backward passes from one thread (an evaluation or "
           "data-loading thread may run the model under torch.no_grad())")

CREATE_GRAPH = ("fastclip: a backward with create_graph=True reached the private model (a "
                "gradient penalty or another higher-order gradient: loss.backward(create_graph=True) "
                "or torch.autograd.grad(..., create_graph=True)). fastclip clips each example's "
                "gradient of its own loss; the parameter gradient of a loss built from gradients "
                "would bypass the per-example clipping, so it is refused. Compute input gradients "
                "without create_graph (FGSM/PGD need only torch.autograd.grad(loss, x)), or "
                "compute such a penalty on a model that is not private")


class Gate:
    """Classifies each backward that reaches a private model (module docstring).

    Keeps each parameter's AccumulateGrad node, fetched once: autograd reuses a live node, so
    the node kept is the one every later graph of the parameter ends in.
    """

    def __init__(self):
        self._nodes: Dict[nn.Parameter, object] = {}

    def clear(self):
        self._nodes.clear()

    def _node(self, p: nn.Parameter):
        node = self._nodes.get(p)
        if node is None:
            with torch.enable_grad():
                node = p.view_as(p).grad_fn.next_functions[0][0]
            self._nodes[p] = node
        return node

    def check(self, params: Iterable[nn.Parameter], names: Dict[nn.Parameter, str],
              all_in_graph: bool = False):
        """Called from inside a backward, at its first record: (kind, wanted) with kind ALL,
        NONE or SOME and ``wanted`` the set of parameters whose gradient the backward computes
        (SOME only; the caller refuses a recorded parameter outside it).

        Args:
            params: the covered parameters.
            names: their qualified names, for errors.
            all_in_graph: every parameter is an input of the node being run (nanobatch), so
                SOME means the backward asked for a part of them: refused here.

        Raises:
            RuntimeError: create_graph=True; torch.autograd.grad asked for a parameter; the
                backward computes the gradients of only some of the parameters.
        """
        if torch.is_grad_enabled():   # in a backward, grad mode is its create_graph
            raise RuntimeError(CREATE_GRAPH)
        wanted: List[nn.Parameter] = []
        missed: List[nn.Parameter] = []
        will = torch._C._will_engine_execute_node
        for p in params:
            if not p.requires_grad:
                continue
            try:
                (wanted if will(self._node(p)) else missed).append(p)
            except RuntimeError:
                # torch refuses the question for a leaf whose gradient autograd.grad captures.
                raise RuntimeError(
                    f"fastclip: torch.autograd.grad asked for the gradient of parameter "
                    f"'{names.get(p, '?')}' of a private model. A private model's parameter "
                    "gradient exists only as the clipped sum that loss.backward() writes into "
                    "p.grad, so this is refused. Call loss.backward() and read p.grad; gradients "
                    "with respect to inputs (torch.autograd.grad(loss, x)) are allowed and leave "
                    "p.grad untouched") from None
        if not wanted:
            return NONE, None
        if not missed:
            return ALL, None
        # Some parameters get no gradient: either they are outside this graph (a plain backward
        # of a loss that does not use them: fine) or the backward runs towards chosen tensors
        # only. The node being run has its edges in the graph; in a plain backward every node in
        # the graph runs, so an edge that will not run means chosen tensors.
        partial = all_in_graph
        if not partial:
            node = torch._C._current_autograd_node()
            if node is not None:
                partial = any(f is not None and not will(f) for f, _ in node.next_functions)
        if partial:
            raise partial_error(missed, names)
        return SOME, set(wanted)


def partial_error(missed, names: Dict[nn.Parameter, str]) -> RuntimeError:
    shown = ", ".join(f"'{names.get(p, '?')}'" for p in list(missed)[:4])
    more = f" and {len(missed) - 4} more" if len(missed) > 4 else ""
    return RuntimeError(
        f"fastclip: this backward computes the gradients of only some of the private model's "
        f"parameters (not of {shown}{more}): loss.backward(inputs=[...]) or "
        "torch.autograd.grad on a part of them. A private step clips each example's whole "
        "gradient over every trainable parameter; clipping a part of it is another step, so it "
        "is refused. Call loss.backward() for all of them, freeze the others "
        "(requires_grad_(False)) before make_private, or ask for none of them "
        "(torch.autograd.grad(loss, inputs) leaves p.grad untouched)")
