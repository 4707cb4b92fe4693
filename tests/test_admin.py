"""Admin: sites, ω against float64 re-implementations of the paper's formulas, folds, bad input.

References used here, all written in this file: an explicit float64 Post-LN forward of BERT and Marian with
Admin's residual weight (built from the stock submodules of an untouched copy of the model), the profiling recursion
run on that forward, admin-torch's closed form evaluated by hand, and the stock model itself (T5 at init, exports).
"""

import copy
import math

import pytest
import torch
from tiny_models import (
    VOCAB,
    classification_batch,
    seq2seq_batch,
    tiny_bert,
    tiny_bert_config,
    tiny_marian,
    tiny_marian_config,
    tiny_t5,
)
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertModel,
    CamembertConfig,
    CamembertModel,
    Data2VecTextConfig,
    Data2VecTextModel,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    RobertaConfig,
    RobertaModel,
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormModel,
    UMT5Config,
    UMT5ForConditionalGeneration,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from hf_clinic.admin import (
    ADMIN_ARCHITECTURES,
    OMEGA_NAME,
    AdminExportError,
    apply_admin,
    clear_residual_captures,
    closed_form_omega,
    export_vanilla,
    find_residual_sites,
    paper_init,
)


NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
NO_DROPOUT_MARIAN = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def omegas(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("admin_omega")}


def randomize_omegas(model, generator):
    """Per-dimension, non-constant ω (as after training), so folds and wirings are tested beyond scalars."""
    with torch.no_grad():
        for p in omegas(model).values():
            p.copy_(0.5 + 2.0 * torch.rand(p.shape, generator=generator))


# --- float64 references: explicit Admin forwards built from an untouched copy of the stock model -------------------


def ref_bert(bert, input_ids, omega_fn):
    """Explicit Admin BERT encoder: x_i = LN(ω_i x_{i-1} + F_i(x_{i-1})); returns the output and (Var x, Var F) per site."""
    x = bert.embeddings(input_ids=input_ids)
    stats, k = [], 0
    for layer in bert.encoder.layer:
        for branch, norm in (
            (lambda h, a=layer.attention: a.output.dense(a.self(h)[0]), layer.attention.output.LayerNorm),
            (lambda h, f=layer: f.output.dense(f.intermediate(h)), layer.output.LayerNorm),
        ):
            f = branch(x)
            stats.append((x.var(unbiased=False).item(), f.var(unbiased=False).item()))
            k += 1
            x = norm(omega_fn(k, stats) * x + f)
    return x, stats


def ref_marian(model, input_ids, decoder_input_ids, omega_fn_enc, omega_fn_dec):
    """Explicit Admin Marian (Post-LN, dropout 0); returns logits and per-stack (Var x, Var F)."""
    enc, dec = model.model.encoder, model.model.decoder
    x = enc.embed_tokens(input_ids) * enc.embed_scale + enc.embed_positions(input_ids.shape)
    enc_stats, k = [], 0
    for layer in enc.layers:
        for branch, norm in (
            (lambda h, a=layer.self_attn: a(h)[0], layer.self_attn_layer_norm),
            (lambda h, f=layer: f.fc2(f.activation_fn(f.fc1(h))), layer.final_layer_norm),
        ):
            f = branch(x)
            enc_stats.append((x.var(unbiased=False).item(), f.var(unbiased=False).item()))
            k += 1
            x = norm(omega_fn_enc(k, enc_stats) * x + f)
    memory = x
    t = decoder_input_ids.shape[1]
    causal = torch.full((t, t), float("-inf"), dtype=x.dtype).triu(1)[None, None]
    y = dec.embed_tokens(decoder_input_ids) * dec.embed_scale + dec.embed_positions(decoder_input_ids.shape)
    dec_stats, k = [], 0
    for layer in dec.layers:
        for branch, norm in (
            (lambda h, a=layer.self_attn: a(h, attention_mask=causal)[0], layer.self_attn_layer_norm),
            (lambda h, a=layer.encoder_attn: a(h, key_value_states=memory)[0], layer.encoder_attn_layer_norm),
            (lambda h, f=layer: f.fc2(f.activation_fn(f.fc1(h))), layer.final_layer_norm),
        ):
            f = branch(y)
            dec_stats.append((y.var(unbiased=False).item(), f.var(unbiased=False).item()))
            k += 1
            y = norm(omega_fn_dec(k, dec_stats) * y + f)
    return model.lm_head(y) + model.final_logits_bias, enc_stats, dec_stats


