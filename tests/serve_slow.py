"""`reward serve` whose every forward pass first sleeps REWARD_TEST_FORWARD_DELAY_S seconds, so a
test can keep requests in flight across a SIGTERM with a tiny model. Test-only: it swaps the
backend class the registry builds, then runs the ordinary command line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import registry  # noqa: E402
from reward_cli import main  # noqa: E402

DELAY_S = float(os.environ.get("REWARD_TEST_FORWARD_DELAY_S", "0"))


class SlowTorchBackend(registry.TorchBackend):
    def score_batch(self, batch):
        time.sleep(DELAY_S)
        return super().score_batch(batch)


registry.TorchBackend = SlowTorchBackend

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
