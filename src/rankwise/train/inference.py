"""Use a trained run: load an adapter (or a full / merged model), evaluate, predict, merge.

An adapter directory written by ``rankwise finetune`` holds the PEFT files plus the tokenizer
and ``rankwise_task.json`` (task, label names, max length, base model); the base model is
taken from there, from ``adapter_config.json``'s ``base_model_name_or_path``, or from an
explicit ``model`` argument. A PEFT adapter directory from elsewhere works too when the base
model and (for classification) the label names can be found.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rankwise.errors import AdapterFormatError, ConfigError, InjectionError, ShapeMismatchError
from rankwise.io import CONFIG_NAME
from rankwise.train.batching import encode
from rankwise.train.config import TASKS
from rankwise.train.data import TextDataset, load_dataset, valid_text
from rankwise.train.evaluate import EvalResult, evaluate
from rankwise.train.models import (
    TOKENIZER_FILES,
    check_positions,
    has_tokenizer_files,
    load_config,
    load_pretrained,
    resolve_model_source,
    with_pad_token,
)

TASK_FILE = "rankwise_task.json"


class Trained(NamedTuple):
    model: Any  # transformers model, adapters loaded (not merged), eval mode
    tokenizer: Any
    task: str
    label_names: tuple[str, ...]
    max_length: int
    has_adapter: bool


class Prediction(NamedTuple):
    text: str
    label: str
    probability: float


def read_task_info(directory: str | Path) -> dict[str, Any]:
    """``rankwise_task.json`` of a run's output directory, checked ({} when there is none).

    ``task`` must be one of the engine's tasks, ``label_names`` a list of distinct strings,
    ``base_model`` a string; any of them may be absent. A broken file is an
    :class:`AdapterFormatError` naming the file and the field, never a silent default.
    """
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise AdapterFormatError(f"{path}: not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(info, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type(info).__name__}")
    task = info.get("task")
    if task is not None and task not in TASKS:
        raise AdapterFormatError(
            f"{path}: 'task' must be one of {', '.join(TASKS)}, found {task!r}"
        )
    names = info.get("label_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AdapterFormatError(
                f"{path}: 'label_names' must be a list of strings, found {names!r}"
            )
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise AdapterFormatError(f"{path}: 'label_names' repeats {', '.join(map(repr, twice))}")
    base = info.get("base_model")
    if base is not None and not isinstance(base, str):
        raise AdapterFormatError(f"{path}: 'base_model' must be a string, found {base!r}")
    return info


def _label_names_of_model_dir(config: Any) -> tuple[str, ...]:
    """A model directory's label names as transformers reads them from its ``config``
    (``AutoConfig``): its ``id2label``, else ``LABEL_0..LABEL_{num_labels-1}`` (transformers 5
    leaves the default two-label id2label out of config.json, so the raw file of a binary
    classifier has none)."""
    id2label = config.id2label or {}
    return tuple(str(id2label[k]) for k in sorted(id2label, key=int))


def _max_length(info: dict[str, Any], directory: Path) -> int | None:
    """``max_length`` from the task file: a positive integer (None when it is not recorded)."""
    value = info.get("max_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterFormatError(
            f"{directory / TASK_FILE}: 'max_length' must be a positive integer, found {value!r}"
        )
    return value


FALLBACK_MAX_LENGTH = 128  # neither recorded nor known from the tokenizer or the model


def default_max_length(model: Any, tokenizer: Any) -> int:
    """Where texts are cut when no length is recorded (an adapter from PEFT, a model that
    rankwise did not train): the tokenizer's ``model_max_length`` (where transformers'
    ``truncation=True`` cuts), but never past the model's position table
    (``max_position_embeddings`` for a model without a learned one); 128 when none of them
    says (transformers' "no limit" value, a model without positions)."""
    from rankwise.train.models import position_limit

    limits = [getattr(tokenizer, "model_max_length", None), position_limit(model)]
    if limits[1] is None:
        limits.append(getattr(getattr(model, "config", None), "max_position_embeddings", None))
    # transformers says "no limit" with int(1e30) (VERY_LARGE_INTEGER)
    known = [n for n in limits if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31]
    return min(known) if known else FALLBACK_MAX_LENGTH


# PEFT task_type -> rankwise task (an adapter from elsewhere has no rankwise_task.json)
_PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}