def profiled(k, stats):
    """The normalised recursion: ω_1 = 1, ω_{i+1}² = ω_i² + Var[F_i] / Var[x_{i-1}], written out as a sum."""
    return math.sqrt(1.0 + sum(vf / vx for vx, vf in stats[: k - 1]))


def shift_right(labels, start=0):
    return torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)


# --- profiling and wiring vs the float64 references ---------------------------------------------------------------


def test_bert_profile_and_wiring_match_float64_reference():
    model = tiny_bert(num_hidden_layers=3, **NO_DROPOUT_BERT)
    reference = copy.deepcopy(model).double().eval()
    batch = classification_batch(batch_size=3, seq_len=10)
    report = apply_admin(model, [batch])

    with torch.no_grad():
        _, stats = ref_bert(reference.bert, batch["input_ids"], profiled)
    expected = [profiled(k, stats) for k in range(1, 7)]
    assert [s.name for s in report.sites] == [
        f"bert.encoder.layer.{i}.{n}.LayerNorm" for i in range(3) for n in ("attention.output", "output")
    ]
    assert report.omegas() == pytest.approx(expected, rel=1e-5)
    assert all(
        s.var_residual == pytest.approx(vx, rel=1e-4) for s, (vx, _) in zip(report.sites[:-1], stats[:-1], strict=True)
    )
    for site, value in zip(report.sites, expected, strict=True):
        p = dict(model.named_parameters())[site.name + ".admin_omega"]
        assert p.dtype == torch.float32 and p.shape == (32,) and p.requires_grad
        assert torch.allclose(p.double(), torch.full_like(p.double(), value), rtol=1e-6)

    # Per-dimension ω (as after training): the hooked model equals the explicit Admin forward.
    randomize_omegas(model, torch.Generator().manual_seed(1))
    vectors = [dict(model.named_parameters())[s.name + ".admin_omega"].detach().double() for s in report.sites]
    model.eval()
    with torch.no_grad():
        ours = model.bert(input_ids=batch["input_ids"]).last_hidden_state
        ref, _ = ref_bert(reference.bert, batch["input_ids"], lambda k, _: vectors[k - 1])
    assert (ours.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_marian_profile_and_wiring_match_float64_reference():
    model = tiny_marian(**NO_DROPOUT_MARIAN)
    paper_init(model)  # non-trivial branch variances, so ω is well away from 1
    reference = copy.deepcopy(model).double().eval()
    batch = seq2seq_batch(batch_size=3)
    report = apply_admin(model, [batch])

    dec_ids = shift_right(batch["labels"], model.config.decoder_start_token_id)
    with torch.no_grad():
        _, enc_stats, dec_stats = ref_marian(reference, batch["input_ids"], dec_ids, profiled, profiled)
    expected_enc = [profiled(k, enc_stats) for k in range(1, 5)]
    expected_dec = [profiled(k, dec_stats) for k in range(1, 7)]
    assert report.omegas("encoder") == pytest.approx(expected_enc, rel=1e-5)
    assert report.omegas("decoder") == pytest.approx(expected_dec, rel=1e-5)
    assert expected_enc[-1] > 1.3 and expected_dec[-1] > 1.3
    # Exportable mode: the first sublayer of each stack reads the raw embeddings and stays at exactly 1, unparameterised.
    first = [s for s in report.sites if s.index == 1]
    assert [s.fixed for s in first] == [True, True] and [s.omega for s in first] == [1.0, 1.0]
    params = omegas(model)
    assert len(params) == 8 and "model.encoder.layers.0.self_attn_layer_norm.admin_omega" not in params
    assert "model.decoder.layers.1.encoder_attn_layer_norm.admin_omega" in params

    randomize_omegas(model, torch.Generator().manual_seed(2))
    model.eval()
    by_site = {
        (s.stack, s.index): (params[s.name + ".admin_omega"].detach().double() if not s.fixed else 1.0)
        for s in report.sites
    }
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], decoder_input_ids=dec_ids).logits
        ref, _, _ = ref_marian(
            reference,
            batch["input_ids"],
            dec_ids,
            lambda k, _: by_site[("encoder", k)],
            lambda k, _: by_site[("decoder", k)],
        )
    assert (ours.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_profile_pools_batches_and_keeps_omega_at_least_one_under_hf_init():
    # HF init: Marian's scaled embeddings have Var < 1 and branches are tiny; the normalised rule gives ω >= 1.
    model = tiny_marian(**NO_DROPOUT_MARIAN)
    reference = copy.deepcopy(model).double().eval()
    b1, b2 = (
        seq2seq_batch(batch_size=2, generator=torch.Generator().manual_seed(3)),
        seq2seq_batch(batch_size=3, src_len=7, generator=torch.Generator().manual_seed(4)),
    )
    report = apply_admin(model, [b1, b2])
    assert report.num_batches == 2
    assert report.sites[0].var_residual < 0.7  # the "variance ≈ 0.4" regime
    assert min(report.omegas()) == 1.0 and all(w >= 1.0 for w in report.omegas())

    # Pooled statistics = moments summed over both batches' elements (population variance of the union).
    def pooled_encoder_stats():
        xs, fs = [], []
        for b in (b1, b2):
            enc = reference.model.encoder
            x = enc.embed_tokens(b["input_ids"]) * enc.embed_scale + enc.embed_positions(b["input_ids"].shape)
            f = enc.layers[0].self_attn(x)[0]
            xs.append(x.reshape(-1)), fs.append(f.reshape(-1))
        return torch.cat(xs).var(unbiased=False).item(), torch.cat(fs).var(unbiased=False).item()

    with torch.no_grad():
        vx, vf = pooled_encoder_stats()
    assert report.sites[0].var_residual == pytest.approx(vx, rel=1e-5)
    assert report.sites[0].var_branch == pytest.approx(vf, rel=1e-4)
    assert report.omegas("encoder")[1] == pytest.approx(math.sqrt(1 + vf / vx), rel=1e-6)


def test_profiling_is_a_training_mode_forward_without_update():
    # Dropout on (the official pass runs in training mode), no autograd graph, no parameter change, mode restored.
    model = tiny_marian().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []  # Marian's dropout is functional, gated by the calling module's `training` flag
    for module in (model.model.encoder.layers[0].self_attn, model.model.decoder.layers[1].fc1):
        module.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    apply_admin(model, [seq2seq_batch()])
    assert sum(training for training, _ in seen) >= 2 and not any(grad for _, grad in seen)
    assert not model.training and not any(m.training for m in model.modules())
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())


