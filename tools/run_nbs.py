#!/usr/bin/env python
"""Execute chapters in place and store them with their outputs, so a reader on GitHub sees every figure.

    python tools/run_nbs.py                      # every notebook in nbs/, in chapter order
    python tools/run_nbs.py 02_dino_loss 16      # named ones (a stem, a prefix like 16, or a path)
    python tools/run_nbs.py --stale              # only those whose code changed since their outputs were stored
    python tools/run_nbs.py --check              # execute nothing: list stale notebooks, exit 1 if any
    python tools/run_nbs.py --shrink-only 16     # execute nothing: apply the size rules below to stored outputs

Each notebook runs in a fresh kernel with the chapter's own full settings (IN_TEST unset), in nbs/ as working
directory, with the library imported from this checkout, `DINO_DATA` defaulting to ../shared/data/imagenette2-128,
and `--threads` intra-op threads. Then the outputs are made small enough to commit:

- figures: matplotlib's inline backend at `--dpi` (72) through a matplotlibrc in a temporary MPLCONFIGDIR; a PNG
  above `--jpeg-above` KiB (photos) is stored as a JPEG when that is much smaller (GitHub renders both);
- text outputs longer than `--max-lines` lines (or `--max-chars` characters) keep their head and tail, with a note;
  carriage-return progress updates are collapsed to their last state;
- widgets: the (large) widget state is not stored; a tqdm bar becomes its final text line, any other widget a note;
- then `nbdev_clean` (settings.ini keeps outputs), and the notebook metadata gets `dino.code_sha256`, a hash of its
  code cells. tests/test_stored_outputs.py fails when a notebook's code no longer matches that hash.

A notebook that raises keeps its previous stored version; the run goes on with the next one and exits 1 at the end.
"""
from __future__ import annotations

import argparse
import base64
import configparser
import io
import copy
import hashlib
import html
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parent.parent
META_KEY, HASH_KEY = "dino", "code_sha256"
TRUNC_NOTE = "... [{n} more lines not stored: run the notebook to see them all (tools/run_nbs.py)] ..."
WIDGET_NOTE = "[an interactive widget is shown here when the notebook runs; it is not stored]"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _settings() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(delimiters=["="])
    cp.read(REPO_ROOT / "settings.ini", encoding="utf-8")
    return cp["DEFAULT"]


NBS_DIR = REPO_ROOT / _settings().get("nbs_path", "nbs")


def all_notebooks() -> list[Path]:
    "The chapters in order (as nbdev and tests/test_notebooks.py see them: nbs/*.ipynb, not hidden or `_`-prefixed)."
    return sorted(p for p in NBS_DIR.glob("*.ipynb") if not p.name.startswith((".", "_")))


