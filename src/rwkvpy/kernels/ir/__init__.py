"""CPU kernels written as explicit LLVM vector code (numba intrinsics), by subject.

numba's loop vectorizer handles a ggml block badly: each 32-weight block became a scalar
prologue (the fp16 scale decoded with integer tricks), a short vector loop with run-time trip
checks and a scalar epilogue, about two instructions per weight. Here each block is one straight
run of vector instructions on 32 lanes that LLVM lowers for the host CPU, and the order of every
floating-point operation is fixed in the IR, so the kernels give the same numbers on every CPU
that runs them. The only fast-math flag used is LLVM's 'contract' (a multiply and an add fused
into one rounding); integer products use x86 AVX2 instructions, everything else is plain IR.

Modules: :mod:`.base` (IR helpers, the block decoders), :mod:`.rows` (products and decoding of
rows as ggml stores them), :mod:`.x8` (the interleaved groups of the integer products),
:mod:`.vecmath` (axpy, short dots, rounding activations to integer blocks, exp), :mod:`.state`
(one token of a head's state, for kernels/wkv/serial.py), :mod:`.kquants` and
:mod:`.kquants_x8` (the K-quants: rows as ggml stores them, interleaved groups). The block
formats' parameters (bytes per block, fields) come from kernels.kinds.Kind, itself read from
rwkvpy.quant's format classes.
"""
