"""``python -m benchmarks.speed``."""

from benchmarks.speed._cli import main

if __name__ == "__main__":
  raise SystemExit(main())
