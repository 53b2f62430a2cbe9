#!/usr/bin/env python
"""Check and benchmark small_doge's Triton Dynamic Mask Attention kernel (small_doge.kernels.dmattn).

    python kernels/bench_dmattn.py               # CUDA machine: correctness at small sizes, then timings and memory
    python kernels/bench_dmattn.py --cpu-smoke   # tiny sizes in Triton's interpreter: proves the script runs
    python kernels/bench_dmattn.py --compile-check   # no GPU needed: compile every kernel for sm_90, report spills

Compares the kernel with (a) the eager reference, (b) torch SDPA with the dense additive mask (the `sdpa` backend,
what transformers does) and (c) torch SDPA flash attention, causal, without bias (the speed ceiling). TFLOP/s count
useful work: 4*D FLOPs per kept (query, key) pair forward (the flash baseline: per causal pair), 2.5x that
backward. Results go to kernels/results.md (markdown) and to stdout.
"""
from __future__ import annotations
import argparse, datetime, gc, math, os, platform, statistics, sys, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cpu-smoke', action='store_true', help="tiny sizes on the CPU in Triton's interpreter")
    p.add_argument('--compile-check', nargs='*', metavar='KIND:D', default=None,
                   help='compile the kernels for sm_90 without a GPU and report registers/spills (entries of the '
                        'tile table, e.g. 16bit:128 fp32:64; default all)')
    p.add_argument('--seqs', type=int, nargs='+', default=[1024, 4096, 8192, 16384], help='sequence lengths S')
    p.add_argument('--windows', type=int, nargs='+', default=[512, 1024, 0], help='keep_window_size W (0 means W = S)')
    p.add_argument('--bias', choices=['random', 'ties', 'both'], default='both',
                   help='random biases (a trained model: kept keys scattered) or all equal (init: a sliding window)')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--kv-heads', type=int, default=4)
    p.add_argument('--dim', type=int, default=128, help='head dim D')
    p.add_argument('--dtype', choices=['bf16', 'fp16', 'fp32'], default='bf16')
    p.add_argument('--reps', type=int, default=20, help='timed repetitions (median reported)')
    p.add_argument('--out', type=Path, default=None,
                   help='markdown output (default kernels/results.md; a temp file with --cpu-smoke)')
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.seqs, args.windows, args.bias = [40], [8, 0], 'both'
        args.batch, args.heads, args.kv_heads, args.dim, args.dtype, args.reps = 1, 2, 1, 16, 'fp32', 1
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / 'dmattn-cpu-smoke.md' if args.cpu_smoke else REPO / 'kernels' / 'results.md'
    return args


def setup(args):
    "Import torch and small_doge (the interpreter must be switched on before triton is imported)."
    if args.cpu_smoke: os.environ['TRITON_INTERPRET'] = '1'
    sys.path.insert(0, str(REPO))
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit('no CUDA device: run on a GPU machine, or pass --cpu-smoke')
    return torch, ('cpu' if args.cpu_smoke else 'cuda')


# ---------------------------------------------------------------- correctness

