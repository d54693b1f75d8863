"""A checkpoint write cut short (SIGKILL during orbax's async save) is never taken for a checkpoint."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp

from configs import tiny
from musenet_jax import train


def test_latest_step_skips_a_torn_write(tmp_path):
    config = tiny.get_config()
    manager = train.checkpoint_manager(str(tmp_path), config)
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)})))
    manager.wait_until_finished()
    manager.close()
    # What a process killed while writing step 8 leaves: orbax's temporary directory, partly written.
    torn = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1764000000000000"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "partial").write_bytes(b"\0" * 10)

    manager = train.checkpoint_manager(str(tmp_path), config)
    assert manager.latest_step() == 4 and manager.all_steps() == [4]
    restored = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    np.testing.assert_array_equal(restored.state["w"], np.arange(3.0))
    manager.close()
