"""Two LGM steps on a tiny ViT with a pyramid growth between them, for tests/test_multiprocess.py.

The test process (one process, 8 devices) builds the inputs with `setup()`, saves them with
`save_inputs()` and runs `run_steps()`; this script runs the same steps as one of several
processes joined with `jax.distributed`:

    python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES INPUTS.npz OUT.npz STATE_SHARDING

It loads the inputs instead of initialising the model again (eager initialisation costs more
CPU than the steps), puts its own contiguous block of the global real batch on its local devices
as the distillation run does, saves the final state with orbax (every process its part, into one
directory), restores it from that checkpoint alone, and writes the restored levels (gathered
from every process's devices when the state is class-sharded) and the step losses to OUT.npz.
"""

from __future__ import annotations

import os
import sys

import numpy as np

NUM_STEPS = 2


def build(state_sharding: str = "replicated"):
    """The static part: (model, features, step config, optimizer). Class-sharded state has two
    images per class, so that its 8 synthetic images split over the 8 devices."""
    from lgm_jax import augment, lgm
    from lgm_jax.models import registry, vit

    backbone = registry.get("dinov2_tiny", width=32, mlp_dim=64, layer_scale=False)
    model, features = vit.ViT(backbone.config), backbone.features
    cfg = lgm.StepConfig(
        num_classes=4,
        ipc=2 if state_sharding == "class" else 1,
        state_sharding=state_sharding,
        aug_rounds=2,
        syn_res=32,
        probe_std=1.0,
        chunk_size=1,
        augment=augment.AugmentConfig(input_res=28),
    )
    return model, features, cfg, lgm.optimizer()


def _init(model, cfg, tx):
    import jax
    import jax.numpy as jnp

    from lgm_jax import lgm

    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
    return params, lgm.init_state(jax.random.key(0), cfg, tx, start_res=[1, 2])


def setup(state_sharding: str = "replicated"):
    """(params, state, real [R, 32, 32, 3] uint8, labels [R] int32): the inputs of the steps."""
    model, _, cfg, tx = build(state_sharding)
    params, state = _init(model, cfg, tx)
    real = np.random.default_rng(0).integers(0, 256, (cfg.num_real, 32, 32, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 0, 0, 1, 2] * (cfg.num_real // 8), np.int32)
    return params, state, real, labels


def save_inputs(path, inputs):
    import jax

    np.savez(path, *[np.asarray(x) for x in jax.tree_util.tree_leaves(inputs)])


def load_inputs(path, state_sharding: str = "replicated"):
    """The inputs saved by `save_inputs`, as host arrays."""
    import jax

    model, _, cfg, tx = build(state_sharding)
    # The tree structure without running the initialisers.
    shapes = jax.eval_shape(lambda: _init(model, cfg, tx))
    with np.load(path) as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    treedef = jax.tree_util.tree_structure((*shapes, 0, 0))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def run_steps(
    inputs, state_sharding: str = "replicated", num_steps: int = NUM_STEPS, ckpt_dir=None
):
    """`num_steps` sharded steps over all devices of all processes, the pyramid growing by one
    level after the first: (levels, losses) as numpy. With `ckpt_dir`, the final state is saved
    with orbax by every process and the levels returned are those restored from it."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lgm_jax import distill, lgm

    _, features, cfg, tx = build(state_sharding)
    params, state, real, labels = inputs
    mesh = lgm.data_mesh()
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    # As the distillation run does: the state (its key included, as raw key data) and the
    # parameters are plain arrays over devices that span both processes; the state replicated
    # or split by image.
    place = lambda s: lgm.state_sharding(s, mesh, state_sharding == "class")
    state = jax.device_put(state, place(state))
    params = jax.device_put(params, replicated)
    per_process = cfg.num_real // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    real = jax.make_array_from_process_local_data(sharded, np.asarray(real)[rows])
    labels = jax.make_array_from_process_local_data(sharded, np.asarray(labels)[rows])
    step = lgm.make_step(features, 32, tx, cfg, mesh=mesh)
    losses = []
    for i in range(num_steps):
        if i == 1:
            state = distill.grow_state(state, tx, "noise", place)
        state, metrics = step(state, params, real, labels)
        losses.append(float(metrics["loss"]))  # replicated, so readable in every process
    if ckpt_dir is not None:
        state = _save_and_restore(state, cfg, tx, place, ckpt_dir)
    return list(distill.host_levels(state.levels)), np.array(losses)


def _save_and_restore(state, cfg, tx, place, ckpt_dir):
    """What a preempted multi-host run does: every process saves its part of the state, then
    restores it (into the same layout) from the checkpoint alone."""
    import jax

    from lgm_jax import checkpoint, lgm

    mngr = checkpoint.manager(ckpt_dir, keep=3)
    ident = {"run": "multiprocess"}
    checkpoint.save(mngr, state, checkpoint.record(state, ident))
    template = jax.eval_shape(lambda: lgm.init_state(jax.random.key(0), cfg, tx, start_res=[1, 2]))
    restored, _ = checkpoint.restore(mngr, template, tx, ident, place, "noise")
    assert int(restored.step) == int(state.step) and len(restored.levels) == len(state.levels)
    for new, old in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        assert new.sharding.is_equivalent_to(old.sharding, old.ndim), (new.sharding, old.sharding)
    return restored


def main(argv):
    port, process_id, num_processes = int(argv[1]), int(argv[2]), int(argv[3])
    inputs_path, out, state_sharding = argv[4], argv[5], argv[6]
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices",
        flush=True,
    )
    inputs = load_inputs(inputs_path, state_sharding)
    ckpt_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "ckpt")
    levels, losses = run_steps(inputs, state_sharding, ckpt_dir=ckpt_dir)
    np.savez(
        out,
        losses=losses,
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        **{f"level{i}": lv for i, lv in enumerate(levels)},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
