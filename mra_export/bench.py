"""``mra-export bench`` (issue 6)."""


def add_bench_arguments(parser):
    pass


def run_bench_from_args(args):
    raise NotImplementedError
