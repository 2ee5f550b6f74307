"""The transporter against autograd Jacobians, its inverse, cached decoding and causality."""

import math

import pytest
import torch
from conftest import randomize

from ntm.config import DataSpec, NTMConfig, TransporterConfig
from ntm.transporter import AffineARBlock, Transporter


TRANSFORMS = ["affine", "spline", "spline-gated"]  # "-gated": with the coupling gate


def _cfg(transform: str, **kw) -> TransporterConfig:
    return TransporterConfig(transform=transform.removesuffix("-gated"), coupling_gate=transform.endswith("-gated"), **kw)


def _transporter(blocks=2, layers=2, N=5, D=3, seed=0, transform="affine"):
    torch.manual_seed(seed)
    tr = Transporter(_cfg(transform, blocks=blocks, layers=layers, width=16, heads=2, spline_bound=2.0), N, D)
    # splines compound the slopes of every block: a milder perturbation keeps the fp32 flow well conditioned
    randomize(tr, 0.3 if transform == "affine" else 0.12, seed)
    return tr.eval()


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("blocks,layers", [(1, 1), (2, 2), (3, 4)])
def test_logdet_equals_slogdet_of_autograd_jacobian(blocks, layers, transform):
    N, D = 4, 2
    tr = _transporter(blocks, layers, N, D, transform=transform)
    for t in (0.0, 0.3, 0.9):
        x = torch.randn(1, N, D)
        tt = torch.tensor([t])
        with torch.no_grad():
            u, logdet = tr(x, tt)
        J = torch.autograd.functional.jacobian(lambda z: tr(z.reshape(1, N, D), tt)[0].reshape(-1), x.reshape(-1))
        sign, logabs = torch.linalg.slogdet(J.double())
        assert sign != 0
        assert float(logdet) == pytest.approx(float(logabs), abs=1e-4)
        assert float(logdet) != pytest.approx(0.0, abs=1e-3)  # the weights really transform


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_inverse_round_trip_and_cached_equals_uncached(transform):
    tr = _transporter(2, 2, N=6, D=3, transform=transform)
    x = torch.randn(8, 6, 3)
    t = torch.rand(8) * 0.9
    u, _ = tr(x, t)
    with torch.no_grad():
        x_cached = tr.inverse(u, t, use_cache=True)
        x_plain = tr.inverse(u, t, use_cache=False)
    assert torch.allclose(x_cached, x, atol=1e-4)
    assert torch.allclose(x_cached, x_plain, atol=1e-5)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("flip", [False, True])
def test_block_is_causal_in_scan_order(flip, transform):
    torch.manual_seed(0)
    N, D = 6, 2
    block = AffineARBlock(_cfg(transform, width=16, heads=2, layers=2), N, D, flip=flip)
    randomize(block, 0.3)
    x = torch.randn(1, N, D)
    t = torch.tensor([0.4])
    u, _ = block(x, t)
    order = list(range(N))[::-1] if flip else list(range(N))
    for pos in range(N):
        n = order[pos]
        x2 = x.clone()
        x2[0, n] += 1.0
        u2, _ = block(x2, t)
        before = order[:pos]
        after = order[pos + 1:]
        if before:
            assert torch.allclose(u2[0, before], u[0, before], atol=0)
        assert not torch.allclose(u2[0, n], u[0, n])  # every token is transformed (by its own value)
        if after:
            assert not torch.allclose(u2[0, after], u[0, after])


def test_identity_at_init_and_at_t_equal_one():
    torch.manual_seed(0)
    fresh = Transporter(TransporterConfig(width=16, heads=2), 5, 2)
    x = torch.randn(4, 5, 2)
    t = torch.rand(4)
    u, ld = fresh(x, t)
    assert torch.equal(u, x) and torch.equal(ld, torch.zeros(4))
    tr = _transporter(2, 2, N=5, D=2)
    t = torch.tensor([0.5, 1.0, 0.2, 1.0])
    u, ld = tr(x, t)
    assert torch.equal(u[[1, 3]], x[[1, 3]]) and torch.equal(ld[[1, 3]], torch.zeros(2))
    assert not torch.allclose(u[[0, 2]], x[[0, 2]])
    assert torch.equal(tr.inverse(u, t)[[1, 3]], x[[1, 3]])