def correctness(torch, device, smoke):
    "Forward and gradients of the kernel vs the eager reference at small sizes; returns markdown rows and success."
    from small_doge.attention import dynamic_mask_attention
    from small_doge.kernels.dmattn import dmattn_triton
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 checks against fp32 eager: exact fp32 dots on both sides
    if smoke: cases = [(1, 2, 1, 33, 33, 16, 5), (1, 2, 1, 1, 40, 16, 6)]
    else: cases = [(2, 8, 4, 1000, 1000, 128, 256), (2, 8, 4, 300, 1200, 128, 512), (1, 8, 4, 1, 4000, 128, 1024),
                   (2, 4, 2, 777, 777, 64, None), (1, 6, 3, 513, 513, 128, 64)]
    dtypes = [(torch.float32, 1e-4)] + ([] if smoke else [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
    rows, ok = [], True
    for B, H, Hkv, Sq, Sk, D, W in cases:
        for dtype, tol in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            mk = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype).requires_grad_()
            q, k, v, bias = mk(B, H, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk)
            am = torch.ones(B, Sk, dtype=torch.long, device=device); am[0, :Sk // 5] = 0   # some left padding
            do = torch.randn(B, H, Sq, D, device=device, generator=g).to(dtype)
            res = []
            for attn in (dynamic_mask_attention, dmattn_triton):
                o = attn(q, k, v, bias, keep_window_size=W, attention_mask=am)
                res.append([o, *torch.autograd.grad(o, (q, k, v, bias), do)])
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()
                      for a, b in zip(*res))
            passed = err <= tol
            ok &= passed
            rows.append(f'| {B}x{H}/{Hkv}x{Sq}/{Sk}x{D} | {W} | {str(dtype)[6:]} | {err:.2e} | {tol:.0e} | '
                        f'{"ok" if passed else "FAIL"} |')
            del res, q, k, v, bias
    return rows, ok


# ---------------------------------------------------------------- timing

def timer(torch, device, fn, reps):
    "Median wall time of fn() in ms (CUDA events on GPU)."
    for _ in range(1 if device == 'cpu' else 3): fn()
    times = []
    for _ in range(reps):
        if device == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record(); torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kept_pairs(torch, bias, W, Sq, n_rep):
    "Number of kept (query, key) pairs over all query heads: sum over keys of |[j, d_j) ∩ query rows|."
    from small_doge.kernels.dmattn import drop_rows
    Sk = bias.shape[-1]
    drop = drop_rows(bias, W, None, n_queries=Sq).long()
    j = torch.arange(Sk, device=bias.device)
    return int((drop.clamp(max=Sk) - j.clamp(min=Sk - Sq)).clamp(min=0).sum().item()) * n_rep


def methods(torch, args):
    import torch.nn.functional as F
    from small_doge.attention import dynamic_mask_attention
    from small_doge.kernels.dmattn import dmattn_triton

    def flash(q, k, v, bias, W):
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)   # inside the timing: part of its cost
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION): return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {'triton': lambda q, k, v, b, W: dmattn_triton(q, k, v, b, keep_window_size=W),
            'eager': lambda q, k, v, b, W: dynamic_mask_attention(q, k, v, b, keep_window_size=W, backend='eager'),
            'sdpa dense mask': lambda q, k, v, b, W: dynamic_mask_attention(q, k, v, b, keep_window_size=W, backend='sdpa'),
            'sdpa flash causal': flash}


def eager_fits(torch, device, B, H, S):
    "Rough check that the eager path's S x S tensors (fp32 scores, probs, mask, and their grads) fit in free memory."
    if device == 'cpu': return True
    free, _ = torch.cuda.mem_get_info()
    return B * H * S * S * 20 < 0.8 * free


def bench_one(torch, device, args, fn, q, k, v, bias, W, flops_fwd):
    do = torch.randn_like(q)
    def fwd():
        with torch.no_grad(): fn(q, k, v, bias, W)
    def fwd_bwd():
        q.grad = k.grad = v.grad = bias.grad = None
        fn(q, k, v, bias, W).backward(do)
    try:
        t_fwd = timer(torch, device, fwd, args.reps)
        t_all = timer(torch, device, fwd_bwd, args.reps)
        peak = float('nan')
        if device == 'cuda':
            q.grad = k.grad = v.grad = bias.grad = None
            torch.cuda.synchronize(); gc.collect(); torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd(); torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.cuda.OutOfMemoryError:
        gc.collect(); torch.cuda.empty_cache()
        return None
    tf = lambda flops, ms: flops / (ms * 1e-3) / 1e12
    return dict(fwd=t_fwd, fwd_tflops=tf(flops_fwd, t_fwd), all=t_all, all_tflops=tf(3.5 * flops_fwd, t_all), peak=peak)