def code_hash(nb) -> str:
    "sha256 of the sources of the notebook's code cells, in order (outputs, metadata and markdown do not count)."
    srcs = [c.source if isinstance(c.source, str) else "".join(c.source) for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256(json.dumps(srcs, ensure_ascii=False).encode("utf-8")).hexdigest()


def stored_hash(nb) -> str | None:
    "The code hash stored when the notebook's outputs were produced (None if it never was)."
    return nb.metadata.get(META_KEY, {}).get(HASH_KEY)


def is_stale(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    return stored_hash(nb) != code_hash(nb)


def resolve(names: list[str]) -> list[Path]:
    "Notebooks named by stem ('02_dino_loss'), unique prefix ('02', '16a') or path, in chapter order."
    nbs, out = all_notebooks(), []
    for n in names:
        p = Path(n)
        if p.suffix == ".ipynb" and p.exists(): hits = [p.resolve()]
        else:
            stem = p.name[:-len(".ipynb")] if p.name.endswith(".ipynb") else p.name
            hits = [q for q in nbs if q.stem == stem] or [q for q in nbs if q.stem.split("_")[0] == stem] \
                or [q for q in nbs if q.stem.startswith(stem)]
        if len(hits) != 1:
            known = ", ".join(q.stem for q in nbs)
            raise SystemExit(f"run_nbs: {n!r} names {len(hits)} notebooks{': ' + ', '.join(q.stem for q in hits) if hits else ''}"
                             f" (known: {known})")
        out.extend(h for h in hits if h not in out)
    order = {q.resolve(): i for i, q in enumerate(nbs)}
    return sorted(out, key=lambda q: order.get(q.resolve(), len(order)))


# ------------------------------------------------------------------ shrinking outputs
def _text(x) -> str: return x if isinstance(x, str) else "".join(x)


def collapse_cr(text: str) -> str:
    "What a terminal shows for text with carriage returns: each line keeps what follows its last '\\r'."
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def truncate(text: str, max_lines: int, max_chars: int) -> str:
    "Head and tail of a long text, with a note saying how many lines were left out."
    lines = text.split("\n")
    if len(lines) > max_lines:
        head, tail = max_lines * 2 // 3, max_lines - max_lines * 2 // 3
        lines = lines[:head] + [TRUNC_NOTE.format(n=len(lines) - head - tail)] + lines[-tail:]
    text = "\n".join(lines)
    if len(text) > max_chars:
        cut = text[:max_chars]
        cut = cut[:cut.rfind("\n")] if "\n" in cut else cut
        text = cut + "\n" + TRUNC_NOTE.format(n=text.count("\n") - cut.count("\n"))
    return text


def _tqdm_line(model_id: str, state: dict) -> str | None:
    "The text of a tqdm.notebook bar (HBox of HTML, progress, HTML) from the stored widget state, or None."
    m = state.get(model_id, {})
    kids = [c.split("IPY_MODEL_")[-1] for c in m.get("state", {}).get("children", []) if isinstance(c, str)]
    if len(kids) != 3: return None
    left, bar, right = (state.get(k, {}).get("state", {}) for k in kids)
    if "max" not in bar or "value" not in bar: return None
    strip = lambda h: html.unescape(re.sub(r"<[^>]+>", "", h or "")).strip()
    filled = round(10 * bar["value"] / bar["max"]) if bar["max"] else 10
    return f"{strip(left.get('value'))}|{'█' * filled}{' ' * (10 - filled)}| {strip(right.get('value'))}"


def png_to_jpeg(b64png: str, quality: int = 80) -> str | None:
    "A base64 PNG re-encoded as a base64 JPEG (transparency on white), or None if that is not 40% smaller."
    from PIL import Image
    raw = base64.b64decode(b64png)
    im = Image.open(io.BytesIO(raw))
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA"); bg = Image.new("RGB", im.size, "white"); bg.paste(im, mask=im.split()[-1]); im = bg
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return base64.b64encode(buf.getvalue()).decode() if buf.tell() < 0.6 * len(raw) else None


def shrink_outputs(nb, max_lines: int = 60, max_chars: int = 8000, max_html: int = 50_000,
                   jpeg_above_kib: float = 40, jpeg_quality: int = 80) -> dict:
    "Make the outputs small enough to commit (in place); returns counts of what was changed."
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    stats = {"truncated": 0, "widgets": 0, "html_dropped": 0, "jpeg": 0}
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        outs = []
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                t = collapse_cr(_text(o.text))
                short = truncate(t, max_lines, max_chars)
                stats["truncated"] += short != t
                o.text = short
                if outs and outs[-1].output_type == "stream" and outs[-1].name == o.name:   # one block per stream
                    outs[-1].text = truncate(outs[-1].text + o.text, max_lines, max_chars); continue
            elif o.output_type in ("display_data", "execute_result"):
                data = o.data
                if WIDGET_VIEW in data:
                    stats["widgets"] += 1
                    line = _tqdm_line(data[WIDGET_VIEW].get("model_id", ""), state)
                    if line is None and data[WIDGET_VIEW].get("model_id") not in state and state:
                        continue                                          # closed widget (tqdm leave=False): gone
                    o.data = {"text/plain": line if line is not None else WIDGET_NOTE}
                    o.metadata = {}
                    if o.output_type == "execute_result":                 # keep it a display (no Out[] number)
                        o = nbformat.v4.new_output("display_data", data=o.data)
                else:
                    png = _text(data.get("image/png", ""))
                    if png and len(png) * 3 / 4 > jpeg_above_kib * 1024:
                        jpg = png_to_jpeg(png, jpeg_quality)
                        if jpg is not None:
                            del data["image/png"]; data["image/jpeg"] = jpg; stats["jpeg"] += 1
                    if "text/html" in data and len(_text(data["text/html"])) > max_html and "text/plain" in data:
                        del data["text/html"]; stats["html_dropped"] += 1
                    if "text/plain" in data:
                        t = _text(data["text/plain"])
                        short = truncate(t, max_lines, max_chars)
                        stats["truncated"] += short != t
                        data["text/plain"] = short
            elif o.output_type == "error":
                o.traceback = [truncate(_text(t), max_lines, max_chars) for t in o.traceback][-20:]
            outs.append(o)
        cell.outputs = outs
    nb.metadata.pop("widgets", None)
    return stats


# ------------------------------------------------------------------ executing
def kernel_env(data: str | None, threads: int, dpi: int, extra: dict) -> tuple[dict, tempfile.TemporaryDirectory]:
    "The environment the kernel starts with, and the temporary folder holding its matplotlibrc."
    tmp = tempfile.TemporaryDirectory(prefix="run_nbs_")
    (Path(tmp.name) / "matplotlibrc").write_text(f"figure.dpi: {dpi}\nsavefig.dpi: {dpi}\n")
    env = dict(os.environ)
    for k in ("IN_TEST", "MPLBACKEND", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER"): env.pop(k, None)  # inline figures, full settings
    env["MPLCONFIGDIR"] = tmp.name
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["DINO_DATA"] = str(data) if data else env.get("DINO_DATA") or str(REPO_ROOT.parent / "shared" / "data" / "imagenette2-128")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"): env[k] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1"); env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env, tmp


def execute(path: Path, env: dict, timeout: int, kernel: str | None) -> "nbformat.NotebookNode":
    "A copy of the notebook executed top to bottom in a fresh kernel (raises nbclient's CellExecutionError)."
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    kw = {"kernel_name": kernel} if kernel else {}
    # cells marked `#| eval: false` (e.g. `if __name__ == "__main__": main()`) are not run, as nbdev's test_nb does
    skipped = {i: c.source for i, c in enumerate(nb.cells) if c.cell_type == "code" and _EVAL_FALSE.search(c.source)}
    for i in skipped: nb.cells[i].source = ""
    client = NotebookClient(nb, timeout=timeout, resources={"metadata": {"path": str(path.parent)}},
                            record_timing=False, store_widget_state=True, **kw)
    try: client.execute(env=env)                       # passed on to the kernel manager's start_kernel
    finally:
        for i, src in skipped.items(): nb.cells[i].source = src
    return nb

_EVAL_FALSE = re.compile(r"^\s*#\s*\|\s*eval\s*:\s*false\b", re.M)


def nbdev_clean_file(path: Path):
    "nbdev_clean on one file, with this project's settings (keeps outputs; keeps the `dino` metadata key)."
    from nbdev.clean import nbdev_clean
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try: nbdev_clean.__wrapped__(str(path)) if hasattr(nbdev_clean, "__wrapped__") else nbdev_clean(str(path))
    finally: os.chdir(cwd)


def store(path: Path, nb, source_hash: str, args) -> dict:
    "Shrink, write, nbdev_clean and stamp one executed notebook; returns a summary."
    stats = shrink_outputs(nb, args.max_lines, args.max_chars, jpeg_above_kib=args.jpeg_above, jpeg_quality=args.jpeg_quality)
    nb.metadata[META_KEY] = {HASH_KEY: source_hash}
    nbformat.write(nb, path)
    nbdev_clean_file(path)
    back = nbformat.read(path, as_version=4)
    if stored_hash(back) != source_hash:
        raise SystemExit(f"run_nbs: nbdev_clean dropped metadata[{META_KEY!r}] from {path.name}: add `{META_KEY}` to "
                         "allowed_metadata_keys in settings.ini")
    n_out = sum(len(c.get("outputs", [])) for c in back.cells if c.cell_type == "code")
    n_png = sum(any(k.startswith("image/") for k in o.get("data", {})) for c in back.cells if c.cell_type == "code" for o in c.outputs)
    return {**stats, "outputs": n_out, "figures": n_png, "bytes": path.stat().st_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("names", nargs="*", help="notebooks (stem, number prefix or path); default: all, in order")
    p.add_argument("--stale", action="store_true", help="only notebooks whose code differs from the stored hash")
    p.add_argument("--check", action="store_true", help="execute nothing; print stale notebooks and exit 1 if any")
    p.add_argument("--shrink-only", action="store_true",
                   help="execute nothing: re-apply the output size rules to stored notebooks whose code is unchanged")
    p.add_argument("--data", default=None, help="DINO_DATA for the kernels (default: $DINO_DATA, else ../shared/data/imagenette2-128)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1),
                   help="OMP/MKL threads of each kernel (default: $OMP_NUM_THREADS or 1)")
    p.add_argument("--dpi", type=int, default=72, help="inline figure resolution (default 72)")
    p.add_argument("--jpeg-above", type=float, default=40, help="store PNG figures above this many KiB as JPEG when much smaller (default 40)")
    p.add_argument("--jpeg-quality", type=int, default=80, help="JPEG quality of those figures (default 80)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default 1800)")
    p.add_argument("--max-lines", type=int, default=60, help="longest text output stored, in lines (default 60)")
    p.add_argument("--max-chars", type=int, default=8000, help="longest text output stored, in characters (default 8000)")
    p.add_argument("--kernel", default=None, help="kernel name (default: the notebook's)")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra environment variables for the kernels")
    a = p.parse_args(argv)
    paths = resolve(a.names) if a.names else all_notebooks()
    if a.stale or a.check: paths = [q for q in paths if is_stale(q)]
    if a.check:
        for q in paths: print(f"stale: {q.relative_to(REPO_ROOT)}")
        print(f"{len(paths)} stale notebook(s)" + (f": run `python tools/run_nbs.py {' '.join(q.stem for q in paths)}`" if paths else ""))
        return 1 if paths else 0
    if a.shrink_only:
        for q in paths:
            nb = nbformat.read(q, as_version=4)
            if stored_hash(nb) != code_hash(nb): print(f"[run_nbs] {q.name}: code changed since it was executed: skipped"); continue
            s = store(q, nb, code_hash(nb), a)
            print(f"[run_nbs] {q.name}: {s['bytes'] / 1024:.0f} KiB (truncated {s['truncated']}, JPEG {s['jpeg']})")
        return 0
    extra = {}
    for kv in a.env:
        k, sep, v = kv.partition("=")
        if not sep or not k: raise SystemExit(f"run_nbs: --env wants KEY=VALUE, got {kv!r}")
        extra[k] = v
    env, tmp = kernel_env(a.data, a.threads, a.dpi, extra)
    failed = []
    with tmp:
        for q in paths:
            src_hash = code_hash(nbformat.read(q, as_version=4))
            t0 = time.time()
            print(f"[run_nbs] {q.name} ...", flush=True)
            try: nb = execute(q, env, a.timeout, a.kernel)
            except Exception as e:
                failed.append(q.name)
                msg = str(e).strip().splitlines()
                print(f"[run_nbs] {q.name} FAILED after {time.time() - t0:.0f} s (stored version kept):\n  "
                      + "\n  ".join(msg[-15:]), flush=True)
                continue
            s = store(q, nb, src_hash, a)
            print(f"[run_nbs] {q.name}: {time.time() - t0:.0f} s, {s['outputs']} outputs, {s['figures']} figures, "
                  f"{s['bytes'] / 1024:.0f} KiB (truncated {s['truncated']}, widgets {s['widgets']}, JPEG {s['jpeg']})", flush=True)
    total = sum(q.stat().st_size for q in all_notebooks())
    print(f"[run_nbs] {len(paths) - len(failed)}/{len(paths)} stored; nbs/ holds {total / 2**20:.2f} MiB of notebooks"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
