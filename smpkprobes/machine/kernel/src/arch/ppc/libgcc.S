/* SPDX-License-Identifier: MIT */
/*
 * The compiler-runtime helpers a 32-bit PowerPC build of the guest kernel
 * needs: clang lowers 64-bit division (vsnprintf's u64 digits) to calls to
 * __udivdi3 / __umoddi3, and we link no compiler runtime.
 *
 * Both are a plain restoring shift-subtract division over 64 iterations.
 * Arguments (SysV ppc32): dividend in r3:r4, divisor in r5:r6 (high:low);
 * the 64-bit result is returned in r3:r4.  Division by zero gives an
 * all-ones quotient, as the loop naturally does.
 *
 *   r3:r4  quotient, shifted in from the dividend
 *   r7:r8  partial remainder
 *   r9:r10 remainder - divisor
 *   r11    "subtract" decision (carry out of the remainder or no borrow)
 */

.macro UDIVMOD
	li	7, 0
	li	8, 0
	li	0, 64
	mtctr	0
1:	li	11, 0
	addc	4, 4, 4		/* (r7:r8:r3:r4) <<= 1 */
	adde	3, 3, 3
	adde	8, 8, 8
	adde	7, 7, 7
	addze	11, 11		/* bit shifted out of the remainder */
	subfc	10, 6, 8	/* r9:r10 = r7:r8 - r5:r6 */
	subfe	9, 5, 7
	addze	11, 11		/* + "no borrow" */
	cmpwi	11, 0
	beq	2f
	mr	7, 9
	mr	8, 10
	ori	4, 4, 1
2:	bdnz	1b
.endm

	.text

	.globl __udivdi3
	.type __udivdi3, @function
	.p2align 2
__udivdi3:
	UDIVMOD
	blr
	.size __udivdi3, . - __udivdi3

	.globl __umoddi3
	.type __umoddi3, @function
	.p2align 2
__umoddi3:
	UDIVMOD
	mr	3, 7
	mr	4, 8
	blr
	.size __umoddi3, . - __umoddi3

	.section .note.GNU-stack, "", @progbits
