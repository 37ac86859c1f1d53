"""Nsight Compute profile of the low-rank delta kernels at qkv shapes (64 slots, ~1 bit/param): batch 64 over 16
tenants (four rows a tenant: the tl.dot kernels) and over 64 tenants (one row a tenant: the decode kernels).
Each case runs three warm-up calls, then one more; ncu profiles every launch.

Usage (GPU with ncu; output committed as bench/results/kernel_profile_ncu.txt):
    ncu --kernel-name regex:"_shrink_kernel|_expand_kernel|_shrink_decode_kernel|_expand_decode_kernel" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis python3 bench/profile_delta_kernels.py
"""
import sys, torch
from deltaserve.kernels import SlotMetadata
from deltaserve.kernels.lowrank_plan import lowrank_plan_for
from deltaserve.kernels.lowrank_shrink import shrink_triton
from deltaserve.kernels.lowrank_expand import expand_triton
from kernel_bench import make_weights
from random_models import G
g = torch.Generator(device="cuda").manual_seed(0)
w = make_weights("qkv", 64, g)
plan = lowrank_plan_for(w.lowrank)
for B, T in ((64, 16), (64, 64)):
    x = torch.randn(B, w.d_in, device="cuda", dtype=torch.float16, generator=g)
    y = torch.randn(B, sum(w.d_outs), device="cuda", dtype=torch.float16, generator=g)
    meta = SlotMetadata.build(torch.arange(B, device="cuda", dtype=torch.int32) % T, 64)
    for _ in range(3):
        z = shrink_triton(x, meta, plan, G)
        expand_triton(y, z, meta, plan, G)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(f"B{B}T{T}")
    z = shrink_triton(x, meta, plan, G)
    expand_triton(y, z, meta, plan, G)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
print("profiled")
