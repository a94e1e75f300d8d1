"""PatchSimilarityWidget in a real browser.

Voila serves a small notebook (the widget on a shared photo and a random-init tiny_v1) on 127.0.0.1 at a free
port; headless Chromium (Debian's `chromium`, driven by Playwright, no `playwright install`) clicks one patch
of the photo. The similarity image shown in the page must change, and the brightest pixel of the PNG it
displays (fetched from the page) must lie in the clicked patch. A screenshot is saved to
tests/artifacts/widget_browser.png (git-ignored). The Voila server and its kernel are stopped at the end,
also on failure. Skipped only when no `chromium` binary exists.
"""
import base64, io, json, os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
# launch flags that work on these machines (shared/DESIGN.md section 2)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SIZE, PATCH = 224, 16                       # the notebook shows the photo at 224 px; tiny_v1 has 16 px patches
GRID = SIZE // PATCH

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no `chromium` binary on PATH: install it with `apt-get install -y chromium` "
           "(bash scripts/setup.sh does this when apt-get is available)")

NOTEBOOK_CELLS = [
    "import torch\ntorch.set_num_threads(1)\n"
    "from dino_from_scratch.config import get_recipe\n"
    "from dino_from_scratch.eval import random_backbone\n"
    "from dino_from_scratch.viz import PatchSimilarityWidget",
    # opacity 1: the similarity panel shows the map alone, so its brightest pixel is the most similar patch
    "w = PatchSimilarityWidget({{'random init tiny_v1': random_backbone(get_recipe('tiny_v1'), seed=0)}}, {folder!r},\n"
    "                          size={size}, alpha=1.0)\n"
    "w.image_dd.value = {image!r}\n"
    "w",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    "Process ids below `pid` (children, grandchildren...), read from /proc."
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try: ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c); todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except OSError: return False
    return True


def _stop(proc: subprocess.Popen):
    "Stop Voila and everything it started (the kernel runs in its own session, so a process-group kill misses it)."
    pids = _descendants(proc.pid)
    for pid in [proc.pid] + pids:
        try: os.kill(pid, signal.SIGTERM)
        except OSError: pass
    try: proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill(); proc.wait(timeout=5)
    deadline = time.time() + 3
    while any(_alive(p) for p in pids) and time.time() < deadline: time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try: os.kill(pid, signal.SIGKILL)
            except OSError: pass


