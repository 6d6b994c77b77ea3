"""04_distill's losses and attention capture (spatialstudy.methods.distill), each checked against a direct computation
written here independently: explicit loops over batch, heads, positions and query rows with plain torch.log /
torch.exp in float64, never calling the module's helpers or F.kl_div the way the module does.

Shapes throughout keep the real pair's mismatches: H_T != H_S (7B 28 heads vs 3B 16) and V_S != V_T (151,936 vs
152,064 rows). The capture is checked on the real random tiny student (Qwen2.5-VL classes, eager attention) against
the maps transformers itself returns with output_attentions=True.
"""
import math
import os
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.utils.checkpoint
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spatialstudy.methods.distill import (  # noqa: E402
    AttentionCapture, answer_rows, attention_kd_loss, decoder_layers, grouped_attention_kd, head_weights,
    layer_groups, layer_map, logit_kd_loss, masked_ce, stacked_heads, weight_entropy)

IGNORE = -100
SIMS = ("dot", "cosine", "l1")


# ---------------------------------------------------------------- direct (reference) computations
def _log_softmax_row(z: torch.Tensor) -> torch.Tensor:
    """log softmax of one 1-D row, by hand (max-shifted log-sum-exp), in float64."""
    z = z.double()
    m = z.max()
    return z - m - torch.log(torch.exp(z - m).sum())


def direct_logit_kd(zs, zt, labels, alpha, T, ignore_index=IGNORE):
    """(loss, ce, kl) with an explicit loop over (b, t): both vocabularies cut to the smaller one."""
    v = min(zs.shape[-1], zt.shape[-1])
    ce_terms, kl_terms = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == ignore_index:
                continue
            ce_terms.append(-_log_softmax_row(zs[b, t, :v])[y])
            log_p = _log_softmax_row(zt[b, t, :v] / T)
            log_q = _log_softmax_row(zs[b, t, :v] / T)
            kl_terms.append(sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p.tolist(), log_q.tolist())))
    ce = float(sum(ce_terms) / len(ce_terms))
    kl = float(sum(kl_terms) / len(kl_terms))
    return alpha * ce + (1 - alpha) * T * T * kl, ce, kl


def direct_head_weights(t, s, similarity, query_mask=None):
    """[B, H_T, H_S] by loops: sim of the flattened (masked) maps, then a hand-written softmax over student heads."""
    t, s = t.double().clone(), s.double().clone()
    B, HT, Q, _ = t.shape
    HS = s.shape[1]
    if query_mask is not None:
        for b in range(B):
            for q in range(Q):
                if not bool(query_mask[b, q]):
                    t[b, :, q, :] = 0.0
                    s[b, :, q, :] = 0.0
    w = torch.zeros(B, HT, HS, dtype=torch.float64)
    for b in range(B):
        for i in range(HT):
            ti = t[b, i].reshape(-1)
            sims = []
            for j in range(HS):
                sj = s[b, j].reshape(-1)
                if similarity == "dot":
                    sims.append(float((ti * sj).sum()))
                elif similarity == "cosine":
                    sims.append(float((ti * sj).sum() / (ti.pow(2).sum().sqrt() * sj.pow(2).sum().sqrt())))
                elif similarity == "l1":
                    sims.append(float(((ti / ti.abs().sum()) * (sj / sj.abs().sum())).sum()))
            m = max(sims)
            e = [math.exp(x - m) for x in sims]
            for j in range(HS):
                w[b, i, j] = e[j] / sum(e)
    return w


def direct_attention_kd(t, s, similarity, query_mask=None, weights=None):
    """sum over teacher heads of KL(t_i || sum_j w_ij s_j) per query row, averaged over the (b, q) rows in the mask:
    loops over b, i and q; 0 log 0 = 0 written out."""
    w = direct_head_weights(t, s, similarity, query_mask) if weights is None else weights
    t, s = t.double(), s.double()
    B, HT, Q, K = t.shape
    total, rows = 0.0, 0
    for b in range(B):
        for q in range(Q):
            if query_mask is not None and not bool(query_mask[b, q]):
                continue
            rows += 1
            for i in range(HT):
                mix = sum(w[b, i, j] * s[b, j, q] for j in range(s.shape[1]))
                p = t[b, i, q]
                nz = p > 0
                total += float((p[nz] * (torch.log(p[nz]) - torch.log(mix[nz]))).sum())
    return total / rows


