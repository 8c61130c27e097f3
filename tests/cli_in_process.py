"""The package's commands run in this process, through their console-script entry points (`main(argv)`): a new
interpreter spends seconds importing torch and diffusers before it checks anything, so the tests that only need a
command's exit status and messages call it here. Each command still has one test that runs it as a real process."""
import contextlib, importlib, io, os
from cxr_diffusion_nbs.core import project_root

COMMANDS = {'cxr-sample': 'sampling:main', 'cxr-train': 'training:main', 'cxr-restore': 'restorer:main',
            'cxr-cohort': 'cohort:main', 'cxr-pipeline': 'pipeline:main'}


class Result:
    "What `subprocess.run(..., capture_output=True, text=True)` would have returned: exit status, stdout, stderr."
    def __init__(self, code, out, err): self.returncode, self.stdout, self.stderr = code, out, err


def run_cli(tool, *args, cwd=None) -> Result:
    "Run command `tool` with `args` in this process from `cwd` (default: the project root); its exit status and output."
    mod, fn = COMMANDS[tool].split(':')
    main = getattr(importlib.import_module(f'cxr_diffusion_nbs.{mod}'), fn)
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd or project_root())
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try: main([str(a) for a in args]); code = 0
            except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally: os.chdir(here)
    return Result(code, out.getvalue(), err.getvalue())
