"""Chapters are stored executed: each notebook in nbs/ carries the outputs of its current code.

`tools/run_nbs.py` executes a notebook, stores its outputs and writes `metadata.dino.code_sha256`, a hash of its
code cells. Here, for every notebook: the stored hash equals the hash of the code now in it (else someone edited
code without re-executing, and the figures on GitHub show something else), and at least one output is stored.
The total size of nbs/ is printed (`pytest -s`) and held under a budget, so stored outputs stay small.
"""
import importlib.util
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("run_nbs", REPO_ROOT / "tools" / "run_nbs.py")
run_nbs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_nbs)

NOTEBOOKS = run_nbs.all_notebooks()
MAX_NB_BYTES = 3 * 2**20        # one chapter with its figures
MAX_TOTAL_BYTES = 25 * 2**20    # all of nbs/


def test_the_hash_sees_code_and_only_code():
    "Editing a code cell changes the hash; outputs, markdown and metadata do not."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("print(x)")]
    h = run_nbs.code_hash(nb)
    nb.cells[0].source = "# another title"
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.metadata["dino"] = {"code_sha256": "whatever"}
    assert run_nbs.code_hash(nb) == h
    nb.cells[1].source = "x = 2"
    assert run_nbs.code_hash(nb) != h
    nb.cells[1].source = "x = 1"
    nb.cells[1], nb.cells[2] = nb.cells[2], nb.cells[1]            # the order of code counts
    assert run_nbs.code_hash(nb) != h
    # a code cell split in two differs from the joined one
    a, b = nbformat.v4.new_notebook(), nbformat.v4.new_notebook()
    a.cells = [nbformat.v4.new_code_cell("x = 1\nprint(x)")]
    b.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("print(x)")]
    assert run_nbs.code_hash(a) != run_nbs.code_hash(b)


def test_output_shrinking_keeps_head_tail_and_says_so():
    text = "\n".join(f"line {i}" for i in range(500))
    short = run_nbs.truncate(text, max_lines=30, max_chars=10_000)
    lines = short.split("\n")
    assert len(lines) == 31 and lines[0] == "line 0" and lines[-1] == "line 499"
    assert "470 more lines not stored" in short
    assert run_nbs.truncate("short\ntext", 30, 10_000) == "short\ntext"
    assert len(run_nbs.truncate("x" * 50_000, 30, 8000)) < 8200
    assert run_nbs.collapse_cr("10%\r50%\r100%\ndone\n") == "100%\ndone\n"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_match_the_code(nb_path: Path):
    nb = nbformat.read(nb_path, as_version=4)
    rel = nb_path.relative_to(REPO_ROOT)
    cmd = f"python tools/run_nbs.py {nb_path.stem}"
    stored, now = run_nbs.stored_hash(nb), run_nbs.code_hash(nb)
    assert stored is not None, f"{rel} was never stored executed (no metadata.dino.code_sha256): run `{cmd}`"
    assert stored == now, (f"{rel}: its code changed since its outputs were stored (stored hash {stored[:12]}, code now "
                           f"{now[:12]}), so the figures a reader sees are not this code's: run `{cmd}` and commit it")
    n_out = sum(len(c.get("outputs", [])) for c in nb.cells if c.cell_type == "code")
    assert n_out >= 1, f"{rel} has no stored output: run `{cmd}`"
    size = nb_path.stat().st_size
    assert size <= MAX_NB_BYTES, f"{rel} is {size / 2**20:.2f} MiB with its outputs (budget {MAX_NB_BYTES / 2**20:.0f} MiB): smaller figures"


def test_total_size_of_stored_notebooks():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    total = sum(sizes.values())
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    print(f"\nnbs/: {len(sizes)} notebooks, {total / 2**20:.2f} MiB; largest: "
          + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in top))
    assert total <= MAX_TOTAL_BYTES, f"nbs/ holds {total / 2**20:.1f} MiB (budget {MAX_TOTAL_BYTES / 2**20:.0f} MiB)"


def _png_b64(a) -> str:
    import base64, io
    from PIL import Image
    buf = io.BytesIO(); Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_shrink_outputs_on_a_made_up_notebook():
    import numpy as np
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)          # noise: PNG ~180 KiB, JPEG far smaller
    plot = np.full((200, 300, 3), 255, np.uint8); plot[100, :] = 0         # a line plot: a tiny PNG, stays PNG
    view = "application/vnd.jupyter.widget-view+json"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x")]
    nb.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="step 1\rstep 2\rstep 3\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "HBox()", view: {"model_id": "bar"}}),
        nbformat.v4.new_output("display_data", data={"text/plain": "HBox()", view: {"model_id": "closed"}}),
        nbformat.v4.new_output("display_data", data={"text/plain": "VBox()", view: {"model_id": "ui"}}),
        nbformat.v4.new_output("display_data", data={"image/png": _png_b64(photo), "text/plain": "<Figure>"}),
        nbformat.v4.new_output("display_data", data={"image/png": _png_b64(plot), "text/plain": "<Figure>"}),
        nbformat.v4.new_output("execute_result", data={"text/plain": "\n".join(map(str, range(1000)))}, execution_count=1),
    ]
    state = {"bar": {"state": {"children": ["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"]}},
             "l": {"state": {"value": "tiny_v1: 100%"}}, "p": {"state": {"value": 40, "max": 40}},
             "r": {"state": {"value": " 40/40 [00:09&lt;00:00,  4.1it/s, loss=5.1]"}},
             "ui": {"state": {"children": []}}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    stats = run_nbs.shrink_outputs(nb, max_lines=30, max_chars=8000, jpeg_above_kib=40)
    outs = nb.cells[0].outputs
    assert [o.output_type for o in outs] == ["stream", "display_data", "display_data", "display_data", "display_data", "execute_result"]
    assert outs[0].text == "step 3\n"                                               # carriage returns collapsed
    assert outs[1].data == {"text/plain": "tiny_v1: 100%|██████████| 40/40 [00:09<00:00,  4.1it/s, loss=5.1]"}  # the bar's last state
    assert outs[2].data == {"text/plain": run_nbs.WIDGET_NOTE}                       # the closed bar is gone; the UI is a note
    assert set(outs[3].data) == {"image/jpeg", "text/plain"} and set(outs[4].data) == {"image/png", "text/plain"}
    assert len(outs[3].data["image/jpeg"]) < 0.6 * len(_png_b64(photo))
    assert "970 more lines not stored" in outs[5].data["text/plain"]
    assert "widgets" not in nb.metadata and stats["jpeg"] == 1 and stats["widgets"] == 3