def _maps(B, H, Q, K, seed, causal=False, temp=1.0):
    """Random attention maps [B, H, Q, K]: probability rows; `causal` puts exact zeros above the diagonal
    (query q sees keys <= q + K - Q, as a decoder's rows do)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, H, Q, K, generator=g) * temp
    if causal:
        allowed = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
        z = z.masked_fill(~allowed, float("-inf"))
    return torch.softmax(z, -1)


def _one_hot_maps(B, shifts, Q, K):
    """Peaked maps: head h's row q attends key (q + shifts[h]) % K only. Distinct shifts (mod K) never agree on a
    row, so two different heads' flattened maps have dot product 0 and a head with itself has dot product Q."""
    out = torch.zeros(B, len(shifts), Q, K)
    for h, sh in enumerate(shifts):
        for q in range(Q):
            out[:, h, q, (q + sh) % K] = 1.0
    return out


def _logits(B, L, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, V, generator=g) * scale


def _labels(B, L, V, seed, masked_frac=0.4):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, L), generator=g)
    y[torch.rand(B, L, generator=g) < masked_frac] = IGNORE
    y[0, 0] = 1  # at least one real label
    return y


# ---------------------------------------------------------------- logit KD
@pytest.mark.parametrize("B,L,VS,VT", [(2, 5, 11, 13), (1, 7, 17, 17), (3, 4, 9, 6)])
@pytest.mark.parametrize("alpha,T", [(0.5, 1.5), (0.0, 1.0), (1.0, 2.0), (0.3, 4.0)])
def test_logit_kd_matches_direct_loop(B, L, VS, VT, alpha, T):
    zs, zt = _logits(B, L, VS, 1), _logits(B, L, VT, 2)
    y = _labels(B, L, min(VS, VT), 3)
    want, _, _ = direct_logit_kd(zs, zt, y, alpha, T)
    got = logit_kd_loss(zs, zt, y, alpha=alpha, temperature=T)
    assert got.dim() == 0
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("T", [0.7, 1.0, 1.5, 3.0])
def test_identical_logits_zero_kl(T):
    """Teacher = student: alpha = 0 gives 0; alpha = 1 is the plain CE (direct -log softmax at the label); any alpha
    is alpha * CE. The teacher may carry extra vocab rows (sliced away) and still be identical."""
    zs = _logits(2, 6, 12, 4)
    extra = _logits(2, 6, 5, 5) * 10
    y = _labels(2, 6, 12, 6)
    _, ce, _ = direct_logit_kd(zs, zs, y, 1.0, T)
    for zt in (zs.clone(), torch.cat([zs, extra], -1)):
        assert float(logit_kd_loss(zs, zt, y, alpha=0.0, temperature=T)) == pytest.approx(0.0, abs=1e-6)
        assert float(logit_kd_loss(zs, zt, y, alpha=1.0, temperature=T)) == pytest.approx(ce, rel=1e-5)
        assert float(logit_kd_loss(zs, zt, y, alpha=0.25, temperature=T)) == pytest.approx(0.25 * ce, rel=1e-5)
    assert float(masked_ce(zs, y)) == pytest.approx(ce, rel=1e-5)


def test_temperature_squared_scaling():
    """alpha = 0 is T^2 * KL_T exactly, KL_T the direct KL between the T-softened distributions; the loss is affine
    in alpha with the CE and T^2 KL_T as end points; doubling T on logits that are themselves doubled leaves KL_T the
    same, so the loss quadruples."""
    zs, zt = _logits(2, 5, 10, 7), _logits(2, 5, 10, 8)
    y = _labels(2, 5, 10, 9)
    for T in (0.5, 1.0, 2.0, 3.0):
        _, ce, kl = direct_logit_kd(zs, zt, y, 0.0, T)
        assert float(logit_kd_loss(zs, zt, y, alpha=0.0, temperature=T)) == pytest.approx(T * T * kl, rel=1e-5)
        for a in (0.2, 0.5, 0.9):
            got = float(logit_kd_loss(zs, zt, y, alpha=a, temperature=T))
            assert got == pytest.approx(a * ce + (1 - a) * T * T * kl, rel=1e-5)
    # KL at T on (zs, zt) == KL at 2T on (2 zs, 2 zt): the T^2 factor alone makes the second 4x the first
    k1 = float(logit_kd_loss(zs, zt, y, alpha=0.0, temperature=1.5))
    k2 = float(logit_kd_loss(2 * zs, 2 * zt, y, alpha=0.0, temperature=3.0))
    assert k2 == pytest.approx(4 * k1, rel=1e-5)


