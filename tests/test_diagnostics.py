"""Issue 7: `measure_amplification` and `residual_dependency` against independent references.

References: a float64 hand computation of a 2-layer BERT (embeddings, attention, FFN and LayerNorm written out here from
the weights), stock transformers modules called step by step (Marian, T5), stock models run with the perturbation added
to a copy of their weights, and the paper's from-scratch setting for Admin's effect.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import classification_batch, seq2seq_batch, tiny_bert, tiny_marian, tiny_t5
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    ElectraConfig,
    ElectraForPreTraining,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from hf_clinic.admin import apply_admin, paper_init
from hf_clinic.diagnostics import branch_parameters, measure_amplification, probe, residual_dependency


# ------------------------------------------------------------------------------------------------ references


def reference_delta(model, eps, seed, stacks, norm_words):
    """δ_p = eps · rms(W_p) · ξ_p, ξ from torch.Generator(seed) in named_parameters order (the documented recipe),
    for the parameters under `stacks` whose name has none of `norm_words`."""
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for name, p in model.named_parameters():
        if not any(f"{s}." in name for s in stacks) or any(w in name for w in norm_words) or "admin_omega" in name:
            continue
        w = p.detach()
        rms = w.pow(2).mean().sqrt().item()
        delta[name] = eps * rms * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    return delta


def var(t):
    return t.double().var(unbiased=False).item()


def rel_change(clean, pert):
    return ((pert - clean).pow(2).sum() / clean.pow(2).sum()).item()


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    v = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(v + eps) * w + b


def scale(x, omega):
    # Admin keeps ω in fp32 and multiplies in fp32 (hf_clinic.admin._wiring docstring), also in a float64 model.
    return (x.float() * torch.tensor(omega, dtype=torch.float32)).double()


def bert_by_hand(model, batch, omega=None, delta=None):
    """Post-LN BERT forward written out in float64: per sublayer (ω⊙x, F, b, x_out) and the encoder output."""
    cfg = model.config
    W = {k: v.detach().clone() for k, v in model.bert.state_dict().items()}
    for name, d in (delta or {}).items():
        W[name.removeprefix("bert.")] = W[name.removeprefix("bert.")] + d
    ids, mask = batch["input_ids"], batch["attention_mask"].double()
    B, T = ids.shape
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    dh = H // nh
    eps = cfg.layer_norm_eps
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:T]
    x = x + W["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float64).min
    sites, k = [], 0

    def lin(h, p):
        return h @ W[p + ".weight"].T + W[p + ".bias"]

    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        q, kk, v = (
            lin(x, p + f"attention.self.{n}").view(B, T, nh, dh).transpose(1, 2) for n in ("query", "key", "value")
        )
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(dh) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(B, T, H)
        f = lin(ctx, p + "attention.output.dense")
        r = scale(x, omega[k]) if omega else x
        b = f + r
        x = layer_norm(b, W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], eps)
        sites.append((r, f, b, x))
        k += 1
        f = lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        r = scale(x, omega[k]) if omega else x
        b = f + r
        x = layer_norm(b, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
        sites.append((r, f, b, x))
        k += 1
    return sites, x


def bert64(**overrides):
    torch.manual_seed(3)
    model = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **overrides)
    paper_init(model)  # Xavier branches: β well away from 0, so the check is not vacuous
    return model.double()


def bert_batch():
    batch = classification_batch(batch_size=3, seq_len=7)
    batch["attention_mask"][1, 5:] = 0  # padding: the mask must reach the attention
    return batch


# ------------------------------------------------------------------------------------------------ float64 hand computation


@pytest.mark.parametrize("admin", [False, True], ids=["vanilla", "admin"])
def test_dependency_matches_float64_hand_computation(admin):
    model = bert64()
    batch = bert_batch()
    omega = None
    if admin:
        apply_admin(model, omega=1.7)
        omega = [1.7] * 4
    dep = residual_dependency(model, batch)
    sites, _ = bert_by_hand(model, batch, omega)
    assert [(s.stack, s.index, s.kind) for s in dep.sites] == [
        ("encoder", 1, "attention"),
        ("encoder", 2, "ffn"),
        ("encoder", 3, "attention"),
        ("encoder", 4, "ffn"),
    ]
    tol = 1e-10
    for got, (r, f, b, _) in zip(dep.sites, sites, strict=True):
        assert got.var_branch == pytest.approx(var(f), rel=tol)
        assert got.var_residual == pytest.approx(var(r), rel=tol)
        assert got.var_sum == pytest.approx(var(b), rel=tol)
        assert got.dependency == pytest.approx(var(f) / var(b), rel=tol)
        assert got.beta == pytest.approx(math.sqrt(var(f) / var(b)), rel=tol)
        assert got.omega == (pytest.approx(1.7) if admin else None)
    # Not vacuous: Xavier-initialised branches carry a real share of the output.
    assert 0.05 < min(dep.dependencies()) and max(dep.dependencies()) < 0.95


@pytest.mark.parametrize("admin", [False, True], ids=["vanilla", "admin"])
def test_amplification_matches_float64_hand_computation(admin):
    model = bert64()
    batch = bert_batch()
    omega = None
    if admin:
        apply_admin(model, omega=1.7)
        omega = [1.7] * 4
    eps, seed = 1e-3, 11
    amp = measure_amplification(model, batch, eps=eps, seed=seed)
    delta = reference_delta(model, eps, seed, ["encoder.layer"], ["LayerNorm"])
    assert amp.num_perturbed == len(delta) == 2 * 12  # 6 linears (weight + bias) per layer; norms left alone
    clean, out = bert_by_hand(model, batch, omega)
    pert, out_p = bert_by_hand(model, batch, omega, delta)
    tol = 1e-7
    for got, (*_, x), (*_, xp) in zip(amp.sites, clean, pert, strict=True):
        expected = rel_change(x, xp)
        assert got.change == pytest.approx(expected, rel=tol)
        assert got.amplification == pytest.approx(expected / eps**2, rel=tol)
    assert amp.total.amplification == pytest.approx(rel_change(out, out_p) / eps**2, rel=tol)
    assert amp.outputs["encoder"] is amp.total
    # It is the documented δ: passing it explicitly gives the same numbers.
    explicit = measure_amplification(model, batch, eps=eps, delta=delta)
    assert explicit.total.change == pytest.approx(amp.total.change, rel=1e-12)


def test_probe_is_both_measurements_at_once():
    model, batch = bert64(), bert_batch()
    amp, dep = probe(model, batch, eps=1e-3, seed=5)
    assert amp.to_dict() == measure_amplification(model, batch, eps=1e-3, seed=5).to_dict()
    assert dep.to_dict() == residual_dependency(model, batch).to_dict()


# ------------------------------------------------------------------------------------------------ Marian and T5


def _capture_inputs(modules):
    seen = {}

    def pre(i):
        def hook(module, args, kwargs):
            seen[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    return seen, [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in enumerate(modules)]


@pytest.mark.parametrize("admin", [False, True], ids=["vanilla", "admin"])
def test_marian_encoder_against_stock_submodules(admin):
    torch.manual_seed(0)
    model = tiny_marian(encoder_layers=3).double()
    paper_init(model)
    batch = seq2seq_batch(batch_size=3)
    if admin:
        apply_admin(model, [batch], omega=2.5, exportable=False)
    model.eval()
    dep = residual_dependency(model, batch)
    layers = model.model.encoder.layers
    seen, handles = _capture_inputs(list(layers))
    with torch.no_grad():
        model(**batch)
        for h in handles:
            h.remove()
        expected = []
        for i, layer in enumerate(layers):
            x = seen[i]
            w = 2.5 if admin else 1.0
            a = layer.self_attn(hidden_states=x)[0]
            b1 = w * x + a
            x1 = F.layer_norm(
                b1, (x.shape[-1],), layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias, 1e-5
            )
            f = layer.fc2(layer.activation_fn(layer.fc1(x1)))
            b2 = w * x1 + f
            expected += [(var(a), var(b1)), (var(f), var(b2))]
    enc = [s for s in dep.sites if s.stack == "encoder"]
    assert len(enc) == 6 and len([s for s in dep.sites if s.stack == "decoder"]) == 6
    for got, (vf, vb) in zip(enc, expected, strict=True):
        assert got.var_branch == pytest.approx(vf, rel=1e-6)
        assert got.dependency == pytest.approx(vf / vb, rel=1e-6)


@pytest.mark.parametrize("family", ["marian", "t5"])
def test_amplification_against_stock_model_with_perturbed_weights(family):
    torch.manual_seed(0)
    model = (tiny_marian() if family == "marian" else tiny_t5()).double()
    batch = seq2seq_batch(batch_size=3)
    stacks = ["encoder.layers", "decoder.layers"] if family == "marian" else ["encoder.block", "decoder.block"]
    eps, seed = 1e-3, 4
    amp = measure_amplification(model, batch, eps=eps, seed=seed)
    delta = reference_delta(model, eps, seed, stacks, ["layer_norm"])
    assert amp.num_perturbed == len(delta)
    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        clean = model(**batch, output_hidden_states=True)
        params = dict(twin.named_parameters())
        for name, d in delta.items():
            params[name].add_(d)
        pert = twin(**batch, output_hidden_states=True)
    assert amp.outputs["encoder"].change == pytest.approx(
        rel_change(clean.encoder_last_hidden_state, pert.encoder_last_hidden_state), rel=1e-6
    )
    assert amp.total.change == pytest.approx(
        rel_change(clean.decoder_hidden_states[-1], pert.decoder_hidden_states[-1]), rel=1e-6
    )
    if family == "marian":
        # Post-LN: every second encoder sublayer output is a layer output, reported by the stock model.
        enc = [s for s in amp.sites if s.stack == "encoder"]
        for layer, site in enumerate(enc[1::2]):
            h0, h1 = clean.encoder_hidden_states[layer + 1], pert.encoder_hidden_states[layer + 1]
            assert site.change == pytest.approx(rel_change(h0, h1), rel=1e-6)


def test_t5_dependency_against_stock_sublayers():
    torch.manual_seed(0)
    model = tiny_t5().double().eval()
    batch = seq2seq_batch(batch_size=3)
    dep = residual_dependency(model, batch)
    subs = [blk.layer[j] for blk in model.encoder.block for j in range(2)]
    ins, outs, handles = {}, {}, []
    for i, m in enumerate(subs):
        handles.append(m.register_forward_pre_hook(lambda mod, a, kw, i=i: ins.__setitem__(i, a[0]), with_kwargs=True))
        handles.append(
            m.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        )
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    for i, got in enumerate(s for s in dep.sites if s.stack == "encoder"):
        f = outs[i] - ins[i]
        assert got.dependency == pytest.approx(var(f) / var(outs[i]), rel=1e-8)


# ------------------------------------------------------------------------------------------------ the paper's effect


def test_admin_reduces_amplification_of_deep_post_ln():
    """From-scratch (paper) init: this is where Admin's effect lives (under HF's N(0, 0.02²) init the branches are
    tiny and both arms have amplification < 0.1)."""
    torch.manual_seed(0)
    model = tiny_bert(num_hidden_layers=12, hidden_size=64, intermediate_size=256, num_attention_heads=4)
    paper_init(model)
    batch = classification_batch(batch_size=4, seq_len=16)
    vanilla = measure_amplification(model, batch)
    vdep = residual_dependency(model, batch)
    admin_model = copy.deepcopy(model)
    report = apply_admin(admin_model, [batch])
    admin = measure_amplification(admin_model, batch)
    adep = residual_dependency(admin_model, batch)
    assert max(report.omegas()) > 2.0  # ω grew with depth, as in the paper
    # Post-LN grows ~linearly with depth, Admin ~logarithmically.
    assert vanilla.total.amplification > 12.0
    assert admin.total.amplification < 0.5 * vanilla.total.amplification
    v, a = vanilla.amplifications(), admin.amplifications()
    assert v[-1] / v[len(v) // 2 - 1] > a[-1] / a[len(a) // 2 - 1]
    # Lighter dependency on the residual branches, closer to the 1/i profile of Pre-LN.
    assert sum(adep.dependencies()) < 0.5 * sum(vdep.dependencies())


def test_hf_init_branches_are_tiny():
    model = tiny_bert(num_hidden_layers=6)
    amp, dep = probe(model, classification_batch())
    assert amp.total.amplification < 0.1 and max(dep.dependencies()) < 0.01


# ------------------------------------------------------------------------------------------------ every family, no side effects


def _roberta():
    cfg = RobertaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=0,
    )
    return RobertaForMaskedLM(cfg)


def _bart():
    cfg = BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    return BartForConditionalGeneration(cfg)


def _electra():
    cfg = ElectraConfig(
        vocab_size=128,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return ElectraForPreTraining(cfg)


FAMILIES = {
    "bert": (tiny_bert, classification_batch, 4),
    "roberta": (_roberta, classification_batch, 4),
    "electra": (_electra, classification_batch, 4),
    "marian": (tiny_marian, seq2seq_batch, 10),
    "bart": (_bart, seq2seq_batch, 10),
    "t5": (tiny_t5, seq2seq_batch, 10),
}


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


CASES = [(f, False) for f in FAMILIES] + [("bert", True), ("marian", True), ("t5", True)]  # one Admin case per wiring


@pytest.mark.parametrize(("family", "admin"), CASES, ids=[f"{f}-{'admin' if a else 'vanilla'}" for f, a in CASES])
def test_every_family_works_and_leaves_the_model_untouched(family, admin):
    make, make_batch, n_sites = FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    batch = make_batch(batch_size=2)
    if family in ("roberta", "electra"):
        batch = {k: v for k, v in batch.items() if k != "labels"}
    if admin:
        apply_admin(model, [batch])
        # Gradients present before the probe must survive it untouched.
        model(**batch).loss.backward()
    model.train()
    model.get_submodule(next(n for n, _ in model.named_children())).eval()  # a mixed train/eval state to restore
    before = _state(model)
    rng = torch.get_rng_state()

    amp, dep = probe(model, batch)

    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1]
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(before[2].values(), after[2].values(), strict=True)
    )
    assert before[3] == after[3]  # every hook removed
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG was not used
    assert len(amp.sites) == len(dep.sites) == n_sites
    assert all(math.isfinite(s.amplification) for s in amp.sites)
    assert all(0.0 <= s.dependency <= 1.5 for s in dep.sites)


def test_deterministic_for_a_seed():
    model, batch = tiny_bert(), classification_batch(batch_size=2)
    first = measure_amplification(model, batch, seed=3)
    assert measure_amplification(model, batch, seed=3).to_dict() == first.to_dict()
    assert measure_amplification(model, batch, seed=4).total.change != first.total.change


def test_branch_parameters_skip_norms_and_omega():
    model = tiny_marian()
    apply_admin(model, [seq2seq_batch()])
    names = [n for n, _ in branch_parameters(model)]
    assert names and all(".layers." in n for n in names)
    assert not any("layer_norm" in n or "admin_omega" in n for n in names)
    with_norms = [n for n, _ in branch_parameters(model, include_norms=True)]
    assert any("layer_norm" in n for n in with_norms) and not any("admin_omega" in n for n in with_norms)


# ------------------------------------------------------------------------------------------------ bad input


def test_unsupported_model_is_refused_with_the_supported_list():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128))
    with pytest.raises(ValueError, match=r"'gpt2'.*bert.*marian.*t5"):
        residual_dependency(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})


@pytest.mark.parametrize("eps", [0, -1e-3, float("nan"), True])
def test_invalid_eps(eps):
    with pytest.raises(ValueError, match="Invalid eps"):
        measure_amplification(tiny_bert(), classification_batch(), eps=eps)


def test_bad_delta_and_batch():
    model = tiny_bert()
    with pytest.raises(ValueError, match="does not have"):
        measure_amplification(model, classification_batch(), delta={"nope.weight": torch.zeros(1)})
    name, p = next(iter(model.named_parameters()))
    with pytest.raises(ValueError, match="shape"):
        measure_amplification(model, classification_batch(), delta={name: torch.zeros(p.numel() + 1)})
    with pytest.raises(ValueError, match="no input_ids"):
        residual_dependency(model, {"attention_mask": torch.ones(1, 3)})
