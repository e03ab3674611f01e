"""Every error aiva raises, under one base, each with a hint a person can act on.

    AivaError
    ├── ConfigError                  a bad config file, key or value
    ├── InvalidValue                 a bad size, port spec, env pair ... given by the user
    ├── SandboxNotFound
    ├── SandboxExists
    ├── InvalidTransition            e.g. pause a stopped sandbox
    ├── BackendError
    │   └── BackendUnavailable       engine missing or not running
    ├── ImageError
    │   ├── ImageNotFound
    │   └── ImageUnsupported         e.g. no python3 inside for the agent
    ├── AgentError                   talking to the in-sandbox agent
    │   ├── AgentUnreachable
    │   ├── ProtocolError
    │   └── RemoteError              the agent reported a failure
    │       ├── SandboxFileNotFound  (also a FileNotFoundError)
    │       ├── SandboxPermissionError (also a PermissionError)
    │       └── SandboxFileExists    (also a FileExistsError)
    ├── CommandTimeout               (also a TimeoutError)
    ├── CommandFailed                non-zero exit where success was required
    ├── SyncError
    └── HostFileError                a host-side file refused (a link or non-file in the
                                     way) or impossible (no space, no such directory)

Low-level exceptions (docker, sqlite, sockets) are mapped to the most specific of these at
the boundary where they happen, with ``raise ... from exc``, so callers never need to know
which engine or transport sits underneath.
"""

from __future__ import annotations


class AivaError(Exception):
    """Base of every aiva error. ``hint`` says what to do next; ``recoverable`` says whether
    retrying the same call can succeed without a person changing something."""

    recoverable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(AivaError):
    pass


class InvalidValue(AivaError, ValueError):
    pass


class SandboxNotFound(AivaError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"no sandbox named '{name}'",
            hint="list sandboxes with `aiva ls`; create one with `aiva start NAME`",
        )
        self.name = name


class SandboxExists(AivaError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"a sandbox named '{name}' already exists",
            hint=f"pick another name, or remove it first with `aiva rm {name}`",
        )
        self.name = name


class InvalidTransition(AivaError):
    def __init__(self, name: str, state: str, action: str, hint: str | None = None) -> None:
        super().__init__(f"cannot {action} sandbox '{name}': it is {state}", hint=hint)
        self.name = name
        self.state = state
        self.action = action


class BackendError(AivaError):
    pass


class BackendUnavailable(BackendError):
    recoverable = True


class ImageError(AivaError):
    pass


class ImageNotFound(ImageError):
    pass


class ImageUnsupported(ImageError):
    pass


class AgentError(AivaError):
    pass


class AgentUnreachable(AgentError):
    recoverable = True


class ProtocolError(AgentError):
    pass


class RemoteError(AgentError):
    """The agent ran the request and it failed; ``kind`` is the agent's error class name."""

    def __init__(self, message: str, *, kind: str = "Error", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


class SandboxFileNotFound(RemoteError, FileNotFoundError):
    pass


class SandboxPermissionError(RemoteError, PermissionError):
    pass


class SandboxFileExists(RemoteError, FileExistsError):
    pass


class SandboxFileUnsupported(RemoteError):
    """Not a regular file (a FIFO, a device, a socket): the agent streams none of those."""

    def __init__(self, message: str, *, kind: str = "UnsupportedFileType",
                 hint: str | None = None) -> None:
        super().__init__(message, kind=kind, hint=hint or "only regular files are read or "
                         "copied; copy what it points to into a file first")


class CommandTimeout(AivaError, TimeoutError):
    recoverable = True


class CommandFailed(AivaError):
    def __init__(self, message: str, *, exit_code: int, stderr: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr = stderr


class SyncError(AivaError):
    pass


class HostFileError(AivaError):
    """Writing what a sandbox sent onto the host was refused or cannot be done."""


class DesktopError(AivaError):
    """A desktop sandbox's screen cannot be shown or recorded (not running, not ready)."""


class NotADesktop(DesktopError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name} has no desktop",
            hint="make one with `aiva start NAME --template desktop` "
                 "(build the image first: `aiva image build desktop`)",
        )
        self.name = name


def remote_error(kind: str, message: str) -> RemoteError:
    """Map an error the agent reports to the most specific host-side type."""
    cls: type[RemoteError] = {
        "FileNotFoundError": SandboxFileNotFound,
        "NotADirectoryError": SandboxFileNotFound,
        "PermissionError": SandboxPermissionError,
        "FileExistsError": SandboxFileExists,
        "UnsupportedFileType": SandboxFileUnsupported,
    }.get(kind, RemoteError)
    return cls(message, kind=kind)
