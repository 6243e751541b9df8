"""Injection on real transformers models: targets, freezing, identity at init, training."""

from __future__ import annotations

import pytest
import torch
from lora_testkit import BUILDERS, assert_unchanged, logits, snapshot, tiny_bert_cls, token_batch
from torch import nn

from rankwise.errors import ConfigError, InjectionError
from rankwise.lora import (
    LoraConfig,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    get_config,
    inject,
    lora_layers,
    trainable_report,
)

BERT_TARGETS = ["query", "key", "value", "dense"]


def test_bert_seq_cls_identity_at_init_and_trainable_set() -> None:
    model = tiny_bert_cls()
    ref = logits(model, "bert")
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS, task_type="SEQ_CLS"))
    torch.testing.assert_close(logits(model, "bert"), ref, rtol=0, atol=1e-6)
    names = [n for n, _ in lora_layers(model)]
    # 2 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler
    assert len(names) == 2 * 6 + 1 and "bert.pooler.dense" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("classifier.")
    }
    assert get_config(model).modules_to_save == ["classifier", "score"]


def test_trainable_report_counts_and_text() -> None:
    model = tiny_bert_cls()
    total = sum(p.numel() for p in model.parameters())
    inject(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    rep = trainable_report(model)
    lora = 2 * 2 * (4 * 32 + 32 * 4)
    assert rep.trainable == lora + 32 * 2 + 2
    assert rep.total == total + lora
    assert rep.by_type["lora"].trainable == lora
    assert (
        str(rep)
        == f"trainable {rep.trainable / 1e3:.3g}K / {rep.total / 1e3:.3g}K ({rep.percent:.2f}%)"
    )


def test_report_format_matches_the_issue_example() -> None:
    from rankwise.lora.report import TrainableReport

    assert str(TrainableReport(341_000, 22_700_000, {})) == "trainable 0.34M / 22.7M (1.50%)"
    # a count that would read 0.00 of the total's unit is given in its own (PEFT prints 1,090)
    assert str(TrainableReport(1_090, 1_000_162, {})) == "trainable 1.09K / 1M (0.11%)"
    assert str(TrainableReport(16, 7_000_000_000, {})) == "trainable 16 / 7B (2.3e-07%)"
    assert str(TrainableReport(999_999, 10**9, {})) == "trainable 1M / 1B (0.10%)"
    assert str(TrainableReport(5_000, 10**6, {})) == "trainable 5K / 1M (0.50%)"
    assert str(TrainableReport(4_999, 10**6, {})) == "trainable 5K / 1M (0.50%)"


def test_only_adapter_and_head_parameters_change_after_steps() -> None:
    model = tiny_bert_cls().train()
    inject(
        model,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, target_modules=BERT_TARGETS, task_type="SEQ_CLS"
        ),
        generator=0,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        out = model(input_ids=token_batch(step), labels=torch.tensor([0, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n or n.startswith("classifier.") for n in changed)
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_make_the_right_biases_trainable(bias: str) -> None:
    model = tiny_bert_cls()
    inject(model, LoraConfig(r=2, target_modules=["query"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    if bias == "lora_only":
        assert trainable == {
            f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)
        }
    else:
        assert trainable == {n for n, _ in model.named_parameters() if n.endswith("bias")}


def test_wrapper_types_and_attributes() -> None:
    model = tiny_bert_cls()
    inject(model, LoraConfig(r=3, lora_alpha=6, target_modules=["query", "word_embeddings"]))
    q = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, LoraLinear) and isinstance(q.base_layer, nn.Linear)
    assert (q.r, q.scaling, q.merged) == (3, 2.0, False)
    assert q.lora_A.weight.shape == (3, 32) and q.lora_B.weight.shape == (32, 3)
    assert q.dropout is None  # p = 0: no dropout module at all
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, LoraEmbedding) and emb.lora_A.shape == (3, 99)


def test_inject_is_reproducible_with_a_generator() -> None:
    a, b = tiny_bert_cls(), tiny_bert_cls()
    cfg = LoraConfig(r=4, target_modules=["query"])
    inject(a, cfg, generator=7)
    inject(b, cfg, generator=7)
    for (_, la), (_, lb) in zip(lora_layers(a), lora_layers(b)):
        assert torch.equal(la.lora_A.weight, lb.lora_A.weight)


def test_dry_run_returns_names_and_touches_nothing() -> None:
    model = tiny_bert_cls()
    snap = snapshot(model)
    names = inject(model, LoraConfig(target_modules=["query"]), dry_run=True)
    assert names == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(target_modules=["qeury"]), "close candidates: \\['query'"),
        (LoraConfig(target_modules=["LayerNorm"]), "LayerNorm; supported types"),
        (LoraConfig(target_modules=r".*\.nothing"), "matched no module"),
        (LoraConfig(target_modules=["query"], modules_to_save=["head"]), "modules_to_save: 'head'"),
        (LoraConfig(target_modules=None), "target_modules"),
        # not "matched no module; close candidates: ['query', 'key']" for 'query' itself
        (
            LoraConfig(target_modules=["query", "key"], exclude_modules=".*"),
            r"matched 4 module\(s\) .*every one excluded by exclude_modules='\.\*'",
        ),
    ],
)
def test_bad_targets_raise_and_leave_the_model_unchanged(config: LoraConfig, message: str) -> None:
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(InjectionError, match=message):
        inject(model, config)
    assert_unchanged(model, snap)


