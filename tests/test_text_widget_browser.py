"""TextQueryWidget (chapter 27) in a real browser: type a word, see where it is.

The model is the chapter's: `tiny_align_config()` (240 steps, batch 128, 128 px) on all captions-mini training photos,
on the trained tiny backbone (`$DINO_ALIGN_BACKBONE`, runs/tiny or ../shared_runs/tiny; the test is skipped
without one). Training is deterministic, so a finished run of that configuration on that backbone in
runs/text_align/trained_cls_patch (written by the chapter or benchmarks/text_align.py) is reused; otherwise it is
trained here (about 3 CPU minutes). Voila serves a notebook with the widget on the CamVid frame with the largest share
of road (chosen from the masks, not from the model; CamVid is never used to train the text alignment); headless
Chromium (Playwright) types "road" into the phrase box and presses Enter. The heat map shown in the page must change,
and its brightest pixel (the map alone: opacity 1) must lie in a patch that is mostly road in the ground truth.
"road", not "sky": at this scale the word "sky" is not localised (chapter 27 reports the pointing game per class).
Screenshot: tests/artifacts/text_widget_browser.png (git-ignored). Skipped when no `chromium` binary exists.
"""
import io, json, os, shutil, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_widget_browser import CHROMIUM, CHROMIUM_ARGS, _free_port, _png_of, _stop  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
SIZE = (96, 128)                       # the widget's input size: a 6 x 8 grid of 16 px patches
MAP = "img.dino-text-map"
WORD, CLASS = "road", 3                 # CamVid class 3 is Road

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` binary on PATH (apt-get install -y chromium)")

NOTEBOOK_CELLS = [
    "import torch\ntorch.set_num_threads(1)\nfrom dino_from_scratch.text import TextQueryWidget, load_aligned",
    "model, tok, _ = load_aligned({run!r})\n"
    "w = TextQueryWidget(model, tok, {{'frame': {image!r}}}, gallery={gallery!r}, size={size!r}, phrase='a dog', alpha=1.0)\n"
    "w",
]


def _trained_backbone():
    for c in (os.environ.get("DINO_ALIGN_BACKBONE"), REPO_ROOT / "runs/tiny", REPO_ROOT.parent / "shared_runs/tiny"):
        if c and list(Path(c).glob("checkpoints/step_*.safetensors")): return Path(c)


@pytest.fixture(scope="module")
def aligned_run(shared_data, tmp_path_factory):
    "The chapter's dino.txt run directory, the CamVid frame with the most road, its mask, the backbone's run."
    import torch
    from dino_from_scratch.dense import load_seg_folder
    from dino_from_scratch.eval import load_backbone
    from dino_from_scratch.text import AlignTrainer, latest_align_checkpoint, load_captions, state_digest, tiny_align_config
    if not (shared_data / "camvid").is_dir() or not (shared_data / "captions-mini").is_dir(): pytest.skip("camvid/captions-mini missing")
    src = _trained_backbone()
    if src is None: pytest.skip("no trained tiny run (dino-train --recipe tiny, or set DINO_ALIGN_BACKBONE)")
    torch.set_num_threads(1)
    bb, cfg = load_backbone(src)[0], tiny_align_config()
    found = latest_align_checkpoint(REPO_ROOT / "runs/text_align/trained_cls_patch", verbose=False)
    if found and found[2]["step"] == cfg.steps and found[2]["config"] == json.loads(json.dumps(cfg.__dict__)) \
            and found[2]["backbone"]["digest"] == state_digest(bb):
        out = found[0]                                                   # the same deterministic run, already trained
    else:
        out = tmp_path_factory.mktemp("align") / "run"
        AlignTrainer(cfg, bb, load_captions(shared_data / "captions-mini", "train"), out, verbose=False,
                     progress=False).fit(progress=False)
    seg = load_seg_folder(shared_data / "camvid", "train")
    i = int((seg.masks == 3).flatten(1).float().mean(1).argmax())          # the frame with the largest share of road (3)
    return out, shared_data / "camvid" / "train" / f"{seg.names[i]}.jpg", seg.masks[i].numpy(), src


@pytest.fixture
def voila_server(aligned_run, shared_data, tmp_path):
    import nbformat
    run, image, _, _ = aligned_run
    gallery = [str(p) for p in sorted((shared_data / "captions-mini" / "val").glob("*.jpg"))[:40]]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c.format(run=str(run), image=str(image), gallery=gallery, size=SIZE)) for c in NOTEBOOK_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, tmp_path / "text_widget.ipynb")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    voila = Path(sys.executable).parent / "voila"
    assert voila.exists(), f"voila is not installed beside {sys.executable}"
    log = tmp_path / "voila.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([str(voila), str(tmp_path / "text_widget.ipynb"), "--no-browser", f"--port={port}",
                                 "--Voila.ip=127.0.0.1", "--show_tracebacks=True"], cwd=tmp_path, env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            if proc.poll() is not None: pytest.fail(f"voila exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close(); break
            except OSError:
                if time.time() > deadline: pytest.fail(f"voila did not listen on port {port}:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        _stop(proc)


def test_type_a_word_in_the_browser(aligned_run, voila_server):
    from PIL import Image
    from playwright.sync_api import sync_playwright
    _, image, mask, backbone = aligned_run
    url, log = voila_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "text_widget_browser.png"
    ready = f"() => {{ const i = document.querySelector({MAP!r}); return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0; }}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            try:
                page.goto(url, timeout=60_000)
                page.wait_for_function(ready, timeout=120_000)
                page.wait_for_function("() => document.querySelectorAll('img.dino-text-top').length === 5", timeout=10_000)
                old_src = page.eval_on_selector(MAP, "i => i.src")
                before = _png_of(page, MAP)
                box = page.locator(".dino-text-query input")
                box.fill(WORD)
                t0 = time.perf_counter()
                box.press("Enter")
                page.wait_for_function("([sel, old]) => { const i = document.querySelector(sel);"
                                       " return i.src !== old && i.complete && i.naturalWidth > 0; }", arg=[MAP, old_src], timeout=30_000)
                ms = (time.perf_counter() - t0) * 1000
                # the status line is the last thing a render updates: once it names the new word, the map is final
                page.wait_for_function("() => document.querySelector('.dino-text-widget').innerText.includes(\"'road' on frame\")",
                                       timeout=30_000)
                after = _png_of(page, MAP)
                status = page.inner_text(".dino-text-widget")
                page.screenshot(path=str(shot), full_page=True)
            except Exception:
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the failure: {shot}\nvoila log:\n{log.read_text()[-3000:]}")
                raise
        finally:
            browser.close()
    print(f"backbone {backbone}; '{WORD}' typed -> new map in {ms:.0f} ms; screenshot {shot}")
    assert after != before, "the heat map did not change after typing a new word"
    assert f"'{WORD}' on frame" in status, status
    a = np.asarray(Image.open(io.BytesIO(after)).convert("RGB")).astype(np.float64)
    assert a.shape == (*SIZE, 3)
    lum = a @ [0.299, 0.587, 0.114]                                   # inferno: brighter = more similar
    top = np.argwhere(lum == lum.max())
    cells = {tuple(t) for t in top // 16}
    H, W = mask.shape
    for r, c in cells:                                                # every brightest patch, mapped onto the 360x480 mask
        region = mask[r * H // 6:(r + 1) * H // 6, c * W // 8:(c + 1) * W // 8]
        share = float((region == CLASS).mean())
        assert share > 0.5, f"'{WORD}' is highest at patch ({r}, {c}), where only {share:.0%} of the pixels are {WORD}"