@pytest.mark.parametrize("ignore_index", [IGNORE, -1])
def test_masked_positions_change_nothing(ignore_index):
    """Logits of either model at label-masked positions can be anything: same loss, and zero gradient there."""
    B, L, VS, VT = 2, 8, 11, 14
    zs, zt = _logits(B, L, VS, 10), _logits(B, L, VT, 11)
    y = _labels(B, L, VS, 12).masked_fill(_labels(B, L, VS, 12) == IGNORE, ignore_index)
    masked = y == ignore_index
    assert masked.any() and (~masked).any()
    base = logit_kd_loss(zs, zt, y, alpha=0.4, temperature=2.0, ignore_index=ignore_index)
    zs2, zt2 = zs.clone(), zt.clone()
    zs2[masked] = torch.randn(int(masked.sum()), VS) * 50
    zt2[masked] = torch.randn(int(masked.sum()), VT) * 50 + 7
    zs2.requires_grad_(True)
    again = logit_kd_loss(zs2, zt2, y, alpha=0.4, temperature=2.0, ignore_index=ignore_index)
    assert float(again.detach()) == pytest.approx(float(base), rel=1e-6)
    want, _, _ = direct_logit_kd(zs, zt, y, 0.4, 2.0, ignore_index=ignore_index)
    assert float(base) == pytest.approx(want, rel=1e-5)
    again.backward()
    assert zs2.grad[masked].abs().max() == 0
    assert zs2.grad[~masked].abs().max() > 0


def test_all_positions_masked_is_zero_and_backpropagates():
    zs = _logits(2, 3, 8, 13).requires_grad_(True)
    y = torch.full((2, 3), IGNORE)
    loss = logit_kd_loss(zs, _logits(2, 3, 9, 14), y, alpha=0.5, temperature=1.5)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(zs.grad, torch.zeros_like(zs))


@pytest.mark.parametrize("VS,VT", [(10, 16), (16, 10)])
def test_vocab_slicing_equals_presliced(VS, VT):
    """A model with extra vocab rows gives the same loss as that model cut to the smaller vocabulary, whatever the
    extra rows hold (no broadcasting, no renormalisation over the padding rows)."""
    zs, zt = _logits(2, 6, VS, 15), _logits(2, 6, VT, 16)
    v = min(VS, VT)
    y = _labels(2, 6, v, 17)
    full = logit_kd_loss(zs, zt, y, alpha=0.5, temperature=1.5)
    cut = logit_kd_loss(zs[..., :v], zt[..., :v], y, alpha=0.5, temperature=1.5)
    assert float(full) == pytest.approx(float(cut), rel=1e-6)
    zs3, zt3 = zs.clone(), zt.clone()
    zs3[..., v:] += 100.0
    zt3[..., v:] -= 100.0
    assert float(logit_kd_loss(zs3, zt3, y, alpha=0.5, temperature=1.5)) == pytest.approx(float(cut), rel=1e-6)


def test_bf16_logits_computed_in_float32():
    """bf16 logits (as the models give them) score as their float32 values would."""
    zs, zt = _logits(2, 5, 12, 18).bfloat16(), _logits(2, 5, 14, 19).bfloat16()
    y = _labels(2, 5, 12, 20)
    got = logit_kd_loss(zs, zt, y, alpha=0.5, temperature=1.5)
    assert got.dtype == torch.float32
    want, _, _ = direct_logit_kd(zs.double(), zt.double(), y, 0.5, 1.5)
    assert float(got) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- head weights
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("B,HT,HS,Q,K", [(2, 5, 3, 4, 6), (1, 2, 4, 3, 3), (3, 4, 4, 5, 7)])
def test_head_weights_match_direct(similarity, B, HT, HS, Q, K):
    t, s = _maps(B, HT, Q, K, 21, causal=True, temp=2.0), _maps(B, HS, Q, K, 22, causal=True, temp=2.0)
    w = head_weights(t, s, similarity=similarity)
    assert w.shape == (B, HT, HS)
    assert torch.allclose(w.sum(-1), torch.ones(B, HT), atol=1e-6), "softmax over student heads"
    assert (w >= 0).all()
    assert torch.allclose(w.double(), direct_head_weights(t, s, similarity), atol=1e-6)