def test_coupling_gate_starts_open_and_closed_makes_the_jacobian_diagonal():
    """A new gate leaves the blocks as they were; a closed gate (1 + tanh -> 0) leaves each token's
    map depending on its own value only, so the Jacobian is diagonal and the log-det its log-diagonal."""
    N, D = 5, 2
    gated = _transporter(2, 1, N, D, transform="spline-gated")
    plain = Transporter(_cfg("spline", blocks=2, layers=1, width=16, heads=2, spline_bound=2.0), N, D).eval()
    keys = plain.load_state_dict(gated.state_dict(), strict=False)
    assert keys.unexpected_keys and all(".gate." in k for k in keys.unexpected_keys) and not keys.missing_keys
    x, t = torch.randn(3, N, D), torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        for block in gated.blocks:  # the randomised gate: back to its initial state
            block.gate.weight.zero_(), block.gate.bias.zero_()
        assert torch.allclose(gated(x, t)[0], plain(x, t)[0], atol=1e-6)
        for block in gated.blocks:
            block.gate.bias.fill_(-30.0)
    tt = t[:1]
    J = torch.autograd.functional.jacobian(lambda z: gated(z.reshape(1, N, D), tt)[0].reshape(-1), x[0].reshape(-1))
    off = J - torch.diag(J.diagonal())
    assert off.abs().max() < 1e-6 and (J.diagonal() - 1).abs().max() > 1e-2  # element-wise, not the identity
    assert float(gated(x[:1], tt)[1].detach()) == pytest.approx(float(J.diagonal().log().sum()), abs=1e-4)
    with torch.no_grad():
        u, _ = gated(x, t)
        assert torch.allclose(gated.inverse(u, t), x, atol=1e-4)


def test_coupling_t_max_makes_the_blocks_element_wise_above_it():
    """With coupling_t_max = 0.5 the Jacobian is diagonal at t = 0.7 and not at t = 0.2, and the
    inverse (sequential and Jacobi) still undoes the map at both levels."""
    N, D = 4, 2
    torch.manual_seed(0)
    tr = Transporter(TransporterConfig(blocks=2, layers=1, width=16, heads=2, transform="spline", spline_bound=2.0,
                                       coupling_t_max=0.5), N, D)
    randomize(tr, 0.12, 0)
    tr.eval()
    x = torch.randn(2, N, D)
    for level, coupled in ((0.7, False), (0.2, True)):
        tt = torch.tensor([level])
        J = torch.autograd.functional.jacobian(lambda z: tr(z.reshape(1, N, D), tt)[0].reshape(-1), x[0].reshape(-1))
        off = (J - torch.diag(J.diagonal())).abs().max()
        assert (off > 1e-3) if coupled else (off < 1e-7)
        with torch.no_grad():
            t2 = tt.expand(2)
            u, _ = tr(x, t2)
            assert torch.allclose(tr.inverse(u, t2), x, atol=1e-4)
            assert torch.allclose(tr.inverse(u, t2, method="jacobi"), x, atol=1e-4)
    from ntm.config import validate_model_config

    cfg = NTMConfig(data=DataSpec(shape=(2,), mean=(0.0, 0.0), std=(1.0, 1.0)),
                    transporter=TransporterConfig(coupling_t_max=0.0))
    with pytest.raises(ValueError, match="coupling_t_max"):
        validate_model_config(cfg)


def test_disabled_transporter_is_identity():
    tr = Transporter(TransporterConfig(enabled=False), 3, 1)
    x = torch.randn(2, 3, 1)
    u, ld = tr(x, torch.tensor([0.1, 0.5]))
    assert torch.equal(u, x) and torch.equal(ld, torch.zeros(2))
    assert len(list(tr.parameters())) == 0



