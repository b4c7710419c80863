"""One exception root for tunneld.

Every error a user can see is a ``TunneldError``; its message is a sentence a person can act
on (what failed, for which host/port, what to do).  Foreign errors (``OSError``,
``asyncssh.Error``) are converted where they enter: in ``forward``, ``host`` and ``control``.

    TunneldError
    ├── UsageError          bad input from the user: spec grammar, arguments, unknown host name
    │   └── SpecError       a forward spec that does not parse
    ├── urls.Refused        a URL the opener will not open (also a ValueError; pure module)
    ├── ConfigError         config.toml or the state file is invalid
    ├── ProtocolError       a control-socket message that is malformed, too long, or unknown
    ├── BindError           a local listener could not be bound (port in use, permission)
    ├── StateError          the state file could not be written (the change is not made)
    ├── NotFound            a host, forward or session that does not exist
    ├── SessionError        a session's command could not start, or failed at once
    └── ConnectError        the SSH connection to a host failed
        ├── AuthError       the server refused our credentials, or needs a person (needs-auth)
        │   ├── LoginNeeded     it wants answers (password, code, passphrase) and no terminal waits
        │   └── LoginAbandoned  the person did not answer (^C, terminal closed, timed out)
        └── HostKeyError    the host key is unknown or changed (never accepted silently)

``DaemonUnavailable`` is the client's own: the daemon could not be reached or started.

On the wire an error is ``{"type": <class name>, "message": str(exc)}``.
"""


class TunneldError(Exception):
    """Root of every error tunneld reports."""


class UsageError(TunneldError):
    """The user asked for something that cannot be done as written."""


class SpecError(UsageError):
    """A forward spec does not follow the grammar."""


class ConfigError(TunneldError):
    """A configuration or state file is invalid."""


class ProtocolError(TunneldError):
    """A control-socket message is malformed, too long, or names an unknown command."""


class BindError(TunneldError):
    """A local listener could not be bound."""


class StateError(TunneldError):
    """The state file could not be written (disk full, read-only): the change is refused."""


class NotFound(TunneldError):
    """No such host, forward or session."""


class SessionError(TunneldError):
    """A session's command could not be started on the server, or failed at once."""


class ConnectError(TunneldError):
    """The SSH connection to a host failed."""


class AuthError(ConnectError):
    """Authentication failed or needs a person."""


class LoginNeeded(AuthError):
    """The login needs a person's answers and no tunnelctl with a terminal is waiting."""


class LoginAbandoned(AuthError):
    """A person was asked and did not answer (cancelled, terminal closed, timed out)."""


class HostKeyError(ConnectError):
    """The server's host key is unknown or does not match known_hosts."""


class DaemonUnavailable(TunneldError):
    """The daemon could not be reached or started."""


#: name → class, so a client can rebuild an error from its wire form
BY_NAME = {cls.__name__: cls for cls in (
    TunneldError, UsageError, SpecError, ConfigError, ProtocolError, BindError, StateError,
    NotFound, SessionError,
    ConnectError, AuthError, LoginNeeded, LoginAbandoned, HostKeyError, DaemonUnavailable)}