class _Aliased(nn.Module):
    """One Linear registered under two names (``enc`` first, ``tied`` second), called through
    the second."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.tied = self.enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tied(x))


@pytest.mark.parametrize("targets", [["tied"], "tied", ["enc", "tied"]])
def test_a_second_name_of_a_shared_module_gets_a_hint(targets: list[str] | str) -> None:
    """named_modules() lists a shared module under its first name only (PEFT matches targets
    the same way): a target naming the second said "matches no module" and nothing more."""
    model = _Aliased()
    snap = snapshot(model)
    with pytest.raises(
        InjectionError, match=r"'tied' is a second name of module 'enc'.*target 'enc'"
    ):
        inject(model, LoraConfig(r=2, target_modules=targets))
    assert_unchanged(model, snap)


def test_a_target_registered_twice_warns_that_the_other_name_skips_the_adapter() -> None:
    model = _Aliased()
    with pytest.warns(UserWarning, match=r"target 'enc' is the same module as \['tied'\]"):
        inject(model, LoraConfig(r=2, target_modules=["enc"]))
    assert type(model.enc).__name__ == "LoraLinear"
    assert type(model.tied) is nn.Linear  # as PEFT: replaced under the first name only


class _SharedBlock(nn.Module):
    """One block applied three times (``ModuleList([blk, blk, blk])``): ``layers.1.q`` is
    ``layers.0.q`` reached through a shared parent, not a second registration."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential()
        block.q = nn.Linear(4, 4)
        self.layers = nn.ModuleList([block, block, block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block.q(x)
        return x


def test_a_block_shared_across_depth_gets_no_alias_warning() -> None:
    import warnings

    model = _SharedBlock()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "calls through 'layers.1.q' run the base layer": false
        inject(model, LoraConfig(r=2, target_modules=["q"]))
    assert all(type(block.q).__name__ == "LoraLinear" for block in model.layers)
    with pytest.raises(
        InjectionError, match=r"reached through a shared parent module: target 'layers\.0\.q'"
    ):
        inject(_SharedBlock(), LoraConfig(r=2, target_modules=["layers.1.q"]))


def test_injecting_twice_is_refused_without_change() -> None:
    model = tiny_bert_cls()
    inject(model, LoraConfig(target_modules=["query"]))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InjectionError, match="already injected"):
        inject(model, LoraConfig(target_modules=["value"]))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"r": -1},
        {"lora_alpha": 0},
        {"lora_dropout": 1.0},
        {"lora_dropout": -0.1},
        {"target_modules": "("},
        {"bias": "some"},
        {"init_lora_weights": "nope"},
        {"rank_pattern": {"query": 0}},
        {"target_modules": "q.*", "layers_to_transform": [0]},
    ],
)
def test_invalid_config_values_raise_at_construction(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_all_linear_matches_peft_and_keeps_outputs(family: str) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    task = "SEQ_CLS" if family in ("bert", "vit") else None
    ours = BUILDERS[family]()
    ref = logits(ours, family)
    names = inject(ours, LoraConfig(target_modules="all-linear", task_type=task), dry_run=True)
    peft_model = get_peft_model(
        BUILDERS[family](), PeftConfig(target_modules="all-linear", task_type=task)
    )
    theirs = [
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, PeftLoraLayer)
    ]
    assert sorted(names) == sorted(theirs)
    inject(ours, LoraConfig(target_modules="all-linear", task_type=task))
    torch.testing.assert_close(logits(ours, family), ref, rtol=0, atol=1e-6)
    assert all(isinstance(m, LoraLayer) for n, m in ours.named_modules() if n in names)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["query", "value"], "layers_to_transform": [1]},
        {"target_modules": ["dense"], "layers_to_transform": 0, "layers_pattern": "layer"},
        {"target_modules": r".*\.(query|key)", "exclude_modules": ["layer.0.attention.self.key"]},
        {"target_modules": ["dense"], "exclude_modules": r".*intermediate.*"},
        {"target_modules": ["query", "value"], "rank_pattern": {"layer.1.*query": 2}},
        # PEFT reads the shorthand in any case ("All-Linear" was taken as a regex here) and
        # an empty layers_pattern as its default one (refused here as an empty pattern)
        {"target_modules": "All-Linear", "task_type": "SEQ_CLS"},
        {"target_modules": ["query", "value"], "layers_to_transform": [1], "layers_pattern": ""},
    ],
)
def test_target_resolution_matches_peft(kwargs: dict) -> None:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    ours = inject(tiny_bert_cls(), LoraConfig(**kwargs), dry_run=True)
    peft_model = get_peft_model(tiny_bert_cls(), PeftConfig(**kwargs))
    theirs = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(m, PeftLoraLayer)
    }
    assert sorted(ours) == sorted(theirs)
    model = inject(tiny_bert_cls(), LoraConfig(**kwargs))
    for name, layer in lora_layers(model):
        assert layer.r == theirs[name].r["default"]
        assert layer.scaling == theirs[name].scaling["default"]


