"""Errors a user can fix, and how the scripts report them: one line, a non-zero exit, no traceback.

Bad data, config, checkpoint, command line, a missing network or a folder that cannot be written
raise a UserError (or a subclass) whose message says what is wrong, where (file and line, config
key and where its value came from) and what to do. `run_script` prints it as `error: <message>`
and exits with status 2; the scripts' `--debug` (or MOVIELENS_DEBUG=1) shows the traceback. Any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from typing import Callable, Optional


class UserError(Exception):
    """Something the user can fix; the message names it, where it is and what to do."""

    label, exit_code = "error", 2


class ConfigError(UserError, ValueError):
    """A config value or key that cannot be used."""


class DataError(UserError, ValueError):
    """A data folder or file that cannot be read as MovieLens."""


class CheckpointError(UserError, ValueError):
    """A file that is not a checkpoint of this repo, or not of this data."""


class Interrupted(UserError):
    """Ctrl-C, with what became of the work in progress and how to go on."""

    label, exit_code = "interrupted", 130


def out_of_memory(error: BaseException, device: object, remedy: str) -> Optional[UserError]:
    """The one line for an allocation that failed (CUDA's torch.OutOfMemoryError, the CPU
    allocator's RuntimeError, numpy's MemoryError), with the size it asked for; None for any
    other error."""
    text = str(error)
    if not (isinstance(error, MemoryError) or isinstance(error, RuntimeError) and
            ("can't allocate memory" in text or "out of memory" in text)):
        return None
    size = re.search(r"allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)", text, re.IGNORECASE)
    asked = f" (it asked for {size.group(1)} more)" if size else ""
    return UserError(f"out of memory on {device}{asked}; {remedy}")


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def quiet_while_loading() -> None:
    """Ctrl-C or kill while a script loads its libraries (torch alone takes seconds) ends it with
    one line and status 130 instead of an import's traceback; run_script then takes over."""
    def stop(signum: int, frame: object) -> None:
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(Interrupted.exit_code)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job (nohup ... &) ignores it
        signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def wait_for_rank_0_to_say_it(seconds: float = 60.0) -> None:
    """Under torchrun every process meets a config error, and rank 0 says it. Another rank that
    exited at once would have torchrun stop rank 0 before it spoke, so it waits for torchrun to
    end it (quietly, once rank 0 has exited with the error) and speaks itself only if not."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(seconds)


def quiet_kept_thread_errors(args: threading.ExceptHookArgs) -> None:
    """Threads that keep their OSError for their owner's next call (TensorBoard's writer, whose
    write met a full disk) end silently: the owner reports the error in one line."""
    if not (issubclass(args.exc_type, OSError) and getattr(args.thread, "exception", None) is args.exc_value):
        threading.__excepthook__(args)


def run_script(main: Callable[[Optional[list[str]]], object], argv: Optional[list[str]] = None) -> int:
    """Run a script's main(argv) as a command: 0 when it returns, else the UserError's exit code
    after its one line (`error: ...`). With --debug or MOVIELENS_DEBUG=1 it keeps its traceback.
    SIGTERM (kill, a job scheduler) stops it as Ctrl-C does: what can be kept is kept."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MOVIELENS_DEBUG") == "1"
    previous, previous_hook = signal.signal(signal.SIGTERM, interrupt), threading.excepthook
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.excepthook = quiet_kept_thread_errors
    try:
        main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except UserError as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") != "0":
            if isinstance(e, Interrupted):  # the signal reached every process: rank 0 says what was kept
                return e.exit_code
            wait_for_rank_0_to_say_it()
        print(f"{e.label}: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        threading.excepthook = previous_hook
    return 0


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help with each option's default where it has one (not for flags, None or [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in help:
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            help += f" (default: {default})"
        return help


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its description the first line of its docstring, defaults in --help."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=DefaultsHelpFormatter)
