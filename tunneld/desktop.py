"""What a browser started for the user needs from their desktop session.  Standard library
only (tunnelctl's service installer uses it too)."""

#: the environment variables that connect a program to the graphical session: the daemon
#: imports them from systemd's user manager when it has none, `tunnelctl service install`
#: exports them to it
GRAPHICAL_ENV = ("DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY")
