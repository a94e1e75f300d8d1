"""Run every notebook in nbs/ top to bottom, one pytest test per notebook.

Each notebook runs through nbdev's `test_nb` (the engine of `nbdev_test`) in a fresh Python process,
as `nbdev_test` does: notebooks then cannot leak state into each other (process groups, seeds, default
dtype, threads, imported modules). Cells carrying a flag from settings.ini `tst_flags`
(`#| notest`, `#| slow`) are skipped; nbdev sets IN_TEST=1, so notebooks can shrink their configs.

Environment knobs:
  DINO_NB_FORCE_FLAGS="slow"  run cells with these flags anyway (e.g. the slow ones)
  DINO_NB_TIMEOUT=1200        seconds allowed per notebook
"""
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbdev.test import test_nb as _run_nb  # renamed so pytest does not collect it as a test

REPO_ROOT = Path(__file__).resolve().parent.parent


def _settings():
    cp = configparser.ConfigParser(delimiters=["="])
    cp.read(REPO_ROOT / "settings.ini", encoding="utf-8")
    return cp["DEFAULT"]


NBS_DIR = REPO_ROOT / _settings().get("nbs_path", "nbs")
SKIP_FLAGS = _settings().get("tst_flags", "").split()
NOTEBOOKS = sorted(p for p in NBS_DIR.glob("*.ipynb") if not p.name.startswith((".", "_")))

# Child process: run one notebook with nbdev's test_nb; exit 1 if it failed (traceback on stderr).
_CHILD = """
import sys
from pathlib import Path
from nbdev.test import test_nb as _run_nb
fn = Path(sys.argv[1]).resolve()
ok, secs = _run_nb(fn, skip_flags=sys.argv[2].split(), force_flags=sys.argv[3].split(), showerr=True)
print(f"{fn.name}: {'ok' if ok else 'FAILED'} in {secs:.1f}s", flush=True)
sys.exit(0 if ok else 1)
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Chapters whose checks need a shared data set: without it they run their code but skip their checks, so the test is
# reported as SKIPPED with the reason, never as a pass. {stem: (environment variable, folder under ../shared/data)}
NEEDS_DATA = {"06_eval": ("DINO_DATA", "imagenette2-128"), "13_dense_eval": ("DINO_CAMVID", "camvid"),
              "15_davis": ("DINO_DAVIS", "davis2016-mini"), "16_explore": ("DINO_VIZ_DATA", "imagenette2-224-viz")}


def missing_data(stem: str):
    "The data folder chapter `stem` needs and does not find, as a skip reason (None when found or not needed)."
    if stem not in NEEDS_DATA: return None
    var, name = NEEDS_DATA[stem]
    p = Path(os.environ[var]) if os.environ.get(var) else REPO_ROOT.parent / "shared" / "data" / name
    return None if p.is_dir() else f"{stem} needs {p} (${var}, else ../shared/data/{name}): without it its checks would be skipped"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb: Path):
    assert callable(_run_nb)
    reason = missing_data(nb.stem)
    if reason: pytest.skip(reason)
    env = dict(os.environ, IN_TEST="1", PYTHONUNBUFFERED="1")
    # import the library from this checkout, whatever else is installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("PYTEST_CURRENT_TEST", None)
    timeout = float(os.environ.get("DINO_NB_TIMEOUT", "1200"))
    force = os.environ.get("DINO_NB_FORCE_FLAGS", "")
    try:
        res = subprocess.run([sys.executable, "-c", _CHILD, str(nb), " ".join(SKIP_FLAGS), force],
                             cwd=nb.parent, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{nb.name} did not finish within {timeout:g}s (DINO_NB_TIMEOUT)\n{out[-4000:]}", pytrace=False)
    if res.returncode != 0:
        err = _ANSI.sub("", res.stderr).strip()
        out = _ANSI.sub("", res.stdout).strip()
        pytest.fail(f"notebook {nb.relative_to(REPO_ROOT)} failed (exit {res.returncode}); "
                    f"skip_flags={SKIP_FLAGS}\n--- stderr ---\n{err[-12000:]}\n--- stdout ---\n{out[-3000:]}",
                    pytrace=False)
