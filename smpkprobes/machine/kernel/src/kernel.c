// SPDX-License-Identifier: MIT
/*
 * smpkprobes guest kernel: the functions that probes are put on.
 *
 * Every function here is an out-of-line global (__kapi) so that the machine
 * can find it by symbol and each documented call really is a call
 * instruction.  The build adds -fno-optimize-sibling-calls, so "return f(x)"
 * stays call+ret rather than a tail jump; barrier()/OPAQUE() stop clang from
 * seeing through callees (dropping calls to pure functions, propagating
 * constant return values).  Both emit no instructions.
 */
#include "kernel.h"
#include "arch.h"

/* ---------------------------------------------------------------- fork */

long last_pid = 100;

/*
 * The data_breakpoint sample's target: a word do_fork writes on every call.
 * A plain increment (one load, one store, through a volatile access) rather
 * than an atomic one, so every call makes exactly one write on every arch: an
 * LL/SC loop (arm, arm64, ppc) retries its store-exclusive under contention,
 * and whether a failed one triggers a watchpoint is implementation-defined.
 * Concurrent calls may lose an increment; last_pid counts the calls exactly.
 */
unsigned long watched_counter;

__kapi long do_fork(unsigned long clone_flags, unsigned long stack_start,
		    void *regs, unsigned long stack_size,
		    int *parent_tidptr, int *child_tidptr)
{
	USE(clone_flags); USE(stack_start); USE(regs);
	USE(stack_size); USE(parent_tidptr); USE(child_tidptr);
	*(volatile unsigned long *)&watched_counter += 1;
	/* A locked read-modify-write (lock xadd on x86): CPUs fork concurrently. */
	return __atomic_add_fetch(&last_pid, 1, __ATOMIC_SEQ_CST);
}

__kapi long fork_loop(long n)
{
	for (long i = 0; i < n; i++)
		do_fork(0x11, 0, NULL, 0, NULL, NULL);
	return n;
}

/* ---------------------------------------------------------------- open */

#define AT_FDCWD (-100)
#define ENOENT   2

static long open_count;

static const char empty_name[] = "";
static const char passwd_name[] = "/etc/passwd";

__kapi long do_sys_open(int dfd, const char *filename, int flags, int mode)
{
	USE(dfd); USE(flags); USE(mode);
	if (!filename || !filename[0])
		return -ENOENT;
	/* fds 0-2 are "taken"; hand out 3..1002 round-robin. */
	return 3 + (__atomic_fetch_add(&open_count, 1, __ATOMIC_SEQ_CST) % 1000);
}

__kapi long sys_open(const char *filename, int flags, int mode)
{
	return do_sys_open(AT_FDCWD, filename, flags, mode);
}

__kapi long open_loop(long n, long fail_every)
{
	long failures = 0;

	for (long i = 1; i <= n; i++) {
		const char *name = passwd_name;

		if (fail_every > 0 && i % fail_every == 0)
			name = empty_name;
		if (sys_open(name, 0, 0) < 0)
			failures++;
	}
	return failures;
}

/* ------------------------------------------------- misc probe targets */

__kapi long vfs_read(void *file, char *buf, unsigned long count, long *pos)
{
	USE(file); USE(buf); USE(pos);
	return count;
}

__kapi int tcp_v4_rcv(void *skb)
{
	USE(skb);
	return 0;
}

__kapi long do_page_fault(void *regs, unsigned long error_code)
{
	USE(regs); USE(error_code);
	return 0;
}

__kapi int notifier_call_chain(void *nl, unsigned long val, void *v)
{
	USE(nl); USE(val); USE(v);
	return 0;
}

__kapi void *__switch_to(void *prev, void *next)
{
	USE(next);
	return prev;
}

/* ----------------------------------- targets of Linux lib/test_kprobes.c */

/* Linux's targets take and return u32; keep those semantics. */
__kapi unsigned long kprobe_target(unsigned long v)
{
	barrier();
	return (u32)v / 3;
}

