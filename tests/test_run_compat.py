"""The compatibility runner's parser and hang handling (tests/compat/run_compat.py).

The parser reads recorded outputs (tests/compat/recorded/): a real test_ssl run on 3.11 whose
server threads interleave with unittest's verbose lines, and tests/compat/recorded/sample_suite.py
run by 3.9's and 3.13's regrtest (subtests, fixtures, skips, expected failures, a verdict glued
to a thread's output, regrtest's --timeout). The hang tests run real processes.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

COMPAT = Path(__file__).resolve().parent / "compat"
RECORDED = COMPAT / "recorded"


def _load():
    spec = importlib.util.spec_from_file_location("run_compat", COMPAT / "run_compat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_compat"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rc = _load()

SAMPLE = {
    "sample_suite.Hang.test_hang": "ok",
    "sample_suite.Plain.test_doc": "ok",
    "sample_suite.Plain.test_error": "ERROR",
    "sample_suite.Plain.test_glued": "ok",
    "sample_suite.Plain.test_ok": "ok",
    "sample_suite.Plain.test_skipped": "skipped",
    "sample_suite.Plain.test_subtest_skip": "skipped",
    "sample_suite.Plain.test_subtests_fail": "FAIL",
    "sample_suite.Plain.test_thread_prints": "ok",
    "sample_suite.Plain.test_xfail": "expected failure",
    "sample_suite.Zlast.test_after": "ok",
}


def test_interleaved_test_ssl_output_counts_every_test():
    output = (RECORDED / "test_ssl_py311.txt").read_text()
    parsed = rc.parse_output(output)
    assert parsed.summary["ran"] == 183 and parsed.summary["skipped"] == 16
    assert len(parsed.verdicts) == 183
    assert sorted(parsed.verdicts.values()).count("skipped") == 16
    assert set(parsed.verdicts.values()) == {"ok", "skipped"}
    assert parsed.problems == [] and parsed.running is None
    # A test whose server printed between " ... " and its "ok" (the old parser lost these).
    assert parsed.verdicts["test.test_ssl.ThreadedTests.test_sni_callback"] == "ok"
    old = re.compile(r"^(\w+) \(([\w.]+)\)(?:\n[^\n]*?)? \.\.\. (ok|FAIL|ERROR|skipped.*|expected failure|"
                     r"unexpected success)$", re.M)
    assert len(old.findall(output)) < 183


@pytest.mark.parametrize("python", ["py39", "py313"])
def test_every_shape_of_verdict(python):
    parsed = rc.parse_output((RECORDED / f"sample_{python}.txt").read_text())
    assert parsed.verdicts == SAMPLE
    assert parsed.summary == {"ran": 11, "failures": 1, "errors": 1, "skipped": 3, "expected failures": 1,
                              "unexpected successes": 0}
    # The glued verdict is not at the end of a line of its own: the counts leave only "ok" for it.
    assert parsed.inferred == ["sample_suite.Plain.test_glued"]
    assert parsed.problems == []


def test_a_lost_verdict_the_counts_do_not_explain_is_a_problem():
    output = (RECORDED / "sample_py313.txt").read_text()
    # One more skip in the summary than found: the glued test could be that skip, so it is not ok.
    changed = output.replace("skipped=3,", "skipped=4,")
    parsed = rc.parse_output(changed)
    assert "sample_suite.Plain.test_glued" not in parsed.verdicts
    assert any("verdicts found for 10" in p for p in parsed.problems)
    assert any("skipped: the summary says 4, 3 skips found" in p for p in parsed.problems)


def test_failures_missing_from_the_headers_are_a_problem():
    output = (RECORDED / "sample_py39.txt").read_text().replace("failures=1,", "failures=2,")
    assert rc.parse_output(output).problems == ["failures: the summary says 2, 1 FAIL: headers found"]


def test_a_test_whose_verdict_line_is_missing_but_has_a_header_fails():
    output = (RECORDED / "sample_py313.txt").read_text()
    output = output.replace("test_error (sample_suite.Plain.test_error) ... ERROR\n", "")
    parsed = rc.parse_output(output)
    assert parsed.verdicts["sample_suite.Plain.test_error"] == "ERROR"
    assert parsed.problems == []


def test_regrtest_timeout_names_the_hanging_test():
    parsed = rc.parse_output((RECORDED / "sample_timeout_py311.txt").read_text())
    assert parsed.running == "sample_suite.Hang.test_hang"
    assert parsed.verdicts == {}
    assert parsed.problems == ["no unittest summary (the run was stopped or crashed)"]


def test_several_files_sum_their_summaries():
    one = (RECORDED / "sample_py313.txt").read_text()
    parsed = rc.parse_output(one + one.replace("sample_suite", "other_suite"))
    assert parsed.summaries == 2 and parsed.summary["ran"] == 22 and len(parsed.verdicts) == 22
    assert parsed.problems == []


def test_a_hanging_test_is_isolated_and_the_suite_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(rc, "TEST_STALL_S", 3)
    suite = rc.Suite("sample", ("--testdir", str(RECORDED), "sample_suite"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSOCK")}
    run = rc.run_suite(suite, dict(env, SAMPLE_HANG="1"), patched=False, workdir=tmp_path)
    assert run.hung == ["sample_suite.Hang.test_hang"]
    assert run.verdicts == dict(SAMPLE, **{"sample_suite.Hang.test_hang": "HANG"})
    assert run.problems == []
    assert any("sample_suite.Hang.test_hang hangs" in n for n in run.notes)


def test_a_process_that_does_not_exit_after_its_summary_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(rc, "EXIT_GRACE_S", 1)
    script = tmp_path / "linger.py"
    script.write_text("import sys, threading\n"
                      "sys.stderr.write('test_a (m.C.test_a) ... ok\\n\\n' + '-' * 70 + '\\nRan 1 test in 0.001s\\n\\nOK\\n')\n"
                      "print('Total duration: 1 ms', flush=True)\n"
                      "threading.Event().wait()\n")
    output, how = rc.run_process([sys.executable, str(script)], {}, deadline=float("inf"))
    assert how == "after-summary"
    assert rc.parse_output(output).verdicts == {"m.C.test_a": "ok"}


def test_known_failures_are_few_and_give_a_reason():
    known = rc.load_known()
    assert len(known) <= 5
    assert all(why for why in known.values())


def test_known_entries_are_ids_patterns_or_lists():
    known = {"m.C.test_a": "why a", "m.*Loop.test_b": "why b", "m.D.{test_c, test_d}": "why c"}
    assert rc.known_entry(known, "m.C.test_a") == "m.C.test_a"
    assert rc.known_entry(known, "m.PollLoop.test_b") == "m.*Loop.test_b"
    assert rc.known_entry(known, "m.D.test_d") == "m.D.{test_c, test_d}"
    assert rc.known_entry(known, "m.D.test_e") is None
    assert rc.known_entry(known, "m.C.test_ab") is None


def test_an_entry_whose_tests_all_pass_again_must_go():
    known = {"test.test_x.*Loop.test_b": "no client port", "test.test_x.C.test_r": "race: an ordering"}
    plain = {"test.test_x.PollLoop.test_b": "ok", "test.test_x.SelectLoop.test_b": "ok", "test.test_x.C.test_r": "ok"}
    assert rc.now_passing(known, plain, ["test.test_x.SelectLoop.test_b"], "test_x") == []
    assert rc.now_passing(known, plain, [], "test_x") == ["test.test_x.*Loop.test_b"]
    assert rc.now_passing(known, plain, [], "test_y") == []


def test_unittest_runs_end_at_their_summary_regrtest_runs_at_total_duration():
    summary = "Ran 1 test in 0.001s\n\nOK\n"
    patched = [sys.executable, "-m", "gridsock.monkey", "--node", "compat", "-m", "unittest", "-v", "m"]
    assert rc._is_final(summary, patched)
    assert not rc._is_final(summary, [sys.executable, "-m", "test", "-v", "test_x"])
    assert rc._is_final(summary + "\nTotal duration: 1 ms\n", [sys.executable, "-m", "test", "-v", "test_x"])


def test_a_child_that_keeps_the_output_open_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(rc, "EXIT_GRACE_S", 1)
    script = tmp_path / "orphan.py"
    script.write_text("import subprocess, sys\n"
                      "subprocess.Popen([sys.executable, '-c', 'import threading; threading.Event().wait()'])\n"
                      "print('Total duration: 1 ms', flush=True)\n")
    output, how = rc.run_process([sys.executable, str(script)], {}, deadline=float("inf"))
    assert "Total duration" in output
    assert how == "after-summary"


def test_a_python_that_does_not_count_decorator_skips_as_run():
    # 3.12.1's "Ran N tests" leaves out the tests its skip decorators skipped.
    output = (RECORDED / "sample_py313.txt").read_text().replace("Ran 11 tests", "Ran 10 tests")
    assert rc.parse_output(output, skips_run=False).problems == []
    assert rc.parse_output(output, skips_run=True).problems != []
    fewer = output.replace("Ran 10 tests", "Ran 8 tests")  # more than the skipped tests
    assert any("unittest ran 8 tests" in p for p in rc.parse_output(fewer, skips_run=False).problems)
