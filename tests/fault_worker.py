"""A torchrun entry point for tests: `launch.train` whose input turns NaN on rank
$LAMINAR_TEST_FAULT_RANK at step $LAMINAR_TEST_FAULT_STEP, on the first attempt only."""
import os
import sys

from tests.ranks import poison_input_at

if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        and os.environ["RANK"] == os.environ["LAMINAR_TEST_FAULT_RANK"]):
    poison_input_at(int(os.environ["LAMINAR_TEST_FAULT_STEP"]))

from launch.train import main  # noqa: E402

sys.exit(main())
