"""tunnelctl: the thin control client of tunneld."""