def test_closed_form_matches_admin_torch_values():
    # sqrt((N+1)/ln(N+1) - 1) by hand, and admin-torch's README/admin.md examples.
    for n, value in ((24, 2.601), (12, 2.017), (18, 2.335), (36, 3.041), (200, 6.075)):
        assert closed_form_omega(n) == pytest.approx(value, abs=1e-3)
    model = tiny_marian()
    report = apply_admin(model, omega="closed_form")
    enc, dec = math.sqrt(5 / math.log(5) - 1), math.sqrt(7 / math.log(7) - 1)
    assert report.omegas("encoder") == pytest.approx([1.0] + [enc] * 3)
    assert report.omegas("decoder") == pytest.approx([1.0] + [dec] * 5)
    bert = tiny_bert()
    assert apply_admin(bert, omega=1.5, trainable=False).omegas() == [1.5] * 4
    assert not any(p.requires_grad for p in omegas(bert).values())


# --- the site table -----------------------------------------------------------------------------------------------


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)
FAMILIES = [
    ("bert", lambda: BertModel(tiny_bert_config()), 4, "embeddings.LayerNorm"),
    ("roberta", lambda: RobertaModel(RobertaConfig(**SMALL, max_position_embeddings=40)), 4, "embeddings.LayerNorm"),
    ("camembert", lambda: CamembertModel(CamembertConfig(**SMALL, max_position_embeddings=40)), 4, None),
    ("xlm-roberta", lambda: XLMRobertaModel(XLMRobertaConfig(**SMALL, max_position_embeddings=40)), 4, None),
    ("data2vec-text", lambda: Data2VecTextModel(Data2VecTextConfig(**SMALL, max_position_embeddings=40)), 4, None),
    ("electra", lambda: ElectraModel(ElectraConfig(**SMALL, embedding_size=16)), 4, "embeddings_project"),
    ("bert-decoder", lambda: BertModel(tiny_bert_config(is_decoder=True, add_cross_attention=True)), 6, None),
    (
        "bart",
        lambda: BartForConditionalGeneration(
            BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=40,
            )
        ),
        10,
        "model.encoder.layernorm_embedding",
    ),
    (
        "mt5",
        lambda: MT5ForConditionalGeneration(
            MT5Config(
                vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
            )
        ),
        10,
        None,
    ),
    (
        "umt5",
        lambda: UMT5ForConditionalGeneration(
            UMT5Config(
                vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
            )
        ),
        10,
        None,
    ),
]


