"""numba for the compiled simulator's kernels (kernels.py, arm_kernels.py, draw_kernels.py, ewc_kernels.py,
eval_kernels.py, intrinsics.py): imported with SciPy hidden, and cached machine code loaded without numba's per-process typing
set-up (`load_fast`), and kept only while every source file compiled into it is unchanged (`_depend`). Import this
module before numba anywhere on the compiled path (the kernel modules do)."""
from __future__ import annotations

import contextlib
import os
import struct
import sys

from common.cli import paused_gc


@contextlib.contextmanager
def _hidden(module: str):
    """`import module` (and its submodules) raises ImportError inside the block, unless it is loaded already."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None
    try:
        yield
    finally:
        del sys.modules[module]


with _hidden("scipy"), paused_gc():   # numba's import only checks SciPy's version (≈ 8 ms CPU of `import scipy`)
    import numba  # noqa: F401
    from numba.core.dispatcher import Dispatcher


def _numba_without_scipy() -> None:
    """Load numba's numpy support with scipy.linalg hidden: numba.np.arraymath probes for SciPy's BLAS at
    import (0.4–0.6 s of `import scipy.linalg` when SciPy is installed), and these kernels call no BLAS."""
    if "numba.np.arraymath" in sys.modules:
        return
    with _hidden("scipy.linalg"):   # `import scipy.linalg...` raises ImportError: numba records "no BLAS"
        import numba.np.arraymath  # noqa: F401


def _runtime_symbols(target_context) -> None:
    """Make numba's runtime (NRT) callable from loaded machine code: its C helpers registered with LLVM,
    the part of rtsys.initialize that loading needs. rtsys.initialize also compiles NRT's LLVM functions
    (≈ 0.03 s CPU each process), which every compiled kernel links into its own code: that is left to the
    first compile, where numba initialises the runtime itself."""
    from numba.core import config
    from numba.core.runtime import rtsys
    if rtsys._init or getattr(_runtime_symbols, "done", False):
        return
    if config.NRT_STATS:                           # statistics are switched on by numba's own initialize
        rtsys.initialize(target_context)
        return
    import llvmlite.binding as ll
    from numba.core.runtime import _nrt_python
    for name, address in _nrt_python.c_helpers.items():
        ll.add_symbol(name if name.startswith("_") else "NRT_" + name, address)
    _runtime_symbols.done = True


@contextlib.contextmanager
def _environments_without_imports():
    """While cached code is unpickled: rebuild each function environment it references (numba's
    environment._rebuild_env) without importing the module named as its globals when that module is not
    loaded yet (numba.np.arrayobj, numba.cpython.unicode, …: ≈ 0.02 s CPU). The globals of an
    environment are read by object-mode code only; these kernels are nopython code, which reads the
    environment's constants (kept as they are)."""
    from numba.core import environment
    numba_rebuild = environment._rebuild_env

    def rebuild(modname, consts, env_name):
        if environment.lookup_environment(env_name) is not None or modname in sys.modules:
            return numba_rebuild(modname, consts, env_name)
        env = environment.Environment({"__name__": modname})
        env.consts[:] = consts
        env.env_name = env_name
        environment.Environment._memo[env_name] = env
        return env

    environment._rebuild_env = rebuild
    try:
        yield
    finally:
        environment._rebuild_env = numba_rebuild


def _elf_definitions(code: bytes) -> set[str] | None:
    """The symbols an ELF64 little-endian object file defines (functions, data, untyped; not sections or files),
    read from its symbol tables; None for any other object format (macOS, Windows) or a file these tables
    cannot be read from: numba's own path then."""
    if code[:4] != b"\x7fELF" or code[4:6] != b"\x02\x01":
        return None
    try:
        return _elf_symbols(code)
    except (struct.error, IndexError, ValueError):
        return None


