"""Host actions take turns at quantum boundaries, in a seed-decided order.  A mixin of
`SMPMachine`.

Host code runs only between quanta (see `_sched`), but when several host tasks are ready at
once, trio runs them in an order of its own, which differs from run to run.  So every
action that changes the probe core (register, unregister, enable, disable, the global
switch, tracefs writes) first asks for its turn (`await m.host_turn(key)`).  At the next
decision point the conductor grants the pending requests one at a time: with one request,
straight away; with several, sorted by what they are about (`key`) and then picked by a
seeded coin ("host").  Each granted action runs until it blocks (on a text sync, a grace
period or the registry lock, all of which resolve in machine order) before the next is
granted.  The same seed therefore gives the same order, whatever trio does.
"""

from __future__ import annotations

import trio


class HostTurns:
    """The host-turn part of `SMPMachine` (see `_machine`)."""

    def _init_host_turns(self) -> None:
        self._host_requests: list[list] = []       # [key, trio.Event]

    async def host_turn(self, key) -> None:
        """Wait until the machine lets this host action run (see the module docstring).
        Outside the machine's lifetime nothing runs concurrently: it returns at once."""
        nursery = self._nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            return
        request = [repr(key), trio.Event()]
        self._host_requests.append(request)
        self._idle_event.set()
        try:
            await request[1].wait()
        except BaseException:
            # Cancelled before its turn: the action never started.
            if request in self._host_requests:
                self._host_requests.remove(request)
            raise

    def _grant_host_turn(self) -> None:
        requests = self._host_requests
        i = 0
        if len(requests) > 1:
            requests.sort(key=lambda r: r[0])
            i = self.conductor.randint("host", 0, len(requests) - 1)
        requests.pop(i)[1].set()
        self._host_woken = True
