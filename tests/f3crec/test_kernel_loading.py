"""How the compiled simulator's kernels are loaded (issue 24, start-up): a kernel whose machine code is in
numba's cache is loaded without numba's typing set-up (no registry refresh, no numba.np.arraymath, no SciPy
BLAS probe, no import of the modules its environments name) and gives the same values and errors; a
kernel with no cached code still compiles (numba's own path) with the SciPy probe hidden, and saves its code
for the next process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[2]

MODULE = '''
import numpy as np
from numba import njit
from f3crec.jit import _load_without_typing

@njit(cache=True)
def shifted(a, x):
    if x < 0:
        raise ValueError("a negative shift")
    out = np.empty_like(a)          # an allocation: the loaded code calls numba's runtime (NRT)
    for i in range(a.size):
        out[i] = a[i] * 2.0 + x
    return out

_load_without_typing(shifted)
'''

PROGRAM = '''
import json, sys
import numpy as np
import toy
values = toy.shifted(np.arange(4.0), 0.5).tolist() + toy.shifted(np.arange(3, dtype=np.float32), 1.0).tolist()
stats = toy.shifted.stats
out = {"values": values, "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
       "arraymath": "numba.np.arraymath" in sys.modules, "scipy_linalg": "scipy.linalg" in sys.modules,
       "arrayobj": "numba.np.arrayobj" in sys.modules}
try:
    toy.shifted(np.arange(2.0), -1.0)
except ValueError as err:
    out["raised"] = str(err)
if sys.argv[1:] == ["new"]:   # a signature never compiled, after loading: numba's own path, in the same process
    out["new"] = toy.shifted(np.arange(3, dtype=np.int64), 1).tolist() + toy.shifted(np.arange(2.0), 0.0).tolist()
    out["misses_after"] = sum(stats.cache_misses.values())
print(json.dumps(out))
'''


def _run(folder: Path, *args: str, program: str = PROGRAM) -> dict:
    env_path = f"{folder}:{ROOT}"
    done = subprocess.run([sys.executable, "-c", program, *args], cwd=folder, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path, "NUMBA_CACHE_DIR": str(folder / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cached_kernel_loads_without_numbas_typing_and_a_new_one_compiles(tmp_path):
    (tmp_path / "toy.py").write_text(MODULE)
    first = _run(tmp_path)            # nothing cached: numba compiles both signatures and saves them
    assert first["misses"] == 2 and first["hits"] == 0
    assert first["arraymath"] and not first["scipy_linalg"]     # compiled with SciPy's BLAS probe hidden
    second = _run(tmp_path, "new")    # both loaded from the cache, without the typing registries ...
    assert second["hits"] == 2 and second["misses"] == 0
    assert not second["arraymath"] and not second["scipy_linalg"]
    assert first["arrayobj"] and not second["arrayobj"]     # np.empty_like's environment, rebuilt without import
    assert second["raised"] == first["raised"] == "a negative shift"
    assert second["values"] == first["values"] == [0.5, 2.5, 4.5, 6.5, 1.0, 3.0, 5.0]
    assert second["misses_after"] == 1 and second["new"] == [1, 3, 5, 0.0, 2.0]   # ... then one compiled


LINKING = '''
import json, sys
import numpy as np
import llvmlite.binding as ll
from numba import njit
import toy
from f3crec.jit import _elf_definitions
values = toy.shifted(np.arange(4.0), 0.5)
library = toy.shifted.overloads[toy.shifted.signatures[0]].library
out = {"deferred": "_linking_bitcode" in vars(library), "values": values.tolist()}
cache = toy.shifted._cache._cache_file
for key in cache._load_index():     # numba's own serialized library: (name, "object", (code, bitcode))
    name, kind, (code, bitcode) = cache.load(key)[0]
    module = ll.parse_bitcode(bitcode)
    out.setdefault("same_symbols", []).append(
        _elf_definitions(code) == {g.name for g in [*module.functions, *module.global_variables] if not g.is_declaration})

@njit                                  # compiled now (no cache): links the loaded library into its own
def caller(a):
    return toy.shifted(a, 1.0).sum()

out["linked"] = caller(np.arange(3.0))
out["parsed"] = "_linking_bitcode" not in vars(library) and vars(library).get("_linking_module") is not None
print(json.dumps(out))
'''


def test_a_cached_kernels_module_for_linking_is_parsed_only_when_another_kernel_links_it(tmp_path):
    """Loading cached code does not parse the library's bitcode (its module for linking into other libraries):
    the symbols it defines are read from the object code (the same set as the bitcode's definitions), and
    a kernel compiled later that calls the loaded one links it (the bitcode parsed then) and runs."""
    from f3crec.jit import _elf_definitions
    assert _elf_definitions(b"\xcf\xfa\xed\xfe" + bytes(60)) is None     # Mach-O (macOS): numba's own path
    assert _elf_definitions(b"\x7fELF\x02\x01" + bytes(20)) is None       # a cut ELF header: numba's path too
    (tmp_path / "toy.py").write_text(MODULE)
    _run(tmp_path)                                                          # compiled and cached
    out = _run(tmp_path, program=LINKING)
    assert out["values"] == [0.5, 2.5, 4.5, 6.5]
    assert out["deferred"]                                  # loaded: the bitcode not parsed
    assert out["same_symbols"] == [True, True]              # float64 and float32 signatures
    assert out["linked"] == 9.0 and out["parsed"]           # (0+1)+(2+1)+(4+1)


def test_every_kernel_of_the_module_loads_this_way():
    from numba.core.dispatcher import Dispatcher
    from f3crec import arm_kernels, draw_kernels, eval_kernels, ewc_kernels, kernels
    dispatchers = [v for m in (kernels, arm_kernels, draw_kernels, ewc_kernels, eval_kernels) for v in vars(m).values()
                   if isinstance(v, Dispatcher)]
    assert {"fedmf_round_drawn", "topk_metrics", "affine_round", "draw_plan", "replay_ranks"} <= \
        {d.__name__ for d in dispatchers}
    assert all("load_overload" in vars(d._cache) for d in dispatchers)


DEPENDENCY = '''
from numba import njit
from f3crec.jit import load_fast

@njit(cache=True, inline="always")
def step(x):
    return x + 1.0

load_fast(globals())
'''

DEPENDENCY_INTRINSIC = '''
from f3crec.jit import load_fast
from numba import types
from numba.extending import intrinsic

@intrinsic
def step(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], context.get_constant(types.float64, 1.0))
    return types.float64(types.float64), codegen

load_fast(globals())
'''

DEPENDANT = '''
from numba import njit
from f3crec.jit import load_fast
from dep import step

@njit(cache=True)
def twice(x):
    return step(x) * 2.0

load_fast(globals())
'''


@pytest.mark.parametrize("dependency", [DEPENDENCY, DEPENDENCY_INTRINSIC], ids=["kernel", "intrinsic"])
def test_a_kernel_compiled_with_another_modules_kernel_is_recompiled_when_that_module_changes(tmp_path, dependency):
    """numba's cache checks only the kernel's own file: a kernel that inlines another kernel module's kernel
    (kernels.fedmf_round_drawn and draw_kernels._draw_client) would keep that kernel's old code after an edit
    there. load_fast stamps such a kernel's cache with every file compiled into it: an edit of the other
    module recompiles it, and an unchanged one still loads from the cache; the same for an intrinsic (the
    kernels' vector compares in intrinsics.py)."""
    (tmp_path / "dep.py").write_text(dependency)
    (tmp_path / "top.py").write_text(DEPENDANT)
    program = ("import json, top, dep; from numba import njit; s = top.twice.stats; "
               "print(json.dumps([top.twice(1.0), njit(lambda x: dep.step(x))(1.0), "
               "sum(s.cache_hits.values()), sum(s.cache_misses.values())]))")

    def run() -> list:
        done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}",
                                   "NUMBA_CACHE_DIR": str(tmp_path / "cache")})
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert run() == [4.0, 2.0, 0, 1]          # compiled and cached
    assert run() == [4.0, 2.0, 1, 0]          # loaded from the cache
    (tmp_path / "dep.py").write_text(dependency.replace("x + 1.0", "x + 100.0").replace("float64, 1.0", "float64, 100.0"))
    assert run() == [202.0, 101.0, 0, 1]      # the edit of dep.py reaches top.twice: compiled again
    assert run() == [202.0, 101.0, 1, 0]


def test_importing_the_kernels_imports_no_scipy():
    """numba only checks SciPy's version at import, and these kernels call no BLAS: SciPy stays unloaded
    (and importable afterwards)."""
    pytest.importorskip("scipy")
    done = subprocess.run([sys.executable, "-c", "import sys, f3crec.kernels; print('scipy' in sys.modules); "
                           "import scipy.linalg; print(scipy.linalg.__name__)"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "scipy.linalg"]