def _model_config(base: str) -> dict[str, Any]:
    """The base model's config.json (a local directory; {} when it is a hub id not at hand)."""
    path = Path(base) / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
            reason = "nested too deeply" if isinstance(err, RecursionError) else err
            raise ConfigError(f"{path}: not valid JSON ({reason})") from None
        return data if isinstance(data, dict) else {}
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(base).to_dict()
    except (OSError, ValueError):
        return {}


def _task_of(config: dict[str, Any], task_type: str | None) -> str:
    """The task of an adapter or model without a task file: PEFT's ``task_type``, else the
    model class in ``architectures``; classification by default."""
    if task_type in _PEFT_TASKS:
        return _PEFT_TASKS[task_type]
    names = config.get("architectures") or []
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "causal-lm"
    return "classification"


def _head_size(root: Path) -> int | None:
    """Rows of the classifier head an adapter file carries (modules_to_save), if any."""
    from rankwise.io import adapter_weights_file

    return _head_rows(adapter_weights_file(root))


def _head_rows(weights: Path) -> int | None:
    """Rows of the classifier head in the safetensors file ``weights`` (read from its
    header), or None when it holds none."""
    from rankwise.io.files import read_header

    for key, info in read_header(weights).items():
        if key.endswith(HEAD_WEIGHT_KEYS):
            return int(info.shape[0])
    return None


# the output weights of transformers' *ForSequenceClassification heads (BERT's classifier,
# GPT-2/Llama's score, RoBERTa/ELECTRA's classifier.out_proj, BART's classification_head)
HEAD_WEIGHT_KEYS = (
    "classifier.weight",
    "score.weight",
    "classifier.out_proj.weight",
    "classification_head.out_proj.weight",
)


def _label_names(config: dict[str, Any], size: int | None) -> tuple[str, ...]:
    """The base model's ``id2label`` (when it has ``size`` labels), else ``LABEL_i``."""
    id2label = config.get("id2label") or {}
    names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    if size is None or len(names) == size:
        return names
    return tuple(f"LABEL_{i}" for i in range(size))


def load_trained(
    directory: str | Path, *, model: str | None = None, max_length: int | None = None
) -> Trained:
    """An adapter directory (with its base model) or a full model directory, ready to run.

    ``max_length`` replaces the recorded one (texts are cut at that many tokens); with
    neither, :func:`default_max_length`."""
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ConfigError(f"max_length: expected a positive integer, found {max_length!r}")
    root = Path(directory)
    if root.is_file():
        raise NotADirectoryError(
            f"adapter/model directory {str(root)!r} is a file; expected a directory "
            f"(its directory {str(root.parent)!r}?)"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"adapter/model directory {str(root)!r} does not exist")
    info = read_task_info(root)
    max_length = _max_length(info, root) if max_length is None else max_length
    has_adapter = (root / CONFIG_NAME).is_file()
    if not has_adapter and not (root / "config.json").is_file():
        raise AdapterFormatError(
            f"{root}: neither an adapter ({CONFIG_NAME}) nor a model directory (config.json)"
        )
    found = _adapter_base(root, info, model) if has_adapter else _model_dir_base(root, info, model)
    base, task, names, saves_head = found.source, found.task, found.label_names, found.saves_head
    if task == "classification" and not names:
        raise AdapterFormatError(
            f"{root}: label names are not recorded ({TASK_FILE}); cannot build the classifier"
        )
    if has_adapter and task == "classification" and not saves_head:
        # the head is the base model's then: a base without a trained one got a random head,
        # another at every load (predict's labels and merge's weights changed run to run); a
        # hub id is judged by its (cached) config, else left to from_pretrained's own error
        try:
            base_config = load_config(str(base))
        except (ConfigError, OSError, ValueError):
            base_config = None
        try:
            if base_config is not None:
                _check_trained_head(Path(base), base_config, names)
        except AdapterFormatError as err:
            raise AdapterFormatError(
                f"{root}: the adapter saves no classification head (no classifier in "
                f"modules_to_save), so the base model's is used, and {err}"
            ) from None
    loaded = load_pretrained(str(base), task=task, label_names=names, head_from_adapter=saves_head)
    tokenizer = loaded.tokenizer
    if has_adapter:
        from rankwise.io import load_adapter

        try:
            load_adapter(loaded.model, root)
        except (InjectionError, AdapterFormatError, ShapeMismatchError) as err:
            # "target_modules: [...] matched no module" named neither the model nor the adapter
            recorded = info.get("base_model") or found.recorded
            given = f"--model {str(base)!r}" if model is not None else f"base model {str(base)!r}"
            other = f", recorded base {recorded!r}" if recorded and recorded != base else ""
            raise type(err)(f"adapter {str(root)!r} on {given}{other}: {err}") from None
        tokenizer = _adapter_tokenizer(root, tokenizer)
    loaded.model.eval()
    if max_length is None:  # not recorded (an adapter from PEFT): transformers' limit
        max_length = default_max_length(loaded.model, tokenizer)
    return Trained(loaded.model, tokenizer, task, names, max_length, has_adapter)


