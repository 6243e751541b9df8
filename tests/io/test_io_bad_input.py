"""Bad adapter directories: each a clear error, and the model left exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_testkit import assert_unchanged, snapshot, tiny_bert_cls, tiny_gpt2
from safetensors.torch import load_file, save_file

from rankwise.errors import AdapterFormatError, InjectionError, ShapeMismatchError
from rankwise.io import load_adapter, read_adapter_config, save_adapter
from rankwise.lora import LoraConfig, get_config, inject, lora_layers

CFG = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    model = inject(tiny_bert_cls(), CFG, generator=0)
    return save_adapter(model, tmp_path / "good")


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
EMB = "base_model.model.bert.embeddings.word_embeddings.weight"


def _nan_embedding() -> torch.Tensor:
    weight = tiny_bert_cls().bert.embeddings.word_embeddings.weight.detach().clone()
    weight[3, 5] = float("nan")
    return weight


def _truncate(d: Path) -> None:
    p = d / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-40])


def _garble_header(d: Path) -> None:
    p = d / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:20] = b"not json!!!!"
    p.write_bytes(bytes(data))


def _only_pickle(d: Path) -> None:
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


CASES = {
    "truncated": (_truncate, AdapterFormatError, "not a valid safetensors file"),
    "corrupt header": (_garble_header, AdapterFormatError, "adapter_model.safetensors"),
    "empty file": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(b""),
        AdapterFormatError,
        "safetensors",
    ),
    "only a pickle": (_only_pickle, AdapterFormatError, "never unpickles"),
    "no weights": (
        lambda d: (d / "adapter_model.safetensors").unlink(),
        AdapterFormatError,
        "no adapter_model",
    ),
    "no config": (
        lambda d: (d / "adapter_config.json").unlink(),
        AdapterFormatError,
        "no adapter_config.json",
    ),
    "config not json": (
        lambda d: (d / "adapter_config.json").write_text("{r: 4"),
        AdapterFormatError,
        "not valid JSON",
    ),
    "not lora": (lambda d: _edit_config(d, peft_type="IA3"), AdapterFormatError, "'IA3'"),
    "dora": (lambda d: _edit_config(d, use_dora=True), AdapterFormatError, "use_dora"),
    "bad r": (lambda d: _edit_config(d, r=0), AdapterFormatError, "r: expected a positive int"),
    # PEFT re-ties saved/adapted embeddings with it; rankwise does not implement that
    "ensure_weight_tying": (
        lambda d: _edit_config(d, ensure_weight_tying=True),
        AdapterFormatError,
        "ensure_weight_tying=True is a PEFT feature rankwise does not implement",
    ),
    "missing key": (
        lambda d: _edit_weights(d, lambda t: t.pop(KEY)),
        AdapterFormatError,
        "missing \\[.*query.lora_A",
    ),
    "extra key": (
        lambda d: _edit_weights(
            d, lambda t: t.update({"base_model.model.x.lora_A.weight": torch.zeros(1)})
        ),
        AdapterFormatError,
        "unexpected \\['x.lora_A.weight'\\]",
    ),
    "no prefix": (
        lambda d: _edit_weights(d, lambda t: t.update({"x": t.pop(KEY)})),
        AdapterFormatError,
        "'x'",
    ),
    "wrong shape": (
        lambda d: _edit_weights(d, lambda t: t.update({KEY: torch.zeros(4, 31)})),
        ShapeMismatchError,
        r"'bert.encoder.layer.0.attention.self.query'.*expected shape \(4, 32\), found \(4, 31\)",
    ),
    "int dtype": (
        lambda d: _edit_weights(d, lambda t: t.update({KEY: t[KEY].to(torch.int32)})),
        AdapterFormatError,
        "dtype torch.int32",
    ),
    "nan": (
        lambda d: _edit_weights(d, lambda t: t[KEY].fill_(float("nan"))),
        AdapterFormatError,
        "inf or nan",
    ),
    "other targets": (
        lambda d: _edit_config(d, target_modules=["query", "key"]),
        AdapterFormatError,
        "missing \\[.*key.lora_A",
    ),
    # PEFT's save_embedding_layers keys are optional, but shape- and value-checked
    "embedding of other vocab": (
        lambda d: _edit_weights(d, lambda t: t.update({EMB: torch.zeros(120, 32)})),
        ShapeMismatchError,
        r"'bert.embeddings.word_embeddings'.*expected shape \(\d+, 32\), found \(120, 32\)",
    ),
    "config nested too deeply": (
        lambda d: (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),
        AdapterFormatError,
        "not valid JSON \\(nested too deeply\\)",
    ),
    # valid alone, an error inside PEFT's (.*\.)?(key)$: re.error escaped the load
    "inline flag in rank_pattern": (
        lambda d: _edit_config(d, rank_pattern={"(?i)QUERY": 2}),
        AdapterFormatError,
        "rank_pattern: '\\(\\?i\\)QUERY' is not valid where it is used",
    ),
    "base model not a string": (
        lambda d: _edit_config(d, base_model_name_or_path=123),
        AdapterFormatError,
        "base_model_name_or_path: expected a model id or path",
    ),
    "dot-dot module key": (
        lambda d: _edit_weights(
            d, lambda t: t.update({"base_model.model.../x.lora_A.weight": torch.zeros(1)})
        ),
        AdapterFormatError,
        "an empty name between dots",
    ),
    "embedding nan": (
        lambda d: _edit_weights(d, lambda t: t.update({EMB: _nan_embedding()})),
        AdapterFormatError,
        "word_embeddings.weight' holds inf or nan",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_raises_and_leaves_plain_model_unchanged(case: str, adapter_dir: Path) -> None:
    edit, error, message = CASES[case]
    edit(adapter_dir)
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(error, match=message):
        load_adapter(model, adapter_dir)
    assert_unchanged(model, snap)


def _injected_state(model: torch.nn.Module) -> tuple[object, ...]:
    """Everything a failed swap must leave as it was, besides the tensors."""
    layers = [
        (n, type(m).__name__, m.r, m.lora_alpha, m.scaling, m.lora_dropout, m.training)
        for n, m in lora_layers(model)
    ]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return layers, grads, get_config(model), model.training


INJECTED_CASES = {
    **{c: CASES[c] for c in ("wrong shape", "missing key", "nan", "truncated", "int dtype")},
    "other targets": (
        lambda d: _edit_config(d, target_modules=["query", "key"]),
        AdapterFormatError,
        r"config adapts other modules than the model's adapters: also \[.*self.key'.*"
        r"not \[.*self.value'",
    ),
}


@pytest.mark.parametrize("case", list(INJECTED_CASES))
def test_bad_adapter_leaves_injected_model_unchanged(case: str, adapter_dir: Path) -> None:
    edit, error, message = INJECTED_CASES[case]
    # the file also changes alpha and dropout: neither may land on a failure
    _edit_config(adapter_dir, lora_alpha=32, lora_dropout=0.25)
    edit(adapter_dir)
    model = inject(tiny_bert_cls(), CFG, generator=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _injected_state(model)
    with pytest.raises(error, match=message):
        load_adapter(model, adapter_dir, is_trainable=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert _injected_state(model) == state


def test_swap_checks_layers_to_transform_against_the_model(adapter_dir: Path) -> None:
    _edit_config(adapter_dir, layers_to_transform=[1])
    model = inject(tiny_bert_cls(), CFG, generator=3)
    with pytest.raises(AdapterFormatError, match=r"not \[.*layer.0.attention.self.query'"):
        load_adapter(model, adapter_dir)
    assert get_config(model).layers_to_transform is None


def test_swap_checks_modules_to_save_against_the_model(tmp_path: Path) -> None:
    src = inject(tiny_bert_cls(), CFG.replace(modules_to_save=["pooler"]), generator=0)
    save_adapter(src, tmp_path)
    model = inject(tiny_bert_cls(), CFG, generator=3)
    with pytest.raises(AdapterFormatError, match=r"keeps in full .* also \['bert.pooler'\]"):
        load_adapter(model, tmp_path)


@pytest.mark.parametrize(("have", "want"), [("plain", "dora"), ("dora", "plain"),
                                             ("plain", "adalora"), ("adalora", "dora")])  # fmt: skip
def test_swap_between_parametrizations_names_them(have: str, want: str, tmp_path: Path) -> None:
    """A DoRA file swapped into plain LoRA adapters said only "keys do not fit the model:
    unexpected [...lora_magnitude_vector]"."""
    from rankwise.lora import AdaLoraConfig

    configs = {"plain": CFG, "dora": CFG.replace(use_dora=True),
               "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                        target_modules=["query"])}  # fmt: skip
    save_adapter(inject(tiny_bert_cls(), configs[want], generator=0), tmp_path)
    model = inject(tiny_bert_cls(), configs[have], generator=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = {"plain": "plain LoRA", "dora": "DoRA", "adalora": "AdaLoRA"}
    with pytest.raises(
        AdapterFormatError, match=f"adapters are {names[have]}, the file's {names[want]}"
    ):
        load_adapter(model, tmp_path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert get_config(model).parametrization == configs[have].parametrization


def test_adapter_for_a_model_of_other_shapes_names_module_and_shapes(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    wide = BertForSequenceClassification(
        BertConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            vocab_size=99,
            num_labels=2,
        )
    )
    save_adapter(inject(wide, CFG, generator=0), tmp_path)
    for model in (tiny_bert_cls(), inject(tiny_bert_cls(), CFG, generator=3)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(
            ShapeMismatchError,
            match=r"module 'bert.encoder.layer.0.attention.self.query'.*"
            r"expected shape \(4, 32\), found \(4, 48\)",
        ):
            load_adapter(model, tmp_path)
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in after)


def test_adapter_for_another_architecture_names_the_module(tmp_path: Path) -> None:
    gpt2 = inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    save_adapter(gpt2, tmp_path)
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(InjectionError, match=r"target_modules: \['c_attn'\] matched no module"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_other_rank_for_injected_model(adapter_dir: Path) -> None:
    model = inject(tiny_bert_cls(), CFG.replace(r=2))
    with pytest.raises(ShapeMismatchError, match="r=4.*r=2"):
        load_adapter(model, adapter_dir)
    assert all(layer.r == 2 for _, layer in lora_layers(model))


def test_read_config_of_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="not an adapter directory"):
        read_adapter_config(tmp_path / "nope")


def test_non_finite_json_is_refused(adapter_dir: Path) -> None:
    path = adapter_dir / "adapter_config.json"
    path.write_text(path.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    with pytest.raises(AdapterFormatError, match="NaN"):
        read_adapter_config(adapter_dir)


def _with_head(tmp_path: Path, **kwargs) -> Path:
    cfg = CFG.replace(modules_to_save=["classifier"], **kwargs)
    return save_adapter(inject(tiny_bert_cls(), cfg, generator=0), tmp_path / "head")


def test_integer_value_for_a_float_modules_to_save_weight_is_refused(tmp_path: Path) -> None:
    d = _with_head(tmp_path)
    key = "base_model.model.classifier.weight"
    _edit_weights(d, lambda t: t.update({key: t[key].round().to(torch.int64)}))
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(AdapterFormatError, match=r"'classifier.weight' has dtype torch.int64"):
        load_adapter(model, d)
    assert_unchanged(model, snap)


def test_two_keys_for_one_tensor_must_agree(tmp_path: Path) -> None:
    # PEFT's bias="all" with modules_to_save writes the head's bias twice (m.bias and
    # m.modules_to_save.bias); equal copies load, differing ones are refused
    d = _with_head(tmp_path, bias="all")
    key = "base_model.model.classifier.bias"
    alias = "base_model.model.classifier.modules_to_save.bias"
    _edit_weights(d, lambda t: t.update({alias: t[key].clone() + 1.0}))
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(AdapterFormatError, match="both hold 'classifier.bias'.*differ"):
        load_adapter(model, d)
    assert_unchanged(model, snap)
    _edit_weights(d, lambda t: t.update({alias: t[key].clone()}))
    load_adapter(model, d)


def test_an_initializer_refusing_the_files_config_names_the_directory_and_module(
    tmp_path: Path,
) -> None:
    # OLoRA with r above the layer's dims: "olora_init: r must be an int in [1, ...]", naming
    # neither the adapter directory nor the module
    base = inject(tiny_bert_cls(), CFG, generator=0)
    directory = save_adapter(base, tmp_path / "a")
    width = 32
    _edit_config(directory, init_lora_weights="olora", r=width + 8)
    _edit_weights(
        directory,
        lambda t: t.update(
            {
                k: torch.zeros(width + 8, v.shape[1])
                if "lora_A" in k
                else torch.zeros(v.shape[0], width + 8)
                for k, v in list(t.items())
                if "lora_" in k
            }  # fmt: skip
        ),
    )
    model = tiny_bert_cls()
    snap = snapshot(model)
    with pytest.raises(
        InjectionError,
        match=rf"{directory}: module 'bert.encoder.layer.0.attention.self.query': olora",
    ):
        load_adapter(model, directory)
    assert_unchanged(model, snap)


def test_a_weights_file_or_a_config_without_targets_is_named(tmp_path) -> None:
    # a path to the weights file said "no adapter_config.json (not an adapter directory)";
    # a config without target_modules failed at injection, naming no file
    import json

    from lora_testkit import tiny_bert_cls

    from rankwise.errors import AdapterFormatError
    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import LoraConfig, inject

    directory = tmp_path / "adapter"
    save_adapter(inject(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"])), directory)
    weights = directory / "adapter_model.safetensors"
    with pytest.raises(
        AdapterFormatError, match=r"not an adapter directory: expected a directory .* found a file"
    ):
        load_adapter(tiny_bert_cls(), weights)
    config = directory / "adapter_config.json"
    data = json.loads(config.read_text())
    data.pop("target_modules")
    config.write_text(json.dumps(data))
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: target_modules is missing"):
        load_adapter(tiny_bert_cls(), directory)
