"""sp_timeout_s accepts only what gloo and NCCL honour (issue 18 item 6, NOTE [ Collective timeouts ] in
memo/config.py): at least 1 ms (below, torch passes 0 ms, which the backends read as "the process
group's default": a peer waited 20 s at 1e-4), finite (inf became an OverflowError that read as a
dead rank) and at most 1e9 s, wherever it is accepted."""

import os
import re
import subprocess
import sys

import pytest

from memo.config import SP_TIMEOUT_MAX_S, SP_TIMEOUT_MIN_S, MemoConfig
from memo.errors import MemoError
from memo.integrations.accelerate import MemoPlugin

BAD = [(1e-4, "from 0.001 to 1e+09: gloo and NCCL count whole milliseconds"),
       (0.0009, "under 1 ms the timeout would silently become the process group's default"),
       (0, "must be a positive number of seconds"), (-3, "must be a positive number of seconds"),
       (1e10, "past 1e+09 s their deadlines overflow"),
       (float("inf"), "is not a finite number of seconds"), (float("nan"), "is not a finite number of seconds"),
       (True, "is not a finite number of seconds"), ("300", "is not a finite number of seconds")]


@pytest.mark.parametrize("value,words", BAD)
def test_memo_config_refuses_timeouts_the_backends_cannot_honour(value, words):
    with pytest.raises(MemoError) as e:
        MemoConfig(sp_timeout_s=value, host_memory_budget="1GiB")
    msg = str(e.value)
    assert msg.startswith(f"memo.config: sp_timeout_s={value!r} ") and words in msg, msg
    assert "0.001" in msg and "e.g. 300" in msg   # the minimum and a value to pass


@pytest.mark.parametrize("value", [SP_TIMEOUT_MIN_S, 0.5, 300, SP_TIMEOUT_MAX_S])
def test_memo_config_accepts_the_range_inclusive(value):
    assert MemoConfig(sp_timeout_s=value, host_memory_budget="1GiB").sp_timeout_s == float(value)


@pytest.mark.parametrize("text,words", [("1e-4", "under 1 ms"), ("inf", "not a finite number"),
                                        ("nan", "not a finite number"), ("1e12", "deadlines overflow")])
def test_memo_plugin_refuses_them_from_the_environment(monkeypatch, text, words):
    monkeypatch.setenv("MEMO_SP_TIMEOUT_S", text)
    with pytest.raises(MemoError) as e:
        MemoPlugin()
    assert f"MEMO_SP_TIMEOUT_S={text!r}" in str(e.value) and words in str(e.value), str(e.value)
    monkeypatch.delenv("MEMO_SP_TIMEOUT_S")
    with pytest.raises(MemoError, match="MemoPlugin.sp_timeout_s=0.0001 must be a positive number of seconds from "
                                        "0.001"):
        MemoPlugin(sp_timeout_s=1e-4)
    assert MemoPlugin(sp_timeout_s=0.001).to_memo_config(host_memory_budget="1GiB").sp_timeout_s == 0.001


def test_sequence_parallel_refuses_them_before_any_group_is_made():
    from memo.parallel.groups import sequence_parallel
    for value in (1e-4, float("inf")):
        with pytest.raises(MemoError, match=r"memo.parallel: timeout_s=.* (under 1 ms|not a finite number)"):
            sequence_parallel(timeout_s=value)


@pytest.mark.parametrize("text,words", [("abc", "MEMO_SP_TIMEOUT_S='abc' is not a number of seconds"),
                                        ("1e-4", "MEMO_SP_TIMEOUT_S=0.0001 must be a positive number of seconds"),
                                        ("inf", "MEMO_SP_TIMEOUT_S=inf is not a finite number")])
def test_memo_config_names_a_bad_MEMO_SP_TIMEOUT_S_default(monkeypatch, text, words):
    monkeypatch.setenv("MEMO_SP_TIMEOUT_S", text)
    with pytest.raises(MemoError, match=re.escape(f"memo.config: {words}")):
        MemoConfig(host_memory_budget="1GiB")
    from memo.parallel.groups import sequence_parallel
    with pytest.raises(MemoError, match=r"memo.(config|parallel): MEMO_SP_TIMEOUT_S="):
        sequence_parallel()
    monkeypatch.setenv("MEMO_SP_TIMEOUT_S", "60")
    assert MemoConfig(host_memory_budget="1GiB").sp_timeout_s == 60.0


def test_import_memo_survives_a_bad_MEMO_SP_TIMEOUT_S():
    """It once raised a bare ValueError at import (memo.parallel.groups read the variable then)."""
    code = "import memo, memo.parallel.groups, memo.integrations.accelerate; print('imported')"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MEMO_SP_TIMEOUT_S="abc"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]
