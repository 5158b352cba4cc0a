"""`python -m glm6b`: the glm6b command line (see glm6b/cli.py)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
