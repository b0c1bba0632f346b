// SPDX-License-Identifier: MIT
/*
 * The compiler-runtime helpers clang calls for 64-bit division on i386
 * (vsnprintf prints u64 values, and 32-bit x86 has no 64-by-64 divide).
 * We link no libgcc/compiler-rt, so the two that the kernel needs live here.
 * Restoring shift-subtract division: only shifts, compares and subtractions
 * on u64, which clang open-codes, so these never call themselves.
 */
#include "types.h"

static u64 udivmod64(u64 n, u64 d, u64 *rem)
{
	u64 q = 0, r = 0;

	if (d == 0) {
		/* Like the hardware: divide by zero traps. */
		__builtin_trap();
	}
	for (int bit = 63; bit >= 0; bit--) {
		r = (r << 1) | ((n >> bit) & 1);
		if (r >= d) {
			r -= d;
			q |= (u64)1 << bit;
		}
	}
	*rem = r;
	return q;
}

u64 __udivdi3(u64 n, u64 d);
u64 __umoddi3(u64 n, u64 d);

u64 __udivdi3(u64 n, u64 d)
{
	u64 r;

	return udivmod64(n, d, &r);
}

u64 __umoddi3(u64 n, u64 d)
{
	u64 r;

	udivmod64(n, d, &r);
	return r;
}