def test_spline_round_trip_slopes_and_identity_at_zero():
    """The spline alone: exact inverse, log-derivative equal to autograd's, identity for zero parameters
    and outside the bound, and bending inside it."""
    from ntm.splines import spline_forward, spline_inverse

    torch.manual_seed(0)
    x = (torch.randn(4000) * 3).double()
    raw = torch.randn(4000, 23).double()
    y, logd = spline_forward(x, raw, 8, 4.0)
    assert torch.allclose(spline_inverse(y, raw, 8, 4.0), x, atol=1e-9)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(spline_forward(xg, raw, 8, 4.0)[0].sum(), xg)
    assert torch.allclose(g.log(), logd, atol=1e-9) and (g > 0).all()
    outside = x.abs() >= 4.0
    assert torch.equal(y[outside], x[outside]) and (y[~outside] - x[~outside]).abs().max() > 0.1
    y0, l0 = spline_forward(x, torch.zeros_like(raw), 8, 4.0)
    assert torch.allclose(y0, x, atol=1e-12) and l0.abs().max() < 1e-12


def _reference_spline(x: float, raw: torch.Tensor, bins: int, bound: float) -> tuple[float, float]:
    """One element of the rational-quadratic spline, written the plain way (Durkan et al. 2019, eq. 4
    and its derivative): all knots built in Python from the softmax of the logits, bin found by a scan."""
    from ntm.splines import MIN_BIN, MIN_SLOPE

    if not -bound < x < bound:
        return x, 0.0
    r = raw.double().tolist()
    def sizes(logits):
        p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).tolist()
        return [2 * bound * (MIN_BIN + (1 - MIN_BIN * bins) * v) for v in p]
    w, h = sizes(r[:bins]), sizes(r[bins:2 * bins])
    slopes = [1.0] + [MIN_SLOPE + math.log1p(math.exp(v + math.log(math.expm1(1 - MIN_SLOPE))))
                      for v in r[2 * bins:]] + [1.0]
    xk, yk = -bound, -bound
    for k in range(bins):
        if x < xk + w[k] or k == bins - 1:
            break
        xk, yk = xk + w[k], yk + h[k]
    wk, hk = (bound - xk, bound - yk) if k == bins - 1 else (w[k], h[k])
    s, d0, d1 = hk / wk, slopes[k], slopes[k + 1]
    th = (x - xk) / wk
    den = s + (d1 + d0 - 2 * s) * th * (1 - th)
    y = yk + hk * (s * th**2 + d0 * th * (1 - th)) / den
    dy = s**2 * (d1 * th**2 + 2 * s * th * (1 - th) + d0 * (1 - th) ** 2) / den**2
    return y, math.log(dy)


def test_spline_matches_a_plain_reference_and_its_inverse():
    from ntm.splines import spline_forward, spline_inverse

    torch.manual_seed(1)
    x = (torch.randn(300) * 2.5).double()
    raw = (torch.randn(300, 23) * 1.5).double()
    y, logd = spline_forward(x, raw, 8, 4.0)
    ref = torch.tensor([_reference_spline(float(x[i]), raw[i], 8, 4.0) for i in range(300)], dtype=torch.float64)
    assert torch.allclose(y, ref[:, 0], atol=1e-10) and torch.allclose(logd, ref[:, 1], atol=1e-9)
    assert torch.allclose(spline_inverse(ref[:, 0], raw, 8, 4.0), x, atol=1e-9)
    # low-precision autocast (bf16 on CUDA in training) leaves the spline's own arithmetic alone
    xf, rf = x.float(), raw.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, la = spline_forward(xf, rf, 8, 4.0)
    yf, lf = spline_forward(xf, rf, 8, 4.0)
    assert ya.dtype == torch.float32 and torch.equal(ya, yf) and torch.equal(la, lf)