def _elf_symbols(code: bytes) -> set[str]:
    offset, = struct.unpack_from("<Q", code, 0x28)
    entry_size, count = struct.unpack_from("<HH", code, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", code, offset + i * entry_size) for i in range(count)]
    names = set()
    for _, kind, _, _, start, size, link, _, _, _ in sections:
        if kind != 2:                              # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for name, info, _, section, _, _ in struct.iter_unpack("<IBBHQQ", code[start:start + size]):
            if name and section != 0 and info & 0xF in (0, 1, 2):   # defined NOTYPE, OBJECT, FUNC
                at = strings + name
                names.add(code[at:code.index(b"\0", at)].decode())
    return names


_ON_DEMAND: dict[type, type] = {}


def _on_demand_class(library_class: type) -> type:
    """`library_class` whose `_shared_module` (the library's LLVM module for linking into another library) is
    parsed from its bitcode when first read, not when the library is loaded from the cache."""
    if library_class not in _ON_DEMAND:
        def get(self):
            bitcode = self.__dict__.pop("_linking_bitcode", None)
            if bitcode is not None:
                import llvmlite.binding as ll
                self.__dict__["_linking_module"] = ll.parse_bitcode(bitcode)
            return self.__dict__.get("_linking_module")

        def put(self, module):
            self.__dict__.pop("_linking_bitcode", None)
            self.__dict__["_linking_module"] = module

        _ON_DEMAND[library_class] = type(library_class.__name__, (library_class,),
                                         {"_shared_module": property(get, put), "__module__": __name__})
    return _ON_DEMAND[library_class]


@contextlib.contextmanager
def _linking_modules_on_demand(codegen):
    """While cached code is loaded: unserialize an object-code library as numba does (the object code handed to
    LLVM, the library finalized) except for its module for linking. numba parses that module's bitcode at once
    (≈ 18 ms CPU for fedmf_round_drawn's 420 KB, 2 % of a whole compiled ML-100K run) to mark the
    symbols it defines; here those are read from the object code's symbol table (≈ 0.2 ms; the same set,
    tests/f3crec/test_kernel_loading.py) and the bitcode is parsed only if another library links this one
    (a kernel compiled later that calls it). Non-ELF objects, and a numba without these internals, keep
    numba's path."""
    engine = getattr(codegen, "_engine", None)
    library_class = getattr(codegen, "_library_class", None)
    needed = ("enable_object_caching", "_set_compiled_object", "_finalize_final_module", "_get_module_for_linking")
    if not isinstance(getattr(engine, "_defined_symbols", None), set) or library_class is None \
            or not all(hasattr(library_class, name) for name in needed):
        yield
        return
    numba_unserialize = codegen.unserialize_library

    def unserialize(state):
        name, kind, data = state
        defined = _elf_definitions(data[0]) if kind == "object" else None
        if defined is None:
            return numba_unserialize(state)
        code, bitcode = data
        library = _on_demand_class(library_class)(codegen, name)
        library._linking_bitcode = bitcode
        library.enable_object_caching()
        library._set_compiled_object(code)
        library._finalize_final_module()
        engine._defined_symbols |= defined
        return library

    own = vars(codegen).get("unserialize_library")   # set by an enclosing load, if any
    codegen.unserialize_library = unserialize
    try:
        yield
    finally:
        if own is None:
            del codegen.unserialize_library
        else:
            codegen.unserialize_library = own


def _load_without_typing(dispatcher) -> None:
    """Let `dispatcher` load its cached machine code without numba's typing set-up. numba's
    FunctionCache.load_overload first refreshes the target context: it imports and installs every typing
    and lowering registry (≈ 0.1 s CPU, and numba.np.arraymath's SciPy probe), which only compiling needs;
    loading needs the runtime's symbols (_runtime_symbols). A miss (no cached code for the signature, or
    stale) takes numba's own path, which refreshes and compiles, with SciPy's BLAS probe hidden. A numba
    whose internals differ from these (checked here) keeps its own loading."""
    from numba.core import environment
    from numba.core.runtime import _nrt_python
    cache = dispatcher._cache
    if not all(hasattr(cache, name) for name in ("_load_overload", "_guard_against_spurious_io_errors")) \
            or not all(hasattr(environment, name) for name in ("_rebuild_env", "lookup_environment")) \
            or not hasattr(environment.Environment, "_memo") or not hasattr(_nrt_python, "c_helpers"):
        return                                     # caching off (a NullCache), or another numba
    numba_load = cache.load_overload

    def load_overload(sig, target_context):
        _runtime_symbols(target_context)
        with cache._guard_against_spurious_io_errors(), _environments_without_imports(), \
                _linking_modules_on_demand(target_context.codegen()):
            loaded = cache._load_overload(sig, target_context)
            if loaded is not None:
                return loaded
        _numba_without_scipy()
        return numba_load(sig, target_context)

    cache.load_overload = load_overload


_SOURCES: dict[str, dict[str, tuple]] = {}   # kernel module -> {module: its file's stamp} of the code compiled into it


def _stamp(path: str) -> tuple:
    """A source file's stamp as numba's cache takes it (caching._CacheLocator.get_source_stamp): mtime, size."""
    st = os.stat(path)
    return st.st_mtime, st.st_size


def _sources(namespace: dict) -> dict[str, tuple]:
    """The modules whose code a kernel module's compiled kernels hold, with their files' stamps: itself, and
    (transitively) the kernel modules whose kernels, overloads or intrinsics it imported (inlined or linked in
    when it compiles). Keyed by module name, not path: a copied tree keeps numba's own rule (stamps, not places)."""
    sources = {namespace["__name__"]: _stamp(namespace["__file__"])}
    for value in list(namespace.values()):   # a kernel (its py_func's module), an intrinsic (its function's)
        module = getattr(getattr(value, "py_func", value), "__module__", None)
        if module != namespace["__name__"] and module in _SOURCES:
            sources.update(_SOURCES[module])
    return sources


def _depend(dispatcher, sources: dict[str, tuple]) -> None:
    """Let `dispatcher`'s cached code stand only while every file of `sources` is unchanged. numba's cache
    checks the stamp of the kernel's own file alone, so a kernel that compiled in another module's kernel
    (kernels.fedmf_round_drawn inlines draw_kernels._draw_client) would keep running that kernel's old code
    after an edit there; its cache index is stamped with every file's stamp instead. A numba whose cache
    differs from this (checked) keeps its own stamp."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = tuple(sorted(sources.items()))


def load_fast(namespace: dict) -> None:
    """Give every numba dispatcher of a kernel module's namespace the fast cached load (_load_without_typing),
    and, where the module compiles in other kernel modules' code, a cache that those modules' edits invalidate
    (_depend); called once at the end of each kernel module, after its last kernel."""
    sources = _SOURCES[namespace["__name__"]] = _sources(namespace)
    for value in list(namespace.values()):
        if isinstance(value, Dispatcher) and not getattr(value, "_fast_load", False):
            if len(sources) > 1:
                _depend(value, sources)
            _load_without_typing(value)
            value._fast_load = True
