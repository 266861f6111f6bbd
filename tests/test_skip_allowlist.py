"""The skip allowlist of tests/conftest.py, run on small test files through pytester: a skip with
an allowed reason whose fact holds passes; any other skip, an xfail, an xpass, a skipped module or
fixture fails the run and is listed with its reason."""
import pathlib

import pytest
import torch

CONFTEST = (pathlib.Path(__file__).parent / "conftest.py").read_text()
CUDA = 'pytest.mark.skipif(True, reason="needs a CUDA device")'

CASES = {
    # name: (test file, CUDA present?, passes?, what the listing names)
    "cuda skip, no cuda": (f"import pytest\n@{CUDA}\ndef test_a(): pass\ndef test_b(): pass\n", False, True, None),
    "cuda skip, cuda present": (f"import pytest\n@{CUDA}\ndef test_a(): pass\n", True, False,
                                "test_a: needs a CUDA device"),
    "other reason": ("import pytest\n@pytest.mark.skipif(True, reason='no libaio')\ndef test_a(): pass\n"
                     "def test_b(): pass\n", False, False, "test_a: no libaio"),
    "cuda reason with more words": ("import pytest\ndef test_a():\n    pytest.skip('needs a CUDA device (and aio)')\n",
                                    False, False, "test_a: needs a CUDA device (and aio)"),
    "skip in a fixture": ("import pytest\n@pytest.fixture\ndef f():\n    pytest.skip('not root')\n"
                          "def test_a(f): pass\n", False, False, "test_a: not root"),
    "importorskip": ("import pytest\npytest.importorskip('no_such_module_here')\ndef test_a(): pass\n", False, False,
                     "could not import 'no_such_module_here'"),
    "gpu-present reason, no cuda": ("import pytest\ndef test_a():\n    pytest.skip('a GPU is present: the paper preset "
                                    "would run')\n", False, False, "test_a: a GPU is present"),
    "xfail": ("import pytest\n@pytest.mark.xfail(reason='flaky')\ndef test_a(): assert 0\n", False, False,
              "test_a: xfail: flaky"),
    "xpass": ("import pytest\n@pytest.mark.xfail(reason='flaky')\ndef test_a(): pass\n", False, False,
              "test_a: xfail (it passed): flaky"),
}


@pytest.mark.parametrize("case", CASES)
def test_skip_allowlist(pytester, monkeypatch, case):
    source, cuda, passes, listed = CASES[case]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)   # the inner run sees this machine as told
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=source)
    result = pytester.runpytest("-p", "no:cacheprovider")
    out = result.stdout.str()
    if passes:
        assert result.ret == 0, out
        assert "skips outside ALLOWED_SKIPS" not in out
        result.assert_outcomes(passed=1, skipped=1)
    else:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, out
        section = out.split("skips outside ALLOWED_SKIPS", 1)[1]
        assert listed in section and "the run fails" in section, out


def test_a_failing_test_and_a_bad_skip_are_both_reported(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner="import pytest\ndef test_a(): assert 0\n"
                                   "def test_b(): pytest.skip('later')\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1, skipped=1)
    assert "test_inner.py::test_b: later" in result.stdout.str()


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_data_is_allowed_outside_ci_only(pytester, monkeypatch, ci):
    """WikiText-2 and SST-2 are not shipped: a clone without ../shared/data (as the inner run's
    directory is) may skip their tests, but under CI=true, where shared/ is laid beside the
    checkout, the same skip fails the run."""
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner="import pytest\n"
                                   "@pytest.mark.skipif(True, reason='no WikiText-2 beside the checkout "
                                   "(../shared/data/wikitext-2)')\ndef test_a(): pass\n"
                                   "@pytest.mark.skipif(True, reason='no GLUE SST-2 beside the checkout "
                                   "(../shared/data/sst2)')\ndef test_b(): pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)
    if ci:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        assert "test_inner.py::test_a: no WikiText-2" in result.stdout.str()
        assert "test_inner.py::test_b: no GLUE SST-2" in result.stdout.str()
    else:
        assert result.ret == 0, result.stdout.str()
