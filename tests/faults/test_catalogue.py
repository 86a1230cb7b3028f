"""Every case of the fault catalogue (tests/faults/cases_*.py) gives a clear one-line error or a
correct result, loses none of the user's files and leaves no temp folder; `bench/faults.py` runs
the same catalogue into bench/results/faults.md."""
import pytest

from tests.faults.catalogue import all_cases, build_fixtures
from tests.faults.runner import run_cases

CASES = all_cases()


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """Every case, two processes at a time; each test below reads its own."""
    fx = build_fixtures(tmp_path_factory.mktemp("fault-fixtures"))
    return {r.case: r for r in run_cases(CASES, fx, tmp_path_factory.mktemp("fault-cases"), timeout_s=120)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_case(case, results):
    result = results[case.id]
    assert result.ok, (f"{case.id}: {result.outcome}{' (data lost)' * result.data_lost}"
                       f"{' (temp left)' * result.temp_left}: {result.message}")