class _Base(NamedTuple):
    """What :func:`load_trained` loads under an adapter (or a full model directory)."""

    source: str
    task: str
    label_names: tuple[str, ...]
    saves_head: bool  # the adapter brings the trained classification head (modules_to_save)
    recorded: str | None = None  # the base the adapter config names (base_model_name_or_path)


def _adapter_base(root: Path, info: dict[str, Any], model: str | None) -> _Base:
    """The base model, task and label names of the adapter directory ``root`` (its task file,
    else a PEFT adapter's ``task_type`` and base model config); ``model`` overrides the base."""
    from rankwise.io import read_adapter_config

    with warnings.catch_warnings():  # load_adapter reads the file again and warns once
        warnings.simplefilter("ignore", RuntimeWarning)
        adapter_config = read_adapter_config(root)
    # an adapter whose file carries the head replaces a checkpoint head of another size: no
    # "re-initialized" warning for a head that is not the one used (another modules_to_save
    # entry, the pooler say, does not bring one)
    head_size = _head_size(root)
    saves_head = head_size is not None
    base = model or info.get("base_model") or adapter_config.base_model_name_or_path
    if base is None:
        raise AdapterFormatError(f"{root}: the base model is not recorded; pass --model")
    if model is None:  # a recorded path from another machine: say where it came from
        where = TASK_FILE if info.get("base_model") else CONFIG_NAME
        try:
            resolve_model_source(str(base))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"base model path {str(base)!r} (recorded in {root / where}) does not exist "
                "here; pass --model PATH"
            ) from None
    # a PEFT adapter from elsewhere (no task file): task from its task_type or the base
    # model's class, label names from the base model's config and the head's size
    names = tuple(info.get("label_names") or ())
    task = str(info.get("task") or "")
    if not task or (task == "classification" and not names):
        config = _model_config(str(base))
        task = task or _task_of(config, adapter_config.task_type)
        if task == "classification" and not names:
            names = _label_names(config, head_size)
    return _Base(str(base), task, names, saves_head, adapter_config.base_model_name_or_path)


def _model_dir_base(root: Path, info: dict[str, Any], model: str | None) -> _Base:
    """A full (or merged) model directory carries its own base: ``model`` is refused."""
    if model is not None:  # it was ignored: another base, or a path that does not exist
        raise ConfigError(
            f"--model {model!r}: {str(root)!r} is a full model directory (no "
            f"{CONFIG_NAME}), which carries its own base; --model applies to adapter "
            "directories only"
        )
    names = tuple(info.get("label_names") or ())
    task = str(info.get("task") or _task_of(_model_config(str(root)), None))
    if task == "classification":
        config = load_config(str(root), option="--adapter")  # read once: names and head
        names = names or _label_names_of_model_dir(config)
        _check_trained_head(root, config, names)
    return _Base(str(root), task, names, False)


def _check_trained_head(root: Path, config: Any, names: tuple[str, ...]) -> None:
    """A full model directory must bring a classification head for ``names``: loading it
    otherwise initializes a random one (a base model's directory, or a head of another size),
    and predictions change from run to run. Read from ``architectures`` (a
    ``*ForSequenceClassification`` class) and the config's labels; a config without
    ``architectures`` is judged by the head weights in ``model.safetensors``."""
    if config.architectures:
        trained = any(a.endswith("ForSequenceClassification") for a in config.architectures)
        rows = config.num_labels if trained else None
    else:
        weights = root / "model.safetensors"
        if not weights.is_file():  # sharded or another format: nothing to tell from here
            return
        rows = _head_rows(weights)
    if rows is None:
        raise AdapterFormatError(
            f"{root}: a model directory without a trained classification head (architectures "
            f"{config.architectures or []}); predict/evaluate need a finetuned classifier: a "
            "finetune run's adapter/ or merged/ directory"
        )
    if rows != len(names):
        raise AdapterFormatError(
            f"{root}: its classification head has {rows} labels, the recorded labels are "
            f"{len(names)} ({list(names)}); the head would be re-initialized"
        )


