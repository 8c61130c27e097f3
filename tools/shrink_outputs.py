"""Shrink the figures stored in the notebooks' outputs, so that the lessons stay small in git.

A matplotlib figure of radiographs is a photograph: stored as PNG it takes 100-400 kB, as JPEG (quality 72, no chroma
subsampling, so coloured labels and outlines stay crisp) a quarter of that. A line plot keeps its PNG with at most 128
colours (no dithering: its lines and text stay exact). Each figure is stored in the smaller of the two, and only when
that saves a fifth of its size. Idempotent: run it after executing a notebook (before `nbdev-clean`);
`tests/test_docs.py` holds the notebooks to their size limits.

    .venv/bin/python tools/shrink_outputs.py              # every notebook in nbs/
    .venv/bin/python tools/shrink_outputs.py nbs/10_training.ipynb --dry-run
"""
import argparse, base64, io, json, os, sys, tempfile
from pathlib import Path
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _flat(png: bytes) -> Image.Image:
    "The PNG `png` as an RGB (or grey) image, transparency flattened onto white (matplotlib's inline figures are white)."
    im = Image.open(io.BytesIO(png))
    if im.mode in ('RGBA', 'LA', 'P'):
        im = im.convert('RGBA')
        flat = Image.new('RGB', im.size, 'white'); flat.paste(im, mask=im.getchannel('A')); return flat
    return im if im.mode in ('RGB', 'L') else im.convert('RGB')


def smaller_encodings(png: bytes, quality: int = 72, colours: int = 128) -> dict:
    """Two re-encodings of a figure: a JPEG (no chroma subsampling, so coloured labels stay crisp), which suits
    photographs such as radiographs, and a PNG of at most `colours` colours (no dithering), which suits plots."""
    im = _flat(png)
    jpg, pal = io.BytesIO(), io.BytesIO()
    im.save(jpg, 'JPEG', quality=quality, subsampling=0, optimize=True)
    im.convert('RGB').quantize(colours, dither=Image.Dither.NONE).save(pal, 'PNG', optimize=True)
    return {'image/jpeg': jpg.getvalue(), 'image/png': pal.getvalue()}


def shrink_output(output: dict, min_bytes: int, ratio: float, quality: int) -> int:
    "Store one output's PNG in the smaller of the two re-encodings where that saves over `1 - ratio`; returns the bytes saved."
    data = output.get('data') or {}
    png64 = data.get('image/png')
    if png64 is None: return 0
    png64 = png64 if isinstance(png64, str) else ''.join(png64)
    if len(png64) < min_bytes: return 0
    kind, best = min(((k, base64.b64encode(v).decode()) for k, v in smaller_encodings(base64.b64decode(png64), quality).items()),
                     key=lambda kv: len(kv[1]))
    if len(best) > ratio * len(png64): return 0
    output['data'] = {(kind if k == 'image/png' else k): (best if k == 'image/png' else v) for k, v in data.items()}
    md = output.get('metadata') or {}
    if 'image/png' in md and kind != 'image/png': md[kind] = md.pop('image/png')
    return len(png64) - len(best)


def drop_plain_twin(output: dict) -> int:
    "Drop the plain-text copy of a stored HTML table (pandas stores both; readers see the HTML); returns the bytes saved."
    data = output.get('data') or {}
    html = data.get('text/html')
    if html is None or 'text/plain' not in data: return 0
    if '<table' not in (html if isinstance(html, str) else ''.join(html)): return 0
    return len(json.dumps(data.pop('text/plain')))


def stored_outputs(nb: dict) -> list:
    "Every stored output of a notebook: its cells' and those kept in the saved widget state (an `Output` widget's figure)."
    outs = [o for c in nb['cells'] for o in c.get('outputs', [])]
    state = ((nb.get('metadata') or {}).get('widgets') or {}).get('application/vnd.jupyter.widget-state+json') or {}
    for model in (state.get('state') or {}).values():
        outs += [o for o in (model.get('state') or {}).get('outputs', []) if isinstance(o, dict)]
    return outs


def shrink_notebook(path: Path, min_bytes: int = 8_000, ratio: float = 0.8, quality: int = 72, dry_run: bool = False) -> int:
    "Shrink every stored figure of the notebook at `path` (written through a temporary file); returns the bytes saved."
    text = path.read_text()
    nb = json.loads(text)
    saved = sum(shrink_output(o, min_bytes, ratio, quality) + drop_plain_twin(o) for o in stored_outputs(nb))
    if saved and not dry_run:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix='.ipynb.tmp')
        with os.fdopen(fd, 'w') as f: f.write(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
        os.replace(tmp, path)
    return saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebooks', nargs='*', type=Path, help='default: every notebook in nbs/')
    p.add_argument('--min-bytes', type=int, default=8_000, help='leave smaller images alone (base64 bytes)')
    p.add_argument('--ratio', type=float, default=0.8, help='re-encode only when that takes the image under this share of its size')
    p.add_argument('--quality', type=int, default=72, help='JPEG quality')
    p.add_argument('--dry-run', action='store_true')
    a = p.parse_args(argv)
    paths = a.notebooks or sorted((ROOT / 'nbs').glob('*.ipynb'))
    total = 0
    for path in paths:
        if not path.exists(): sys.exit(f'shrink_outputs: {path.name}: no such notebook')
        saved = shrink_notebook(path, a.min_bytes, a.ratio, a.quality, a.dry_run)
        if saved: print(f'{path.name}: {saved / 1e6:.2f} MB saved')
        total += saved
    print(f'{"would save" if a.dry_run else "saved"} {total / 1e6:.2f} MB in {len(paths)} notebooks')


if __name__ == '__main__': main()