def timings(torch, device, args):
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.dim
    results = []
    for S in args.seqs:
        for W_arg in args.windows:
            W = S if W_arg == 0 else W_arg
            for bias_kind in (['random', 'ties'] if args.bias == 'both' else [args.bias]):
                g = torch.Generator(device=device).manual_seed(0)
                mk = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype).requires_grad_()
                q, k, v = mk(B, H, S, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)
                bias = (torch.randn(B, Hkv, S, device=device, generator=g) if bias_kind == 'random'
                        else torch.ones(B, Hkv, S, device=device)).to(dtype).requires_grad_()
                pairs = kept_pairs(torch, bias.detach(), W, S, H // Hkv) 
                for name, fn in methods(torch, args).items():
                    if name == 'sdpa flash causal' and bias_kind == 'ties' and args.bias == 'both': continue  # same run
                    if name == 'eager' and not eager_fits(torch, device, B, H, S):
                        results.append(dict(S=S, W=W, bias=bias_kind, method=name, res='skipped (would not fit)'))
                        continue
                    n_pairs = B * H * S * (S + 1) // 2 if name == 'sdpa flash causal' else pairs
                    r = bench_one(torch, device, args, fn, q, k, v, bias, W, 4 * D * n_pairs)
                    results.append(dict(S=S, W=W, bias=bias_kind, method=name, res=r if r else 'OOM'))
                    print(format_row(results[-1]), flush=True)
                del q, k, v, bias
    return results


def format_row(r):
    head = f"| {r['S']} | {r['W']} | {r['bias']} | {r['method']} |"
    x = r['res']
    if isinstance(x, str): return head + f' {x} | | | | |'
    peak = 'n/a' if math.isnan(x['peak']) else f"{x['peak']:.0f}"
    return head + (f" {x['fwd']:.3f} | {x['fwd_tflops']:.3g} | {x['all']:.3f} | {x['all_tflops']:.3g} | {peak} |")


def goals(results, args):
    "The three targets of the kernel, checked on the measured numbers (n/a when the needed rows are missing)."
    get = lambda S, W, method, bias='random': next((r['res'] for r in results if r['S'] == S and r['W'] == W and
                                                    r['method'] == method and r['bias'] == bias
                                                    and isinstance(r['res'], dict)), None)
    lines, S_max = [], max(args.seqs)
    ratios = []
    for S in args.seqs:
        t, f = get(S, S, 'triton'), get(S, S, 'sdpa flash causal')
        if t and f: ratios.append((S, t['fwd'] / f['fwd'], t['all'] / f['all']))
    if ratios:
        worst = max(max(a, b) for _, a, b in ratios)
        detail = ', '.join(f'S={S}: fwd {a:.2f}x, fwd+bwd {b:.2f}x' for S, a, b in ratios)
        lines.append(f"- W >= S within 1.4x of SDPA-flash causal: {'PASS' if worst <= 1.4 else 'FAIL'} ({detail})")
    else: lines.append('- W >= S within 1.4x of SDPA-flash causal: n/a')
    S_goal = 16384 if 16384 in args.seqs else S_max
    W_goal = 1024 if 1024 in args.windows else min(w for w in args.windows if w) if any(args.windows) else S_goal
    t, d = get(S_goal, W_goal, 'triton'), get(S_goal, W_goal, 'sdpa dense mask')
    if t and d:
        a, b = d['fwd'] / t['fwd'], d['all'] / t['all']
        lines.append(f"- S={S_goal}, W={W_goal} at least 3x faster than the dense-mask path: "
                     f"{'PASS' if min(a, b) >= 3 else 'FAIL'} (fwd {a:.1f}x, fwd+bwd {b:.1f}x, random biases)")
    else: lines.append(f'- S={S_goal}, W={W_goal} at least 3x faster than the dense-mask path: n/a')
    peaks = [(S, get(S, W_goal if W_goal < S else S, 'triton')) for S in sorted(args.seqs)]
    peaks = [(S, p['peak']) for S, p in peaks if p and not math.isnan(p['peak'])]
    if len(peaks) >= 2:
        (s0, p0), (s1, p1) = peaks[0], peaks[-1]
        growth, linear = p1 / p0, s1 / s0
        lines.append(f"- memory linear in S: {'PASS' if growth <= 1.25 * linear else 'FAIL'} "
                     f"(peak x{growth:.2f} from S={s0} to S={s1}, S x{linear:.0f})")
    else: lines.append('- memory linear in S: n/a')
    return lines


def compile_check(entries):
    "Compile the kernels of the tile table for an H100 (sm_90) without a GPU; ptxas -v gives registers and spills."
    import inspect, re, subprocess
    os.environ['TRITON_INTERPRET'] = '0'   # the compiler needs the real triton.language (and small_doge must not choose the interpreter)
    sys.path.insert(0, str(REPO))
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    import small_doge.kernels.dmattn as dm
    target, ptxas = GPUTarget('cuda', 90, 32), get_ptxas(90).path
    pointers = dict(Drop='*i32', First='*i32', Rank='*i32', Sorted='*i32', Lse='*fp32', Delta='*fp32', DB='*fp32')

    def report(fn, dtype, consts, opts):
        sig = {}
        for name in inspect.signature(fn.fn).parameters:   # fn: a JITFunction
            if name in consts: sig[name] = 'constexpr'
            elif name in pointers: sig[name] = pointers[name]
            elif name in ('Q', 'K', 'V', 'Bias', 'O', 'DO', 'DK', 'DV', 'DQ'): sig[name] = f'*{dtype}'
            else: sig[name] = 'fp32' if name == 'scale' else 'i32'
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)
        with tempfile.NamedTemporaryFile('w', suffix='.ptx', delete=False) as f: f.write(k.asm['ptx'])
        out = subprocess.run([ptxas, '-v', '--gpu-name', 'sm_90a', f.name, '-o', os.devnull], capture_output=True,
                             text=True)
        os.unlink(f.name)
        if out.returncode: raise RuntimeError(f'ptxas failed for {fn.__name__}: {out.stderr[-500:]}')
        regs = re.search(r'Used (\d+) registers', out.stderr)
        spill = re.search(r'(\d+) bytes spill stores', out.stderr)
        return int(regs.group(1)), int(spill.group(1)) if spill else 0, k.metadata.shared

    rows, spilled = [], 0
    kernels = dict(fwd=dm._fwd_kernel, dkdv=dm._bwd_dkdv_kernel, dq=dm._bwd_dq_kernel)
    todo = [tuple(e.split(':')) for e in entries] if entries else [(k, str(d)) for k, d in dm._TILES]
    for kind, D in todo:
        cfg, D = dm._TILES[kind, int(D)], int(D)
        dtype = 'fp32' if kind == 'fp32' else 'bf16'
        for name, fn in kernels.items():
            bm, bn, warps, stages = cfg[name]
            consts = dict(HEAD_D=D, BLOCK_D=D, DOT_PREC='ieee' if dtype == 'fp32' else 'tf32', BLOCK_M=bm, BLOCK_N=bn)
            regs, spills, shared = report(fn, dtype, consts, dict(num_warps=warps, num_stages=stages))
            spilled += spills
            rows.append(f'| {name} | {dtype} | {D} | {bm}x{bn} | {warps} | {stages} | {regs} | {spills} | {shared} |')
            print(rows[-1], flush=True)
    regs, spills, shared = report(dm._drop_rows_kernel, 'i32', dict(BLOCK_J=64, P=512, LOG_P=9, CHUNK=64),
                                  dict(num_warps=4))
    rows.append(f'| drop_rows | int32 | - | 64 keys, P=512 | 4 | - | {regs} | {spills} | {shared} |')
    print(rows[-1])
    print(f'compiled {len(rows)} kernels for sm_90; {spilled} bytes of register spills in the attention kernels')
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.compile_check is not None: return compile_check(args.compile_check)
    torch, device = setup(args)
    import triton
    dev_name = 'CPU (Triton interpreter, --cpu-smoke)' if device == 'cpu' else torch.cuda.get_device_name()
    print(f'device: {dev_name}', flush=True)
    corr_rows, corr_ok = correctness(torch, device, args.cpu_smoke)
    print('correctness:', 'ok' if corr_ok else 'FAILED', flush=True)
    results = timings(torch, device, args)
    md = [f"# Dynamic Mask Attention kernel: results{' (CPU smoke run, not a benchmark)' if args.cpu_smoke else ''}",
          '', f'- device: {dev_name}', f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
          f'- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}',
          f'- shapes: batch {args.batch}, heads {args.heads}/{args.kv_heads} (query/kv), head dim {args.dim}, '
          f'{args.dtype}; median of {args.reps} runs',
          '', '## correctness (max error relative to the output scale, forward and dq/dk/dv/dbias)', '',
          '| B x H/Hkv x Sq/Sk x D | W | dtype | max rel err | tol | |', '|---|---|---|---|---|---|', *corr_rows,
          '', '## speed and memory', '',
          'TFLOP/s: 4*D FLOPs per kept (query, key) pair forward, 3.5x that for forward+backward (flash causal: per '
          'causal pair). Peak: extra memory of one forward+backward over the inputs.', '',
          '| S | W | bias | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB |',
          '|---|---|---|---|---|---|---|---|---|', *map(format_row, results),
          '', '## goals', '',
          *(['- not evaluated: interpreter timings say nothing about GPU speed'] if args.cpu_smoke else goals(results, args)),
          '']
    text = '\n'.join(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f'.{args.out.name}.tmp')
    tmp.write_text(text); os.replace(tmp, args.out)
    print(text)
    print(f'wrote {args.out}')
    return 0 if corr_ok else 1


if __name__ == '__main__': sys.exit(main())
