"""LoRA-GA: the first SGD step follows the best rank-2r approximation of the gradient."""

from __future__ import annotations

import pytest
import torch
from lora_testkit import tiny_bert_cls, token_batch
from torch import nn

from rankwise.errors import ConfigError, InjectionError
from rankwise.lora import LoraConfig, lora_layers
from rankwise.lora.lora_ga import estimate_gradients, lora_ga_factors, lora_ga_init

TARGETS = ["query", "value", "output.dense"]


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = token_batch(seed, batch=3, seq=9)
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 1])}


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    return tiny_bert_cls().to(dtype).eval()


def _effective(layer: nn.Module) -> torch.Tensor:
    A, B = layer.factors()
    return layer.base_matrix().detach() + layer.scaling * (B.detach() @ A.detach())


def test_first_step_is_the_best_rank_2r_gradient_approximation() -> None:
    batch, r = _batch(), 2
    ref = _model()
    names = [
        n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(TARGETS))
    ]
    grads = estimate_gradients(ref, names, [batch], loss_fn=lambda m, b: m(**b).loss)
    with torch.no_grad():
        before = ref(input_ids=batch["input_ids"]).logits

    model = _model()
    cfg = LoraConfig(r=r, lora_alpha=4, target_modules=TARGETS)
    lora_ga_init(model, cfg, [batch], method="exact", generator=0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=batch["input_ids"]).logits, before, atol=1e-10, rtol=0
        )
    layers = dict(lora_layers(model))
    assert set(layers) == set(names)
    w0 = {n: _effective(layer) for n, layer in layers.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    eta = 1e-4  # small enough for O(η²) and large enough for float64 cancellation
    opt = torch.optim.SGD(trainable, lr=eta)
    model(**batch).loss.backward()
    opt.step()
    for name, layer in layers.items():
        assert layer.lora_A.weight.dtype == torch.float64  # adapters follow the model's dtype
        delta = _effective(layer) - w0[name]
        U, S, Vh = torch.linalg.svd(grads[name], full_matrices=False)
        G2r = (U[:, : 2 * r] * S[: 2 * r]) @ Vh[: 2 * r]
        k = (delta * G2r).sum() / G2r.square().sum()
        assert float(k) < 0  # a descent step
        residual = (delta - k * G2r).norm() / delta.norm()
        assert float(residual) <= 1e-4, name


def test_factors_are_arb2r_with_the_stable_scale() -> None:
    g = torch.Generator().manual_seed(0)
    G = torch.randn(24, 16, generator=g, dtype=torch.float64)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    A, B, base = lora_ga_factors(G, W, r=3, scaling=2.0, gamma=16, method="exact")
    c = 24**0.25 / 4.0
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    eye = torch.eye(3, dtype=G.dtype)
    # A: the first r right singular vectors (up to sign), B: the next r left ones, both times c
    torch.testing.assert_close(((A / c) @ Vh[:3].T).abs(), eye, atol=1e-10, rtol=0)
    torch.testing.assert_close((B / c).T @ (B / c), eye, atol=1e-10, rtol=0)
    # B spans the (r+1..2r)-th left singular vectors
    torch.testing.assert_close(U[:, 3:6] @ (U[:, 3:6].T @ B), B, atol=1e-10, rtol=0)
    torch.testing.assert_close(base + 2.0 * B @ A, W, atol=1e-12, rtol=0)


def test_layers_per_pass_gives_the_same_init_and_restores_flags() -> None:
    batches = [_batch(1), _batch(2)]
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    one = lora_ga_init(_model(torch.float32), cfg, batches, method="exact")
    chunked = lora_ga_init(_model(torch.float32), cfg, batches, method="exact", layers_per_pass=1)
    for (_, a), (_, b) in zip(lora_layers(one), lora_layers(chunked)):
        torch.testing.assert_close(
            a.lora_B.weight @ a.lora_A.weight, b.lora_B.weight @ b.lora_A.weight, atol=1e-5, rtol=0
        )
        assert a.base_layer.weight.grad is None
    trainable = {n for n, p in one.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier") for n in trainable)


def test_randomized_default_keeps_the_output() -> None:
    batch = _batch()
    model = _model(torch.float32)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    lora_ga_init(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS), [batch], generator=0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=batch["input_ids"]).logits, before, atol=1e-5, rtol=0
        )