@pytest.mark.parametrize("similarity", SIMS)
def test_head_weights_with_query_mask(similarity):
    """Rows outside the mask are zeroed before the similarity: the result matches the direct masked computation and
    rewriting those rows (in teacher and student) changes nothing."""
    B, HT, HS, Q, K = 2, 4, 3, 6, 6
    t, s = _maps(B, HT, Q, K, 23, causal=True, temp=2.0), _maps(B, HS, Q, K, 24, causal=True, temp=2.0)
    qm = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    w = head_weights(t, s, similarity=similarity, query_mask=qm)
    assert torch.allclose(w.double(), direct_head_weights(t, s, similarity, qm), atol=1e-6)
    t2, s2 = t.clone(), s.clone()
    out = ~qm[:, None, :, None].expand_as(t2)
    t2[out] = torch.rand(int(out.sum())) * 5
    out_s = ~qm[:, None, :, None].expand_as(s2)
    s2[out_s] = torch.rand(int(out_s.sum())) * 5
    assert torch.allclose(head_weights(t2, s2, similarity=similarity, query_mask=qm), w, atol=1e-7)
    assert not torch.allclose(head_weights(t2, s2, similarity=similarity), head_weights(t, s, similarity=similarity),
                              atol=1e-4), "without the mask those rows do matter (the check above is not vacuous)"


def test_dot_is_near_one_hot_cosine_flatter_l1_flattest():
    """By construction: peaked (one-hot) rows, 64 query rows, each teacher head equal to exactly one student head and
    disjoint from the rest. dot similarities are 64 vs 0 -> weights one-hot (entropy ~ 0); cosine 1 vs 0 -> weight
    e / (e + H_S - 1) on the match; l1 1/64 vs 0 -> almost uniform (entropy ~ log H_S)."""
    Q = K = 64
    HT, HS = 4, 6
    t = _one_hot_maps(2, [0, 5, 9, 13], Q, K)
    s = _one_hot_maps(2, [9, 1, 0, 13, 3, 5], Q, K)   # teacher heads 0, 1, 2, 3 are student heads 2, 5, 0, 3
    match = [2, 5, 0, 3]
    w = {sim: head_weights(t, s, similarity=sim) for sim in SIMS}
    for sim in SIMS:
        assert w[sim].shape == (2, HT, HS)
        assert torch.allclose(w[sim].sum(-1), torch.ones(2, HT), atol=1e-6)
        assert w[sim].argmax(-1).tolist() == [match, match], "the matching student head always weighs most"
    assert torch.allclose(w["dot"], torch.nn.functional.one_hot(torch.tensor([match, match]), HS).float(), atol=1e-6)
    e = math.e
    assert float(w["cosine"][0, 0, 2]) == pytest.approx(e / (e + HS - 1), rel=1e-5)
    h = {sim: weight_entropy(w[sim]) for sim in SIMS}
    assert h["dot"] < 1e-6
    p = e / (e + HS - 1)
    q = 1 / (e + HS - 1)
    assert h["cosine"] == pytest.approx(-(p * math.log(p) + (HS - 1) * q * math.log(q)), rel=1e-5)
    assert h["dot"] < h["cosine"] < h["l1"] < math.log(HS)
    assert h["l1"] > 0.99 * math.log(HS)


def test_weight_entropy_extremes():
    assert weight_entropy(torch.eye(5)[None]) == pytest.approx(0.0, abs=1e-7)
    assert weight_entropy(torch.full((2, 3, 7), 1 / 7)) == pytest.approx(math.log(7), rel=1e-6)


