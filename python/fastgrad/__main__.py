"""``python -m fastgrad bench [...]``: the benchmark suite (see fastgrad/bench.py)."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "bench":
        print("usage: python -m fastgrad bench [--help]", file=sys.stderr)
        return 2
    from . import bench
    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
