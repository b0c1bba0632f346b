/* SPDX-License-Identifier: MIT */
/*
 * 32-bit ARM (ARM state) guest entry points that have to be assembly: the
 * hypercall stubs, the probe core's trap points and the AAPCS 64-bit
 * division helper.  The stubs and trap points live in .kprobes.text, which
 * the linker script brackets with __kprobes_text_start/_end; the probe core
 * refuses to put probes there.
 *
 * Hypercalls: the machine hooks [__hypercall_start, __hypercall_end) and
 * emulates each stub (AAPCS arguments in r0, r1; result in r0), then returns
 * to lr itself.  Each stub's single "bx lr" is only a fallback for a machine
 * that does not hook it.
 *
 * The breakpoint is BKPT #0 (0xe1200070): Unicorn reports it as interrupt 7
 * with PC at the BKPT.  Linux uses an undefined instruction instead, but
 * Unicorn ends emulation with UC_ERR_INSN_INVALID on those rather than
 * raising a hookable interrupt.
 */

	.syntax unified
	.arm

#define FUNC(name)		\
	.globl name;		\
	.type name, %function;	\
	.p2align 2;		\
	name:

#define ENDFUNC(name)		\
	.size name, . - name

/* What entry-common.S needs in this arch's syntax. */
#define ARCH_RET		bx	lr
#define ARCH_IDLE		1:	b	1b
#define ARCH_BREAKPOINT		bkpt	#0

#include "../entry-common.S"

/*
 * u64 __aeabi_uldivmod(u64 n, u64 d): quotient in r0:r1, remainder in r2:r3.
 * A wrapper around aeabi.c's __udivmoddi4(n, d, &rem), with an ordinary
 * frame record so stacks walk through it.
 */
	.text
FUNC(__aeabi_uldivmod)
	push	{r11, lr}
	mov	r11, sp
	sub	sp, sp, #16
	add	r12, sp, #8
	str	r12, [sp]
	bl	__udivmoddi4
	ldr	r2, [sp, #8]
	ldr	r3, [sp, #12]
	mov	sp, r11
	pop	{r11, pc}
ENDFUNC(__aeabi_uldivmod)

	.section .note.GNU-stack, "", %progbits
