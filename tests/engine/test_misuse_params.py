"""Issue 13 case 2: parameters that change after make_private.

A layer unfrozen (``requires_grad_(True)``) or a head appended after make_private is clipped
exactly from the next forward on; a layer frozen simply drops out; a replaced parameter
(``load_state_dict(assign=True)``, ``module.weight = nn.Parameter(...)``) is clipped in the model
and refused at the step while the optimizer holds the old one; a raw gradient is never released.

Measured by the definition (tests/misuse_common.py): noise 0, SGD at lr 1, loss_reduction "sum",
so the parameter update IS the released clipped sum; it is compared with tests/reference.py's
float64 per-example gradients, and one example's influence on it is bounded by the sensitivity.
"""
import functools
import math

import pytest
import torch
from torch import nn

import harness
import reference as R
from conftest import DTYPES
from harness import CE, MODES
from misuse_common import flat_params, private

# the updates here are float64: their dtypes are asserted too
assert_close = functools.partial(harness.assert_close, same_dtype=True)

CLIPPINGS = ["flat", "per_layer"]
C = 0.5
B = 5


def mlp(dtype=torch.float64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(),
                         nn.Linear(6, 3)).to(dtype)


def head(dtype=torch.float64):
    torch.manual_seed(2)
    return nn.Linear(3, 3).to(dtype)


def data(dtype):
    torch.manual_seed(3)
    return torch.randn(B, 5, dtype=dtype) * 3, torch.randint(0, 3, (B,))


# How each case changes the model: (before make_private, after make_private). The same two
# functions applied in a row to a fresh model give the reference model.
CASES = {
    "unfreeze": (lambda m, opt: m[0].requires_grad_(False),
                 lambda m, opt: m[0].requires_grad_(True)),
    "unfreeze_weight": (lambda m, opt: m[2].weight.requires_grad_(False),   # its bias trains
                        lambda m, opt: m[2].weight.requires_grad_(True)),
    "head": (lambda m, opt: None, lambda m, opt: _append_head(m, opt)),
    "freeze": (lambda m, opt: None, lambda m, opt: m[2].requires_grad_(False)),
}


def _append_head(m, opt):
    h = head(next(m.parameters()).dtype)
    m.append(h)
    if opt is not None:
        opt.add_param_group({"params": list(h.parameters())})


def plain(values, build=mlp):
    """A fresh model (no hooks) holding the parameter values ``values`` (as flat_params)."""
    m = build()
    with torch.no_grad():
        for p, v in zip(m.parameters(), torch.split(values, [p.numel() for p in m.parameters()])):
            p.copy_(v.view_as(p))
    return m


def reference_model(case, dtype):
    m = mlp(dtype)
    before, after = CASES[case]
    before(m, None)
    after(m, None)
    return m


def layer_names(m):
    """The clipping layers of these models: one per module with trainable parameters."""
    return [n for n, mod in m.named_modules()
            if any(p.requires_grad for p in mod.parameters(recurse=False))]


def reference_update(m, x, y, clipping):
    """float64 sum_i clip(g_i) over the trainable parameters of ``m``, flattened like
    flat_params (0 for a frozen parameter)."""
    g = R.per_example_grads(m, CE, x, y)
    groups = ([list(g)] if clipping == "flat" else
              [[n for n in g if n.rsplit(".", 1)[0] == layer] for layer in layer_names(m)])
    bound = C if clipping == "flat" else C / math.sqrt(len(groups))
    out = {}
    for names in groups:
        norm = sum(g[n].flatten(1).square().sum(1) for n in names).sqrt()
        c = torch.clamp(bound / norm, max=1.0)
        for n in names:
            out[n] = torch.tensordot(c, g[n], dims=1)
    return torch.cat([out[n].flatten() if n in out else torch.zeros(p.numel(), dtype=torch.float64)
                      for n, p in m.named_parameters()])


