/* SPDX-License-Identifier: MIT */
/*
 * 32-bit ARM (ARM state only, AAPCS) specifics needed by the arch-neutral C
 * sources.  Only things that cannot be expressed in C live here; each is a
 * single instruction.
 */
#ifndef SMPK_ARCH_H
#define SMPK_ARCH_H

#define ARCH_NAME "arm"

/*
 * Spin-wait hint inside spin_lock().  Not YIELD: Unicorn (QEMU's TCG outside
 * parallel mode) turns YIELD/WFE into an exit that it reports as an invalid
 * instruction.  A plain NOP hint keeps the loop shape.
 */
static inline __attribute__((always_inline)) void cpu_relax(void)
{
	__asm__ __volatile__("nop" ::: "memory");
}

/* Execute an architecturally undefined instruction (bad_insn()). */
static inline __attribute__((always_inline)) void arch_bad_insn(void)
{
	__asm__ __volatile__("udf #0" ::: "memory");
}

/*
 * First stack-passed argument slot of the current function, given its frame
 * address.  clang's ARM-state frame record (-fno-omit-frame-pointer) is
 * "push {..., r11, lr}; add r11, sp, #N": r11 points at the saved r11, the
 * saved lr is above it, and lr is the highest register pushed, so
 * [fp + 8] is the caller's SP at entry: the fifth integer argument.
 */
#define ARCH_STACK_ARGS(fp) ((long *)(fp) + 2)

/* Integer arguments passed in registers (r0-r3). */
#define ARCH_NR_ARG_REGS 4

#endif /* SMPK_ARCH_H */
