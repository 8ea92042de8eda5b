"""LLVM intrinsics the compiled simulator's kernels call (kernels.py, arm_kernels.py, eval_kernels.py): cache-line prefetches,
a rounding cast, and 64-byte vector compares with a population count. Each is one or a few machine
instructions that numba's own lowering does not emit; none changes a value the kernels compute."""
from __future__ import annotations

from .jit import load_fast

from llvmlite import ir  # noqa: E402  (numba and llvmlite after .jit, which imports numba with SciPy hidden)
from numba import types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


def _prefetch(write: int):
    """An intrinsic prefetch(arr, row, col): ask for the cache line of arr[row, col] (C-contiguous 2-D; of
    arr[row] for a 1-D array) to be brought into L2 (`write`: with intent to write). A hint: it changes no
    value, only when a miss is paid."""
    @intrinsic
    def prefetch(typingctx, arr, row, col):
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            index = [args[1], args[2]] if aryty.ndim == 2 else [args[1]]     # 1-D: col unused
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, index, wraparound=False)
            byte_ptr = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [byte_ptr] + [ir.IntType(32)] * 3)
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")  # remangled by opaque-pointer LLVMs
            flag = lambda v: ir.Constant(ir.IntType(32), v)  # noqa: E731
            builder.call(fn, [builder.bitcast(ptr, byte_ptr), flag(write), flag(1), flag(1)])  # locality 1: L2
            return context.get_dummy_value()
        return types.void(arr, row, col), codegen
    return prefetch


prefetch_read, prefetch_write = _prefetch(0), _prefetch(1)


@intrinsic
def as_dtype_of(typingctx, x, arr):
    """x rounded to arr's dtype, as storing it into arr would round it (a scalar, no memory round trip)."""
    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], signature.args[0], signature.return_type)
    return arr.dtype(x, arr), codegen


def _vector_count(op: str):
    """An intrinsic count(arr, start, x) = #{k < W: arr[start + k] <op> x} over the W = 64 bytes / itemsize
    elements from arr[start] (1-D, C-contiguous, start + W ≤ arr.size; not checked): one vector compare
    (ordered: false for NaN, as Python's `<` and `>` are) and a population count, no branch."""
    @intrinsic
    def count(typingctx, arr, start, x):
        if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.layout != "C":
            return None                                  # a typing error: 1-D C-contiguous arrays only
        width = 512 // arr.dtype.bitwidth

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            vec_t = ir.VectorType(context.get_value_type(aryty.dtype), width)
            vec = builder.load(builder.bitcast(ptr, vec_t.as_pointer()), align=1)
            one = builder.insert_element(ir.Constant(vec_t, ir.Undefined),
                                         context.cast(builder, args[2], signature.args[2], aryty.dtype),
                                         ir.Constant(ir.IntType(32), 0))
            splat = builder.shuffle_vector(one, ir.Constant(vec_t, ir.Undefined),
                                           ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))
            bits = builder.bitcast(builder.fcmp_ordered(op, vec, splat), ir.IntType(width))
            return builder.zext(builder.ctpop(bits), ir.IntType(64))
        return types.int64(arr, start, x), codegen
    return count


count_below, count_above = _vector_count("<"), _vector_count(">")

COLUMN_VECTORS = 4   # independent accumulators of column_sums: enough adds in flight to hide their latency


@intrinsic
def column_sums(typingctx, table, v, lo, out, n):
    """out[i] = (((0 + table[0, lo + i]·v[0]) + table[1, lo + i]·v[1]) + …) for i < n, in the table's dtype, term
    by term in k order (no fused multiply-add): what adding one column at a time gives, with the running sums
    kept in vector registers across the d columns instead of stored and reloaded per column. `table` (d, I) and
    `out` C-contiguous, v of the table's dtype, n a multiple of COLUMN_VECTORS × (64 bytes / itemsize) and
    lo + n ≤ I (not checked)."""
    if not (isinstance(table, types.Array) and table.ndim == 2 and table.layout == "C" and isinstance(out, types.Array)
            and out.ndim == 1 and out.layout == "C" and out.dtype == table.dtype and isinstance(v, types.Array)
            and v.dtype == table.dtype):
        return None
    width = 512 // table.dtype.bitwidth

    def codegen(context, builder, signature, args):
        table_ty, v_ty, lo_ty, out_ty, n_ty = signature.args
        tab = context.make_array(table_ty)(context, builder, args[0])
        vec = context.make_array(v_ty)(context, builder, args[1])
        res = context.make_array(out_ty)(context, builder, args[3])
        lo = context.cast(builder, args[2], lo_ty, types.intp)
        n = context.cast(builder, args[4], n_ty, types.intp)
        elem = context.get_value_type(table_ty.dtype)
        vec_t = ir.VectorType(elem, width)
        d = cgutils.unpack_tuple(builder, tab.shape, 2)[0]
        accs = [cgutils.alloca_once(builder, vec_t) for _ in range(COLUMN_VECTORS)]
        step = ir.Constant(ir.IntType(64), width * COLUMN_VECTORS)
        zero = ir.Constant(vec_t, [ir.Constant(elem, 0.0)] * width)
        mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
        with cgutils.for_range_slice(builder, ir.Constant(ir.IntType(64), 0), n, step) as (i0, _):
            for acc in accs:
                builder.store(zero, acc)
            with cgutils.for_range(builder, d) as loop:
                k = loop.index
                vk = builder.load(cgutils.get_item_pointer(context, builder, v_ty, vec, [k], wraparound=False))
                splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vec_t, ir.Undefined), vk,
                                                                      ir.Constant(ir.IntType(32), 0)),
                                               ir.Constant(vec_t, ir.Undefined), mask)
                for u, acc in enumerate(accs):
                    col = builder.add(builder.add(lo, i0), ir.Constant(ir.IntType(64), u * width))
                    ptr = cgutils.get_item_pointer(context, builder, table_ty, tab, [k, col], wraparound=False)
                    column = builder.load(builder.bitcast(ptr, vec_t.as_pointer()), align=1)
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(column, splat)), acc)
            for u, acc in enumerate(accs):
                at = builder.add(i0, ir.Constant(ir.IntType(64), u * width))
                ptr = cgutils.get_item_pointer(context, builder, out_ty, res, [at], wraparound=False)
                builder.store(builder.load(acc), builder.bitcast(ptr, vec_t.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(table, v, lo, out, n), codegen

load_fast(globals())
