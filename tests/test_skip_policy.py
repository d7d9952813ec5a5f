"""The skip policy of tests/conftest.py (SkipPolicy, EXPECTED_SKIPS): a test skipped for a reason that is
not allowed fails the session, so a missing tool or dependency is never a quiet "s" in a green run."""

from __future__ import annotations

import pytest

from tests.conftest import EXPECTED_SKIPS, SkipPolicy

pytest_plugins = ["pytester"]

QUIET = ("-p", "no:asyncio")  # the inner sessions need no asyncio (and it warns without its ini options)
TESTS = """
import pytest

def test_runs():
    pass

def test_skipped():
    pytest.skip("promtool is not installed")

@pytest.mark.xfail(reason="a known bug")
def test_known_bug():
    raise AssertionError
"""


def test_policy_is_active_in_this_suite(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("loraloop-skip-policy")
    assert isinstance(plugin, SkipPolicy) and plugin.expected is EXPECTED_SKIPS
    assert "-rfEs" in pytestconfig.getini("addopts") and "--strict-markers" in pytestconfig.getini("addopts")


def test_unexpected_skip_fails_the_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=TESTS)
    result = pytester.runpytest("-rs", *QUIET, plugins=[SkipPolicy({})])
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*1 unexpected skip(s): the run fails*", "test_a.py::test_skipped: promtool is not installed"]
    )


def test_allowed_skip_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=TESTS)
    result = pytester.runpytest(*QUIET, plugins=[SkipPolicy({"^promtool is not installed$": "allowed in this test"})])
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "unexpected skip" not in result.stdout.str()


def test_a_module_skipped_as_a_whole_fails_the_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a="import pytest\npytest.importorskip('no_such_module_here')", test_b="def test_b(): pass")
    result = pytester.runpytest(*QUIET, plugins=[SkipPolicy({})])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*1 unexpected skip(s)*", "test_a.py: could not import 'no_such_module_here'*"])