def _adapter_tokenizer(root: Path, base_tokenizer: Any) -> Any:
    """The tokenizer saved beside an adapter, when it holds a vocabulary (a
    tokenizer_config.json alone is ignored, with a warning), else the base model's."""
    if has_tokenizer_files(root):
        from transformers import AutoTokenizer

        return with_pad_token(AutoTokenizer.from_pretrained(root), str(root))
    if (root / "tokenizer_config.json").is_file():
        warnings.warn(
            f"{root}: tokenizer_config.json without a vocabulary file (one of "
            f"{', '.join(TOKENIZER_FILES)}) is ignored; the base model's tokenizer is used",
            RuntimeWarning,
            stacklevel=3,
        )
    return base_tokenizer


def evaluate_file(
    trained: Trained,
    data: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
) -> EvalResult:
    """Accuracy (classification) or perplexity (causal LM) of ``trained`` on a data file."""
    names = trained.label_names if trained.task == "classification" else None
    dataset = load_dataset(
        data,
        task=trained.task,
        text_column=text_column,
        label_column=label_column,
        label_names=names,
    )
    encoded = encode(dataset, trained.tokenizer, task=trained.task, max_length=trained.max_length)
    check_positions(trained.model, encoded.lengths(), where=str(data))
    result = evaluate(
        trained.model, encoded, batch_size=batch_size, pad_id=trained.tokenizer.pad_token_id
    )
    bad = 0 if result.logits is None else int((~torch.isfinite(result.logits).all(dim=-1)).sum())
    if bad or not math.isfinite(result.loss):  # NaN's argmax is a label: a made-up accuracy
        rows = f" for {bad} of {result.examples} examples" if bad else ""
        raise ValueError(
            f"evaluate: the model's outputs on {data!r} are not finite (NaN/inf){rows}; the "
            "adapter's weights overflow this model"
        )
    return result


@torch.no_grad()
def predict(trained: Trained, texts: list[str]) -> list[Prediction]:
    """The most likely label and its softmax probability for each text (classification)."""
    if trained.task != "classification":
        raise ValueError(
            f"predict: the run's task is {trained.task!r}; predict supports classification"
        )
    if not texts:
        raise ValueError("predict: expected at least one text, found none")
    for number, text in enumerate(texts, start=1):
        valid_text(text, where=f"predict: text {number}")
    dataset = TextDataset(tuple(texts), tuple(0 for _ in texts), trained.label_names, None, "argv")
    encoded = encode(
        dataset, trained.tokenizer, task="classification", max_length=trained.max_length
    )
    check_positions(trained.model, encoded.lengths(), where="predict")
    result = evaluate(trained.model, encoded, batch_size=64, pad_id=trained.tokenizer.pad_token_id)
    bad = (~torch.isfinite(result.logits).all(dim=-1)).nonzero().flatten().tolist()
    if bad:  # NaN argmax is label 0: a confident-looking answer from a broken model
        raise ValueError(
            f"predict: the model's outputs for text {bad[0] + 1} are not finite (NaN/inf); "
            "the adapter's weights overflow this model"
        )
    probs = torch.softmax(result.logits, dim=-1)  # (texts, classes)
    best = probs.argmax(dim=-1).tolist()
    return [
        Prediction(t, trained.label_names[b], float(probs[i, b]))
        for i, (t, b) in enumerate(zip(texts, best))
    ]


