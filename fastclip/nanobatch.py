"""NanoBatch mode (placeholder while it is being written)."""


class NanoBatch:
    def __init__(self, engine, nanobatch_size=1, num_threads=None):
        raise NotImplementedError("mode='nanobatch' is being implemented")
