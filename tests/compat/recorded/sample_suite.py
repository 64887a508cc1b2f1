"""A small unittest module whose verbose output has every shape the compatibility runner reads.

Run by tests/test_run_compat.py (and recorded under tests/compat/recorded/ on 3.9 and 3.13):
    python -m test -v --testdir tests/compat/recorded sample_suite 2>&1
Its tests fail, skip and print on purpose; it is not one of the project's tests.
With SAMPLE_HANG=1, Hang.test_hang never ends (the runner must isolate it and go on).
"""
import os
import sys
import threading
import unittest


class Plain(unittest.TestCase):
    def test_ok(self):
        pass

    def test_doc(self):
        """First line of a docstring."""

    def test_thread_prints(self):
        # A server thread prints between the " ... " and the verdict, as test_ssl's do.
        thread = threading.Thread(target=lambda: print(" server: hello from a thread", flush=True))
        thread.start()
        thread.join()

    def test_glued(self):
        # Output without a newline: the verdict ends up on the same line, not after " ... ".
        sys.stderr.write("\n server: no newline ")
        sys.stderr.flush()

    def test_subtests_fail(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertEqual(i % 2, 0)

    def test_subtest_skip(self):
        with self.subTest(i=1):
            self.skipTest("a skipped subtest")

    @unittest.expectedFailure
    def test_xfail(self):
        self.fail("expected")

    def test_error(self):
        raise RuntimeError("an error")

    @unittest.skip("a skipped test")
    def test_skipped(self):
        pass


class SkippedClass(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise unittest.SkipTest("a skipped class")

    def test_never(self):
        pass


class Hang(unittest.TestCase):
    def test_hang(self):
        if os.environ.get("SAMPLE_HANG"):
            threading.Event().wait()


class Zlast(unittest.TestCase):
    def test_after(self):
        pass
