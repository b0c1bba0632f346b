// SPDX-License-Identifier: MIT
/*
 * The run-time helper the AAPCS expects for 64-bit division, which 32-bit
 * ARM has no instruction for (vsnprintf's u64 % base, u64 / base).  32-bit
 * division uses the Cortex-A15's udiv/sdiv (-mcpu=cortex-a15).
 *
 * __aeabi_uldivmod returns the quotient in r0:r1 and the remainder in r2:r3,
 * which C cannot express; entry.S wraps __udivmoddi4 to that convention.
 */
#include "kernel.h"

u64 __udivmoddi4(u64 n, u64 d, u64 *rem);

__attribute__((noinline)) u64 __udivmoddi4(u64 n, u64 d, u64 *rem)
{
	u64 q = 0, r = 0;

	if (d == 0) {		/* as the hardware would: no trap, garbage */
		*rem = n;
		return ~0ULL;
	}
	for (int bit = 63; bit >= 0; bit--) {
		r = (r << 1) | ((n >> bit) & 1);
		if (r >= d) {
			r -= d;
			q |= 1ULL << bit;
		}
	}
	*rem = r;
	return q;
}
