"""blastfx.stage_times: compress's wall time per pipeline stage, recorded only inside the block."""
import re
import threading
import time

import pytest
import torch

import blastfx
from blastfx import BlastConfig
from blastfx.timing import stage
import models


def test_stages_nest_sum_their_repeats_and_count_them():
    with blastfx.stage_times() as times:
        with stage("outer"):
            for _ in range(3):
                with stage("inner"):
                    time.sleep(0.02)
        with stage("other"):
            pass
    assert list(times.seconds) == ["outer/inner", "outer", "other"]
    assert times.counts == {"outer/inner": 3, "outer": 1, "other": 1}
    assert times["outer/inner"] >= 0.06 and times["outer"] >= times["outer/inner"]
    assert times.total == pytest.approx(times["outer"] + times["other"])
    assert str(times).startswith("StageTimes(total ") and re.search(r"outer/inner \d+\.\d s \(3x\)", str(times))


def test_nothing_is_recorded_outside_the_block_nor_in_another_thread():
    seen = {}

    def other_thread():
        with stage("elsewhere"):
            pass
        seen["done"] = True

    with blastfx.stage_times() as times:
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    with stage("after"):
        pass
    assert seen == {"done": True} and times.seconds == {}


def test_a_stage_that_raises_is_still_charged_and_the_stack_unwinds():
    with blastfx.stage_times() as times:
        with pytest.raises(KeyError):
            with stage("failing"):
                raise KeyError("x")
        with stage("next"):
            pass
    assert set(times.seconds) == {"failing", "next"}


def test_stages_wait_for_the_gpu_only_while_recording(monkeypatch):
    from blastfx import timing
    waits = []
    monkeypatch.setattr(timing, "_sync", lambda: waits.append(1))
    with stage("unrecorded"):
        pass
    assert waits == []
    with blastfx.stage_times(), stage("recorded"):
        pass
    assert waits == [1, 1]                          # on entry and on exit


def test_a_failing_wait_still_unwinds_the_stack(monkeypatch):
    from blastfx import timing
    with blastfx.stage_times() as times:
        with pytest.raises(RuntimeError, match="device lost"):
            with stage("outer"):
                monkeypatch.setattr(timing, "_sync", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
        monkeypatch.setattr(timing, "_sync", lambda: None)
        with stage("next"):
            pass
    assert list(times.seconds) == ["outer", "next"]


@pytest.mark.parametrize("name", ["", "a/b", None])
def test_bad_stage_names_are_refused(name):
    with blastfx.stage_times(), pytest.raises(ValueError, match="stage name"):
        with stage(name):
            pass
    with pytest.raises(ValueError, match="stage name"):       # not only while recording
        with stage(name):
            pass


def test_compress_reports_its_pipeline_stages():
    batches = [torch.randint(3, 128, (2, 16)) for _ in range(2)]
    with blastfx.stage_times() as plain:
        blastfx.compress(models.tiny_llama(), 0.5, calibration=batches,
                         config=BlastConfig(progress=False, sequential=False))
    assert {"analyze", "statistics", "plan", "build"} <= set(plain.seconds)
    with blastfx.stage_times() as seq:
        blastfx.compress(models.tiny_llama(), 0.5, calibration=batches,
                         config=BlastConfig(progress=False, sequential=True, reconstruct_steps=2,
                                            compute_device="cpu"))
    assert {"sequential/capture", "sequential/statistics", "sequential/build", "sequential/forward",
            "sequential/reconstruct", "sequential/residency"} <= set(seq.seconds)
    # q/k/v, o, gate/up and down are the four stages of each of the two blocks
    assert seq.counts["sequential/build"] == 8 and seq.counts["sequential/reconstruct"] == 2
    assert sum(v for k, v in seq.seconds.items() if k.count("/") == 1) <= seq["sequential"] + 1e-6
