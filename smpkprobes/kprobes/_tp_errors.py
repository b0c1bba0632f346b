"""The probe-event parser's errors: the kernel's ERRORS list (kernel/trace/trace_probe.h),
word for word, typos included, and the error_log they are written to.

An error is logged as the kernel's __trace_probe_log_err() logs it: the command is rebuilt
from its words joined by one space, and the caret stands under byte `pos` of that command,
where `pos` is the offset of the word the parser was at plus the offset inside that word.
Past the last word, the caret stands one space after the command.
"""

from __future__ import annotations

import errno as E
from collections import deque

from .._errors import KprobeError

# code: (the errno the kernel returns for it most often, the kernel's text)
ERRORS: dict[str, tuple[int, str]] = {
    "FILE_NOT_FOUND": (E.EINVAL, "Failed to find the given file"),
    "NO_REGULAR_FILE": (E.EINVAL, "Not a regular file"),
    "BAD_REFCNT": (E.EINVAL, "Invalid reference counter offset"),
    "REFCNT_OPEN_BRACE": (E.EINVAL, "Reference counter brace is not closed"),
    "BAD_REFCNT_SUFFIX": (E.EINVAL, "Reference counter has wrong suffix"),
    "BAD_UPROBE_OFFS": (E.EINVAL, "Invalid uprobe offset"),
    "BAD_MAXACT_TYPE": (E.EINVAL, "Maxactive is only for function exit"),
    "BAD_MAXACT": (E.EINVAL, "Invalid maxactive number"),
    "MAXACT_TOO_BIG": (E.EINVAL, "Maxactive is too big"),
    "BAD_PROBE_ADDR": (E.EINVAL, "Invalid probed address or symbol"),
    "NON_UNIQ_SYMBOL": (E.EADDRNOTAVAIL, "The symbol is not unique"),
    "BAD_RETPROBE": (E.EINVAL, "Retprobe address must be an function entry"),
    "NO_TRACEPOINT": (E.EINVAL, "Tracepoint is not found"),
    "BAD_TP_NAME": (E.EINVAL, "Invalid character in tracepoint name"),
    "BAD_ADDR_SUFFIX": (E.EINVAL, "Invalid probed address suffix"),
    "NO_GROUP_NAME": (E.EINVAL, "Group name is not specified"),
    "GROUP_TOO_LONG": (E.EINVAL, "Group name is too long"),
    "BAD_GROUP_NAME": (E.EINVAL, "Group name must follow the same rules as C identifiers"),
    "NO_EVENT_NAME": (E.EINVAL, "Event name is not specified"),
    "EVENT_TOO_LONG": (E.EINVAL, "Event name is too long"),
    "BAD_EVENT_NAME": (E.EINVAL, "Event name must follow the same rules as C identifiers"),
    "EVENT_EXIST": (E.EEXIST, "Given group/event name is already used by another event"),
    "RETVAL_ON_PROBE": (E.EINVAL, "$retval is not available on probe"),
    "NO_RETVAL": (E.ENOENT, "This function returns 'void' type"),
    "BAD_STACK_NUM": (E.EINVAL, "Invalid stack number"),
    "BAD_ARG_NUM": (E.EINVAL, "Invalid argument number"),
    "BAD_VAR": (E.EINVAL, "Invalid $-valiable specified"),
    "BAD_REG_NAME": (E.EINVAL, "Invalid register name"),
    "BAD_MEM_ADDR": (E.EINVAL, "Invalid memory address"),
    "BAD_IMM": (E.EINVAL, "Invalid immediate value"),
    "IMMSTR_NO_CLOSE": (E.EINVAL, "String is not closed with '\"'"),
    "FILE_ON_KPROBE": (E.EINVAL, "File offset is not available with kprobe"),
    "BAD_FILE_OFFS": (E.EINVAL, "Invalid file offset value"),
    "SYM_ON_UPROBE": (E.EINVAL, "Symbol is not available with uprobe"),
    "TOO_MANY_OPS": (E.EINVAL, "Dereference is too much nested"),
    "DEREF_NEED_BRACE": (E.EINVAL, "Dereference needs a brace"),
    "BAD_DEREF_OFFS": (E.EINVAL, "Invalid dereference offset"),
    "DEREF_OPEN_BRACE": (E.EINVAL, "Dereference brace is not closed"),
    "COMM_CANT_DEREF": (E.EINVAL, "$comm can not be dereferenced"),
    "BAD_FETCH_ARG": (E.EINVAL, "Invalid fetch argument"),
    "ARRAY_NO_CLOSE": (E.EINVAL, "Array is not closed"),
    "BAD_ARRAY_SUFFIX": (E.EINVAL, "Array has wrong suffix"),
    "BAD_ARRAY_NUM": (E.EINVAL, "Invalid array size"),
    "ARRAY_TOO_BIG": (E.EINVAL, "Array number is too big"),
    "BAD_TYPE": (E.EINVAL, "Unknown type is specified"),
    "BAD_STRING": (E.EINVAL, "String accepts only memory argument"),
    "BAD_SYMSTRING": (E.EINVAL, "Symbol String doesn't accept data/userdata"),
    "BAD_BITFIELD": (E.EINVAL, "Invalid bitfield"),
    "ARG_NAME_TOO_LONG": (E.EINVAL, "Argument name is too long"),
    "NO_ARG_NAME": (E.EINVAL, "Argument name is not specified"),
    "BAD_ARG_NAME": (E.EINVAL, "Argument name must follow the same rules as C identifiers"),
    "USED_ARG_NAME": (E.EINVAL, "This argument name is already used"),
    "ARG_TOO_LONG": (E.E2BIG, "Argument expression is too long"),
    "NO_ARG_BODY": (E.EINVAL, "No argument expression"),
    "BAD_INSN_BNDRY": (E.EILSEQ, "Probe point is not an instruction boundary"),
    "FAIL_REG_PROBE": (E.EINVAL, "Failed to register probe event"),
    "DIFF_PROBE_TYPE": (E.EEXIST, "Probe type is different from existing probe"),
    "DIFF_ARG_TYPE": (E.EEXIST, "Argument type or name is different from existing probe"),
    "SAME_PROBE": (E.EEXIST, "There is already the exact same probe event"),
    "NO_EVENT_INFO": (E.EINVAL, "This requires both group and event name to attach"),
    "BAD_ATTACH_EVENT": (E.EINVAL, "Attached event does not exist"),
    "BAD_ATTACH_ARG": (E.EINVAL, "Attached event does not have this field"),
    "NO_EP_FILTER": (E.EINVAL, "No filter rule after 'if'"),
    "NOSUP_BTFARG": (E.EOPNOTSUPP, "BTF is not available or not supported"),
    "NO_BTFARG": (E.ENOENT, "This variable is not found at this probe point"),
    "NO_BTF_ENTRY": (E.ENOENT, "No BTF entry for this probe point"),
    "BAD_VAR_ARGS": (E.EINVAL, "$arg* must be an independent parameter without name etc."),
    "NOFENTRY_ARGS": (E.EINVAL, "$arg* can be used only on function entry or exit"),
    "DOUBLE_ARGS": (E.EINVAL, "$arg* can be used only once in the parameters"),
    "ARGS_2LONG": (E.E2BIG, "$arg* failed because the argument list is too long"),
    "ARGIDX_2BIG": (E.EINVAL, "$argN index is too big"),
    "NO_PTR_STRCT": (E.EINVAL, "This is not a pointer to union/structure."),
    "NOSUP_DAT_ARG": (E.EOPNOTSUPP, "Non pointer structure/union argument is not supported."),
    "BAD_HYPHEN": (E.EINVAL, "Failed to parse single hyphen. Forgot '>''?"),
    "NO_BTF_FIELD": (E.ENOENT, "This field is not found."),
    "BAD_BTF_TID": (E.EINVAL, "Failed to get BTF type info."),
    "BAD_TYPE4STR": (E.EINVAL, "This type does not fit for string."),
    "NEED_STRING_TYPE": (E.EINVAL, "$comm and immediate-string only accepts string type"),
    "TOO_MANY_ARGS": (E.E2BIG, "Too many arguments are specified"),
    "TOO_MANY_EARGS": (E.EINVAL, "Too many entry arguments specified"),
}

