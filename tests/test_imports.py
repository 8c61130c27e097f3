"""The import graph of the package: no cycle, counting the imports inside functions too; the one deliberate upward
reach (`generators.KIND_MODULES`, imported on demand) lists exactly the modules that register a kind; consumers ask a
generator's capabilities instead of guessing from its attributes."""
import ast, importlib.metadata, subprocess, sys
from pathlib import Path
import cxr_diffusion_nbs
from cxr_diffusion_nbs.generators import KIND_MODULES, PACKAGE

PKG = Path(cxr_diffusion_nbs.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob('*.py') if p.stem != '_modidx')

def imports_of(module: str) -> set:
    "The package modules `module` imports anywhere in its file (top level and inside functions), `__init__` included."
    out = set()
    for n in ast.walk(ast.parse((PKG/f'{module}.py').read_text())):
        if isinstance(n, ast.ImportFrom):
            name = n.module or ''
            if n.level == 0 and not name.startswith('cxr_diffusion_nbs'): continue
            if n.level > 1: continue
            rel = name.removeprefix('cxr_diffusion_nbs').lstrip('.')
            if rel: out.add(rel.split('.')[0])
            else: out |= {a.name for a in n.names if a.name in MODULES} | {'__init__'}
        elif isinstance(n, ast.Import):
            out |= {a.name.split('.')[1] for a in n.names if a.name.startswith('cxr_diffusion_nbs.')}
    return out & set(MODULES)

def cycles(graph: dict) -> list:
    "Strongly connected components of more than one module (or a module importing itself): the import cycles."
    index, low, stack, on, found = {}, {}, [], set(), []
    def visit(v):
        index[v] = low[v] = len(index); stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1 or v in graph[v]: found.append(sorted(comp))
    for v in sorted(graph):
        if v not in index: visit(v)
    return found

def test_no_import_cycles_counting_imports_inside_functions():
    graph = {m: imports_of(m) for m in MODULES}
    assert cycles(graph) == []
    assert cycles({'a': {'b'}, 'b': {'a'}, 'c': set()}) == [['a', 'b']]      # the check sees a loop when there is one

def test_generators_sits_below_every_kind_and_the_init_imports_nothing_that_imports_it_back():
    assert not imports_of('generators') & {'sampling', 'gan', 'cohort', '__init__'}
    assert imports_of('__init__') == {'generators'}                          # cxr_diffusion_nbs.load_generator, on first use

def test_kind_modules_are_exactly_the_modules_that_register_a_kind():
    registering = {m for m in MODULES if m != 'generators' and any(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, 'id', '') == 'register_generator'
        for n in ast.parse((PKG/f'{m}.py').read_text()).body)}
    assert registering == set(KIND_MODULES) == {'sampling', 'gan'}

def test_importing_the_package_or_generators_stays_light_and_versions_agree():
    code = ('import sys, cxr_diffusion_nbs.generators as g; '
            'print(sorted(m for m in sys.modules if m.startswith("cxr_diffusion_nbs.") and m.split(".")[1] in ("sampling", "gan", "cohort")))')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stderr[-2000:]
    assert PACKAGE == f'cxr_diffusion_nbs {cxr_diffusion_nbs.__version__}' == f"cxr_diffusion_nbs {importlib.metadata.version('cxr_diffusion_nbs')}"

def test_consumers_ask_capabilities_not_attributes():
    for m in ('cohort', 'rarity', 'pipeline', 'inpainting', 'ilvr', 'gan', 'sampling'):
        src = (PKG/f'{m}.py').read_text()
        for guess in ("hasattr(model, 'generate')", "hasattr(gen, 'to_latents')", "hasattr(gen, 'noise_scheduler')",
                      "'sampler' in gen.defaults", 'is_diffusion(', "hasattr(gen, 'model_sha256')", "':GANGenerator"):
            assert guess not in src, f'{m}.py: {guess}'
