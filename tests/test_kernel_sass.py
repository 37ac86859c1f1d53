"""bench/kernel_sass.py's SASS reading on a cuobjdump-style listing: instructions, loops (backward branches),
opcode counts. (Compiling needs Triton's real JIT, not the interpreter the tests run under.)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernel_sass  # noqa: E402

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                       /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;                 /* 0x0000000404027981 */
        /*0020*/                   LOP3.LUT P0, RZ, R2, 0x1, RZ, 0xc0, !PT ;    /* 0x0000000102007812 */
        /*0030*/               @P0 FADD R3, R5, R3 ;                            /* 0x0000000305030221 */
        /*0040*/                   SHFL.BFLY PT, R6, R3, 0x1, 0x1f ;            /* 0x0c201f0003067f89 */
        /*0050*/               @P1 BRA 0x20 ;                                   /* 0xfffffffc00c01947 */
        /*0060*/                   P2R R7, PR, RZ, 0x1 ;                        /* 0x0000000000077803 */
        /*0070*/              @!P2 BRA 0x10 ;                                   /* 0xffffffe800e0a947 */
        /*0080*/                   BRA 0x90 ;                                   /* 0x0000000000007947 */
        /*0090*/                   EXIT ;                                       /* 0x000000000000794d */
"""


def test_instructions_drop_predicates_and_keep_addresses():
    code = kernel_sass.instructions(LISTING)
    assert [a for a, _ in code] == list(range(0, 0xa0, 0x10))
    assert code[3] == (0x30, "FADD R3, R5, R3")
    assert code[7] == (0x70, "BRA 0x10")


def test_loops_are_backward_branches_innermost_first_with_opcode_counts():
    inner, outer = kernel_sass.loops(kernel_sass.instructions(LISTING))  # the forward BRA 0x90 is no loop
    assert (inner.start, inner.end, inner.instructions) == (0x20, 0x50, 4)
    assert inner.opcodes == {"LDG": 0, "SHFL": 1, "BAR": 0, "LOP3": 1, "FADD": 1, "P2R": 0, "R2P": 0, "STL": 0, "LDL": 0}
    assert (outer.start, outer.end, outer.instructions) == (0x10, 0x70, 7)
    assert outer.opcodes["LDG"] == 1 and outer.opcodes["P2R"] == 1
