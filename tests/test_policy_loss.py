"""``linear_policy_loss`` against TRL's own ``GRPOTrainer._compute_loss``, run on the same
inputs with float64 full logits (TRL's method called on a stand-in trainer whose per-token
log-probs are ``log_softmax(z / T).gather`` in float64): loss, gradients of the hidden states,
the weight and the bias, and the logged metrics, for each loss type, with and without the KL
term, clipping active on both sides, padded masks, both backends; bf16; the one-pass design
(3 GEMMs per chunk, none in the backward) and the backward's scaling."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from triton_xent import CrossEntropyInputError, linear_policy_loss

B, T, D, V = 3, 5, 8, 40
TEMP = 0.7
MAX_LEN = 7


def _data(seed=0, dtype=torch.float32, bias=True, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g).to(dtype)
    W = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g)
    adv[0], adv[1] = adv[0].abs() + 0.1, -adv[1].abs() - 0.1  # signs for the clipping below
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0  # padding
    mask[2, 1:] = 0
    lp = _logps(x, W, b, target, TEMP)[0].detach()
    # old / ref log-probs off the current ones: ratios outside [0.8, 1.28] on both sides
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    old[0, 0], old[1, 0] = lp[0, 0] - 0.5, lp[1, 0] + 0.5  # clipped high (A > 0) and low (A < 0)
    return x, W, b, target, adv, mask, old, ref


def _logps(x, W, b, target, temp, softcap=None, logit_scale=None, logits_dtype=None):
    z = x.double() @ W.double().T
    if b is not None:
        z = z + b.double()
    if logits_dtype is not None:  # a 16-bit model's logits (TRL's too): rounded once
        z = z + (z.to(logits_dtype).double() - z).detach()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temp
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), ent


class _Acc:
    num_processes = 1
    sync_gradients = True

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


def trl_loss(x, W, b, target, adv, mask, old, ref, *, loss_type, beta=0.0, epsilon=0.2,
             epsilon_high=0.28, delta=None, bias_kl=False, isr=None, num_items=None,
             softcap=None, logit_scale=None, temp=TEMP, logits_dtype=None, sapo=(1.0, 1.05),
             entropy_coef=0.0):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on a stand-in trainer: float64 log-probs of
    the full logits; returns ``loss, dX, dW, db, metrics``."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    xd = x.detach().double().requires_grad_()
    Wd = W.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()

    def logps(model, input_ids, attention_mask, logits_to_keep, **kw):
        lp, ent = _logps(xd, Wd, bd, target, temp, softcap, logit_scale, logits_dtype)
        return lp, ent, None  # differentiable, as TRL's head's

    args = SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl, steps_per_generation=1,
                           sapo_temperature_pos=sapo[0], sapo_temperature_neg=sapo[1])
    self = SimpleNamespace(
        _get_per_token_logps_and_entropies=logps, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, args=args,
        use_vllm=isr is not None, vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN, accelerator=_Acc(),
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 0, dtype=torch.long),
              "prompt_mask": torch.zeros(B, 0, dtype=torch.long), "completion_ids": target,
              "completion_mask": mask, "advantages": adv.double(),
              "old_per_token_logps": None if old is None else old.double(),
              "ref_per_token_logps": ref.double()}
    if isr is not None:
        inputs["importance_sampling_ratio"] = isr.double()
    if num_items is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items), dtype=torch.float64)
    loss = trl_grpo.GRPOTrainer._compute_loss(self, None, inputs)
    loss.backward()
    return loss, xd.grad, Wd.grad, None if bd is None else bd.grad, self._metrics["train"]


def _leaves(x, W, b):
    return tuple(None if t is None else t.detach().clone().requires_grad_() for t in (x, W, b))


def _close(got, want, rtol=2e-5, atol=1e-6):
    want = want.to(got.dtype)
    assert torch.allclose(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max())), (
        (got - want).abs().max())


def _check(kw, backend, trl_kw, data, chunk_size=4):
    x, W, b, target, adv, mask, old, ref = data
    xl, Wl, bl = _leaves(x, W, b)
    loss, m = linear_policy_loss(xl, Wl, target, adv, mask=mask, old_logprobs=old,
                                 ref_logprobs=ref, linear_bias=bl, temperature=TEMP,
                                 chunk_size=chunk_size, backend=backend, **kw)
    loss.backward()
    r_loss, r_dx, r_dw, r_db, r_m = trl_loss(x, W, b, target, adv, mask, old, ref, **trl_kw)
    _close(loss.detach(), r_loss.detach())
    _close(xl.grad, r_dx)
    _close(Wl.grad, r_dw)
    if b is not None:
        _close(bl.grad, r_db)
    lt = trl_kw["loss_type"]
    pairs = ((m.clip_ratio_low, "clip_ratio/low_mean"), (m.clip_ratio_high, "clip_ratio/high_mean"),
             (m.clip_ratio_region, "clip_ratio/region_mean"),
             (m.clip_ratio_low_min, "clip_ratio/low_min"),
             (m.clip_ratio_high_max, "clip_ratio/high_max"))
    if lt == "cispo":
        pairs = ((m.clip_ratio_high, "cispo_clip_ratio"),)
    elif lt == "sapo":  # TRL logs no clip ratio; nothing is clipped
        pairs = ()
        assert not (m.is_low_clipped.any() or m.is_high_clipped.any())
    for ours, theirs in pairs:
        assert math.isclose(float(ours), r_m[theirs][0], rel_tol=1e-6), theirs
    lp, ent = _logps(x, W, b, target, TEMP, trl_kw.get("softcap"), trl_kw.get("logit_scale"))
    _close(m.logprobs, lp)
    _close(m.entropy, ent)
    assert math.isclose(float((m.entropy * mask).sum() / mask.sum()), r_m["entropy"][0],
                        rel_tol=1e-5)
    if kw.get("entropy_coef"):  # TRL logs the loss without the bonus then
        assert math.isclose(float(m.policy_loss), r_m["policy_loss"][0], rel_tol=1e-5)
    if kw.get("beta"):
        kl_mean = float((m.kl * mask).sum() / mask.sum())
        assert math.isclose(kl_mean, r_m["kl"][0], rel_tol=1e-5)
    return m


CLIPPED = ("grpo", "dapo", "bnpo", "dr_grpo", "luspo")


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", CLIPPED + ("cispo", "sapo"))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_trl(loss_type, beta, backend):
    data = _data(seed=1, per_token_adv=loss_type in ("bnpo", "sapo"))
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # cispo: the ratio's cap itself
    kw = dict(loss_type=loss_type, beta=beta, epsilon_high=eps_high)
    trl_kw = dict(loss_type=loss_type, beta=beta, epsilon_high=eps_high)
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = MAX_LEN
    if loss_type in ("dapo", "cispo"):
        kw["num_items_in_batch"] = torch.tensor(9.0)
        trl_kw["num_items"] = 9.0
    if loss_type == "sapo":
        kw.update(sapo_temperature_pos=0.9, sapo_temperature_neg=1.2)
        trl_kw["sapo"] = (0.9, 1.2)
    m = _check(kw, backend, trl_kw, data)
    if loss_type in CLIPPED:
        assert m.is_low_clipped.any() and m.is_high_clipped.any()  # both sides clip somewhere
    elif loss_type == "cispo":
        assert m.is_high_clipped.any()
    assert m.is_low_clipped.shape == (B, T) and (m.kl is None) == (beta == 0.0)


@pytest.mark.parametrize("case", ["delta_biaskl_isr", "softcap_scale_no_old", "dapo_default",
                                  "entropy_bonus", "entropy_bonus_triton"])
def test_options_match_trl(case):
    data = list(_data(seed=2))
    if case == "delta_biaskl_isr":
        isr = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) + 0.5
        kw = dict(loss_type="grpo", beta=0.1, delta=1.3, use_bias_correction_kl=True,
                  importance_sampling_ratio=isr, epsilon_high=0.28)
        trl_kw = dict(loss_type="grpo", beta=0.1, delta=1.3, bias_kl=True, isr=isr)
    elif case == "softcap_scale_no_old":
        data[6] = None  # old log-probs: the current ones, detached (ratio 1)
        kw = dict(loss_type="bnpo", beta=0.1, softcap=3.0, logit_scale=0.8, epsilon_high=0.28)
        trl_kw = dict(loss_type="bnpo", beta=0.1, softcap=3.0, logit_scale=0.8)
    elif case.startswith("entropy_bonus"):  # TRL's entropy_coef: the entropy's gradient too
        kw = dict(loss_type="grpo", beta=0.04, entropy_coef=0.3, epsilon_high=0.28)
        trl_kw = dict(loss_type="grpo", beta=0.04, entropy_coef=0.3)
    else:  # dapo without num_items_in_batch: this batch's token count
        kw = dict(epsilon_high=0.28)
        trl_kw = dict(loss_type="dapo", num_items=int(data[5].sum()))
    _check(kw, "triton" if case.endswith("triton") else "torch", trl_kw, data, chunk_size=5)


def test_bf16_against_float64():
    x, W, b, target, adv, mask, old, ref = _data(seed=4, dtype=torch.bfloat16)
    xl, Wl, bl = _leaves(x, W, b)
    loss, m = linear_policy_loss(xl, Wl, target, adv, mask=mask, old_logprobs=old,
                                 ref_logprobs=ref, linear_bias=bl, temperature=TEMP, beta=0.04,
                                 loss_type="grpo", chunk_size=4, accum_dtype=torch.float32)
    loss.backward()
    assert loss.dtype == torch.float32 and xl.grad.dtype == torch.bfloat16
    r_loss, r_dx, r_dw, r_db, _ = trl_loss(x, W, b, target, adv, mask, old, ref,
                                           loss_type="grpo", beta=0.04, epsilon_high=0.2,
                                           logits_dtype=torch.bfloat16)
    _close(loss.detach(), r_loss.detach(), rtol=1e-5)  # fp32 math on the bf16 logits
    for got, want in ((xl.grad, r_dx), (Wl.grad, r_dw), (bl.grad, r_db)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-2, err


def test_flat_input_and_no_grad():
    x, W, b, target, adv, mask, old, ref = _data(seed=5, per_token_adv=True)
    with torch.no_grad():
        l3, m3 = linear_policy_loss(x, W, target, adv, mask=mask, old_logprobs=old,
                                    loss_type="bnpo")
    flat = dict(mask=mask.reshape(-1), old_logprobs=old.reshape(-1), loss_type="bnpo")
    l2, m2 = linear_policy_loss(x.reshape(-1, D), W, target.reshape(-1), adv.reshape(-1), **flat)
    assert torch.equal(l2, l3) and torch.equal(m2.logprobs, m3.logprobs.reshape(-1))
    assert m2.clip_ratio_low_min is None and m3.clip_ratio_low_min is not None


_GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm,
          torch.ops.aten.baddbmm, torch.ops.aten.matmul, torch.ops.aten.linear}


class _CountGemms(TorchDispatchMode):
    """GEMM calls and their FLOPs (``2 m k n``)."""

    def __init__(self):
        super().__init__()
        self.n = self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _GEMMS:
            self.n += 1
            a, b = args[-2], args[-1]  # (m, k) @ (k, n), the last two operands of mm / addmm
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [False, True])
def test_one_pass_three_gemms_and_upstream_scaling(bias):
    x, W, b, target, adv, mask, old, ref = _data(seed=6, bias=bias)
    grads = []
    for upstream in (1.0, 2.0):
        xl, Wl, bl = _leaves(x, W, b)
        with _CountGemms() as fwd:
            loss, _ = linear_policy_loss(xl, Wl, target, adv, mask=mask, old_logprobs=old,
                                         ref_logprobs=ref, linear_bias=bl, beta=0.1,
                                         chunk_size=4)
        with _CountGemms() as bwd:
            (loss * upstream).backward()
        assert fwd.n == 3 * math.ceil(B * T / 4), fwd.n  # logits, dX, dW per chunk
        assert fwd.flops == 3 * 2 * B * T * D * V
        assert bwd.n == 0  # nothing recomputed
        grads.append([t.grad for t in (xl, Wl, bl) if t is not None])
    for g1, g2 in zip(*grads):
        assert torch.equal(g2, 2.0 * g1)  # exactly: scaling by 2 is exact


def test_refusals():
    x, W, b, target, adv, mask, old, ref = _data(seed=7)
    xl = x.clone().requires_grad_()

    def call(**kw):
        return linear_policy_loss(xl, W, target, kw.pop("adv", adv), mask=mask, **kw)

    for kw, words in [
        (dict(loss_type="gspo"), "not a loss type of TRL"),
        (dict(loss_type="vespo"), "one per sequence"),
        (dict(loss_type="cispo", delta=2.0), "delta"),
        (dict(importance_sampling_level="sequence"), "GSPO"),
        (dict(top_entropy_quantile=0.2), "quantile"),
        (dict(beta=0.1), "ref_logprobs"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(loss_type="bnpo", num_items_in_batch=4), "num_items_in_batch"),
        (dict(num_items_in_batch=0), "divide the loss by 0"),
        (dict(loss_type="dr_grpo", max_completion_length=0), "positive int"),
        (dict(epsilon_low=-0.1), "epsilon_low"),
        (dict(adv=adv.clone().requires_grad_()), "detach"),
        (dict(adv=torch.randn(B + 1)), "shape"),
    ]:
        with pytest.raises(CrossEntropyInputError, match=words):
            call(**kw)
    with pytest.raises(CrossEntropyInputError, match="per sequence"):
        linear_policy_loss(xl.reshape(-1, D), W, target.reshape(-1), adv.repeat_interleave(T),
                           loss_type="grpo")
    loss, _ = call()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_float64_is_trls_to_rounding(loss_type):
    """In float64 the closed forms give TRL's loss and gradients to float64 rounding: nothing
    approximated (clipping on both sides, the KL term, an entropy bonus)."""
    x, W, b, target, adv, mask, old, ref = _data(seed=8, dtype=torch.float64)
    old, ref = old.double(), ref.double()
    xl, Wl, bl = _leaves(x, W, b)
    eps_high = 1.3 if loss_type == "cispo" else 0.28
    n_items = 9.0 if loss_type == "cispo" else None  # cispo's normaliser (TRL's input)
    loss, _ = linear_policy_loss(xl, Wl, target, adv, mask=mask, old_logprobs=old,
                                 ref_logprobs=ref, linear_bias=bl, temperature=TEMP, beta=0.05,
                                 entropy_coef=0.1, loss_type=loss_type, epsilon_high=eps_high,
                                 num_items_in_batch=n_items, chunk_size=4)
    loss.backward()
    r_loss, r_dx, r_dw, r_db, _ = trl_loss(x, W, b, target, adv, mask, old, ref,
                                           loss_type=loss_type, beta=0.05, entropy_coef=0.1,
                                           epsilon_high=eps_high, num_items=n_items)
    for got, want in ((loss.detach(), r_loss.detach()), (xl.grad, r_dx), (Wl.grad, r_dw),
                      (bl.grad, r_db)):
        assert got.dtype == torch.float64
        _close(got, want, rtol=1e-10, atol=1e-12)


def test_only_the_weight_requires_grad():
    """A frozen backbone: dW alone (no dX GEMM), the same as with both."""
    x, W, b, target, adv, mask, old, ref = _data(seed=9, bias=False)
    grads = []
    for x_grad in (True, False):
        xl = x.clone().requires_grad_(x_grad)
        Wl = W.clone().requires_grad_()
        with _CountGemms() as fwd:
            loss, _ = linear_policy_loss(xl, Wl, target, adv, mask=mask, old_logprobs=old,
                                         chunk_size=8)
        loss.backward()
        assert fwd.n == (3 if x_grad else 2) * 2
        grads.append(Wl.grad)
    assert torch.equal(grads[0], grads[1])
