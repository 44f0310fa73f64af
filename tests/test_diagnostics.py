"""Warnings: said once, through one channel, with the problem apart from what is done about it."""

from __future__ import annotations

import logging
import warnings

import pytest

from composer_numa import diagnostics
from composer_numa.diagnostics import Diagnostic, NumaWarning, emit


def test_a_warning_is_emitted_once_and_only_as_a_warning(caplog):
    d = Diagnostic("too-few-cores", "2 ranks share 1 core", "their threads compete")
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emit(d)
        emit(d)
        emit(Diagnostic("too-few-cores", "2 ranks share 1 core", "their threads compete"))
    assert [str(w.message) for w in caught] == ["[too-few-cores] 2 ranks share 1 core: their threads compete"]
    assert caught[0].category is NumaWarning
    assert caplog.records == []  # not logged as well


def test_the_command_line_channel_is_one_stderr_line(capsys):
    emit(Diagnostic("bind-not-applied", "local rank 0: CPU affinity 4-7 not applied", "running unbound"),
         stderr=True)
    emit(Diagnostic("bind-not-applied", "local rank 0: CPU affinity 4-7 not applied", "running unbound"),
         stderr=True)
    assert capsys.readouterr().err == ("composer-numa: warning: [bind-not-applied] local rank 0: CPU affinity "
                                       "4-7 not applied: running unbound\n")


def test_forget_emitted_lets_a_warning_be_said_again():
    d = Diagnostic("setting-ignored", "x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emit(d)
        diagnostics.forget_emitted()
        emit(d)
    assert len(caught) == 2


def test_json_keeps_the_whole_text_and_codes_are_all_listed():
    d = Diagnostic("node-memory-insufficient", "rank 0 needs 2 GiB", "bind becomes preferred")
    assert d.to_json() == {"code": "node-memory-insufficient",
                           "message": "rank 0 needs 2 GiB: bind becomes preferred"}
    assert len(set(diagnostics.CODES)) == len(diagnostics.CODES)
    assert all(getattr(diagnostics, name) in diagnostics.CODES
               for name in diagnostics.__all__ if name.isupper() and name != "CODES")


def test_strict_errors_name_the_problem_not_the_fallback():
    from composer_numa.binding.session import bind_rank
    from composer_numa.errors import PlanError
    from composer_numa.plan import PlanOptions

    with pytest.raises(PlanError) as info:
        bind_rank(PlanOptions(memory="bind", memory_need="1P"), local_rank=0, nproc=1, strict=True,
                  environ={})
    text = str(info.value)
    assert "[node-memory-insufficient] rank 0 needs 1.0 PiB" in text
    assert "preferred instead" not in text and "\n" not in text
