"""`lstmwatch demo`: small LSTMs trained on CPU, one healthy and one per failure the article names, each
watched by lstmwatch; what it finds in each is printed, and every run's log and report written to a folder.

Not part of lstmwatch's core: nothing in the core imports this package. `scenarios` holds the seeded
training runs (also used by benchmarks/zoo.py and the tests), `runner` the demo itself.
"""

from .runner import Outcome, Progress, run_demo, verdict

__all__ = ["Outcome", "Progress", "run_demo", "verdict"]