SUBSYSTEM = "trace_kprobe"
CMD_PREFIX = "  Command: "
TRACING_LOG_ERRS_MAX = 16          # error_log keeps the newest 16 entries, as the kernel


class TraceProbeError(KprobeError):
    """A kprobe_events command the kernel refuses with an error_log entry.  `.code` is the
    ERRORS key, `.reason` the kernel's text, `.command` the command as logged, `.pos` the
    0-based caret position in it (`.column` = pos + 1), `.token` the word the caret is in
    ("" past the end).  `str()` is the error_log entry without its timestamp."""

    def __init__(self, code: str, command: str, pos: int, errno: int | None = None):
        err, reason = ERRORS[code]
        self.code, self.reason, self.command, self.pos = code, reason, command, pos
        self.column = pos + 1
        start = command.rfind(" ", 0, pos) + 1 if pos < len(command) else len(command)
        end = command.find(" ", pos)
        self.token = command[start:end if end >= 0 else len(command)]
        self.log = (f"{SUBSYSTEM}: error: {reason}\n{CMD_PREFIX}{command}\n"
                    f"{' ' * (len(CMD_PREFIX) + pos)}^\n")
        super().__init__(errno if errno is not None else err, self.log.rstrip("\n"))

    def __str__(self) -> str:
        return self.log.rstrip("\n")


class ErrorLog:
    """The error_log file: the newest 16 entries, `[sec.usec] subsystem: error: ...`."""

    def __init__(self):
        self._entries: deque[str] = deque(maxlen=TRACING_LOG_ERRS_MAX)

    def add(self, now_ns: int, err: TraceProbeError) -> None:
        us = now_ns // 1000
        self._entries.append(f"[{us // 1_000_000:5d}.{us % 1_000_000:06d}] {err.log}")

    def read(self) -> str:
        return "".join(self._entries)

    def clear(self) -> None:
        self._entries.clear()
