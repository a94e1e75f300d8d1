"""SIGKILL at random moments (one during a checkpoint write), resumed each time: the final weights are bit-identical to
an uninterrupted run (the short version of benchmarks/kill_resume.py)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("kill_resume", Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py")
kill_resume = importlib.util.module_from_spec(spec); spec.loader.exec_module(kill_resume)


def test_sigkill_twice_then_resume_is_bit_identical(shared_data, tmp_path):
    s = kill_resume.run(kills=2, steps=8, seed=1, shared=shared_data, work=tmp_path, verbose=False)
    assert s["kills"] == 2, s["log"]                     # both kills landed before the run ended
    assert s["bit_identical"], s["tensors_differ"]
    assert s["metrics_steps_ok"]                         # steps 1..8 logged once each, cut-off lines dropped
