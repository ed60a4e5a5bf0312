"""up/forked.py: a function run in a forked child, its result or error brought back."""

from __future__ import annotations

import os
import sys

import pytest

from fzpoll.errors import LocalError
from fzpoll.up import forked


def _imports_and_returns(name: str) -> tuple[int, bool]:
    __import__(name)
    return os.getpid(), name in sys.modules


def test_result_comes_back_and_imports_stay_in_the_child() -> None:
    name = "wave"  # a stdlib module the tests never import
    assert name not in sys.modules
    pid, imported = forked.call(_imports_and_returns, name)
    assert imported and pid != os.getpid()
    assert name not in sys.modules  # what the child imported is not in the parent


def _fail_local() -> None:
    raise LocalError("cannot add route 10.0.0.0/24 via wg0: EEXIST")


def _fail_bug() -> None:
    raise KeyError("oops")


def _die() -> None:
    os._exit(3)


def test_local_error_is_raised_in_the_parent() -> None:
    with pytest.raises(LocalError, match="cannot add route 10.0.0.0/24 via wg0: EEXIST"):
        forked.call(_fail_local)


def test_a_bug_becomes_a_local_error_naming_it() -> None:
    with pytest.raises(LocalError, match="KeyError: 'oops'"):
        forked.call(_fail_bug)


def test_a_child_that_dies_without_answering() -> None:
    with pytest.raises(LocalError, match="died without an answer"):
        forked.call(_die)
