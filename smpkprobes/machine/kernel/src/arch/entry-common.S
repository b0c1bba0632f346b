/* SPDX-License-Identifier: MIT */
/*
 * The guest entry points every architecture shares, included by each
 * arch/<arch>/entry.S after it defines, in its own syntax:
 *
 *   FUNC(name), ENDFUNC(name)  a global, typed, sized function
 *   ARCH_RET                   return to the caller (with any delay slot)
 *   ARCH_IDLE                  a branch to itself (label 1 is free)
 *   ARCH_BREAKPOINT            the kprobes breakpoint instruction
 *
 * Everything here lives in .kprobes.text, which the linker script brackets
 * with __kprobes_text_start/_end; the probe core refuses to put probes there.
 *
 * Hypercalls: the machine hooks [__hypercall_start, __hypercall_end) and
 * emulates each stub (arguments and result by the arch's calling
 * convention), then returns to the caller itself.  Each stub's return is only
 * a fallback for a machine that does not hook it.
 */

	.section .kprobes.text, "ax", %progbits

	.globl __hypercall_start
__hypercall_start:

/* void __hc_console_write(const char *buf, unsigned long len) */
FUNC(__hc_console_write)
	ARCH_RET
ENDFUNC(__hc_console_write)

/* void __hc_msleep(unsigned long ms) */
FUNC(__hc_msleep)
	ARCH_RET
ENDFUNC(__hc_msleep)

/* void __hc_schedule(void) */
FUNC(__hc_schedule)
	ARCH_RET
ENDFUNC(__hc_schedule)

/* void __hc_do_exit(long code) -- never returns */
FUNC(__hc_do_exit)
	ARCH_RET
ENDFUNC(__hc_do_exit)

/* unsigned long __hc_ktime_get_ns(void) */
FUNC(__hc_ktime_get_ns)
	ARCH_RET
ENDFUNC(__hc_ktime_get_ns)

/* Return address of every task's top frame: the task's function returned. */
FUNC(__hc_task_return)
	ARCH_RET
ENDFUNC(__hc_task_return)

/* Return address of calls the machine makes into the guest (nested calls). */
FUNC(__hc_call_return)
	ARCH_RET
ENDFUNC(__hc_call_return)

	.globl __hypercall_end
__hypercall_end:

/* Idle loop for CPUs with nothing to run. */
FUNC(cpu_idle)
	ARCH_IDLE
ENDFUNC(cpu_idle)

/*
 * A jprobe handler ends with a call here; the probe core traps on the
 * breakpoint, restores the registers and stack saved at the probe hit and
 * resumes the probed function.  The return is not normally reached.
 */
FUNC(jprobe_return)
	ARCH_BREAKPOINT
	ARCH_RET
ENDFUNC(jprobe_return)

/*
 * kretprobes redirect return addresses here.  The probe core traps on the
 * breakpoint, runs the return handlers and resumes at the real return
 * address.
 */
FUNC(kretprobe_trampoline)
	ARCH_BREAKPOINT
	nop
ENDFUNC(kretprobe_trampoline)