def test_jacobi_inverse_with_splines():
    tr = _transporter(2, 1, N=7, D=2, transform="spline")
    x, t = torch.randn(5, 7, 2), torch.rand(5) * 0.9
    with torch.no_grad():
        u, _ = tr(x, t)
        assert torch.allclose(tr.inverse(u, t, method="jacobi"), x, atol=1e-4)



def _table_spline(x: torch.Tensor, raw: torch.Tensor, bins: int, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The spline through its full knot tables (softmax, cumsum, padded slopes, gather at the bin):
    the textbook autograd graph, to check the library's gradients against."""
    from ntm.splines import MIN_BIN, MIN_SLOPE

    w = 2 * bound * (MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(raw[:, :bins], -1))
    h = 2 * bound * (MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(raw[:, bins:2 * bins], -1))
    zero = torch.zeros_like(x)[:, None]
    xk = torch.cat([zero, w.cumsum(-1)], -1) - bound
    yk = torch.cat([zero, h.cumsum(-1)], -1) - bound
    one = torch.ones_like(zero)
    d = torch.cat([one, MIN_SLOPE + torch.nn.functional.softplus(raw[:, 2 * bins:] + math.log(math.expm1(1 - MIN_SLOPE))),
                   one], -1)
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    k = (xc[:, None] >= xk[:, 1:bins]).sum(-1, keepdim=True)
    at = lambda tab: tab.gather(-1, k)[:, 0]
    x0, y0, d0, d1 = at(xk), at(yk), at(d), d.gather(-1, k + 1)[:, 0]
    wk, hk = at(xk[:, 1:]) - x0, at(yk[:, 1:]) - y0
    s, th = hk / wk, (xc - x0) / wk
    den = s + (d1 + d0 - 2 * s) * th * (1 - th)
    y = y0 + hk * (s * th**2 + d0 * th * (1 - th)) / den
    dy = s**2 * (d1 * th**2 + 2 * s * th * (1 - th) + d0 * (1 - th) ** 2) / den**2
    return torch.where(inside, y, x), torch.where(inside, dy.log(), torch.zeros_like(x))


def test_spline_gradients_match_the_knot_table_graph_and_finite_differences():
    """The bin-major bin lookup (bin counted without gradient, masked sums) gives the gradients of
    the textbook graph in x and in every raw parameter, and passes gradcheck."""
    from ntm.splines import spline_forward

    torch.manual_seed(2)
    x = (torch.randn(2000) * 2.5).double().requires_grad_()
    raw = (torch.randn(2000, 23) * 1.5).double().requires_grad_()
    a, b = torch.randn(2000).double(), torch.randn(2000).double()
    grads = []
    for fn in (spline_forward, _table_spline):
        y, logd = fn(x, raw, 8, 4.0)
        grads.append(torch.autograd.grad((a * y + b * logd).sum(), (x, raw)))
    for mine, ref in zip(*grads):
        assert torch.allclose(mine, ref, atol=1e-9, rtol=1e-9)
    assert grads[0][1][:, :16].abs().max() > 0.01 and grads[0][1][:, 16:].abs().max() > 0.01  # both kinds move
    xs, rs = x[:12].detach().clone().requires_grad_(), raw[:12].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda u, r: spline_forward(u, r, 8, 4.0), (xs, rs))

