"""cfsctl: command-line client of the cfsd varlink daemon (imports nothing from cfsd)."""
