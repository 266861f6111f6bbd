import os
import pathlib

# Two cores, several processes (pytest, gloo ranks, helpers): OpenMP spin-waiting threads
# slow tiny CPU kernels by 100x when oversubscribed. One thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dist_world_1():
    """A one-process gloo world, as deepspeed.initialize needs outside the launcher."""
    import deepspeed
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("TRILEMMA_TEST_PORT", "29533"))
    deepspeed.init_distributed(dist_backend="gloo")
    yield


# --- Skips cannot grow silently ------------------------------------------------------------------
# A skipped test proves nothing, and a missing package or permission can turn whole files into
# skips while the run stays green. So every skip must give one of these reasons, word for word, and
# the fact behind it must hold on this machine; any other skip, and any xfail or xpass, fails the
# run at its end, naming each test and its reason. Active in every run, not only under CI=true: a
# developer sees the verdict CI will give (CI runs on machines without a GPU), but for the data
# sets below, which only CI is sure to have.
def _no_cuda() -> bool:
    return not torch.cuda.is_available()


# The real data sets are not shipped: they sit beside the checkout, in ../shared/data, in this
# project's layout and in CI. A clone elsewhere may lack them; under CI=true they must be there.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
NO_WIKITEXT2 = "no WikiText-2 beside the checkout (../shared/data/wikitext-2)"
NO_SST2 = "no GLUE SST-2 beside the checkout (../shared/data/sst2)"


def _outside_ci_without(path: str):
    return lambda: os.environ.get("CI") != "true" and not (SHARED_DATA / path).exists()


ALLOWED_SKIPS = {
    "needs a CUDA device": _no_cuda,
    # test_reproduce: only a machine without a GPU can see the paper preset refuse to run
    "a GPU is present: the paper preset would run": lambda: not _no_cuda(),
    NO_WIKITEXT2: _outside_ci_without("wikitext-2/wiki.train.tokens"),
    NO_SST2: _outside_ci_without("sst2/train.tsv"),
}


class SkipAllowlist:
    """Collects the skips ALLOWED_SKIPS does not accept; fails the session and lists them."""

    def __init__(self):
        self.unexplained = []   # (test id, reason)

    def _note(self, report) -> None:
        if hasattr(report, "wasxfail"):   # xfailed (reported as skipped) or xpassed (as passed)
            self.unexplained.append((report.nodeid, f"xfail{'' if report.skipped else ' (it passed)'}: "
                                                    f"{report.wasxfail}"))
            return
        text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = text.removeprefix("Skipped: ")
        holds = ALLOWED_SKIPS.get(reason)
        if holds is None or not holds():
            self.unexplained.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report):
        if report.skipped or hasattr(report, "wasxfail"):
            self._note(report)

    def pytest_collectreport(self, report):   # a whole module skipped (importorskip, skip at its top)
        if report.skipped:
            self._note(report)

    def pytest_sessionfinish(self, session):
        if self.unexplained and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.unexplained:
            terminalreporter.section("skips outside ALLOWED_SKIPS (tests/conftest.py)", red=True)
            for nodeid, reason in self.unexplained:
                terminalreporter.line(f"{nodeid}: {reason}", red=True)
            terminalreporter.line(f"{len(self.unexplained)} test(s) did not run, for reasons not allowed on this "
                                  "machine: the run fails. Install what they need, or fix them.")


def pytest_configure(config):
    config.pluginmanager.register(SkipAllowlist(), "skip-allowlist")