def test_spline_blocks_limits_the_splines_to_the_first_blocks():
    from ntm.config import NTMConfig, validate_model_config

    tr = Transporter(TransporterConfig(blocks=3, layers=1, width=16, heads=2, transform="spline", spline_blocks=1,
                                       spline_bound=2.0), 4, 2)
    assert [b.spline for b in tr.blocks] == [True, False, False]
    assert tr.blocks[0].proj_out.out_features > tr.blocks[1].proj_out.out_features
    randomize(tr, 0.12, 0)
    x, t = torch.randn(1, 4, 2), torch.tensor([0.3])
    with torch.no_grad():
        u, logdet = tr.eval()(x, t)
    J = torch.autograd.functional.jacobian(lambda z: tr(z.reshape(1, 4, 2), t)[0].reshape(-1), x.reshape(-1))
    assert float(logdet) == pytest.approx(float(torch.linalg.slogdet(J.double())[1]), abs=1e-4)
    with pytest.raises(ValueError, match="spline_blocks"):
        validate_model_config(NTMConfig(transporter=TransporterConfig(blocks=2, transform="spline", spline_blocks=3)))


@pytest.mark.parametrize("gated", [False, True])
def test_shared_level_pass_and_identity_rows_equal_a_row_by_row_pass(gated):
    """A batch mixing coupled levels, element-wise levels (shared network pass per distinct (t, T))
    and t = 1 rows gives the same u, log-det and parameter gradients as transporting each row on
    its own (one level per call, nothing shared); the t = 1 rows are the identity."""
    N, D = 4, 2
    torch.manual_seed(0)
    tr = Transporter(TransporterConfig(blocks=2, layers=1, width=16, heads=2, transform="spline", spline_bound=2.0,
                                       coupling_t_max=0.5, coupling_gate=gated), N, D, multi_T=True)
    randomize(tr, 0.12, 0)
    x = torch.randn(9, N, D)
    t = torch.tensor([0.2, 0.7, 1.0, 0.7, 0.0, 0.9, 0.7, 1.0, 0.9])
    T = torch.tensor([4.0, 4.0, 4.0, 8.0, 4.0, 8.0, 4.0, 8.0, 8.0])  # (0.7, 4) repeats; (0.7, 8) is its own level

    def reference_row(i: int):  # one row: a single level, nothing to share
        return tr(x[i:i + 1], t[i:i + 1], T[i:i + 1])

    u, ld = tr(x, t, T)
    (u.square().sum() + ld.sum()).backward()
    grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None}
    tr.zero_grad()
    ref = [reference_row(i) for i in range(len(t))]
    u_ref, ld_ref = torch.cat([r[0] for r in ref]), torch.cat([r[1] for r in ref])
    (u_ref.square().sum() + ld_ref.sum()).backward()
    # fp32 (the transporter's arithmetic): batched and one-row matmuls round differently, ~1e-5
    assert torch.allclose(u, u_ref, atol=1e-4) and torch.allclose(ld, ld_ref, atol=1e-4)
    last = t >= 1
    assert torch.equal(u[last], x[last]) and torch.equal(ld[last], torch.zeros(int(last.sum())))
    for n, p in tr.named_parameters():
        if p.grad is not None:
            assert (grads[n] - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6, n


def test_shared_splines_match_per_element_splines_in_values_and_gradients():
    """spline_forward with ``index`` (C distinct splines shared by M elements) equals the per-element
    call on the expanded parameters, values and gradients in x and in the shared raw parameters."""
    from ntm.splines import spline_forward

    torch.manual_seed(3)
    C, M = 7, 3000
    x = (torch.randn(M) * 2.5).double().requires_grad_()
    table = (torch.randn(C, 23) * 1.5).double().requires_grad_()
    index = torch.randint(0, C, (M,))
    a, b = torch.randn(M).double(), torch.randn(M).double()
    y, logd = spline_forward(x, table, 8, 4.0, index=index)
    g = torch.autograd.grad((a * y + b * logd).sum(), (x, table))
    y_ref, logd_ref = spline_forward(x, table[index], 8, 4.0)
    g_ref = torch.autograd.grad((a * y_ref + b * logd_ref).sum(), (x, table))
    assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(logd, logd_ref, atol=1e-10)
    for mine, ref in zip(g, g_ref):
        assert torch.allclose(mine, ref, atol=1e-9, rtol=1e-9)
    assert (y - x).abs().max() > 0.1 and g[1].abs().max() > 0.01