@pytest.mark.parametrize("name,build,num_sites,first_producer", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_wires_and_folds_exactly(name, build, num_sites, first_producer):
    model = build().eval()
    is_t5 = "t5" in name
    report = apply_admin(model, omega=1.0 if is_t5 else "closed_form")
    assert len(report.sites) == num_sites
    assert len(omegas(model)) == num_sites  # every first sublayer reads a norm/projection output: all exportable
    randomize_omegas(model, torch.Generator().manual_seed(5))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    kwargs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids[:, :5]
    if name == "bert-decoder":
        kwargs["encoder_hidden_states"] = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(7))

    def final(m):
        out = m(**kwargs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    with torch.no_grad():
        admin_out = final(model)
        stock = export_vanilla(model)
        stock_out = final(stock)
    assert type(stock) is type(model) and not omegas(stock) and not hasattr(stock.config, "admin")
    assert not any(hooks for m in stock.modules() for hooks in (m._forward_pre_hooks, m._forward_hooks))
    assert (stock_out - admin_out).abs().max() / admin_out.abs().max() < 1e-5
    # ω changed the function (otherwise the equality above would be vacuous)
    ones = copy.deepcopy(model)
    with torch.no_grad():
        for p in omegas(ones).values():
            p.fill_(1.0)
        assert (final(ones) - admin_out).abs().max() / admin_out.abs().max() > 1e-2
    if first_producer is not None:
        site = report.sites[0]
        assert site.index == 1 and not site.fixed


def test_t5_gains_are_exactly_vanilla_at_init():
    model = tiny_t5().eval()
    vanilla = copy.deepcopy(model)
    batch = seq2seq_batch()
    report = apply_admin(model, [batch])  # batches are not needed for T5, and not used
    assert report.omega_init == "branch_gain" and report.omegas() == [1.0] * 10
    assert [s.name for s in report.sites[:2]] == [
        "encoder.block.0.layer.0.layer_norm",
        "encoder.block.0.layer.1.layer_norm",
    ]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, vanilla(**batch).logits)
        gen = model.generate(batch["input_ids"], max_new_tokens=6, do_sample=False)
        assert torch.equal(gen, vanilla.generate(batch["input_ids"], max_new_tokens=6, do_sample=False))
    model.train()
    vanilla.train()
    torch.manual_seed(11)
    a = model(**batch).loss
    torch.manual_seed(11)
    b = vanilla(**batch).loss
    assert torch.equal(a, b)  # same dropout draws: the gain hook consumes no randomness