def test_bad_input_leaves_the_model_unchanged() -> None:
    model = _model(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InjectionError, match="2r"):
        lora_ga_init(model, LoraConfig(r=17, target_modules=["query"]), [_batch()])
    with pytest.raises(ValueError, match="batches"):
        lora_ga_init(model, LoraConfig(r=2, target_modules=["query"]), [])
    # no save could hold it (for_original_base refuses DoRA): refused before training, not after
    with pytest.raises(ConfigError, match="use_dora"):
        lora_ga_init(model, LoraConfig(r=2, target_modules=["query"], use_dora=True), [_batch()])
    # another initializer was replaced by LoRA-GA's without a word
    for init in ("pissa", False, "gaussian"):
        cfg = LoraConfig(r=2, target_modules=["query"], init_lora_weights=init)
        with pytest.raises(ConfigError, match=rf"init_lora_weights: .*found {init!r}"):
            lora_ga_init(model, cfg, [_batch()])
    assert not hasattr(model, "_rankwise_lora")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_plain_lora_ga_file_is_refused_both_ways(tmp_path) -> None:
    """Its base lost s·B0 A0 (from gradients), which no loader can rebuild from a file
    (PEFT loads such a file silently wrong): only for_original_base saves are written/read."""
    import json

    from rankwise.errors import AdapterFormatError, ConfigError
    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import inject

    config = LoraConfig(r=2, target_modules=["query"], init_lora_weights="lora_ga")
    with pytest.raises(ConfigError, match="call rankwise.lora_ga_init"):
        inject(tiny_bert_cls(), config)  # it gave plain LoRA (B = 0, base untouched) silently
    model = lora_ga_init(tiny_bert_cls(), config.replace(init_lora_weights=True), [_batch()])
    with pytest.raises(ConfigError, match="for_original_base=True"):
        save_adapter(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    save_adapter(model, tmp_path / "ok", for_original_base=True)
    load_adapter(tiny_bert_cls(), tmp_path / "ok")
    path = tmp_path / "ok" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "lora_ga"}))
    with pytest.raises(AdapterFormatError, match="init_lora_weights='lora_ga'"):
        load_adapter(tiny_bert_cls(), tmp_path / "ok")


def test_targets_without_a_gradient_and_bad_settings_are_named() -> None:
    model = _model(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # pooler.dense matches "dense" but the loss below never reaches it (was a TypeError)
    with pytest.raises(ValueError, match="bert.pooler.dense: its weight got no gradient"):
        lora_ga_init(
            model,
            LoraConfig(r=2, target_modules=["query", "dense"]),
            [_batch()],
            loss_fn=lambda m, b: m.bert(input_ids=b["input_ids"]).last_hidden_state.sum(),
        )
    cfg = LoraConfig(r=2, target_modules=["query"])
    for gamma in (float("inf"), float("nan"), 0.0, True):  # inf gave A = B = 0: a dead adapter
        with pytest.raises(ValueError, match="gamma"):
            lora_ga_init(model, cfg, [_batch()], gamma=gamma)
    with pytest.raises(ValueError, match="layers_per_pass"):
        lora_ga_init(model, cfg, [_batch()], layers_per_pass=2.5)
    with pytest.raises(ValueError, match="loss on batch 0 is nan"):
        lora_ga_init(model, cfg, [_batch()], loss_fn=lambda m, b: m(**b).loss * float("nan"))
    assert not hasattr(model, "_rankwise_lora")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_tied_target_is_refused() -> None:
    from lora_testkit import tiny_gpt2

    model = tiny_gpt2()
    ids = token_batch(1, batch=2, seq=6)
    with pytest.raises(InjectionError, match="lm_head: its weight is shared"):
        lora_ga_init(
            model,
            LoraConfig(r=2, target_modules=["c_attn", "lm_head"]),
            [{"input_ids": ids, "labels": ids}],
        )
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not hasattr(model, "_rankwise_lora")


def test_an_unknown_method_is_refused_before_the_gradient_pass() -> None:
    # method="foo" was refused only after every batch's gradient had been computed
    calls = []

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        calls.append(1)
        return model(**batch).loss

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    model = _model()
    with pytest.raises(ValueError, match="method: expected 'randomized' or 'exact', found 'foo'"):
        lora_ga_init(model, cfg, [_batch()], loss_fn=loss_fn, method="foo")  # type: ignore[arg-type]
    assert calls == [] and not list(lora_layers(model))


def test_a_train_mode_sweep_is_reproducible_and_leaves_the_global_rng(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the model in train mode its dropout drew from torch's global RNG: generator=0 gave
    other factors under another global seed, and the caller's RNG was consumed (and CUDA's
    generators are not reseeded for it)."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    factors = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = _model().train()  # tiny BERT: dropout 0.1
        state = torch.get_rng_state()
        seeded.clear()  # (the test's own seeding above)
        lora_ga_init(model, cfg, [_batch()], generator=0)
        assert seeded == []
        assert torch.equal(torch.get_rng_state(), state) and model.training
        factors.append([t.detach().clone() for _, m in lora_layers(model) for t in m.factors()])
    for a, b in zip(*factors, strict=True):
        assert torch.equal(a, b)
