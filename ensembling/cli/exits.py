"""Exit codes, and the one place that turns an error a user can act on into one line
and a code: every command's `main` runs its work through `exit_code`."""

import errno
import sys

from ensembling.errors import DataError, ExportError, TrainingFailed, UsageError

INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT (128 + 2)
BROKEN_PIPE = 141  # and for a program SIGPIPE ended (128 + 13): its reader left
# Disk full, quota, read-only file system, permission: the user can fix these.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def exit_code(prog, body, then, every_os_error=False):
    """`body()`'s exit code, or that of the error a user can act on, said in one line:
    2 for a flag, a file or the data (a full disk or an unwritable folder too, `then`
    saying how to go on), 1 for a member's process that failed. Other OS errors are
    bugs, shown as such, unless `every_os_error` (the commands that only read the
    user's files and write their own)."""
    try:
        return body()
    except (UsageError, DataError, ExportError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # the reader of the output left: ensemble.py ends quietly
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS and not every_os_error:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        if error.errno in STORAGE_ERRNOS:
            then = f"free space or fix permissions, {then}"
        print(f"{prog}: error: {error.strerror or error}{where}; {then}", file=sys.stderr)
        return 2