def test_marian_non_exportable_mode_and_export_error_names_the_site():
    model = tiny_marian()
    report = apply_admin(model, omega="closed_form", exportable=False)
    assert not report.exportable and not any(s.fixed for s in report.sites)
    first = "model.encoder.layers.0.self_attn_layer_norm.admin_omega"
    with torch.no_grad():
        omegas(model)[first].fill_(1.0)
    # ω₁ == 1 everywhere still exports exactly (nothing to fold) for the encoder; the decoder's ω₁ is closed-form.
    with pytest.raises(AdminExportError, match="model.decoder.layers.0.self_attn_layer_norm.admin_omega"):
        export_vanilla(model)
    with torch.no_grad():
        omegas(model)["model.decoder.layers.0.self_attn_layer_norm.admin_omega"].fill_(1.0)
        omegas(model)[first][3] = 1.25  # "trained": per-dimension ω₁
    with pytest.raises(AdminExportError, match="first encoder sublayer.*exportable=True"):
        export_vanilla(model)


def test_find_residual_sites_public_api():
    # The public site lookup (used by hf_clinic.diagnostics): forward order, the stock modules, ω when present.
    model = tiny_marian()
    sites = find_residual_sites(model)
    enc, dec = model.model.encoder.layers, model.model.decoder.layers
    expected = [
        ("encoder", 1, "attention", enc[0].self_attn_layer_norm, enc[0].self_attn),
        ("encoder", 2, "ffn", enc[0].final_layer_norm, enc[0].fc1),
        ("encoder", 3, "attention", enc[1].self_attn_layer_norm, enc[1].self_attn),
        ("encoder", 4, "ffn", enc[1].final_layer_norm, enc[1].fc1),
    ]
    for layer in dec:
        expected += [
            ("decoder", None, "attention", layer.self_attn_layer_norm, layer.self_attn),
            ("decoder", None, "cross_attention", layer.encoder_attn_layer_norm, layer.encoder_attn),
            ("decoder", None, "ffn", layer.final_layer_norm, layer.fc1),
        ]
    assert len(sites) == len(expected) == 10
    for k, (site, (stack, index, kind, norm, entry)) in enumerate(zip(sites, expected, strict=True)):
        assert (site.stack, site.kind, site.wiring) == (stack, kind, "residual_capture")
        assert site.index == (index if index is not None else k - 3)
        assert site.norm is norm and site.entry is entry and model.get_submodule(site.norm_name) is norm
        assert site.omega is None  # no Admin yet
    report = apply_admin(model, omega="closed_form")
    sites = find_residual_sites(model)
    assert [s.norm_name for s in sites] == [s.name for s in report.sites]
    params = dict(model.named_parameters())
    for site, entry in zip(sites, report.sites, strict=True):
        if entry.fixed:
            assert site.omega is None
        else:
            assert site.omega is params[f"{site.norm_name}.{OMEGA_NAME}"]
    t5_sites = find_residual_sites(tiny_t5())
    assert [s.wiring for s in t5_sites] == ["branch_gain"] * 10 and t5_sites[-1].kind == "ffn"
    with pytest.raises(ValueError, match="Unsupported model type"):
        find_residual_sites(DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4)))


def test_clear_residual_captures_releases_an_interrupted_forward():
    import gc
    import weakref

    model = tiny_marian().eval()
    apply_admin(model, omega="closed_form")
    layer = model.model.encoder.layers[1]
    refs = []

    class Stop(Exception):
        pass

    def capture(module, args):
        refs.append(weakref.ref(args[0]))

    def stop(module, args):
        raise Stop

    handles = [
        layer.self_attn.register_forward_pre_hook(capture),
        layer.self_attn_layer_norm.register_forward_pre_hook(stop, prepend=True),
    ]
    batch = seq2seq_batch()
    with torch.no_grad(), pytest.raises(Stop):
        model(**batch)
    for handle in handles:
        handle.remove()
    gc.collect()
    assert refs[0]() is not None  # the interrupted forward left the residual referenced by Admin's capture
    clear_residual_captures(model)
    gc.collect()
    assert refs[0]() is None
    with torch.no_grad():
        model(**batch)  # and the model runs normally afterwards