__kapi unsigned long kprobe_target2(unsigned long v)
{
	barrier();
	return (u32)v / 3 + 1;
}

/* Called from probe handlers to test recursion; must not be foldable. */
__kapi long kprobe_recursed_target(void)
{
	return OPAQUE(0x5a5aL);
}

/*
 * Stack-trace test: the driver calls stacktrace_target, which calls
 * stacktrace_internal_target.  Each target records its return address once
 * (slot 1 for stacktrace_target, slot 0 for the internal one), so a test can
 * check that a stack unwound from inside a (kret)probe handler contains the
 * real return addresses and not kretprobe_trampoline.
 */
unsigned long target_return_address[2];

__kapi unsigned long stacktrace_internal_target(void)
{
	if (!target_return_address[0])
		target_return_address[0] =
			(unsigned long)__builtin_return_address(0);
	return target_return_address[0];
}

__kapi unsigned long stacktrace_target(void)
{
	if (!target_return_address[1])
		target_return_address[1] =
			(unsigned long)__builtin_return_address(0);
	stacktrace_internal_target();
	return target_return_address[1];
}

__kapi unsigned long stacktrace_driver(void)
{
	stacktrace_target();
	return (unsigned long)__builtin_return_address(0);
}

/*
 * Real double recursion (two calls per level) for kretprobe nesting tests.
 * OPAQUE() on the first result prevents clang's accumulator-recursion
 * elimination from turning the second call into a loop.
 */
__kapi unsigned long fib(unsigned long n)
{
	unsigned long a;

	if (n < 2)
		return n;
	a = fib(n - 1);
	return OPAQUE(a) + fib(n - 2);
}

/* ---------------------------------------------- sleeping and exiting */

__kapi long msleep(unsigned long ms)
{
	__hc_msleep(ms);
	return 0;
}

__kapi long sleepy(unsigned long ms)
{
	msleep(ms);
	return ms;
}

__kapi void schedule(void)
{
	__hc_schedule();
}

__kapi unsigned long ktime_get_ns(void)
{
	return __hc_ktime_get_ns();
}

/*
 * __hc_do_exit never returns when the machine emulates it.  Should the stub's
 * fallback "ret" ever run, __builtin_unreachable() becomes a trap
 * instruction (the build passes -mllvm -trap-unreachable), which also keeps
 * every return address of a call to do_exit() inside its caller.
 */
__kapi void do_exit(long code)
{
	__hc_do_exit(code);
	__builtin_unreachable();
}

__kapi long exit_inside(long code)
{
	do_exit(code);
	return 0;
}

/* ------------------------------------------------------------- locks */

__kapi void spin_lock(int *lock)
{
	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE)) {
		/* Spin on plain loads so waiters do not hammer the line. */
		while (__atomic_load_n(lock, __ATOMIC_RELAXED))
			cpu_relax();
	}
}

__kapi void spin_unlock(int *lock)
{
	__atomic_store_n(lock, 0, __ATOMIC_RELEASE);
}

/*
 * Increment *counter n times under *lock.  The increment is deliberately a
 * plain load ... store with a few dependent instructions in between, so if
 * the lock were broken (e.g. the probe core mis-emulating the atomic
 * exchange) CPUs interleaving between load and store would lose updates.
 */
__kapi long locked_inc(int *lock, long *counter, long n)
{
	volatile long *c = counter;

	for (long i = 0; i < n; i++) {
		long v;

		spin_lock(lock);
		v = *c;
		v ^= 0x5555;
		v = OPAQUE(v);		/* keep both xors */
		v ^= 0x5555;
		v += 1;
		*c = v;
		spin_unlock(lock);
	}
	return n;
}

/* --------------------------------------------------------- benchmark */

__kapi long bench_target(long x)
{
	barrier();
	return x * 2 + 1;
}

__kapi long bench_loop(long n)
{
	long sum = 0;

	for (long i = 0; i < n; i++)
		sum += bench_target(i);
	return sum;
}