def test_rslora_scaling_and_patterns() -> None:
    model = inject(
        tiny_bert_cls(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["query"],
            alpha_pattern={"layer.1.attention.self.query": 2},
        ),
    )
    scales = [layer.scaling for _, layer in lora_layers(model)]
    assert scales == [8 / 2.0, 2 / 2.0]


@pytest.mark.parametrize("init", ["olora", "pissa", "pissa_exact"])
def test_a_non_finite_base_weight_is_refused_by_name_for_weight_factoring_inits(init: str) -> None:
    # OLoRA gave NaN factors silently; PiSSA's error named only "M"
    model = tiny_bert_cls()
    query = "bert.encoder.layer.1.attention.self.query"
    with torch.no_grad():
        model.get_submodule(query).weight[0, 1] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=2, target_modules=["query"], init_lora_weights=init)
    with pytest.raises(InjectionError, match=rf"{query}: the base weight holds 1 NaN/inf"):
        inject(model, config)
    after = model.state_dict()
    assert after.keys() == before.keys() and not hasattr(model, "_rankwise_lora")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    inject(model, LoraConfig(r=2, target_modules=["query"]))  # the default init reads no weight


@pytest.mark.parametrize("lazy", [nn.LazyLinear(4), nn.LazyConv2d(4, 3)])
def test_a_lazy_target_is_refused_by_name(lazy: nn.Module) -> None:
    # torch's "Can't access the shape of an uninitialized parameter" named no module
    model = nn.Sequential(nn.Linear(3, 3), lazy)
    with pytest.raises(InjectionError, match=r"module '1' is a lazy .*one forward pass"):
        inject(model, LoraConfig(r=2, target_modules=["1"]))
    assert model[1] is lazy
    # not a target: torch's unnamed error came after the target was wrapped
    for cfg in (LoraConfig(r=2, target_modules=["0"]), LoraConfig(r=2, target_modules=["0"],
                                                                   bias="all")):  # fmt: skip
        with pytest.raises(InjectionError, match=r"module '1' is a lazy"):
            inject(model, cfg)
        assert type(model[0]) is nn.Linear


def _bert_cls_4_layers() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
        vocab_size=99, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)  # 4 x 6 linear layers + pooler: 25 targets


