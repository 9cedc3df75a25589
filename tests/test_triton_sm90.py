"""Every Triton kernel compiles for an H100 (sm_90), on a machine without a GPU.

The other Triton tests run the kernels in Triton's interpreter, which accepts code the compiler
rejects (a module global that is not a ``tl.constexpr``, an int argument that the launcher turns
into a constant when it equals 1). Here each kernel goes through Triton's real compiler and the
ptxas bundled with Triton, to PTX and a cubin, in a subprocess with the interpreter off; the
seeds and streams must be marked ``do_not_specialize`` (a seed of 1 would otherwise become a
Python int inside the kernel). The bfloat16 variants of the fused losses, what runs on a GPU, must
also compile without register spills (ptxas -v); the float32 and float64 ones, which tests call directly,
may spill.
"""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from llkern.triton_kernels import context_add, info_nce, mean_kl, miracle_encode, philox, renyi, supcon

    PTXAS = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")

    def pointers(*names, dtype="*fp32"):
        return {name: dtype for name in names}

    def ints(*names):
        return {name: "i32" for name in names}

    strides = ints(*(f"{t}{d}" for t in "hab" for d in "bcyx"))
    mean_kl_scalars = {**ints("num_blocks", "block_size", "seed", "stream"), "kappa_bits": "i64", "delta_bits": "i64"}
    mean_kl_forward_args = {**pointers("theta_ptr", "gamma_ptr", "nu_ptr", "rho_ptr", "w_ptr"), **mean_kl_scalars}
    mean_kl_backward_args = {**pointers("grad_ptr", "theta_ptr", "gamma_ptr", "nu_ptr", "rho_ptr", "d_theta_ptr",
                                        "d_gamma_ptr", "d_rho_ptr"), **mean_kl_scalars}
    kernels = {
        "context_add_forward": (context_add.context_add_forward,
            {**pointers("h_ptr", "c1_ptr", "c2_ptr", "out_ptr"), **ints("C", "H", "W", "tile0"), **strides,
             **ints("ob", "oc", "oy", "ox")},
            dict(S1=2, S2=4, NUM_CONTEXTS=2, CHANNELS_LAST=True, ACC=tl.float32, BLOCK=1024)),
        "context_add_backward": (context_add.context_add_backward,
            {**pointers("g_ptr", "d1_ptr", "d2_ptr"), **ints("C", "H", "W", "tile0"),
             **ints(*(f"{t}{d}" for t in "gab" for d in "bcyx"))},
            dict(S1=1, S2=2, NUM_CONTEXTS=2, CHANNELS_LAST=False, ACC=tl.float32, BLOCK=1024)),
        "mean_kl_forward": (mean_kl.mean_kl_forward, mean_kl_forward_args,
            dict(HAS_NU=True, ROWS=32, BLOCK=32, ACC=tl.float32)),
        "mean_kl_backward": (mean_kl.mean_kl_backward, mean_kl_backward_args,
            dict(HAS_NU=True, ROWS=32, BLOCK=32, ACC=tl.float32)),
        # the widest blocks take one block per program (llkern/ops/mean_kl.py: TILE_ELEMENTS // BLOCK)
        "mean_kl_forward_1024": (mean_kl.mean_kl_forward, mean_kl_forward_args,
            dict(HAS_NU=False, ROWS=1, BLOCK=1024, ACC=tl.float64)),
        "mean_kl_backward_256": (mean_kl.mean_kl_backward, mean_kl_backward_args,
            dict(HAS_NU=False, ROWS=4, BLOCK=256, ACC=tl.float32)),
        "fill_stream": (philox.fill_stream,
            {**pointers("out_x0", "out_x1", dtype="*i64"), "out_z": "*fp32", **ints("seed", "stream", "first"),
             "count": "i32"},
            dict(BLOCK=1024)),
        "miracle_select": (miracle_encode.miracle_select,
            {**pointers("mu_ptr", "sigma_ptr", "rho_ptr", "score_ptr"), "index_ptr": "*i64", "key_ptr": "*fp64",
             **ints("block_size", "stride_mu_b", "stride_mu_j", "stride_sigma_b", "stride_sigma_j", "stride_rho_b",
                    "stride_rho_j", "seed", "first_block", "gumbel_first")},
            dict(NUM_CANDIDATES=1024, SPLITS=4, SAMPLE=True, F64=False, TILE=128, BLOCK=32)),
    }
    # the fused InfoNCE: bfloat16 operands (what info_nce runs on a GPU), float32 without TF32, float64
    for tag, ptr, acc in (("bf16", "*bf16", tl.float32), ("fp32", "*fp32", tl.float32), ("fp64", "*fp64", tl.float64)):
        acc_ptr = "*fp64" if acc == tl.float64 else "*fp32"
        for d in (128, 256):
            blocks = dict(BLOCK_N=info_nce.COLUMN_BLOCK, BLOCK_D=info_nce.width_block(d))
            flags = dict(ACC=acc, IEEE=tag == "fp32", INTERPRETED=False)
            kernels[f"info_nce_row_lse_{tag}_{d}"] = (info_nce.row_lse, {
                "a_ptr": ptr, "b_ptr": ptr, "lse_ptr": acc_ptr, "diag_ptr": acc_ptr, "params_ptr": acc_ptr,
                **ints("N", "D")}, dict(**flags, **blocks, BLOCK_M=info_nce.row_block(d)))
            for shared in (False, True):
                kernels[f"info_nce_row_grad_{tag}_{d}" + ("_shared" if shared else "")] = (info_nce.row_grad, {
                    "a_ptr": ptr, "b_ptr": ptr, "stat_a_ptr": acc_ptr, "stat_b_ptr": acc_ptr, "z_ptr": ptr,
                    "norm_ptr": acc_ptr, "grad_ptr": acc_ptr, "params_ptr": acc_ptr, "out_ptr": ptr,
                    **ints("N", "D", "stride_z", "stride_out")},
                    dict(USE_A=True, USE_B=True, SHARED=shared, NORMALIZE=True, **flags, **blocks,
                         BLOCK_M=info_nce.grad_row_block(d)))
            # the shared offset's one pass: rows and columns (symmetric; EVEN: N = 32768), rows only (one-way)
            for columns, even in ((True, True), (True, False), (False, True), (False, False)):
                name = f"info_nce_row_sums_{tag}_{d}_{'columns' if columns else 'rows'}_{even}"
                kernels[name] = (info_nce.row_sums, {
                    "a_ptr": ptr, "b_ptr": ptr, "sum_ptr": acc_ptr, "diag_ptr": acc_ptr, "colsum_ptr": acc_ptr,
                    "params_ptr": acc_ptr, **ints("N", "D")},
                    dict(COLUMNS=columns, EVEN=even, **flags, **blocks, BLOCK_M=info_nce.row_block(d)))
            kernels[f"supcon_row_stats_{tag}_{d}"] = (supcon.row_stats, {
                "u_ptr": ptr, "labels_ptr": "*i64", "lse_ptr": acc_ptr, "positive_sum_ptr": acc_ptr,
                "count_ptr": "*i32", "params_ptr": acc_ptr, **ints("N", "D")},
                dict(**flags, **blocks, BLOCK_M=info_nce.row_block(d)))
            for shared in (False, True):
                kernels[f"supcon_row_grad_{tag}_{d}" + ("_shared" if shared else "")] = (supcon.row_grad, {
                    "u_ptr": ptr, "labels_ptr": "*i64", "stat_ptr": acc_ptr, "w_ptr": acc_ptr,
                    "inv_count_ptr": acc_ptr, "z_ptr": ptr, "norm_ptr": acc_ptr, "grad_ptr": acc_ptr,
                    "params_ptr": acc_ptr, "out_ptr": ptr,
                    **ints("N", "D", "stride_z", "stride_out")},
                    dict(SHARED=shared, NORMALIZE=True, **flags, **blocks, BLOCK_M=info_nce.grad_row_block(d)))
            kernels[f"renyi_row_sums_{tag}_{d}"] = (renyi.row_sums, {
                "u_ptr": ptr, "sq_ptr": acc_ptr, "labels_ptr": "*i64", "all_ptr": acc_ptr, "same_ptr": acc_ptr,
                "count_ptr": "*i32", **ints("N", "D")}, dict(**flags, **blocks, BLOCK_M=info_nce.row_block(d)))
            kernels[f"renyi_row_grad_{tag}_{d}"] = (renyi.row_grad, {
                "u_ptr": ptr, "sq_ptr": acc_ptr, "labels_ptr": "*i64", "coef_ptr": acc_ptr, "out_ptr": ptr,
                **ints("N", "D", "stride_out")}, dict(**flags, **blocks, BLOCK_M=info_nce.grad_row_block(d)))
        if tag == "bf16":  # the narrow tiles, the one-way loss's d z1 and d z2, no normalisation
            for d, use_a, use_b in ((16, True, False), (64, False, True)):
                blocks = dict(BLOCK_N=info_nce.COLUMN_BLOCK, BLOCK_D=info_nce.width_block(d))
                kernels[f"info_nce_row_lse_{tag}_{d}"] = (info_nce.row_lse, {
                    "a_ptr": ptr, "b_ptr": ptr, "lse_ptr": acc_ptr, "diag_ptr": acc_ptr, "params_ptr": acc_ptr,
                    **ints("N", "D")}, dict(**flags, **blocks, BLOCK_M=info_nce.row_block(d)))
                kernels[f"info_nce_row_grad_{tag}_{d}_one_way"] = (info_nce.row_grad, {
                    "a_ptr": ptr, "b_ptr": ptr, "stat_a_ptr": acc_ptr, "stat_b_ptr": acc_ptr, "z_ptr": ptr,
                    "norm_ptr": acc_ptr, "grad_ptr": acc_ptr, "params_ptr": acc_ptr, "out_ptr": ptr,
                    **ints("N", "D", "stride_z", "stride_out")},
                    dict(USE_A=use_a, USE_B=use_b, SHARED=False, NORMALIZE=False, **flags, **blocks,
                         BLOCK_M=info_nce.grad_row_block(d)))
                kernels[f"info_nce_row_grad_{tag}_{d}_one_way_shared"] = (info_nce.row_grad, {
                    "a_ptr": ptr, "b_ptr": ptr, "stat_a_ptr": acc_ptr, "stat_b_ptr": acc_ptr, "z_ptr": ptr,
                    "norm_ptr": acc_ptr, "grad_ptr": acc_ptr, "params_ptr": acc_ptr, "out_ptr": ptr,
                    **ints("N", "D", "stride_z", "stride_out")},
                    dict(USE_A=use_a, USE_B=use_b, SHARED=True, NORMALIZE=True, **flags, **blocks,
                         BLOCK_M=info_nce.grad_row_block(d)))
        kernels[f"info_nce_normalize_rows_{tag}"] = (info_nce.normalize_rows, {
            "z_ptr": ptr, "u_ptr": ptr, "norm_ptr": acc_ptr, **ints("N", "D", "stride_z")},
            dict(NORMALIZE=True, ACC=acc, INTERPRETED=False, ROWS=info_nce.NORMALIZE_ROWS, BLOCK_D=128))
    target = GPUTarget("cuda", 90, 32)
    for name, (kernel, signature, constants) in kernels.items():
        # the launcher would turn a seed or stream of 1 into a constant, which has no .to()
        for param in kernel.params:
            if param.name in ("seed", "stream", "first", "first_block", "gumbel_first", "kappa_bits", "delta_bits"):
                assert param.do_not_specialize, f"{name}: {param.name} must be in do_not_specialize"
        signature = {**signature, **{k: "constexpr" for k in constants}}
        options = {"num_warps": info_nce.WARPS} if name.startswith(("info_nce_row", "supcon_row", "renyi_row")) else {}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=target,
                                  options=options)
        assert compiled.asm.get("cubin"), name
        if name == "fill_stream":  # the normals' square root correctly rounded, as in the interpreter
            assert "sqrt.rn.f32" in compiled.asm["ptx"] and "sqrt.approx" not in compiled.asm["ptx"], name
        if "_bf16" in name:  # what runs on a GPU: no register spills (ptxas -v on the kernel's PTX)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
                ptx.write(compiled.asm["ptx"])
            report = subprocess.run([PTXAS, "-v", "-arch=sm_90a", ptx.name, "-o", os.devnull], capture_output=True,
                                    text=True).stderr
            os.unlink(ptx.name)
            assert "Used" in report and " 0 bytes spill stores" in report, (name, report)
            print(name, "no spills")
        print(name, "ok")
    # Under torch.compile, Inductor passes every int argument equal to 1 as a constant (do_not_specialize is
    # the Triton launcher's, not Inductor's): the kernels must compile so too (seed.to(...) did not). The small
    # kernels, and the fused losses' bfloat16 variants at d = 128.
    for name, (kernel, signature, constants) in kernels.items():
        if name.startswith(("info_nce", "supcon", "renyi")) and "_bf16_128" not in name:
            continue
        ones = {k: 1 for k, v in signature.items() if v in ("i32", "i64")}
        signature = {**signature, **{k: "constexpr" for k in (*constants, *ones)}}
        options = {"num_warps": info_nce.WARPS} if name.startswith(("info_nce_row", "supcon_row", "renyi_row")) else {}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs={**constants, **ones}),
                                  target=target, options=options)
        assert compiled.asm.get("cubin"), name
        print(name, "compiles with its ints at 1")
""")


def test_every_triton_kernel_compiles_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok") == 8 + 15 + 12 + 4 + 30 + 2 + 6 + 12, result.stdout
    # every bfloat16 kernel of the fused losses (what info_nce, supcon_loss and renyi_mutual_information run)
    assert result.stdout.count(" no spills") == 31, result.stdout
    assert result.stdout.count("compiles with its ints at 1") == 8 + 12, result.stdout