def test_unknown_similarity_is_rejected():
    t = _maps(1, 2, 3, 3, 0)
    with pytest.raises(ValueError, match="similarity"):
        head_weights(t, t, similarity="euclid")
    with pytest.raises(ValueError, match="similarity"):
        attention_kd_loss(t, t, similarity="euclid")


# ---------------------------------------------------------------- attention KD
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("B,HT,HS,Q,K", [(2, 5, 3, 4, 6), (1, 3, 6, 5, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_kd_matches_direct_loop(similarity, B, HT, HS, Q, K, masked):
    t, s = _maps(B, HT, Q, K, 31, causal=True, temp=2.0), _maps(B, HS, Q, K, 32, causal=True, temp=2.0)
    qm = None
    if masked:
        g = torch.Generator().manual_seed(33)
        qm = torch.rand(B, Q, generator=g) < 0.6
        qm[:, 0] = True
    got = attention_kd_loss(t, s, similarity=similarity, query_mask=qm)
    assert got.dim() == 0
    assert float(got) == pytest.approx(direct_attention_kd(t, s, similarity, qm), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("similarity", SIMS)
def test_attention_kd_ignores_rows_outside_the_mask(similarity):
    B, HT, HS, Q, K = 2, 4, 2, 5, 5
    t, s = _maps(B, HT, Q, K, 34, causal=True), _maps(B, HS, Q, K, 35, causal=True)
    qm = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    base = attention_kd_loss(t, s, similarity=similarity, query_mask=qm)
    t2, s2 = t.clone(), s.clone()
    for b in range(B):
        for q in range(Q):
            if not qm[b, q]:
                t2[b, :, q] = _maps(1, HT, 1, K, 100 + q)[0, :, 0]
                s2[b, :, q] = _maps(1, HS, 1, K, 200 + q)[0, :, 0]
    assert float(attention_kd_loss(t2, s2, similarity=similarity, query_mask=qm)) == pytest.approx(float(base),
                                                                                                 rel=1e-6)


def test_attention_kd_zero_when_student_holds_teacher_heads():
    """The student has each teacher head exactly (plus unrelated extra heads) and dot weights over 64 peaked rows are
    one-hot: the mixture is the teacher head itself, so the loss is 0. Also 0 with soft (non one-hot) rows, where
    the weights are still one-hot to float precision."""
    Q = K = 64
    t = _one_hot_maps(2, [0, 7, 21], Q, K)
    s = torch.cat([_one_hot_maps(2, [40, 41], Q, K), t[:, [2, 0, 1]]], dim=1)   # H_S = 5 > H_T = 3
    assert float(attention_kd_loss(t, s, similarity="dot")) == pytest.approx(0.0, abs=1e-6)
    soft_t = 0.9 * t + 0.1 / K
    soft_s = torch.cat([0.9 * _one_hot_maps(2, [40, 41], Q, K) + 0.1 / K, soft_t[:, [2, 0, 1]]], dim=1)
    w = head_weights(soft_t, soft_s, similarity="dot")
    assert weight_entropy(w) < 1e-6
    assert float(attention_kd_loss(soft_t, soft_s, similarity="dot")) == pytest.approx(0.0, abs=1e-5)
    # a student without those heads is penalised: the loss is clearly positive
    assert float(attention_kd_loss(soft_t, soft_s[:, :2], similarity="dot")) > 1.0


@pytest.mark.parametrize("similarity", SIMS)
def test_attention_kd_gradient_reaches_student_through_the_mixture_only(similarity):
    """Gradients flow to the student maps (not the teacher's), and they are those of the loss with the weights held
    constant (the weights come from the detached student maps)."""
    B, HT, HS, Q, K = 2, 3, 4, 5, 5
    zt = torch.randn(B, HT, Q, K)
    zs = torch.randn(B, HS, Q, K, requires_grad=True)
    t = torch.softmax(zt, -1)
    s = torch.softmax(zs, -1)
    qm = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    loss = attention_kd_loss(t, s, similarity=similarity, query_mask=qm)
    loss.backward()
    g = zs.grad.clone()
    assert torch.isfinite(g).all() and g.abs().max() > 0

    w_const = head_weights(t, s.detach(), similarity=similarity, query_mask=qm).detach()
    zs2 = zs.detach().clone().requires_grad_(True)
    s2 = torch.softmax(zs2, -1)
    mix = torch.einsum("bij,bjqk->biqk", w_const, s2)
    kl_rows = (t * (torch.log(t) - torch.log(mix))).sum(-1).sum(1)          # [B, Q]
    ref = (kl_rows * qm).sum() / qm.sum()
    ref.backward()
    assert float(ref.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(g, zs2.grad, atol=1e-6)
    # rows outside the mask get no gradient
    assert zs.grad.permute(0, 2, 1, 3)[~qm].abs().max() == 0


# ---------------------------------------------------------------- layer mapping and head concatenation
def _half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def test_layer_map_real_pair_36_to_28():
    got = layer_map(36, 28)
    want = [_half_up(Fraction(27, 35) * l) for l in range(36)]
    assert got == want
    assert len(got) == 36 and got[0] == 0 and got[-1] == 27
    assert all(a <= b for a, b in zip(got, got[1:]))
    assert set(got) == set(range(28)), "every teacher layer is used"
    assert sum(1 for a, b in zip(got, got[1:]) if a == b) == 8, "36 - 28 student layers share a teacher layer"


def test_layer_map_tiny_pair_and_edges():
    assert layer_map(4, 3) == [0, 1, 1, 2]
    assert layer_map(3, 2) == [0, 1, 1], "0.5 rounds up"
    assert layer_map(1, 5) == [0]
    assert layer_map(5, 5) == list(range(5))
    assert layer_map(3, 5) == [0, 2, 4]
    with pytest.raises(ValueError):
        layer_map(0, 3)


def test_layer_map_rounds_exact_halves_up_for_every_pair():
    bad = [(s, t) for s in range(2, 41) for t in range(1, 81)
           if layer_map(s, t) != [_half_up(Fraction(t - 1, s - 1) * l) for l in range(s)]]
    assert bad == []


def test_layer_groups_concat_and_pairs():
    assert layer_groups(4, 3, "concat") == [(0, [0]), (1, [1, 2]), (2, [3])]
    assert layer_groups(4, 3) == layer_groups(4, 3, "concat"), "concat is the default"
    assert layer_groups(4, 3, "pairs") == [(0, [0]), (1, [1]), (1, [2]), (2, [3])]
    real = layer_groups(36, 28)
    assert [t for t, _ in real] == list(range(28))
    assert sorted(s for _, ss in real for s in ss) == list(range(36))
    assert sorted(len(ss) for _, ss in real) == [1] * 20 + [2] * 8
    assert len(layer_groups(36, 28, "pairs")) == 36
    with pytest.raises(ValueError, match="pairing"):
        layer_groups(4, 3, "interleave")


def test_stacked_heads_concatenates_along_heads():
    B, H, Q, K = 2, 3, 4, 5
    maps = {l: _maps(B, H, Q, K, 40 + l) for l in range(4)}
    st = stacked_heads(maps, [1, 2])
    assert st.shape == (B, 2 * H, Q, K)
    assert torch.equal(st[:, :H], maps[1]) and torch.equal(st[:, H:], maps[2])
    assert torch.equal(stacked_heads(maps, [3]), maps[3])


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("pairing", ["concat", "pairs"])
def test_grouped_attention_kd_is_mean_over_groups(similarity, pairing):
    """Tiny pair: 3 teacher layers x 4 heads, 4 student layers x 3 heads (concat: 6 heads against teacher layer 1)."""
    B, Q, K = 2, 4, 6
    tm = {l: _maps(B, 4, Q, K, 50 + l, causal=True, temp=2.0) for l in range(3)}
    sm = {l: _maps(B, 3, Q, K, 60 + l, causal=True, temp=2.0) for l in range(4)}
    qm = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    groups = layer_groups(4, 3, pairing)
    got = grouped_attention_kd(tm, sm, groups, similarity=similarity, query_mask=qm)
    per_group = []
    for t_layer, s_layers in groups:
        stacked = torch.cat([sm[l] for l in s_layers], dim=1)
        assert stacked.shape[1] == 3 * len(s_layers)
        per_group.append(direct_attention_kd(tm[t_layer], stacked, similarity, qm))
    assert len(per_group) == (3 if pairing == "concat" else 4)
    assert float(got) == pytest.approx(sum(per_group) / len(per_group), rel=1e-5)


# ---------------------------------------------------------------- answer rows
def test_answer_rows_are_positions_before_answer_tokens():
    L = 10
    labels = torch.full((3, L), IGNORE)
    labels[0, 6:9] = torch.tensor([5, 6, 7])        # answer at 6..8 -> rows 5..7
    labels[1, 3:5] = torch.tensor([1, 2])           # answer at 3..4, rest padding -> rows 2..3
    labels[1, 8] = 4                                # a second answer span -> row 7
    labels[2, 9] = 3                                # last position -> row 8
    rows, mask = answer_rows(labels)
    expected = [[t for t in range(L - 1) if labels[b, t + 1] != IGNORE] for b in range(3)]
    assert expected == [[5, 6, 7], [2, 3, 7], [8]]
    A = max(len(e) for e in expected)
    assert rows.shape == mask.shape == (3, A)
    assert mask.dtype == torch.bool
    for b, e in enumerate(expected):
        assert rows[b, :len(e)].tolist() == e, "real rows first, in order"
        assert mask[b].tolist() == [True] * len(e) + [False] * (A - len(e))
        assert ((rows[b] >= 0) & (rows[b] < L)).all(), "padded rows index inside the sequence (gather-safe)"


def test_answer_rows_custom_ignore_and_empty():
    labels = torch.tensor([[-1, -1, 4, 5], [-1, 2, -1, -1]])
    rows, mask = answer_rows(labels, ignore_index=-1)
    assert rows[0][mask[0]].tolist() == [1, 2] and rows[1][mask[1]].tolist() == [0]
    rows, mask = answer_rows(torch.full((2, 5), IGNORE))
    assert rows.shape == (2, 1) and not mask.any()


# ---------------------------------------------------------------- capture on the real tiny student
def _record(i: int):
    image = Image.new("RGB", (112, 112), ((37 * i) % 256, (91 * i + 40) % 256, 200))
    return SimpleNamespace(images=[image], question=f"How far is the red cube from the blue sphere in scene {i}?",
                           reasoning="The cube sits left of the sphere." * (i + 1), answer=f"About {i + 1} meters.")


@pytest.fixture(scope="module")
def tiny_batch():
    """(eager model, processor, inputs without labels, labels): two episodes of different lengths, right padded."""
    from spatialstudy.models.bases import load_model
    from spatialstudy.models.chat import collate
    from spatialstudy.models.episodes import spacethinker_episode

    model, proc = load_model("tiny-student-random", attn_implementation="eager")
    model.eval()
    batch = collate([spacethinker_episode(_record(i)) for i in range(2)], proc)
    labels = batch.pop("labels")
    assert batch["attention_mask"][0].sum() != batch["attention_mask"][1].sum()
    return model, proc, batch, labels


def test_capture_equals_output_attentions_at_answer_rows(tiny_batch):
    model, _, inputs, labels = tiny_batch
    layers = [1, 3]
    rows, mask = answer_rows(labels)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    n_layers = model.config.text_config.num_hidden_layers
    assert len(ref) == n_layers
    B, H, L, _ = ref[0].shape
    cap = AttentionCapture(model, layers)
    try:
        assert cap.maps == {}
        with torch.no_grad():
            model(**inputs)
        assert cap.maps == {}, "nothing recorded before recording() opens"
        with torch.no_grad(), cap.recording(rows) as maps:
            out = model(**inputs)
        assert maps is cap.maps
        assert out.attentions is None, "the capture does not make the model return every layer's maps"
        assert sorted(cap.maps) == layers, "only the chosen layers"
        for l in layers:
            got = cap.maps[l]
            assert got.shape == (B, H, rows.shape[1], L)
            for b in range(B):
                for a in range(rows.shape[1]):
                    assert torch.equal(got[b, :, a], ref[l][b, :, int(rows[b, a])])
            assert not got.requires_grad
        # the real answer rows are those just before an answer token
        for b in range(B):
            want = [t for t in range(L - 1) if labels[b, t + 1] != IGNORE]
            assert rows[b][mask[b]].tolist() == want and len(want) > 0

        # after the block: another forward records nothing new
        kept = {l: m.clone() for l, m in cap.maps.items()}
        with torch.no_grad():
            model(input_ids=inputs["input_ids"][:, :10], attention_mask=inputs["attention_mask"][:, :10])
        assert cap.rows is None and sorted(cap.maps) == layers
        assert all(torch.equal(cap.maps[l], kept[l]) for l in layers)
    finally:
        cap.remove()
    with cap.recording(rows), torch.no_grad():
        model(**inputs)
    assert cap.maps == {}, "remove() takes the hooks off"


def test_capture_keeps_the_graph_for_the_student(tiny_batch):
    """Outside no_grad the captured maps carry gradients back to the student's attention weights."""
    model, _, inputs, labels = tiny_batch
    rows, mask = answer_rows(labels)
    cap = AttentionCapture(model, [0, 2])
    try:
        with cap.recording(rows):
            model(**inputs)
        assert all(m.requires_grad for m in cap.maps.values())
        q = torch.softmax(torch.randn_like(cap.maps[2]), -1)
        loss = attention_kd_loss(q, stacked_heads(cap.maps, [0, 2]), similarity="l1", query_mask=mask)
        model.zero_grad()
        loss.backward()
        q_grad = decoder_layers(model)[2].self_attn.q_proj.weight.grad
        assert q_grad is not None and q_grad.abs().max() > 0
        assert decoder_layers(model)[3].self_attn.q_proj.weight.grad is None, "layer 3 is above every captured map"
    finally:
        cap.remove()
        model.zero_grad(set_to_none=True)


def test_decoder_layers_bare_and_peft(tiny_batch):
    from peft import LoraConfig, get_peft_model

    from spatialstudy.models.bases import load_model

    model, _, _, _ = tiny_batch
    layers = decoder_layers(model)
    assert len(layers) == model.config.text_config.num_hidden_layers
    wrapped = get_peft_model(load_model("tiny-student-random", attn_implementation="eager")[0],
                             LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(decoder_layers(wrapped)) == len(layers)
    with pytest.raises(ValueError, match="language_model.layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_capture_with_sdpa_raises_clear_error(tiny_batch):
    from spatialstudy.models.bases import load_model

    _, _, inputs, labels = tiny_batch
    model, _ = load_model("tiny-student-random", attn_implementation="sdpa")
    model.eval()
    rows, _ = answer_rows(labels)
    cap = AttentionCapture(model, [1])
    try:
        with torch.no_grad():
            model(**inputs)                          # hooks idle: sdpa runs fine
        with pytest.raises(RuntimeError, match="eager"), torch.no_grad(), cap.recording(rows):
            model(**inputs)
    finally:
        cap.remove()


def test_capture_under_gradient_checkpointing_gives_the_same_gradient(tiny_batch):
    """Non-reentrant gradient checkpointing (as lora.make_trainable enables it) recomputes each layer in backward
    with the capture closed: the maps are recorded once, and the attention-KD gradient equals the one without
    checkpointing."""
    from spatialstudy.models.bases import load_model

    _, _, inputs, labels = tiny_batch
    rows, mask = answer_rows(labels)
    grads = []
    for ckpt in (False, True):
        model = load_model("tiny-student-random", attn_implementation="eager")[0]
        model.train()
        if ckpt:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cap = AttentionCapture(model, [1, 2])
        calls = []
        counter = decoder_layers(model)[1].self_attn.register_forward_hook(lambda *a: calls.append(1))
        with cap.recording(rows):
            model(**inputs)
        target = torch.softmax(torch.randn(cap.maps[1].shape, generator=torch.Generator().manual_seed(7)), -1)
        loss = attention_kd_loss(target, stacked_heads(cap.maps, [1, 2]), similarity="cosine", query_mask=mask)
        loss.backward()
        assert len(calls) == (2 if ckpt else 1), "checkpointing recomputes the layer in backward"
        assert sorted(cap.maps) == [1, 2]
        grads.append(decoder_layers(model)[1].self_attn.k_proj.weight.grad.clone())
        cap.remove()
        counter.remove()
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