def released(case, mode, clipping, dtype, idx, check_layers=False):
    """The update one private step on the examples ``idx`` releases after the case's change."""
    x, y = data(dtype)
    m = mlp(dtype)
    before, after = CASES[case]
    before(m, None)
    m, opt, _ = private(m, C=C, mode=mode, clipping=clipping)
    after(m, opt)
    start = flat_params(m)
    opt.zero_grad()
    CE(m(x[idx]), y[idx]).sum().backward()
    opt.step()
    if check_layers:
        want = layer_names(reference_model(case, dtype))
        assert [layer.name for layer in opt.engine.layers] == want
        if clipping == "per_layer":
            assert opt.engine.bounds == pytest.approx((C / math.sqrt(len(want)),) * len(want))
        assert opt.sensitivity == pytest.approx(C)
    return start - flat_params(m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_changed_parameters_are_clipped_exactly(case, mode, clipping, dtype):
    """The update is the reference clipped sum over the now-trainable parameters, and one
    example moves it by at most C."""
    x, y = data(dtype)
    full = released(case, mode, clipping, dtype, list(range(B)), check_layers=True)
    ref_model = reference_model(case, dtype)
    assert_close(full, reference_update(ref_model, x, y, clipping), dtype)
    if case != "freeze":  # the changed parameters moved, by their clipped share
        changed = {"unfreeze": "0.", "unfreeze_weight": "2.weight", "head": "5."}[case]
        sizes = [(n, p.numel()) for n, p in ref_model.named_parameters()]
        offsets = torch.tensor([0] + [s for _, s in sizes]).cumsum(0)
        part = torch.cat([full[offsets[i]:offsets[i + 1]] for i, (n, _) in enumerate(sizes)
                          if n.startswith(changed)])
        assert part.norm() > 1e-3
    worst = max((full - released(case, mode, clipping, dtype, [i for i in range(B) if i != j]))
                .norm().item() for j in range(B))
    assert worst <= C * (1 + (1e-9 if dtype == torch.float64 else 1e-4))
    assert worst > 0.9 * C   # clipping is active: an unclipped example would move it further


def test_clipping_is_active_in_these_tests():
    """Every example's norm over the unfrozen model exceeds C (and so does the unfrozen layer's
    own share): an update holding a raw gradient would differ from the reference."""
    m = reference_model("unfreeze", torch.float64)
    x, y = data(torch.float64)
    g = R.per_example_grads(m, CE, x, y)
    assert (R.norms(m, CE, x, y) > 2 * C).all()
    assert (g["0.weight"].flatten(1).norm(dim=1) > C).sum() >= 3


def test_a_raw_gradient_of_the_unfrozen_layer_exceeds_c():
    """The measurement above can fail: a raw gradient for the unfrozen layer (what was released
    before) moves the update by more than C."""
    x, y = data(torch.float64)
    m = reference_model("unfreeze", torch.float64)
    raw = R.per_example_grads(m, CE, x, y)["0.weight"]
    assert raw.flatten(1).norm(dim=1).max() > 2 * C


@pytest.mark.parametrize("mode", MODES)
def test_freeze_and_unfreeze_over_several_steps(mode):
    """A schedule: frozen at make_private, unfrozen after step 1, frozen again after step 2;
    each step's update is the reference clipped sum of the parameters trainable at that step."""
    x, y = data(torch.float64)
    m = mlp()
    m[0].requires_grad_(False)
    m, opt, _ = private(m, C=C, mode=mode, clipping="per_layer")
    ref = mlp()
    for frozen in (True, False, True):
        m[0].requires_grad_(not frozen)
        ref[0].requires_grad_(not frozen)
        start = flat_params(m)
        opt.zero_grad()
        CE(m(x), y).sum().backward()
        opt.step()
        assert_close(start - flat_params(m), reference_update(ref, x, y, "per_layer"), torch.float64)
        assert len(opt.engine.layers) == (2 if frozen else 3)
        with torch.no_grad():
            for p, q in zip(ref.parameters(), m.parameters()):
                p.copy_(q)
    assert opt.steps == 3


@pytest.mark.parametrize("mode", MODES)
def test_unfrozen_between_backward_and_step(mode):
    """A layer unfrozen after the backward: it has no gradient in this step (it was a constant
    in the forward) and is clipped from the next forward on."""
    x, y = data(torch.float64)
    m = mlp()
    m[0].requires_grad_(False)
    m, opt, _ = private(m, C=C, mode=mode)
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    m[0].requires_grad_(True)
    start = flat_params(m)
    opt.step()
    ref = mlp()
    ref[0].requires_grad_(False)
    assert_close(start - flat_params(m), reference_update(ref, x, y, "flat"), torch.float64)
    start = flat_params(m)
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    opt.step()
    upd = start - flat_params(m)
    assert upd[:48].norm() > 1e-3    # 0.weight and 0.bias moved
    assert_close(upd, reference_update(plain(start), x, y, "flat"), torch.float64)


# ---- per-layer bounds given as a list --------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_list_of_bounds_follows_its_layers_when_one_is_frozen(mode):
    """Freezing a layer keeps the other layers' bounds (by name) and the sensitivity (the frozen
    layer's share of the noise stays: a logical batch straddling the change stays covered)."""
    x, y = data(torch.float64)
    m, opt, _ = private(mlp(), C=[0.1, 0.2, 0.3], mode=mode, clipping="per_layer")
    m[2].requires_grad_(False)
    start = flat_params(m)
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    opt.step()
    assert [layer.name for layer in opt.engine.layers] == ["0", "4"]
    assert opt.engine.bounds == (0.1, 0.3)
    assert opt.sensitivity == pytest.approx(math.sqrt(0.01 + 0.04 + 0.09))
    ref = mlp()
    ref[2].requires_grad_(False)
    g = R.per_example_grads(ref, CE, x, y)
    want = {}
    for layer, bound in (("0", 0.1), ("4", 0.3)):
        names = [f"{layer}.weight", f"{layer}.bias"]
        norm = sum(g[n].flatten(1).square().sum(1) for n in names).sqrt()
        for n in names:
            want[n] = torch.tensordot(torch.clamp(bound / norm, max=1.0), g[n], dims=1)
    ref_upd = torch.cat([want[n].flatten() if n in want else torch.zeros(p.numel(), dtype=torch.float64)
                         for n, p in ref.named_parameters()])
    assert_close(start - flat_params(m), ref_upd, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_list_of_bounds_refuses_a_layer_it_has_no_bound_for(mode):
    x, y = data(torch.float64)
    m = mlp()
    m[0].requires_grad_(False)
    m, opt, _ = private(m, C=[0.2, 0.3], mode=mode, clipping="per_layer")
    m[0].requires_grad_(True)
    start = flat_params(m)
    with pytest.raises(ValueError, match=r"fastclip: .*\['0'\].*no bound.*float max_grad_norm.*"
                                         r"one bound per layer of: 0, 2, 4"):
        m(x)
    # the plan is unchanged; the step is refused too, before anything is released
    assert [layer.name for layer in opt.engine.layers] == ["2", "4"]
    with pytest.raises(ValueError, match="no bound"):
        opt.step()
    assert torch.equal(start, flat_params(m)) and opt.steps == 0
    m[0].requires_grad_(False)      # undone: training goes on
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    opt.step()
    assert opt.steps == 1 and not torch.equal(start, flat_params(m))


# ---- replaced parameters ---------------------------------------------------------------------

def _assign(m):
    sd = {k: v.clone() + 0.01 for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)


def _set_weight(m):
    m[2].weight = nn.Parameter(m[2].weight.detach().clone() + 0.01)


@pytest.mark.parametrize("replace", [_assign, _set_weight], ids=["assign", "setattr"])
@pytest.mark.parametrize("mode", MODES)
def test_replaced_parameter_held_by_the_optimizer_is_refused(mode, replace):
    """The optimizer holds the old, detached parameter: refused at the step with its name and
    the fix; nothing moves, nothing is accounted."""
    x, y = data(torch.float64)
    m, opt, _ = private(mlp(), C=C, mode=mode)
    old = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    replace(m)
    start = flat_params(m)
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    # the model's own (new) parameters are clipped exactly ...
    assert_close(torch.cat([p.grad.flatten() for p in m.parameters()]),
                 reference_update(plain(start), x, y, "flat"), torch.float64)
    # ... but the optimizer would step the old ones
    with pytest.raises(ValueError, match=r"fastclip: the optimizer holds the former '(0|2)\.weight'"
                                         r".*re-create the optimizer over model.parameters\(\) and "
                                         r"call make_private again, or load with assign=False"):
        opt.step()
    assert torch.equal(start, flat_params(m)) and opt.steps == 0
    assert all(torch.equal(a, p) for a, p in zip(old, [p for g in opt.param_groups
                                                        for p in g["params"]]))


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_replaced_parameter_works_when_the_optimizer_holds_the_new_one(mode, clipping):
    x, y = data(torch.float64)
    m, opt, _ = private(mlp(), C=C, mode=mode, clipping=clipping)
    _assign(m)
    opt.param_groups[0]["params"] = list(m.parameters())
    start = flat_params(m)
    ref = plain(start)
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    opt.step()
    assert_close(start - flat_params(m), reference_update(ref, x, y, clipping), torch.float64)
    assert opt.steps == 1


# ---- parameters outside the model, raw gradients -----------------------------------------------

def test_optimizer_parameter_not_in_the_model_is_refused_at_make_private():
    m = mlp()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.SGD(list(m.parameters()) + [extra], lr=1.0)
    import fastclip
    with pytest.raises(ValueError, match=r"fastclip: the optimizer holds a parameter not in the "
                                         r"private model \(shape \(3,\)\)"):
        fastclip.make_private(m, opt, None, noise_multiplier=0.0, max_grad_norm=C)


@pytest.mark.parametrize("mode", MODES)
def test_head_added_to_the_optimizer_but_used_outside_the_model_is_refused(mode):
    """A head in the optimizer, applied to the model's output outside the model: its raw
    gradient is refused at the step; nothing moves."""
    x, y = data(torch.float64)
    m, opt, _ = private(mlp(), C=C, mode=mode)
    h = head()
    opt.add_param_group({"params": list(h.parameters())})
    start, hstart = flat_params(m), flat_params(h)
    opt.zero_grad()
    CE(h(m(x)), y).sum().backward()
    with pytest.raises(ValueError, match="not in the private model.*make it part of the model"):
        opt.step()
    assert torch.equal(start, flat_params(m)) and torch.equal(hstart, flat_params(h))
    assert opt.steps == 0


@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
def test_raw_gradient_of_an_unfrozen_layer_called_outside_the_model_is_refused(mode):
    """Unfrozen, then used through its submodules directly (the root's call, where the engine
    re-plans, never runs): autograd's raw gradient is in p.grad. The step re-plans (the layer is
    covered now) and refuses the gradient it did not write."""
    x, y = data(torch.float64)
    m = mlp()
    m[0].requires_grad_(False)
    m, opt, _ = private(m, C=C, mode=mode)
    m[0].requires_grad_(True)
    start = flat_params(m)
    opt.zero_grad()
    out = m[4](m[3](m[2](m[1](m[0](x)))))
    CE(out, y).sum().backward()
    assert m[0].weight.grad is not None
    with pytest.raises(RuntimeError, match=r"fastclip: parameter '0\.(weight|bias)' has a gradient "
                                           r"fastclip did not write.*zero_grad"):
        opt.step()
    assert torch.equal(start, flat_params(m)) and opt.steps == 0
    opt.zero_grad()      # the fix: through the model itself
    CE(m(x), y).sum().backward()
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize("mode", MODES)
def test_gradient_assigned_by_hand_is_refused(mode):
    x, y = data(torch.float64)
    m, opt, _ = private(m := mlp(), C=C, mode=mode)
    opt.zero_grad()
    CE(m(x), y).sum().backward()
    m[4].bias.grad = torch.ones_like(m[4].bias)
    start = flat_params(m)
    with pytest.raises(RuntimeError, match=r"'4\.bias' has a gradient fastclip did not write"):
        opt.step()
    assert torch.equal(start, flat_params(m)) and opt.steps == 0


@pytest.mark.parametrize("mode", MODES)
def test_zero_grad_in_place_and_noise_are_not_refused(mode):
    """Gradients fastclip released or zeroed in place (set_to_none=False; noise creates p.grad
    for a parameter without one) are accumulated into at later steps, not refused."""
    x, y = data(torch.float64)
    m = mlp()
    m, opt, _ = private(m, C=C, mode=mode, noise_multiplier=1.0)
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        if step == 1:
            m[4].requires_grad_(False)     # no gradient for it this step: noise creates one
        if step == 2:
            m[4].requires_grad_(True)
        CE(m(x), y).sum().backward()
        opt.step()
    assert opt.steps == 3


def test_nanobatch_forward_before_the_change_backpropagated_after_is_refused():
    x, y = data(torch.float64)
    m = mlp()
    m[0].requires_grad_(False)
    m, opt, _ = private(m, C=C, mode="nanobatch")
    opt.zero_grad()
    loss1 = CE(m(x), y).sum()
    m[0].requires_grad_(True)
    loss2 = CE(m(x), y).sum()
    with pytest.raises(RuntimeError, match="forward made before the model's trainable parameters "
                                           "changed"):
        (loss1 + loss2).backward()
    assert all(p.grad is None for p in m.parameters())


# ---- the per-forward check -------------------------------------------------------------------

def test_refresh_sees_every_kind_of_change_and_nothing_else():
    from fastclip.engine import Engine
    m = mlp()
    e = Engine(m, max_grad_norm=C)
    assert not e.refresh() and not e.refresh(full=True)
    nn.Linear(2, 2)                         # another model's registrations: no change here
    assert not e.refresh()
    m[0].weight.requires_grad_(False)
    assert e.refresh() and not e.covers(m[0].weight) and e.covers(m[0].bias)
    m[2].weight = nn.Parameter(m[2].weight.detach().clone())
    assert e.refresh() and e.covers(m[2].weight)
    m.append(nn.Linear(3, 2).double())
    assert e.refresh() and e.covers(m[5].weight)
    m[4]._parameters["bias"] = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # no hook sees it
    assert e.refresh(full=True) and e.covers(m[4].bias)
    assert not e.refresh(full=True)
    e.detach()
    m[0].weight.requires_grad_(True)
    assert not e.refresh()                  # a detached engine stays detached


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_forward_before_the_change_backpropagated_with_one_after(change, mode, clipping):
    """loss1 from a forward before the change, loss2 after it (the engine re-planned in
    between), one backward of loss1 + loss2: each example's gradient is that of its two losses,
    over the parameters trainable now (a layer frozen in forward 1 was a constant there)."""
    x, y = data(torch.float64)
    m = mlp()
    if change == "unfreeze":
        m[0].requires_grad_(False)
    m, opt, _ = private(m, C=C, mode=mode, clipping=clipping)
    start = flat_params(m)
    opt.zero_grad()
    loss1 = CE(m(x), y).sum()
    m[0 if change == "unfreeze" else 4].requires_grad_(change == "unfreeze")
    loss2 = CE(m(x * 0.5), y).sum()
    (loss1 + loss2).backward()
    opt.step()
    before, after = plain(start), plain(start)
    if change == "unfreeze":
        before[0].requires_grad_(False)
    else:
        after[4].requires_grad_(False)
    g1 = R.per_example_grads(before, CE, x, y)
    g2 = R.per_example_grads(after, CE, x * 0.5, y)
    g = {n: g1.get(n, 0) + g2[n] for n in g2}   # the parameters trainable now
    groups = ([list(g)] if clipping == "flat" else
              [[n for n in g if n.startswith(layer + ".")] for layer in layer_names(after)])
    bound = C if clipping == "flat" else C / math.sqrt(len(groups))
    want = {}
    for names in groups:
        norm = sum(g[n].flatten(1).square().sum(1) for n in names).sqrt()
        for n in names:
            want[n] = torch.tensordot(torch.clamp(bound / norm, max=1.0), g[n], dims=1)
    ref = torch.cat([want[n].flatten() if n in want else torch.zeros(p.numel(), dtype=torch.float64)
                     for n, p in after.named_parameters()])
    assert_close(start - flat_params(m), ref, torch.float64)
