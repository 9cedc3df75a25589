"""One quick look at every CUDA/Triton op on a GPU: each op once forward and backward against its
float64 reference (relative error of the output and of every gradient), the host syncs one call makes
(``torch.cuda.set_sync_debug_mode``), and the median time of llkern against the eager reference at one
shape per op. Every case runs on its own: one that fails prints its error and the rest still run.

    python bench/gpu_probe.py                 # probe: errors, syncs, times; table last, JSON with --json
    python bench/gpu_probe.py --smoke         # small odd sizes, no timing: for compute-sanitizer

Relative error is ``‖out − ref‖ / ‖ref‖`` over the output and each gradient, the reference computed in
float64 on the CPU from the same inputs (for 16-bit inputs: the 16-bit values, upcast).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch

import llkern.functional as LF
import llkern.nn.activation_memory as activation_memory
from llkern.ops.relu_mask import relu_with_mask

DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def run_case(fn: Callable, inputs: list[torch.Tensor], grad_mask: list[bool]) -> tuple[list, list]:
    """Outputs (a tuple of tensors) and the gradients of sum(out0 · g) w.r.t. the inputs marked."""
    leaves = [leaf(t, m) for t, m in zip(inputs, grad_mask, strict=True)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wanted = [t for t, m in zip(leaves, grad_mask, strict=True) if m]
    if not wanted:
        return list(outs), []
    # (made on the device: a host-to-device copy would count as a sync below)
    g = torch.linspace(0.5, 1.5, outs[0].numel(), dtype=torch.float64, device=outs[0].device).reshape(outs[0].shape)
    grads = torch.autograd.grad((outs[0] * g.to(outs[0].dtype)).sum(), wanted, allow_unused=True)
    return list(outs), [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wanted, strict=True)]


def count_syncs(fn: Callable) -> int:
    """Host synchronisations one call (forward and backward) makes, by the sync debug mode's warnings."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def median_ms(fn: Callable, reps: int = 30) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


# --- the cases: (name, dtype, inputs, grad mask, kernel fn, reference fn) -----------------------------


def bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, impl: str) -> torch.Tensor:
    """relu(BN(x)) in training mode: llkern's compiled ops, or PyTorch's BatchNorm and ReLU."""
    if impl == "kernel":
        return activation_memory.batch_norm_relu(x, None, None, weight, bias, True)
    return torch.relu(torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5))


