"""A search callback that stops a search at a given step, as a kill would (the resume tests)."""
from nasprune.search import Callback


class Kill(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, searcher, step, metrics):
        if step == self.at:
            raise KeyboardInterrupt("killed")
