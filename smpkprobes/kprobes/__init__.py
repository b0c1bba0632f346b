"""The probe core: probe objects, the registry and arming, the hit state machine, kretprobes,
jprobes, instruction slots, and the debugfs and tracefs views.  It reaches the machine only
through `KernelServices` (machine/_services.py); `_core` says which module holds what."""
