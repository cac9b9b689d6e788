"""Compile the Triton kernels of `otkd_nb.fast` (`triton=True`) for NVIDIA GPUs without a GPU, and report each one's registers and spills.

Triton compiles ahead of time for a named architecture, and its bundled `ptxas -v` says how many registers a thread uses and
how many bytes spill to local memory: what decides the number of warps per tile size and the largest tile (`TRITON_MAX`).
The tests run `--quick` so that a kernel that would not compile on a GPU fails on any machine.

    python tools/triton_registers.py              # sm_90 (H100, H200) and sm_80 (A100), every tile size the solver uses
    python tools/triton_registers.py --quick      # sm_90, two tile sizes
"""
import os
os.environ.pop('TRITON_INTERPRET', None)  # compile for real: the interpreter must be off before triton is imported
import argparse, re, subprocess, sys, tempfile, time
from pathlib import Path

def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='90,80', help='compute capabilities, comma-separated (90: H100/H200, 80: A100)')
    p.add_argument('--quick', action='store_true', help='sm_90 only, float32, tiles 64 x 64 and 128 x 128 (what the tests run)')
    a = p.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError: print('triton is not installed: nothing to compile'); return 1
    import otkd_nb.fast as fast
    ptxas = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas'
    archs = [90] if a.quick else [int(s) for s in a.arch.split(',')]
    dtypes = ['fp32'] if a.quick else ['fp32', 'fp64']
    tiles = [(64, 64), (128, 128)] if a.quick else [(1, 8), (8, 1), (2, 128), (128, 2), (16, 32), (32, 32), (64, 64), (128, 128)]
    kernels = {'plain': (fast.ipot_plain_kernel, ('K', 'A', 'B')), 'log': (fast.ipot_log_kernel, ('M', 'LA', 'LB'))}
    print('| arch | kernel | dtype | tile | warps | registers | spill stores (bytes) |\n|---|---|---|---|---|---|---|')
    failed, t0 = 0, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for name, (kernel, args) in kernels.items():
                for dtype in dtypes:
                    for bn, bm in tiles:
                        warps = fast.triton_warps(bn, bm)
                        sig = {**{k: '*' + dtype for k in (*args, 'P')}, **{k: 'i32' for k in ('n', 'm', 'n_iter', 'inner')}, 'BN': 'constexpr', 'BM': 'constexpr'}
                        try:
                            ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs={'BN': bn, 'BM': bm}),
                                                target=GPUTarget('cuda', arch, 32), options={'num_warps': warps})
                            ptx = Path(tmp) / 'k.ptx'; ptx.write_text(ck.asm['ptx'])
                            r = subprocess.run([str(ptxas), '-v', '--gpu-name', f'sm_{arch}a' if arch >= 90 else f'sm_{arch}', str(ptx), '-o', str(ptx.with_suffix('.cubin'))],
                                               capture_output=True, text=True, check=True)
                            regs, spill = re.search(r'Used (\d+) registers', r.stderr), re.search(r'(\d+) bytes spill stores', r.stderr)
                            print(f'| sm_{arch} | {name} | {dtype} | {bn} x {bm} | {warps} | {regs.group(1)} | {spill.group(1) if spill else 0} |', flush=True)
                        except Exception as e:
                            failed += 1; print(f'| sm_{arch} | {name} | {dtype} | {bn} x {bm} | {warps} | FAILED: {str(e)[:200]} | |', flush=True)
    print(f'\n{failed} failed; {time.time() - t0:.0f} s')
    return 1 if failed else 0

if __name__ == '__main__': sys.exit(main())