def cases(smoke: bool) -> list[dict]:
    g = torch.Generator().manual_seed(7)

    def rn(*shape, dtype=torch.float32, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        tag = str(dtype).replace("torch.", "")
        # transport penalty
        n = 1025 if smoke else 1 << 22
        y, x = rn(7, n // 7 + 1, dtype=dtype), rn(7, n // 7 + 1, dtype=dtype)
        out.append(dict(op="transport_penalty", dtype=tag, inputs=[y, x], mask=[True, True],
                        fn=lambda y, x, impl: LF.transport_penalty(y, x, 0.7, impl=impl)))
        # aux head (vision, small)
        b, c, hw, k = (7, 13, 3, 5) if smoke else (1024, 64, 8, 10)
        feats = rn(b, c, hw, hw, dtype=dtype)
        w, bias = rn(k, c, dtype=dtype, scale=0.3), rn(k, dtype=dtype, scale=0.1)
        tgt = torch.randint(0, k, (b,), generator=g).to(DEVICE)
        out.append(dict(op="aux_head_loss", dtype=tag, inputs=[feats, w, bias], mask=[True, True, True],
                        fn=lambda f, w, bias, impl, t=tgt: LF.aux_head_loss(f, w, bias, t.to(f.device), impl=impl)))
        # aux head, many classes (the chunked path)
        b, c, k = (37, 70, 1000) if smoke else (2048, 1024, 32000)
        feats = rn(b, c, dtype=dtype)
        w = rn(k, c, dtype=dtype, scale=1 / math.sqrt(c))
        tgt = torch.randint(0, k, (b,), generator=g).to(DEVICE)
        out.append(dict(op="aux_head_loss[tokens]", dtype=tag, inputs=[feats, w], mask=[True, True],
                        fn=lambda f, w, impl, t=tgt: LF.aux_head_loss(f, w, None, t.to(f.device), impl=impl)))
        if dtype == torch.bfloat16:  # bfloat16 logits and d weight summed in bfloat16 (3 chunks at full size)
            out.append(dict(op="aux_head_loss[tokens, low_memory]", dtype=tag, inputs=[feats, w], mask=[True, True],
                            fn=lambda f, w, impl, t=tgt: LF.aux_head_loss(f, w, None, t.to(f.device), impl=impl,
                                                                          low_memory=True)))
        # similarity losses
        n, d = (97, 7) if smoke else (4096, 128)
        z1, z2 = rn(n, d, dtype=dtype), rn(n, d, dtype=dtype)
        labels = torch.randint(0, 10, (n,), generator=g).to(DEVICE)
        out.append(dict(op="info_nce", dtype=tag, inputs=[z1, z2], mask=[True, True],
                        fn=lambda a, b, impl: LF.info_nce(a, b, 0.1, impl=impl)))
        out.append(dict(op="supcon_loss", dtype=tag, inputs=[z1], mask=[True],
                        fn=lambda a, impl, lab=labels: LF.supcon_loss(a, lab.to(a.device), 0.1, impl=impl)))
        nr = 97 if smoke else 2048
        # (σ = √d: random rows are ~√(2d) apart, so K² ≈ e⁻² and the gradient is not ≈ 0 as at Silverman's width)
        out.append(dict(op="renyi_mutual_information", dtype=tag, inputs=[z1[:nr]], mask=[True],
                        fn=lambda a, impl, lab=labels[:nr]: LF.renyi_mutual_information(
                            a, lab.to(a.device), sigma=math.sqrt(a.shape[1]), impl=impl)))
        # context add (Triton)
        shape = (2, 3, 7, 5) if smoke else (16, 64, 64, 64)
        h = rn(*shape, dtype=dtype)
        c2 = rn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=dtype)
        out.append(dict(op="context_add", dtype=tag, inputs=[h, c2], mask=[True, True],
                        fn=lambda h, c, impl: LF.context_add(h, c, impl=impl)))
        # 1-bit ReLU mask, and BatchNorm + ReLU recomputed (training statistics)
        shape = (3, 5, 7, 11) if smoke else (64, 256, 32, 32)
        out.append(dict(op="relu_with_mask", dtype=tag, inputs=[rn(*shape, dtype=dtype)], mask=[True],
                        fn=lambda x, impl: relu_with_mask(x, impl=impl)[0]))
        bn_weight, bn_bias = rn(shape[1], dtype=dtype, scale=0.3) + 1, rn(shape[1], dtype=dtype, scale=0.1)
        out.append(dict(op="batch_norm_relu", dtype=tag, inputs=[rn(*shape, dtype=dtype), bn_weight, bn_bias],
                        mask=[True, True, True], fn=bn_relu))
        if dtype == torch.bfloat16:
            continue  # Mean-KL and MIRACLE selection take fp32/fp64 parameters
        # Mean-KL sampling (Triton)
        blocks, size = (97, 30) if smoke else (1 << 16, 30)
        theta, gamma = rn(blocks, size, dtype=dtype, scale=2.0), rn(blocks, size, dtype=dtype)
        nu = rn(blocks, size, dtype=dtype, scale=0.1)
        rho = (0.05 + torch.rand(blocks, size, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
        def sample(th, ga, rh, impl, nu=nu):
            return LF.mean_kl_sample(th, ga, nu.to(th.device, th.dtype), rh, seed=3, stream=1, impl=impl)

        out.append(dict(op="mean_kl_sample", dtype=tag, inputs=[theta, gamma, rho], mask=[True, True, True],
                        fn=sample))
        # MIRACLE candidate selection (Triton); no gradient. Timed against the float64 NumPy reference.
        blocks, size, bits = (5, 7, 6) if smoke else (64, 30, 12)
        rho = 0.05 + torch.rand(blocks, size, generator=g, dtype=torch.float64)
        sigma = rho * (0.2 + 0.8 * torch.rand(blocks, size, generator=g, dtype=torch.float64))
        mu = rho * 0.8 * torch.randn(blocks, size, generator=g, dtype=torch.float64)
        mu, sigma, rho = (t.to(dtype).to(DEVICE) for t in (mu, sigma, rho))
        out.append(dict(op="miracle_select", dtype=tag, inputs=[mu, sigma, rho], mask=[False, False, False],
                        fn=lambda m, s, r, impl, bits=bits: LF.miracle_select(m, s, r, seed=5, bits=bits, impl=impl)))
    return out


def probe(case: dict, smoke: bool) -> dict:
    row = {"op": case["op"], "dtype": case["dtype"], "shape": list(case["inputs"][0].shape)}
    fn, inputs, mask = case["fn"], case["inputs"], case["mask"]
    kernel = lambda *t: fn(*t, impl="kernel")  # noqa: E731
    outs, grads = run_case(kernel, inputs, mask)
    sync()
    if case["op"] == "miracle_select":
        # The selection is discrete: compare the scores of the chosen candidates, and count agreement.
        ref_idx, ref_scores = fn(*[t.cpu().double() for t in inputs], impl="reference")
        row["agree"] = (outs[0].cpu() == ref_idx.cpu()).double().mean().item()
        row["err_out"] = rel_err(outs[1], ref_scores)
    else:
        ref_inputs = [t.detach().cpu().double() for t in inputs]
        ref_outs, ref_grads = run_case(lambda *t: fn(*t, impl="reference"), ref_inputs, mask)
        row["err_out"] = rel_err(outs[0], ref_outs[0])
        row["err_grads"] = [rel_err(a, r) for a, r in zip(grads, ref_grads, strict=True)]
    step = lambda: run_case(kernel, inputs, mask)  # noqa: E731
    row["syncs"] = count_syncs(step)
    if not smoke:
        row["ms_llkern"] = median_ms(step)
        eager = lambda: run_case(lambda *t: fn(*t, impl="reference"), inputs, mask)  # noqa: E731
        if case["op"] == "miracle_select":
            cpu_inputs = [t.cpu() for t in inputs]
            start = time.perf_counter()
            fn(*cpu_inputs, impl="reference")
            row["ms_eager"] = 1e3 * (time.perf_counter() - start)
            row["eager_is"] = "CPU float64 reference"
        else:
            try:
                row["ms_eager"] = median_ms(eager)
                row["eager_is"] = "reference on the GPU"
            except Exception as error:  # the reference may not fit (e.g. N×N at large N)
                row["ms_eager"] = None
                row["eager_is"] = f"failed: {type(error).__name__}"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small odd sizes, no timing (for compute-sanitizer)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only", help="run only ops whose name contains this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_probe: no CUDA device", file=sys.stderr)
        return 2
    print(f"gpu_probe on {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    rows, failed = [], 0
    for case in cases(args.smoke):
        if args.only and args.only not in case["op"]:
            continue
        start = time.perf_counter()
        try:
            row = probe(case, args.smoke)
        except Exception as error:
            failed += 1
            row = {"op": case["op"], "dtype": case["dtype"], "error": f"{type(error).__name__}: {error}"[:300]}
            traceback.print_exc()
        row["wall_s"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{'op':33} {'dtype':8} {'err out':>9} {'err grads (max)':>15} {'syncs':>5} {'llkern ms':>10} "
          f"{'eager ms':>9} {'speedup':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:33} {r['dtype']:8} ERROR {r['error'][:90]}")
            continue
        eg = max(r.get("err_grads") or [0.0])
        ms, me = r.get("ms_llkern"), r.get("ms_eager")
        sp = f"{me / ms:7.2f}" if ms and me else "      -"
        print(f"{r['op']:33} {r['dtype']:8} {r.get('err_out', float('nan')):9.2e} {eg:15.2e} {r['syncs']:5d} "
              f"{ms if ms else float('nan'):10.3f} {me if me else float('nan'):9.3f} {sp}")
    print(f"{failed} of {len(rows)} cases failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