@pytest.mark.parametrize(
    "targets",
    [
        "all-linear",
        ["query", "key", "value", "dense"],
        [f"layer.{i}.attention.self.query" for i in range(4)],
    ],
)
def test_long_target_lists_are_condensed_as_peft(tmp_path, targets) -> None:
    # PEFT rewrites a list of 20+ names (all-linear's expansion included) to the fewest
    # suffixes that select the same modules; rankwise attached and saved the 25 full paths
    import json

    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from rankwise.io import save_adapter

    kwargs = {"r": 2, "task_type": "SEQ_CLS", "target_modules": targets}
    names = inject(_bert_cls_4_layers(), LoraConfig(**kwargs), dry_run=True)
    if targets == "all-linear":  # 25 names, as listed
        assert len(names) == 25
        listed = inject(_bert_cls_4_layers(), LoraConfig(**{**kwargs, "target_modules": names}))
        assert sorted(get_config(listed).target_modules) == ["dense", "key", "query", "value"]
    ours = inject(_bert_cls_4_layers(), LoraConfig(**kwargs))
    theirs = get_peft_model(_bert_cls_4_layers(), PeftConfig(**kwargs))
    expected = theirs.peft_config["default"].target_modules
    expected = expected if isinstance(expected, str) else sorted(expected)
    got = get_config(ours).target_modules
    assert (got if isinstance(got, str) else sorted(got)) == expected
    assert sorted(n for n, _ in lora_layers(ours)) == sorted(names)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    read = [
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft")
    ]
    assert sorted(read[0]["target_modules"]) == sorted(read[1]["target_modules"])


def test_minimal_suffixes_select_the_same_names() -> None:
    from rankwise.lora.targets import minimal_suffixes

    names = [
        f"m.{part}.{i}.{leaf}" for part in ("enc", "dec") for i in range(12) for leaf in "qkvo"
    ]
    wanted = [n for n in names if n.endswith((".q", ".v")) or ".dec.3." in n]
    others = [n for n in names if n not in wanted]
    got = minimal_suffixes(wanted, others)
    assert got == ["dec.3.k", "dec.3.o", "q", "v"]  # "3.k" would take enc.3.k too
    from peft.tuners.tuners_utils import _find_minimal_target_modules

    assert got == sorted(_find_minimal_target_modules(wanted, others))

    def hit(n: str) -> bool:
        return any(n == s or n.endswith("." + s) for s in got)

    assert [n for n in names if hit(n)] == [n for n in names if n in wanted]


def test_mamba_layers_read_past_the_adapter_are_refused_or_left_out() -> None:
    # all-linear put an adapter on Mamba's dt_proj (its weight is used as `dt_proj.weight @ x`:
    # the unmerged output equalled the base's, merging then changed it) and out_proj (read by
    # the fused kernels; PEFT refuses it), without a word
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=50)
    model = MambaForCausalLM(config)
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match=r"left out 'backbone.layers.0.mixer.dt_proj' and 1"):
        names = inject(model, LoraConfig(target_modules="all-linear"), dry_run=True)
    assert names == ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.x_proj"]
    for target in ("dt_proj", "out_proj"):
        with pytest.raises(InjectionError, match=rf"mixer.{target}' cannot take an adapter"):
            inject(model, LoraConfig(target_modules=[target]))
        assert_unchanged(model, before)


def test_all_linear_on_fused_experts_says_they_stay_frozen() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, vocab_size=50,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match=r"experts are fused parameters .*gate_up_proj"):
        names = inject(MixtralForCausalLM(config), LoraConfig(target_modules="all-linear"))
    assert len(list(lora_layers(names))) == 4  # q, k, v, o


def test_a_long_list_with_layers_to_transform_is_not_condensed() -> None:
    # a full name is adapted whatever layers_to_transform says, a suffix only in those layers:
    # the condensed list selected 6 of 24 modules when read back (the file did not reload)
    names = inject(_bert_cls_4_layers(), LoraConfig(target_modules="all-linear"), dry_run=True)
    names = [n for n in names if "pooler" not in n]
    config = LoraConfig(target_modules=names, layers_to_transform=[0])
    model = inject(_bert_cls_4_layers(), config)
    assert sorted(get_config(model).target_modules) == sorted(names)
    again = inject(_bert_cls_4_layers(), get_config(model), dry_run=True)
    assert sorted(again) == sorted(names) and len(names) >= 24
