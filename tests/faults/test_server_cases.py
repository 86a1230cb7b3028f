"""The server's fault cases (tests/faults/server.py) against a real `haq serve` process: every bad
request a 4xx with an OpenAI error body, hang-ups, floods and SIGTERM handled, no traceback."""
import pytest

from tests.faults.server import server_cases

pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from haq import zoo

    return server_cases(zoo.build("tiny-mixtral"), tmp_path_factory.mktemp("serve-faults"))


def test_every_server_case_is_a_clear_error_or_a_correct_result(results):
    bad = [f"{r.case}: {r.outcome} ({r.exit_code}) {r.message}" for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    assert len(results) >= 35
