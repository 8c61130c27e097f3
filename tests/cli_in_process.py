"""The package's commands run in this process, through their console-script entry points (`main(argv)`): a new
interpreter spends seconds importing torch and diffusers before it checks anything, so the tests that only need a
command's exit status and messages call it here. Each command still has one test that runs it as a real process."""
import contextlib, io, os
from importlib.metadata import entry_points
from cxr_diffusion_nbs.core import project_root


class Result:
    "What `subprocess.run(..., capture_output=True, text=True)` would have returned: exit status, stdout, stderr."
    def __init__(self, code, out, err): self.returncode, self.stdout, self.stderr = code, out, err


def run_cli(tool, *args, cwd=None) -> Result:
    "Run command `tool` with `args` in this process from `cwd` (default: the project root); its exit status and output."
    (ep,) = entry_points(group='console_scripts', name=tool)     # the installed command's own entry point (pyproject.toml)
    main = ep.load()
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd or project_root())
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try: main([str(a) for a in args]); code = 0
            except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally: os.chdir(here)
    return Result(code, out.getvalue(), err.getvalue())