# --- bad input ----------------------------------------------------------------------------------------------------


def test_unsupported_model_lists_supported_types():
    model = DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    with pytest.raises(ValueError, match=r"'distilbert'; supported: bart, bert, camembert.*ADMIN_ARCHITECTURES"):
        apply_admin(model, omega="closed_form")


def test_double_application_is_an_error():
    model = tiny_bert()
    apply_admin(model, omega="closed_form")
    before = {n: p.clone() for n, p in omegas(model).items()}
    with pytest.raises(ValueError, match="already applied.*4 admin_omega"):
        apply_admin(model, omega="closed_form")
    assert all(torch.equal(before[n], p) for n, p in omegas(model).items())


def test_pre_ln_models_are_refused():
    # T5 is pre-norm: Admin's residual ω is undefined; closed_form is refused.
    with pytest.raises(ValueError, match="pre-norm.*Post-LN"):
        apply_admin(tiny_t5(), omega="closed_form")
    # mBART has Marian's attribute names but is Pre-LN: the self-test forward catches it, and leaves no trace.
    mbart = MBartForConditionalGeneration(
        MBartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=40,
        )
    )
    with pytest.raises(ValueError, match="Pre-LN"):
        apply_admin(mbart, omega="closed_form", sites=ADMIN_ARCHITECTURES["marian"])
    assert not omegas(mbart) and not any(m._forward_pre_hooks for m in mbart.modules())
    # RoBERTa-PreLayerNorm has BERT's module names but no norm after the residual sum.
    prelayernorm = RobertaPreLayerNormModel(RobertaPreLayerNormConfig(**SMALL, max_position_embeddings=40))
    with pytest.raises(ValueError, match="no submodule 'attention.output.LayerNorm'.*Pre-LN"):
        apply_admin(prelayernorm, omega="closed_form", sites=ADMIN_ARCHITECTURES["bert"])


def test_invalid_arguments():
    for bad in ("logn", -1.0, 0, float("nan"), True):
        with pytest.raises(ValueError, match="Invalid omega"):
            apply_admin(tiny_bert(), omega=bad)
    with pytest.raises(ValueError, match="needs `batches`"):
        apply_admin(tiny_bert())
    with pytest.raises(ValueError, match="no Admin parameters"):
        export_vanilla(tiny_bert())
    model = tiny_bert()
    with pytest.raises(ValueError, match="before DDP/FSDP wrapping.*torch.compile"):
        apply_admin(torch.compile(model), omega="closed_form")


def test_models_built_from_one_config_are_marked_separately():
    config = tiny_marian_config()
    a, b = MarianMTModel(config), MarianMTModel(config)
    apply_admin(a, omega="closed_form")
    assert hasattr(a.config, "admin") and not hasattr(b.config, "admin")
    assert a.model.encoder.config is a.config and a.model.encoder.layers[0].self_attn.config is a.config
    apply_admin(b, omega="closed_form")  # not mistaken for an already-marked model


def test_paper_init():
    model = tiny_marian(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    positions = model.model.encoder.embed_positions.weight.clone()
    counts = paper_init(model)
    shared = model.model.shared.weight
    assert model.lm_head.weight is shared  # tied: keeps the embedding's init
    assert shared.std().item() == pytest.approx(64**-0.5, rel=0.05) and torch.all(shared[0] == 0)  # padding row
    fc1 = model.model.encoder.layers[0].fc1.weight  # Xavier-uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (64 + 128))
    assert fc1.abs().max() <= bound and fc1.abs().max() > 0.9 * bound
    assert torch.all(model.model.encoder.layers[0].fc1.bias == 0)
    assert torch.equal(model.model.encoder.embed_positions.weight, positions)  # frozen sinusoids untouched
    assert counts["embedding"] == 1 and counts["norm"] == 10
