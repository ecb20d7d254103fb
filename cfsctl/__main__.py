"""``python -m cfsctl``."""

from cfsctl.main import main

if __name__ == "__main__":
    raise SystemExit(main())
