"""kill -9 (and SIGTERM) of a real quantize process at several points, then a rerun: the result is
the uninterrupted run's, bit for bit, and nothing left behind loads as a checkpoint."""
import signal
import subprocess

import pytest

from tests.faults.crash import KILL_POINTS, crash_and_resume, logits, quantize_cmd, write_calibration_text


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from haq import zoo

    model = zoo.build("tiny-mixtral")
    folder = tmp_path_factory.mktemp("ref")
    calib = write_calibration_text(folder / "calib.txt")
    subprocess.run(quantize_cmd(model, folder / "q", calib), check=True, capture_output=True)
    return model, calib, logits(folder / "q")


@pytest.mark.parametrize("point,sig", [(KILL_POINTS[0], signal.SIGKILL), (KILL_POINTS[2], signal.SIGKILL),
                                       (KILL_POINTS[1], signal.SIGTERM)])
def test_a_killed_quantize_resumes_to_the_uninterrupted_result(reference, tmp_path, point, sig):
    model, calib, ref = reference
    result = crash_and_resume(model, tmp_path / "q", calib, point, sig, ref)
    assert result.killed, f"the run ended before {point!r}: the kill point was not tested"
    assert result.leftover_refused, "a folder the kill left loads as a checkpoint"
    assert result.max_abs_logit_diff == 0.0
    assert result.leftovers_after_rerun == [], result.leftovers_after_rerun
