"""Hardware breakpoints: watchpoints on data, the kprobes document's last TODO, as Linux
answered it (include/linux/hw_breakpoint.h, kernel/events/hw_breakpoint.c).

  register_wide_hw_breakpoint / unregister_* ..... HwBreakpointSubsystem (`m.hw_breakpoints`)
  register_user_hw_breakpoint / modify_* ......... the same, for one task (follows it)
  the per-CPU slot constraint table .............. _constraints.SlotConstraints
  arch_install / arch_uninstall_hw_breakpoint .... _debugreg.DebugRegisters (per CPU)
  hw_breakpoint_handler (the debug exception) .... _debugreg.DebugRegisters._access
  the per-arch facts ............................. smpkprobes.cpus._hwbp

It sits beside the probe core and, like it, reaches the machine only through named points:
cross-CPU calls, the sched-in and task-exit notifiers, and each CPU's Unicorn instance.
"""
