"""``python -m fastgrad bench [...]``: the benchmark suite (see fastgrad/bench/)."""
import sys

USAGE = """usage: python -m fastgrad bench [--help] [options]

  bench   fastgrad.grad vs torch.autograd.grad (and torch.func, torch.compile) on the same
          graphs, every result checked against torch before it is timed; writes a table,
          a JSON file and a speedup plot (python -m fastgrad bench --help for the options)"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] != "bench":
        print(USAGE, file=sys.stderr)
        return 2
    from . import bench
    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