def _pick_patch(folder: Path, image: str) -> tuple[int, int]:
    """A patch whose similarity map has a unique top colour at 8-bit display precision (with a margin).
    At random init neighbouring patches of a smooth region can reach a cosine of 0.998 to the query, which the
    256-colour map cannot tell from 1; such a patch would make "the brightest pixel" ambiguous, not wrong.
    This runs the same deterministic model as the notebook, kernel-side."""
    import torch
    from dino_from_scratch.config import get_recipe
    from dino_from_scratch.eval import random_backbone
    from dino_from_scratch.viz import patch_features, patch_similarity, prepare_image, image_tensor, image_sources
    torch.set_num_threads(1)
    f = patch_features(random_backbone(get_recipe("tiny_v1"), seed=0), image_tensor(prepare_image(image_sources(folder)[image], PATCH, SIZE)))
    for r, c in [(r, c) for r in range(2, GRID - 2) for c in range(GRID - 3, 1, -1)]:
        if (r, c) == (GRID // 2, GRID // 2): continue                       # the patch shown before the click
        s = patch_similarity(f, (r, c))
        lo, second = float(s.min()), float(s.flatten().sort(descending=True).values[1])
        if (second - lo) / (1 - lo) * 255 < 252: return r, c
    pytest.fail(f"no patch of {image} has a distinguishable similarity peak")


def _png_of(page, selector: str) -> bytes:
    "The bytes of the image an <img> shows (ipywidgets.Image sets a blob: URL), fetched inside the page."
    b64 = page.evaluate("""async (sel) => {
        const img = document.querySelector(sel);
        const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let s = ''; for (let i = 0; i < buf.length; i += 8192) s += String.fromCharCode(...buf.subarray(i, i + 8192));
        return btoa(s);
    }""", selector)
    return base64.b64decode(b64)


@pytest.fixture
def voila_server(shared_data, tmp_path):
    "Voila serving the widget notebook on 127.0.0.1:<free port>; yields (url, image name, log file); always stopped."
    import nbformat
    folder = shared_data / "imagenette2-224-viz"
    if not folder.is_dir(): pytest.skip(f"{folder} not found")
    first = sorted((folder / "val" / "english_springer").glob("*.jpg"))[0]
    image = f"english_springer/{first.stem}"               # the widget lists images by short names, class/stem
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c.format(folder=str(folder), size=SIZE, image=image)) for c in NOTEBOOK_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb_path = tmp_path / "widget.ipynb"
    nbformat.write(nb, nb_path)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    voila = Path(sys.executable).parent / "voila"
    assert voila.exists(), f"voila is not installed beside {sys.executable} (pip install -e .[dev])"
    log = tmp_path / "voila.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([str(voila), str(nb_path), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
                                 "--show_tracebacks=True"], cwd=tmp_path, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 20
        while True:
            if proc.poll() is not None: pytest.fail(f"voila exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close(); break
            except OSError:
                if time.time() > deadline: pytest.fail(f"voila did not listen on port {port} in 20 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/", image, log
    finally:
        _stop(proc)


def test_click_a_patch_in_the_browser(voila_server, shared_data):
    from PIL import Image
    from playwright.sync_api import sync_playwright
    url, image, log = voila_server
    row, col = _pick_patch(shared_data / "imagenette2-224-viz", image)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "widget_browser.png"
    sim = "img.dino-sim-a"
    t_start = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            try:
                page.goto(url, timeout=30_000)
                page.wait_for_function(f"() => {{ const i = document.querySelector({sim!r});"
                                       " return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0; }",
                                       timeout=30_000)
                page.wait_for_function("() => document.querySelectorAll('.dino-click-grid button').length === "
                                       f"{GRID * GRID}", timeout=10_000)
                t_ready = time.time()
                old_src = page.eval_on_selector(sim, "i => i.src")
                before = _png_of(page, sim)
                # click the middle of patch (row, col) on the photo: the transparent button over it receives it
                box = page.locator("img.dino-query").bounding_box()
                assert box and box["width"] > 100, box
                x = box["x"] + (col + 0.5) * box["width"] / GRID
                y = box["y"] + (row + 0.5) * box["height"] / GRID
                t0 = time.perf_counter()
                page.mouse.click(x, y)
                page.wait_for_function("([sel, old]) => { const i = document.querySelector(sel);"
                                       " return i.src !== old && i.complete && i.naturalWidth > 0; }",
                                       arg=[sim, old_src], timeout=10_000)
                click_ms = (time.perf_counter() - t0) * 1000
                after = _png_of(page, sim)
                status = page.inner_text(".dino-explorer")
                page.screenshot(path=str(shot), full_page=True)
            except Exception:
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the failure: {shot}\nvoila log:\n{log.read_text()[-3000:]}")
                raise
        finally:
            browser.close()
    print(f"page ready in {t_ready - t_start:.1f} s; click on patch ({row}, {col}) -> new map in the page: {click_ms:.0f} ms; "
          f"screenshot: {shot}")
    assert after != before, "the similarity image did not change after the click"
    a = np.asarray(Image.open(io.BytesIO(after)).convert("RGB")).astype(np.float64)
    assert a.shape == (SIZE, SIZE, 3)
    lum = a @ [0.299, 0.587, 0.114]
    ys, xs = np.unravel_index(np.argmax(lum), lum.shape)
    assert (ys // PATCH, xs // PATCH) == (row, col), f"brightest pixel at ({ys}, {xs}), not in patch ({row}, {col})"
    top = np.argwhere(lum == lum.max())
    assert {tuple(t) for t in top // PATCH} == {(row, col)}                # all of the brightest pixels, not just one
    assert f"patch ({row}, {col})" in status, status
    b = np.asarray(Image.open(io.BytesIO(before)).convert("RGB")).astype(np.float64) @ [0.299, 0.587, 0.114]
    yb, xb = np.unravel_index(np.argmax(b), b.shape)
    assert (yb // PATCH, xb // PATCH) != (row, col)                        # the peak moved to the clicked patch