/* ------------------------------------------------------------ jprobes */

/*
 * Ten arguments, so that the last two (i and j) are passed on the stack on
 * every architecture we run (at most eight argument registers anywhere).
 */
__kapi long jprobe_stackargs_target(long a, long b, long c, long d, long e,
				    long f, long g, long h, long i, long j)
{
	barrier();
	return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h +
	       9 * i + 10 * j;
}

__kapi long jprobe_stackargs_caller(long base)
{
	return jprobe_stackargs_target(base, base + 1, base + 2, base + 3,
				       base + 4, base + 5, base + 6, base + 7,
				       base + 8, base + 9);
}

/*
 * A jprobe entry handler that misbehaves the way C allows: it scribbles over
 * its incoming stack arguments i and j.  Their home is the caller's
 * outgoing-argument area (the probe core's copy of the probed function's
 * stack), which the probe core must restore on jprobe_return(), otherwise
 * the probed function sees the garbage.  clang gives &i/&j a private local
 * copy, so the slots are addressed explicitly from the frame pointer
 * (ARCH_STACK_ARGS, ARCH_NR_ARG_REGS in arch.h).
 *
 * It also overwrites the local copies of the register arguments and calls
 * jprobe_return() with garbage in the argument registers (through a cast
 * function pointer: jprobe_return takes no arguments and traps at once), so
 * the probe core must restore registers as well.
 */
__kapi long jprobe_scribble_handler(long a, long b, long c, long d, long e,
				    long f, long g, long h, long i, long j)
{
	volatile long *stack_args = ARCH_STACK_ARGS(__builtin_frame_address(0));
	volatile long *pa = &a, *pb = &b, *pc = &c, *pd = &d, *pe = &e,
		      *pf = &f;
	void (*jret6)(long, long, long, long, long, long) =
		(void (*)(long, long, long, long, long, long))jprobe_return;

	stack_args[8 - ARCH_NR_ARG_REGS] = 0xdead0009;	/* i */
	stack_args[9 - ARCH_NR_ARG_REGS] = 0xdead000a;	/* j */
	*pa = 0xdead0001;
	*pb = 0xdead0002;
	*pc = 0xdead0003;
	*pd = 0xdead0004;
	*pe = 0xdead0005;
	*pf = 0xdead0006;
	jret6(0xdead0001, 0xdead0002, 0xdead0003, 0xdead0004, 0xdead0005,
	      0xdead0006);
	return 0;
}

/* The classic samples/kprobes/jprobe_example.c handler. */
__kapi long jdo_fork(unsigned long clone_flags, unsigned long stack_start,
		     void *regs, unsigned long stack_size,
		     int *parent_tidptr, int *child_tidptr)
{
	printk("jprobe: clone_flags = 0x%lx, stack_start = 0x%lx regs = 0x%p\n",
	       clone_flags, stack_start, regs);
	jprobe_return();
	return 0;
}

/* -------------------------------------------- faults and odd behaviour */

__kapi long printk_test(long x)
{
	printk("printk_test %ld %lx %s\n", x, x, "ok");
	return x;
}

/* Address 8 is never mapped by the machine: this faults (oops tests). */
__kapi long null_deref(void)
{
	return *(volatile long *)8;
}

__kapi long infinite_loop(void)
{
	for (;;)
		__asm__ __volatile__("");
}

__kapi long bad_insn(void)
{
	arch_bad_insn();
	return 0;
}

/* Kept tiny so that tests can rewrite its code (stale-translation tests). */
__kapi long text_poke_victim(long x)
{
	return x + 7;
}

/*
 * A task that moves between CPUs: do_fork, then yield, n times.  Without
 * preemption this is how a per-task hardware breakpoint sees its task migrate.
 */
__kapi long fork_schedule_loop(long n)
{
	for (long i = 0; i < n; i++) {
		do_fork(0x11, 0, NULL, 0, NULL, NULL);
		schedule();
	}
	return n;
}