def merge_to(trained: Trained, out: str | Path) -> Path:
    """Merge the adapter into the base weights and save a plain transformers model directory."""
    from rankwise.io.files import made_parents, readable_files, replaced_dir
    from rankwise.lora import merge_and_unload

    if isinstance(out, str) and not out.strip():  # Path("") is the working directory
        raise ConfigError("merge: out: expected a directory, found an empty string")
    if not trained.has_adapter:
        raise AdapterFormatError(
            "merge: the directory holds a full model, not an adapter; nothing to merge"
        )
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ConfigError(f"merge: output {str(final)!r} exists and is not an empty directory")
    with made_parents(final):  # a refused or failed merge leaves none of them behind
        model = merge_and_unload(trained.model)
        # replaced_dir, not a rename of the directory: --out . or $PWD, an empty working
        # directory, gets the files moved in (a rename failed there, leaving the whole model in
        # a hidden temporary, or swapped the directory out from under the shell)
        with replaced_dir(final) as tmp:
            model.save_pretrained(tmp)
            trained.tokenizer.save_pretrained(tmp)
            # the task, labels and max length travel with the model (evaluate/predict read them)
            task = {"task": trained.task, "label_names": list(trained.label_names)}
            (tmp / TASK_FILE).write_text(
                json.dumps({**task, "max_length": trained.max_length}, indent=2), encoding="utf-8"
            )
            readable_files(tmp)  # final is new or empty: every file here was written now
    return final


# Tokenizer files and the run's task file, copied from --finetuned (a model directory, which
# holds much else) by extract so predict/evaluate work on the result; the vocabulary files of
# transformers' tokenizers (their VOCAB_FILES_NAMES) besides the common ones
SIDECARS = ("rankwise_task.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
            "spiece.model", "spm.model", "tokenizer.model", "sentencepiece.bpe.model",
            "sentencepiece.model", "chat_template.jinja", "chat_template.json", "bpe.codes",
            "entity_vocab.json", "source.spm", "target.spm", "target_vocab.json",
            "normalizer.json")  # fmt: skip


def sidecar_file(path: Path) -> bool:
    """Whether ``path`` is a file to copy as a sidecar: a regular file, or a symbolic link
    to one inside its own directory or, in a Hugging Face cache snapshot
    (``<repo>/snapshots/<rev>/``, or a folder below it), inside that repository's ``blobs``.
    A link elsewhere is skipped with a warning: a downloaded adapter could otherwise pull any
    file the user can read (``tokenizer.json -> ~/.ssh/id_rsa``) into an adapter derived from
    it, which the user may then share."""
    if not path.is_symlink():
        return path.is_file()
    if not path.is_file():
        return False
    folder = path.parent.resolve()
    target = path.resolve()
    roots = [folder]
    for ancestor in (folder, *folder.parents):
        if ancestor.parent.name == "snapshots":  # <repo>/snapshots/<rev>: links into blobs
            roots.append(ancestor.parent.parent / "blobs")
            break
    if any(target.is_relative_to(root) for root in roots):
        return True
    warnings.warn(
        f"{path}: not copied: a symbolic link to {str(target)!r}, outside the adapter's "
        "directory (and not a hub cache blob)",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def copy_extract_sidecars(
    source: str, destination: str, *, task: dict | None, base: str, tuned_config: Any
) -> list[str]:
    """Tokenizer files as they are; the task file with ``base_model`` set to ``base`` (the
    extracted adapter applies to that model, not to the fine-tuned one's own base). A model
    fine-tuned elsewhere has no task file: one is written from its config (the task from its
    class, the label names from its ``id2label``), so predict/evaluate/merge name the labels as
    the fine-tuned model does instead of the base's (often ``LABEL_i``)."""
    import shutil

    from rankwise.train.config import atomic_write_text

    copied = []
    for name in SIDECARS:
        path = Path(source) / name
        if name == "rankwise_task.json":
            info = task if sidecar_file(path) else task_from_config(tuned_config)
            if info is None:
                continue
            info = {**info, "base_model": base}
            atomic_write_text(Path(destination) / name, json.dumps(info, indent=2))
        elif sidecar_file(path):
            shutil.copy2(path, Path(destination) / name)
        else:
            continue
        copied.append(name)
    return copied


def task_from_config(config: Any) -> dict | None:
    """``rankwise_task.json`` fields of a transformers model without one (None if its class
    is neither a sequence classifier nor a causal LM)."""
    names = getattr(config, "architectures", None) or []
    if any(n.endswith("ForSequenceClassification") for n in names):
        id2label = config.id2label or {}
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        return {"task": "classification", "label_names": labels}
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return {"task": "causal-lm", "label_names": []}
    return None
