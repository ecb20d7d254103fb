"""``python -m cfsd``: run the daemon."""

from cfsd.service.main import main

if __name__ == "__main__":
    raise SystemExit(main())
